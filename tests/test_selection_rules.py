"""`benchmarks/selection_rules.py` on a committed run's own tables (real cases, no model): the runs' own rule gives
the run's own figures again, a table that does not is refused, and nothing is written over what the script did
not write."""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import selection_rules  # noqa: E402

from lgg import postprocess  # noqa: E402

ROW = "unet-aug-flair-160-tf70-bf16-fold4"  # the first run collected with its tables of each case by setting


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A scratch results/ holding the row's JSON and folder, as `selection_rules` reads them."""
    out = tmp_path / "results"
    (out / ROW).mkdir(parents=True)
    shutil.copy(ROOT / "results" / f"{ROW}.json", out / f"{ROW}.json")
    for path in (ROOT / "results" / ROW).glob("*.csv"):
        shutil.copy(path, out / ROW / path.name)
    monkeypatch.setattr(selection_rules, "RESULTS", out)
    return out


def test_the_runs_own_rule_gives_the_runs_own_figures_and_every_rule_scores_every_case(results):
    result, cases = selection_rules.selection([ROW], "test")
    row = json.loads((results / f"{ROW}.json").read_text())
    figures = {(entry["weights"], entry["rule"]): entry for entry in result["rules"]}
    assert set(figures) == {(w, r) for w in selection_rules.WEIGHTS for r in selection_rules.RULES}
    own = figures[("kept", "validation")]
    assert own["mean_case_dice"] == pytest.approx(row["test"]["case_dice_mean"], abs=1e-4)
    assert own["per_row"][ROW]["setting"] == postprocess.describe(row["test"]["postprocessing"])
    assert own["vs_kept_validation"]["mean_difference"] == 0
    last = figures[("last", "validation")]
    assert last["mean_case_dice"] == pytest.approx(row["after_minutes"][-1]["case_dice_mean"], abs=1e-4)
    assert "largest 3-D" not in figures[("kept", "no-largest-3d")]["per_row"][ROW]["setting"]
    assert figures[("kept", "raw")]["per_row"][ROW]["setting"] == postprocess.describe(postprocess.RAW)
    assert all(entry["cases"] == row["test"]["cases"] for entry in result["rules"])
    assert len(cases) == len(figures) * row["test"]["cases"] and cases["case_dice"].between(0, 1).all()


def test_a_test_table_that_does_not_give_the_runs_figures_is_refused(results):
    row = json.loads((results / f"{ROW}.json").read_text())
    path = results / ROW / "test_postprocessing_cases.csv"
    table = pd.read_csv(path)
    table.loc[0, postprocess.setting_key(row["test"]["postprocessing"])] -= 0.01
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="the run's own rule"):
        selection_rules.selection([ROW], "test")


def test_a_validation_table_missing_a_setting_is_refused_naming_it(results):
    path = results / ROW / "val_postprocessing_cases.csv"
    pd.read_csv(path).drop(columns="t0.5_c0").to_csv(path, index=False)
    with pytest.raises(ValueError, match="val_postprocessing_cases.csv: not one row per case"):
        selection_rules.selection([ROW], "test")


def test_a_patient_in_two_rows_is_refused(results):
    twin = ROW + "-again"
    shutil.copytree(results / ROW, results / twin)
    shutil.copy(results / f"{ROW}.json", results / f"{twin}.json")
    with pytest.raises(ValueError, match=f"test case of both {ROW} and {twin}"):
        selection_rules.selection([ROW, twin], "test")


def test_out_never_replaces_a_file_it_did_not_write(results, tmp_path):
    theirs = tmp_path / "mine.csv"
    theirs.write_text("a user's table\n")
    with pytest.raises(SystemExit, match="was not written with"):
        selection_rules.main(["--rows", ROW, "--out", str(tmp_path / "mine.json")])
    assert theirs.read_text() == "a user's table\n" and not (tmp_path / "mine.json").exists()
    with pytest.raises(SystemExit, match="lies inside the input folder"):
        selection_rules.main(["--rows", ROW, "--out", str(results / ROW / "x.json")])  # inside its inputs
    out = tmp_path / "rules.json"
    selection_rules.main(["--rows", ROW, "--out", str(out)])
    selection_rules.main(["--rows", ROW, "--out", str(out)])  # its own file, the same rows: replaced
    assert json.loads(out.read_text())["rows"] == [ROW] and out.with_suffix(".csv").is_file()
    other = ROW.replace("fold4", "fold9")
    shutil.copytree(results / ROW, results / other)
    (results / f"{other}.json").write_text((results / f"{ROW}.json").read_text())
    out.write_text(json.dumps({"command": "x", "rows": [other], "rules": []}))
    with pytest.raises(SystemExit, match="holds the rules of other rows"):
        selection_rules.main(["--rows", ROW, "--out", str(out)])
    assert json.loads(out.read_text())["rows"] == [other]
