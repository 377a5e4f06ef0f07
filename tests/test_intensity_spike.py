"""benchmarks/intensity_spike.py: the committed figures the README quotes come back from the shipped model, and
nonsense settings are refused before the model is loaded or anything measured."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_case

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import intensity_spike  # noqa: E402

COMMITTED = ROOT / "results" / "intensity-spike.json"
CASE = "TCGA_DU_5874_19950510"  # a test case of the shipped model (fold 2), the smallest tumor of the three
CASE_WRITTEN = "TCGA_XX_0001_20000101"  # conftest.write_case's
SCORED = ROOT / "results" / "unet-aug-flair-bf16-fold2" / "test.csv"  # what the shipped model's run scored on it


def test_the_committed_figures_are_the_shipped_models():
    """Replacing the shipped model makes these figures another model's: run the script again."""
    committed = json.loads(COMMITTED.read_text())
    assert committed["model"] == {"models/unet/model.h5": intensity_spike.file_sha256(ROOT / "models/unet/model.h5")}


@pytest.mark.slow
def test_a_case_at_five_times_comes_back_as_committed(real_data, tmp_path):
    out = tmp_path / "new folder" / "spike.json"  # made when the figures are written
    intensity_spike.main(["--data", str(real_data), "--cases", CASE, "--factors", "5", "--out", str(out)])
    again = {row["factor"]: row for row in json.loads(out.read_text())["rows"]}
    committed = {row["factor"]: row for row in json.loads(COMMITTED.read_text())["rows"] if row["case_id"] == CASE}
    assert set(again) == {None, 5.0} and again[5.0]["grey_levels"]["FLAIR"] < again[None]["grey_levels"]["FLAIR"] / 4
    for factor, row in again.items():
        expected = committed[factor]
        assert row["grey_levels"] == expected["grey_levels"] and row["warned"] == expected["warned"]  # exact mapping
        assert row["true_voxels"] == expected["true_voxels"] and row["split"] == expected["split"] == "test"
        assert row["tumor_voxels"] == pytest.approx(expected["tumor_voxels"], rel=0.02)  # CPUs may round apart
        assert row["dice_vs_mask"] == pytest.approx(expected["dice_vs_mask"], abs=0.01)
    scored = pd.read_csv(SCORED).set_index("case_id").loc[CASE, "case_dice"]
    assert again[None]["dice_vs_mask"] == pytest.approx(scored, abs=5e-3)  # as the run's own evaluation scored it


@pytest.fixture
def refused(tmp_path, monkeypatch):
    """Run the script on a small written case, where loading a model means a refusal came too late; -> (run, out)."""
    write_case(tmp_path / "data" / "kaggle_3m")

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(intensity_spike.predict, "load_predictor", too_late)
    out = tmp_path / "spike.json"

    def run(*argv):
        with pytest.raises(SystemExit) as raised:
            intensity_spike.main(["--data", str(tmp_path / "data"), "--cases", CASE_WRITTEN, *argv, "--out", str(out)])
        assert not out.exists()
        return raised

    return run, out


@pytest.mark.parametrize("factor", ["1", "0.5", "-1", "0", "nan", "inf", "ten"])
def test_a_factor_that_is_no_outlier_is_refused(factor, refused, capsys):
    run, _ = refused
    run("--factors", factor)
    assert "--factors" in (err := capsys.readouterr().err) and ("above 1 or below -1" in err or "a number" in err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--factors", "5", "5.0"], "--factors: each once"),
        (["--cases", CASE_WRITTEN, CASE_WRITTEN], "--cases: each once"),
        (["--cases", "TCGA_XX_0000_20000101"], "no case folder"),
        (["--cases", ".."], "is not usable"),
    ],
)
def test_repeated_or_missing_cases_and_repeated_factors_are_refused(argv, message, refused):
    run, _ = refused
    assert message in str(run(*argv).value)


def test_another_tools_file_as_out_is_refused(refused, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# a user's file\n")
    with pytest.raises(SystemExit, match="not a file of benchmarks/intensity_spike.py"):
        intensity_spike.main(["--data", str(tmp_path / "data"), "--out", str(readme)])
    assert readme.read_text() == "# a user's file\n"


def test_a_model_that_is_not_one_is_refused_by_name(tmp_path):
    write_case(tmp_path / "data" / "kaggle_3m")
    bogus = tmp_path / "model.h5"
    bogus.write_text("not a model")
    with pytest.raises(SystemExit, match="--model .*model.h5"):
        intensity_spike.main(
            ["--data", str(tmp_path / "data"), "--model", str(bogus), "--cases", CASE_WRITTEN, "--factors", "5",
             "--out", str(tmp_path / "spike.json")]
        )  # fmt: skip
    assert not (tmp_path / "spike.json").exists()
