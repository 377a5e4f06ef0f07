"""`python -m lgg` end to end on a few real cases: train, evaluate, predict; and the demo set."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from lgg import data, metrics, postprocess, train
from lgg.files import file_sha256

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # benchmarks/pooled_postprocessing.py

# The run scored its test cases with the model in memory (XLA where `train` uses it); these commands reload
# model.h5 (plain kernels), whose probabilities differ by ~1e-5, so a pixel at the threshold can flip: a case Dice
# moves by ~1e-4 at most. A scoring error moves it by far more.
SAME_SCORE = 1e-3


def lgg(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "lgg", *map(str, args)], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(
            f"lgg {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.fixture(scope="module")
def run_dir(real_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "unet"
    lgg(
        "train",
        "unet",
        "--data",
        real_data,
        "--out",
        out,
        "--epochs",
        1,
        "--image-size",
        64,
        "--max-cases",
        6,
        "--batch-size",
        8,
        "--base-filters",
        8,
        "--snapshot-minutes",
        0,
    )
    return out


@pytest.fixture(scope="module")
def classifier_dir(real_data, run_dir):
    out = run_dir.parent / "classifier"
    lgg("train", "classifier", "--data", real_data, "--out", out, "--epochs", 1, "--image-size", 64,
        "--max-cases", 6, "--batch-size", 8, "--precision", "mixed_bfloat16")  # fmt: skip
    return out


def test_a_mixed_precision_run_exports_a_float32_model(classifier_dir):
    assert json.loads((classifier_dir / "config.json").read_text())["precision"] == "mixed_bfloat16"
    model = keras.saving.load_model(classifier_dir / "model.h5")
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    assert model.loss is not None  # compiled like a float32 run's export


def test_tuning_a_classifiers_post_processing_is_refused(classifier_dir, real_data, tmp_path):
    """A classifier has no post-processing: --tune-postprocessing was a silent no-op."""
    refused = lgg("evaluate", "--model", classifier_dir / "model.h5", "--data", real_data, "--out", tmp_path / "t",
                  "--tune-postprocessing", check=False)  # fmt: skip
    assert refused.returncode == 2 and "is a classifier" in refused.stderr and not (tmp_path / "t").exists()


@pytest.mark.slow
def test_train_writes_the_whole_run_folder(run_dir):
    for name in (
        "model.h5",
        "model.keras",
        "best.weights.h5",
        "history.csv",
        "split.csv",
        "config.json",
        "curves.png",
        "test_cases.csv",
        "test_summary.json",
        "test_case_dice.png",
        "test_overlays.png",
        "postprocess.json",
        "val_postprocessing.csv",
        "test_postprocessing.csv",
        "val_postprocessing_cases.csv",
        "test_postprocessing_cases.csv",
        "snapshots/after-0min.weights.h5",
        "snapshots/curve.csv",
        "snapshots/after-0min/val_postprocessing_cases.csv",
        "snapshots/after-0min/test_postprocessing_cases.csv",
    ):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed"] == 0 and config["environment"]["keras"]
    history = pd.read_csv(run_dir / "history.csv")
    assert {"loss", "val_dice_coefficient", "val_case_dice", "elapsed_s", "train_slices_per_s"} <= set(history.columns)
    assert np.isfinite(history.train_slices_per_s).all() and (history.train_slices_per_s > 0).all()
    assert config["jit_compile"] is None and config["jit_compile_used"] == train.resolve_jit_compile(None)
    # the precision too is the machine's choice (bfloat16 on a CPU with AVX-512 BF16), and the exported model float32
    assert config["precision"] is None and config["precision_used"] == train.precision_by_default(
        config["jit_compile_used"]
    )
    assert {layer.dtype_policy.name for layer in keras.saving.load_model(run_dir / "model.h5").layers} == {"float32"}
    summary = json.loads((run_dir / "test_summary.json").read_text())
    assert summary["postprocessing"] == json.loads((run_dir / "postprocess.json").read_text())
    assert set(summary["raw"]) == set(metrics.SEGMENTATION_SUMMARY_KEYS)
    steps = pd.read_csv(run_dir / "test_postprocessing.csv")
    assert steps["step"].iloc[0] == "raw, threshold 0.5" and steps["step"].iloc[-1] == "chosen on validation"
    assert steps["case_dice_mean"].iloc[-1] == pytest.approx(summary["case_dice_mean"])
    # each case under every setting: on validation the grid the choice was made on, on test the chosen column scored
    grid = pd.read_csv(run_dir / "val_postprocessing.csv")
    means = postprocess.long_case_table(run_dir / "val_postprocessing_cases.csv").groupby(list(postprocess.RAW))
    grid = grid.set_index(list(postprocess.RAW))["case_dice_mean"]
    np.testing.assert_allclose(means["case_dice"].mean().loc[grid.index], grid, atol=1e-4)
    chosen = pd.read_csv(run_dir / "test_postprocessing_cases.csv").set_index("case_id")[
        postprocess.setting_key(summary["postprocessing"])
    ]
    scored = pd.read_csv(run_dir / "test_cases.csv").set_index("case_id")["case_dice"]
    np.testing.assert_allclose(chosen.loc[scored.index], scored, atol=1e-4)
    curve = pd.read_csv(run_dir / "snapshots" / "curve.csv")
    assert list(curve["minutes"]) == [0] and curve["epoch"].iloc[0] == 1
    split = pd.read_csv(run_dir / "split.csv")
    assert split.groupby("case_id")["split"].nunique().max() == 1 and set(split.split) == {"train", "val", "test"}


def test_pooled_post_processing_leaves_out_the_folds_test_patients(run_dir, real_data, tmp_path):
    """benchmarks/pooled_postprocessing.py: the run's own figures rescored from the grid give its
    val_postprocessing.csv and test_cases.csv again; of the other folds' validation cases, those that are this
    fold's test patients are left out of its choice, the others count."""
    import pooled_postprocessing as pooled

    from lgg import postprocess

    grid = pooled.run_grid(run_dir, real_data)  # raises when the run's own figures do not come out again
    assert len(grid) == len(list(postprocess.candidates())) * grid.drop_duplicates(["split", "case_id"]).shape[0]
    validation_cases = pd.read_csv(run_dir / "split.csv").query("split == 'val'").case_id.nunique()
    # a fold whose validation patients are this one's test patients: they are left out, the choice is the run's own
    swapped = grid.assign(fold="swapped", split=grid["split"].map({"val": "test", "test": "val"}))
    choice, cases = pooled.pooled_choice(pd.concat([grid, swapped]), run_dir.name)
    assert cases == validation_cases and choice == postprocess.load(run_dir / "model.h5")
    # a fold whose validation patients are not: they count (the same scores twice: the same choice)
    again = grid.assign(fold="again")
    choice, cases = pooled.pooled_choice(pd.concat([grid, swapped, again]), run_dir.name)
    assert cases == 2 * validation_cases and choice == postprocess.load(run_dir / "model.h5")
    result = pooled.compare(grid, [run_dir])
    assert result["pooled_vs_own"]["mean_difference"] == 0
    assert result["cases"] == len(pd.read_csv(run_dir / "test_cases.csv"))
    with pytest.raises(SystemExit, match="is not scored once for each case"):
        pooled.test_dice(grid, {**postprocess.RAW, "threshold": 0.55})
    for runs, words in (
        ([run_dir], "two or more"),
        ([run_dir, run_dir], "named twice"),
        ([run_dir, tmp_path / "x"], "not a finished"),
    ):
        with pytest.raises(SystemExit, match=words):
            pooled.check_runs(runs)


