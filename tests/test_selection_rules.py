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


def grid(means):
    """A made-up validation grid of one case: {setting key: its Dice}, every other candidate setting at 0."""
    keys = [postprocess.setting_key(settings) for settings in postprocess.candidates()]
    return postprocess.long_case_table(pd.DataFrame([{"case_id": "a", **dict.fromkeys(keys, 0.0), **means}]))


def test_flip_tta_is_preferred_among_tied_settings_only():
    # a TTA setting is tied with the best; another TTA setting, outside the tie, is simpler: the tied one is kept
    means = {"t0.5_c0_3d": 0.900, "t0.5_c150_3d_tta": 0.8995, "t0.5_c0_tta": 0.8988}
    assert selection_rules.RULES["validation"](grid(means)) == {**postprocess.RAW, "largest_3d": True}
    assert selection_rules.RULES["tta-on-ties"](grid(means)) == {
        **postprocess.RAW,
        "min_component_px": 150,
        "largest_3d": True,
        "hflip_tta": True,
    }
    # no TTA setting tied: the runs' own choice
    means["t0.5_c150_3d_tta"] = 0.890
    assert selection_rules.RULES["tta-on-ties"](grid(means)) == selection_rules.RULES["validation"](grid(means))


def test_without_the_largest_component_the_best_other_setting_is_chosen():
    means = {"t0.5_c0_3d": 0.900, "t0.4_c50": 0.880, "t0.6_c0": 0.850}
    assert selection_rules.RULES["no-largest-3d"](grid(means)) == {**postprocess.RAW, "threshold": 0.4,
                                                                   "min_component_px": 50}  # fmt: skip
    assert selection_rules.RULES["raw"](grid(means)) == postprocess.RAW


def test_the_test_cases_choose_nothing(results):
    """Every test Dice but those of the runs' own settings scrambled: every rule chooses what it chose."""
    before, _ = selection_rules.selection([ROW], "test")
    row = json.loads((results / f"{ROW}.json").read_text())
    curve = pd.read_csv(results / ROW / "dice_vs_minutes.csv")
    own = {"test_postprocessing_cases.csv": postprocess.setting_key(row["test"]["postprocessing"])}
    last = next(s for s in postprocess.candidates() if postprocess.describe(s) == curve["postprocessing"].iloc[-1])
    own["after-60min_test_postprocessing_cases.csv"] = postprocess.setting_key(last)
    for name, keep in own.items():
        table = pd.read_csv(results / ROW / name)
        others = [column for column in table.columns if column not in ("case_id", keep)]
        table[others] = table[others].sample(frac=1, random_state=0).to_numpy()[:, ::-1]
        table.to_csv(results / ROW / name, index=False)
    after, _ = selection_rules.selection([ROW], "test")
    assert [e["per_row"][ROW]["setting"] for e in after["rules"]] == [
        e["per_row"][ROW]["setting"] for e in before["rules"]
    ]


def test_a_validation_table_on_which_the_run_would_have_chosen_otherwise_is_refused(results):
    path = results / ROW / "val_postprocessing_cases.csv"
    table = pd.read_csv(path)
    table["t0.2_c150"] = 1.0  # now the best setting by far
    table.to_csv(path, index=False)
    with pytest.raises(ValueError, match="the run's own rule chooses threshold 0.2"):
        selection_rules.selection([ROW], "test")


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
    selection_rules.check_out(out, [ROW, other])  # the same rows and more: the next folds of a recipe
    for rows in ([other], [], "x"):
        out.write_text(json.dumps({"command": "x", "rows": rows, "rules": []}))
        with pytest.raises(SystemExit, match="holds the rules of other rows"):
            selection_rules.main(["--rows", ROW, "--out", str(out)])
        assert json.loads(out.read_text())["rows"] == rows
