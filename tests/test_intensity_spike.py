"""benchmarks/intensity_spike.py: the committed figures the README quotes come back from the shipped model, and
nonsense settings are refused before anything is measured."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import intensity_spike  # noqa: E402

COMMITTED = ROOT / "results" / "intensity-spike.json"
CASE = "TCGA_DU_5874_19950510"  # a test case of the shipped model (fold 2), the smallest tumor of the three
SCORED = ROOT / "results" / "unet-aug-flair-bf16-fold2" / "test.csv"  # what the shipped model's run scored on it


def test_the_committed_figures_are_the_shipped_models():
    """Replacing the shipped model makes these figures another model's: run the script again."""
    committed = json.loads(COMMITTED.read_text())
    assert committed["model"] == {"models/unet/model.h5": intensity_spike.file_sha256(ROOT / "models/unet/model.h5")}


@pytest.mark.slow
def test_a_case_at_five_times_comes_back_as_committed(real_data, tmp_path):
    out = tmp_path / "spike.json"
    intensity_spike.main(["--data", str(real_data), "--cases", CASE, "--factors", "5", "--out", str(out)])
    again = {row["factor"]: row for row in json.loads(out.read_text())["rows"]}
    committed = {row["factor"]: row for row in json.loads(COMMITTED.read_text())["rows"] if row["case_id"] == CASE}
    assert set(again) == {None, 5.0} and again[5.0]["grey_levels"]["FLAIR"] < again[None]["grey_levels"]["FLAIR"] / 4
    for factor, row in again.items():
        expected = committed[factor]
        assert row["grey_levels"] == expected["grey_levels"] and row["warned"] == expected["warned"]  # exact mapping
        assert row["true_voxels"] == expected["true_voxels"]
        assert row["tumor_voxels"] == pytest.approx(expected["tumor_voxels"], rel=0.02)  # CPUs may round apart
        assert row["dice_vs_mask"] == pytest.approx(expected["dice_vs_mask"], abs=0.01)
    scored = pd.read_csv(SCORED).set_index("case_id").loc[CASE, "case_dice"]
    assert again[None]["dice_vs_mask"] == pytest.approx(scored, abs=5e-3)  # as the run's own evaluation scored it
    assert again[None]["split"] == "test"


@pytest.mark.parametrize("factor", ["1", "0.5", "-1", "nan", "inf", "ten"])
def test_a_factor_that_is_no_outlier_is_refused(factor, tmp_path, capsys):
    with pytest.raises(SystemExit):
        intensity_spike.main(["--factors", factor, "--out", str(tmp_path / "spike.json")])
    assert "--factors" in capsys.readouterr().err
    assert not (tmp_path / "spike.json").exists()


def test_another_file_as_out_and_a_missing_case_are_refused_before_measuring(real_data, tmp_path):
    with pytest.raises(SystemExit, match="not a file of benchmarks/intensity_spike.py"):
        intensity_spike.main(["--data", str(real_data), "--out", str(ROOT / "README.md")])
    for case, message in (("TCGA_XX_0000_20000101", "no case folder"), ("..", "--cases")):
        with pytest.raises(SystemExit, match=message):
            intensity_spike.main(["--data", str(real_data), "--cases", case, "--out", str(tmp_path / "a.json")])
    assert not (tmp_path / "a.json").exists()