@pytest.mark.slow
def test_evaluate_prints_per_case_dice(run_dir, real_data, tmp_path):
    result = lgg("evaluate", "--model", run_dir / "model.h5", "--data", real_data, "--out", tmp_path)
    per_case = pd.read_csv(run_dir / "test_cases.csv")
    for case_id in per_case.case_id:
        assert case_id in result.stdout
    again = json.loads((tmp_path / "test_summary.json").read_text())
    first = json.loads((run_dir / "test_summary.json").read_text())
    assert again["case_dice_mean"] == pytest.approx(first["case_dice_mean"], abs=SAME_SCORE)
    assert 0 <= first["case_dice_mean"] <= 1
    # the summary's interval is the bootstrap interval of the per-case table (NaN for identical scores)
    np.testing.assert_allclose(
        first["case_dice_mean_ci95"], metrics.mean_confidence_interval(per_case.case_dice), equal_nan=True
    )
    tuned = tmp_path / "tuned"
    lgg("evaluate", "--model", run_dir / "model.h5", "--data", real_data, "--out", tuned, "--tune-postprocessing")
    chosen = json.loads((tuned / "postprocess.json").read_text())
    assert json.loads((tuned / "test_summary.json").read_text())["postprocessing"] == chosen
    assert (tuned / "val_postprocessing.csv").is_file()


