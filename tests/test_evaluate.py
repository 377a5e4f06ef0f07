"""Scoring apart from writing: `score` returns arrays and tables and writes nothing; `save_tables`
and `save_plots` write exactly what `evaluate_run` writes, with the same figures."""

import json

import numpy as np
import pandas as pd
import pytest

from lgg import data, evaluate, metrics, models, postprocess, train


@pytest.fixture(scope="module")
def slices(real_data):
    table = data.find_slices(real_data, max_cases=3)
    return table.assign(split="test")


@pytest.fixture(scope="module")
def segmenter():
    import keras

    keras.utils.set_random_seed(0)
    return train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation")


def test_score_writes_nothing_and_matches_what_evaluate_run_writes(slices, segmenter, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = {**postprocess.RAW, "threshold": 0.3, "largest_3d": True}
    evaluation = evaluate.score(segmenter, slices, "test", postprocessing=settings)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even into the working folder
    assert evaluation.images.shape == (len(slices), 256, 256, 3) and evaluation.predicted.shape == (
        len(slices),
        256,
        256,
    )
    # the per-case Dice is the Dice of each case's whole volume, from the arrays it returns
    for case_id, rows in evaluation.rows.reset_index(drop=True).groupby("case_id"):
        truth = evaluation.masks[rows.index, ..., 0].astype(bool)
        expected = metrics.dice_score(truth, evaluation.predicted[rows.index])
        actual = evaluation.table.set_index("case_id").loc[case_id, "case_dice"]
        assert actual == pytest.approx(expected, abs=1e-9)
    assert evaluation.steps is not None and evaluation.summary["postprocessing"] == settings

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    summary = evaluate.evaluate_run(segmenter, slices, run_dir, "test", postprocessing=settings)
    written = {path.name for path in run_dir.iterdir()}
    assert written == {"test_cases.csv", "test_postprocessing.csv", "test_postprocessing_cases.csv",
                       "test_summary.json", "test_case_dice.png", "test_overlays.png"}  # fmt: skip
    # every setting's Dice per case is recorded; the chosen setting's column is the scored Dice
    by_setting = pd.read_csv(run_dir / "test_postprocessing_cases.csv").set_index("case_id")
    assert by_setting.shape == (evaluation.table["case_id"].nunique(), len(list(postprocess.candidates())))
    chosen = by_setting[postprocess.setting_key(settings)].loc[evaluation.table["case_id"]]
    np.testing.assert_allclose(chosen, evaluation.table["case_dice"], atol=5e-5)
    assert json.loads((run_dir / "test_summary.json").read_text()) == json.loads(json.dumps(evaluation.summary))
    assert summary["case_dice_mean"] == evaluation.summary["case_dice_mean"]
    saved = pd.read_csv(run_dir / "test_cases.csv")
    np.testing.assert_allclose(saved["case_dice"], evaluation.table["case_dice"], atol=1e-9)


def test_classifier_scores_per_slice(slices, tmp_path):
    classifier = train.compile_model(models.build_classifier((32, 32, 3), backbone="light"), "classification")
    evaluation = evaluate.score(classifier, slices, "test")
    assert evaluation.predicted is None and evaluation.steps is None
    assert len(evaluation.table) == len(slices) and evaluation.table["probability"].between(0, 1).all()
    evaluate.save_tables(evaluation, tmp_path)
    evaluate.save_plots(evaluation, tmp_path)
    assert {path.name for path in tmp_path.iterdir()} == {"test_slices.csv", "test_summary.json",
                                                          "test_roc_confusion.png"}  # fmt: skip


def test_score_refuses_an_empty_split(slices, segmenter):
    with pytest.raises(ValueError, match="no slices in split 'val'"):
        evaluate.score(segmenter, slices, "val")


def test_cases_trained_on_reads_the_split_beside_the_model(tmp_path):
    pd.DataFrame(
        {"case_id": ["A", "A", "B", "C", "D"], "slice_index": [1, 2, 1, 1, 1], "split": ["train"] * 3 + ["val", "test"]}
    ).to_csv(tmp_path / "split.csv", index=False)
    model = tmp_path / "model.h5"
    assert evaluate.cases_trained_on(model, ["D", "C", "B", "X"]) == ["B"]
    assert evaluate.cases_trained_on(model, ["D", "C", "B"], parts=("train", "val")) == ["B", "C"]
    assert evaluate.cases_trained_on(tmp_path / "elsewhere" / "model.h5", ["B"]) is None  # unknown, not "none seen"
