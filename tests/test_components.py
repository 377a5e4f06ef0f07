"""`benchmarks/components.py`: which 3-D region each rule keeps, the step's own rule scoring as `evaluate` does
on real cases with the shipped model, and nothing written over what exists."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import data_without

from lgg import evaluate, postprocess

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import components  # noqa: E402

SHIPPED = ROOT / "models" / "unet"


def test_each_rule_keeps_its_region_and_gaps_are_never_joined():
    probabilities = np.zeros((4, 16, 16), np.float32)
    probabilities[0, 2:4, 2:4] = 1.0  # the tumor: 4 px, the highest peak
    probabilities[1:3, 8:12, 8:12] = 0.9  # the most voxels: 32 px ...
    probabilities[2, 12:16, 12:16] = 0.6  # ... and 16 touching it diagonally: one region of 48 px, sum 38.4
    probabilities[3, 0:6, 0:7] = 0.99  # slice 5: 42 px, sum 41.6, the most probability
    probabilities[3, 8:10, 8:10] = 0.95  # slice 5, after the missing slice 4: its own region (4 px), never joined
    true = probabilities == 1.0
    settings = {**postprocess.RAW, "threshold": 0.5}
    table, kept = components.regions(probabilities, true, np.array([1, 2, 3, 5]), settings)
    assert table["voxels"].tolist() == [4, 48, 42, 4]
    assert table[["first_slice", "last_slice"]].values.tolist() == [[1, 1], [2, 3], [5, 5], [5, 5]]
    assert table["true_voxels_inside"].tolist() == [4, 0, 0, 0]
    assert kept["all"].sum() == 98
    assert kept["voxels"].sum() == 48 and not kept["voxels"][true].any()  # the step drops the tumor
    assert kept["voxels"][1:3, 8:12, 8:12].all()
    assert kept["probability_sum"].sum() == 42 and kept["probability_sum"][3, 0:6, 0:7].all()
    assert (kept["peak"] == true).all()  # the highest peak keeps it
    assert (kept["voxels"] == postprocess.largest_component_3d(probabilities >= 0.5, [1, 2, 3, 5])).all()
    probabilities[3, 0:6, 0:7] = 1.0  # two peaks of 1.0: the one with more probability is kept
    _, kept = components.regions(probabilities, true, np.array([1, 2, 3, 5]), settings)
    assert kept["peak"].sum() == 42
    empty, kept = components.regions(np.zeros((2, 8, 8), np.float32), np.zeros((2, 8, 8), bool), [1, 2], settings)
    assert empty.empty and all(not mask.any() for mask in kept.values())


def test_the_step_scores_as_evaluate_on_real_cases(real_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "shipped"
    run.mkdir()
    for name in components.RUN_FILES:
        shutil.copy(SHIPPED / name, run / name)
    split = pd.read_csv(run / "split.csv")
    cases = sorted(set(split.query("split == 'test'").case_id))[:2]
    monkeypatch.setattr(components, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    argv = ["--data", str(real_data), "--name", "t", str(run), "--cases", *cases]
    components.main(argv)
    assert "shipped test (2 cases)" in capsys.readouterr().out
    result = json.loads((tmp_path / "results" / "components-t.json").read_text())
    regions = pd.read_csv(tmp_path / "results" / "components-t.csv")
    assert len(regions) and set(regions.case_id) <= set(cases) and (regions.voxels > 0).all()
    [row] = result["mean_case_dice"]
    # the step's rule is `lgg.postprocess` with the largest 3-D component switched on, scored as `evaluate` does
    settings = {**postprocess.load(run / "model.h5"), "largest_3d": True}
    slices = evaluate.slices_with_split(real_data, run / "split.csv")
    scored = evaluate.score(
        evaluate.load_model(run / "model.h5"), slices[slices.case_id.isin(cases)], "test", postprocessing=settings
    )
    assert row["voxels"] == pytest.approx(scored.table["case_dice"].mean(), abs=1e-4)
    settings["largest_3d"] = False  # and every region kept is the same without the step
    scored = evaluate.score(evaluate.load_model(run / "model.h5"), slices[slices.case_id.isin(cases)], "test",
                            postprocessing=settings)  # fmt: skip
    assert row["all"] == pytest.approx(scored.table["case_dice"].mean(), abs=1e-4)

    before = (tmp_path / "results" / "components-t.json").read_bytes()
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "test_slices.csv").write_text("case_id\n")
    part = data_without(real_data, tmp_path / "part", cases[0])  # a score without one of the run's test cases
    for bad, message in (
        (argv, "exists: choose another --name"),
        (["--name", "u", str(tmp_path / "nowhere")], "is not a segmenter run folder: it has no model.h5"),
        (["--name", "../u", str(run)], "--name may hold letters"),
        (["--name", "u", str(run), str(classifier)], "is a classifier's run"),
        (["--data", str(real_data), "--name", "u", str(run), "--cases", "TCGA_XX_0000"], "are not validation or test"),
        (["--data", str(part), "--name", "u", str(run)], f"1 validation / test cases of {run} are not in {part}"),
    ):
        with pytest.raises(SystemExit, match=message):
            components.main(bad)
    assert (tmp_path / "results" / "components-t.json").read_bytes() == before
    assert not (tmp_path / "results" / "components-u.csv").exists()