@pytest.mark.slow
def test_predicted_masks_score_like_evaluate(run_dir, real_data, tmp_path):
    per_case = pd.read_csv(run_dir / "test_cases.csv")
    case_id = per_case.case_id.iloc[0]
    lgg("predict", "--model", run_dir / "model.h5", "--out", tmp_path, real_data / case_id, "--pixel-spacing-mm", 0.5)
    slices = data.find_slices(real_data, max_cases=6)
    slices = slices[slices.case_id == case_id]
    predicted = np.stack([data.read_mask(tmp_path / case_id / f"{case_id}_{i}_pred.tif") for i in slices.slice_index])
    truth = np.stack([data.read_mask(path) for path in slices.mask_path])
    assert metrics.dice_score(truth, predicted) == pytest.approx(per_case.case_dice.iloc[0], abs=SAME_SCORE)
    row = pd.read_csv(tmp_path / "cases.csv").iloc[0]
    assert row.case_id == case_id and row.slices == len(slices) and row.tumor_area_px_total == predicted.sum()
    assert row.tumor_area_mm2_total == pytest.approx(0.25 * predicted.sum())
    with_tumor = [i for i, mask in zip(slices.slice_index, predicted) if mask.any()]
    overlays = sorted(path.name for path in (tmp_path / case_id).glob("*_overlay.png"))
    assert overlays == sorted(f"{case_id}_{i}_overlay.png" for i in with_tumor)
    assert (tmp_path / case_id / f"{case_id}_montage.png").is_file() == bool(with_tumor)
    assert not list(tmp_path.rglob(".partial-*"))


@pytest.mark.slow
def test_two_stage_pipeline_is_scored_and_used_by_predict(run_dir, classifier_dir, real_data, tmp_path):
    lgg("evaluate", "--model", run_dir / "model.h5", "--classifier", classifier_dir / "model.h5", "--data", real_data,
        "--out", tmp_path)  # fmt: skip
    summary = json.loads((tmp_path / "two_stage.json").read_text())
    assert summary["classifier_sha256"] == file_sha256(classifier_dir / "model.h5")  # predict checks it
    alone = json.loads((run_dir / "test_summary.json").read_text())
    assert summary["segmenter_alone"]["case_dice_mean"] == pytest.approx(alone["case_dice_mean"], abs=SAME_SCORE)
    assert summary["two_stage"]["tumor_free_false_positive_rate"] <= alone["tumor_free_false_positive_rate"]
    table = pd.read_csv(tmp_path / "two_stage_test.csv")
    assert len(table) == 11 and summary["gate_threshold"] in set(table["gate_threshold"])
    case_id = pd.read_csv(run_dir / "test_cases.csv").case_id.iloc[0]
    out, plain = tmp_path / "gated", tmp_path / "plain"
    lgg("predict", "--model", run_dir / "model.h5", "--classifier", classifier_dir / "model.h5", "--gate-threshold",
        0.999, "--out", out, real_data / case_id)  # fmt: skip
    lgg("predict", "--model", run_dir / "model.h5", "--out", plain, real_data / case_id)
    gated_area = pd.read_csv(out / "cases.csv").tumor_area_px_total.iloc[0]
    assert gated_area <= pd.read_csv(plain / "cases.csv").tumor_area_px_total.iloc[0]  # the gate only removes
    refused = lgg("predict", "--model", run_dir / "model.h5", "--classifier", classifier_dir / "model.h5",
                  "--gate-threshold", 1.01, "--out", tmp_path / "above", real_data / case_id, check=False)  # fmt: skip
    assert refused.returncode == 2 and "--gate-threshold" in refused.stderr and not (tmp_path / "above").exists()
    wrong = lgg("predict", "--model", run_dir / "model.h5", "--classifier", run_dir / "model.h5", "--out",
                tmp_path / "wrong", real_data / case_id, check=False)  # fmt: skip
    assert wrong.returncode == 2 and "needs a classifier" in wrong.stderr


@pytest.mark.slow
def test_second_run_into_the_same_folder_is_refused(run_dir, real_data):
    result = lgg("train", "unet", "--data", real_data, "--out", run_dir, "--epochs", 1, check=False)
    assert result.returncode == 2 and "--overwrite" in result.stderr


def test_missing_data_gives_a_clear_message(tmp_path):
    result = lgg("train", "unet", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", check=False)
    assert result.returncode == 2
    assert "data folder not found" in result.stderr and "python -m lgg download" in result.stderr


def test_a_malformed_fold_is_refused_before_the_run_folder_is_made(real_data, tmp_path):
    out = tmp_path / "run"
    result = lgg("train", "unet", "--data", real_data, "--out", out, "--split", "patient-fold-6-of-5", check=False)
    assert result.returncode == 2 and "patient-fold-6-of-5" in result.stderr
    assert not out.exists()


def test_demo_data_is_in_the_kaggle_layout(tmp_path):
    lgg("demo-data", "--dest", tmp_path, "--cases", 3)
    slices = data.find_slices(tmp_path)
    assert slices.case_id.nunique() == 3 and len(slices) == 60
    assert 0 < slices.has_tumor.sum() < 60
    assert slices.case_id.str.startswith("SYNTH").all()


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_epoch(real_data, tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "lgg",
        "train",
        "unet",
        "--data",
        str(real_data),
        "--out",
        str(out),
        "--epochs",
        "3",
        "--image-size",
        "32",
        "--max-cases",
        "4",
        "--batch-size",
        "8",
        "--base-filters",
        "4",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    history, state = out / "history.csv", out / "resume" / "state.json"
    deadline = time.time() + 300
    while time.time() < deadline and not state.exists():  # the first epoch is done and saved
        time.sleep(0.01)
    # killed at once, in the second epoch: on an idle machine the two epochs left of this tiny run take about a
    # second, so waiting a moment longer would find the run finished (and its resume state removed)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert json.loads(state.read_text())["epoch"] in (0, 1), "the run should have been killed in its 2nd or 3rd epoch"
    assert not (out / "model.h5").exists()
    started = json.loads((out / "config.json").read_text())
    continued = lgg(*command[3:], "--resume")  # the same command, continued
    resumed = pd.read_csv(history)
    assert resumed["epoch"].tolist() == [0, 1, 2]  # continued at epoch 1, not restarted
    config = json.loads((out / "config.json").read_text())
    # the compiler and precision the run started with, read from its config.json (not chosen again)
    assert "(as the run started;" in continued.stdout
    assert (config["jit_compile_used"], config["precision_used"]) == (
        started["jit_compile_used"],
        started["precision_used"],
    )
    assert (out / "model.h5").is_file()

    # and it ends where the same run, never interrupted, ends (CPU kernels: within 1e-4, as README says)
    straight = tmp_path / "straight"
    lgg(*[str(straight) if part == str(out) else part for part in command[3:]])
    uninterrupted = pd.read_csv(straight / "history.csv")
    columns = ["loss", "dice_coefficient", "val_loss", "val_dice_coefficient", "val_case_dice"]
    pd.testing.assert_frame_equal(resumed[columns], uninterrupted[columns], atol=1e-4, rtol=1e-3)
    first = json.loads((out / "test_summary.json").read_text())
    second = json.loads((straight / "test_summary.json").read_text())
    assert first["batch_dice_smooth1"] == pytest.approx(second["batch_dice_smooth1"], abs=1e-4)


@pytest.mark.slow
def test_predict_refuses_odd_inputs_naming_them(run_dir, tmp_path):
    import tifffile

    odd = tmp_path / "in" / "TCGA_XX_0001_20000101_1.tif"
    odd.parent.mkdir()
    tifffile.imwrite(odd, np.zeros((128, 128), np.uint16))
    result = lgg("predict", "--model", run_dir / "model.h5", "--out", tmp_path / "out", odd, check=False)
    assert result.returncode == 2 and odd.name in result.stderr and "expected uint8" in result.stderr
    weights_only = lgg("predict", "--model", run_dir / "best.weights.h5", "--out", tmp_path / "o2", odd, check=False)
    assert weights_only.returncode == 2 and "best.weights.h5" in weights_only.stderr


def test_every_command_prints_its_help():
    """argparse formats help text with `%`: a literal one in a setting's help (`5 %`) once broke `train --help`."""
    import argparse

    from lgg.__main__ import _parser

    parser = _parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert "train" in commands.choices
    for name, command in commands.choices.items():
        text = command.format_help()
        assert name in text and "--help" in text
    assert "up to 5 %" in commands.choices["train"].format_help()
