"""`benchmarks/misses.py`: the cases whose missing sequences the dataset filled with FLAIR are found in
the real data, and a case is drawn only by a model that never saw it."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from lgg import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import misses  # noqa: E402


def test_cases_lacking_a_sequence_are_found_in_the_real_data(real_data):
    slices = data.find_slices(real_data)
    expected = {
        "TCGA_FG_A60K_20040224": "FLAIR only",  # pre- and post-contrast channels are FLAIR on every slice
        "TCGA_DU_6407_19860514": "no post-contrast",
        "TCGA_CS_4941_19960909": "all three sequences",
    }
    table = misses.sequence_copies(slices[slices["case_id"].isin(expected)]).set_index("case_id")
    assert table["sequences"].to_dict() == expected
    assert table.loc["TCGA_DU_6407_19860514", "pre_is_flair_share"] == 0.0
    assert (table["non_blank_slices"] <= table["slices"]).all()


def test_a_case_is_drawn_only_by_a_model_that_never_saw_it(real_data, tmp_path, capsys):
    slices = data.find_slices(real_data)
    case = slices[slices["case_id"] == "TCGA_FG_A60K_20040224"]  # the case at Dice 0 in the cross-validation
    model = tmp_path / "run" / "model.h5"  # refused on its split.csv, before the model is read
    with pytest.raises(ValueError, match="no such model file"):
        misses.draw_case(model, case, 0.0, tmp_path / "case.png")
    model.parent.mkdir()
    model.write_bytes(b"not read")
    with pytest.raises(ValueError, match="no split.csv"):
        misses.draw_case(model, case, 0.0, tmp_path / "case.png")
    pd.DataFrame({"case_id": [case["case_id"].iloc[0]], "split": ["val"]}).to_csv(model.parent / "split.csv")
    with pytest.raises(ValueError, match="trained or chose its epoch on TCGA_FG_A60K_20040224"):
        misses.draw_case(model, case, 0.0, tmp_path / "case.png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit):  # the whole command: refused before any table or figure is written
        misses.main(["--data", str(real_data), "--model", str(model), "--out", str(out)])
    assert "trained or chose its epoch" in capsys.readouterr().err
    assert not out.exists()
    inside = real_data / "misses-out"  # nor among the data
    with pytest.raises(SystemExit):
        misses.main(["--data", str(real_data), "--out", str(inside)])
    assert "apart from the data" in capsys.readouterr().err and not inside.exists()


def test_a_recipe_and_a_threshold_are_refused_at_the_door(real_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    for argv, message in (
        (["--recipe", "../unet"], "--recipe '../unet' is not a segmenter recipe with folds"),
        (["--below", "0"], "--below: must be greater than 0"),
        (["--below", "1.5"], "--below: must be at most 1"),
        (["--below", "nan"], "--below: must be a finite number"),
        (["--model", "a.h5", "--fold-models"], "not allowed with argument"),
    ):
        with pytest.raises(SystemExit):
            misses.main(["--data", str(real_data), "--out", str(out), *argv])
        assert message in capsys.readouterr().err, argv
    with monkeypatch.context() as patch:  # a recipe whose folds are not all collected: no pooled table yet
        patch.setattr(misses, "RESULTS", tmp_path / "no-results")
        with pytest.raises(SystemExit):
            misses.main(["--data", str(real_data), "--out", str(out), "--recipe", "unet"])
        assert "no-results/unet-cross-validation.csv is missing" in capsys.readouterr().err
    # each case under 0.5 drawn by the fold model that scored it: runs/results-<fold>/model.h5, absent here
    monkeypatch.setattr(misses, "RUNS", tmp_path / "runs")
    argv = ["--data", str(real_data), "--out", str(out), "--recipe", "unet-aug-bf16", "--below", "0.5", "--fold-models"]
    with pytest.raises(SystemExit):
        misses.main(argv)
    # the lowest first: TCGA_DU_7018 (0.29 in results/unet-aug-bf16-cross-validation.csv), scored by fold 5
    assert "runs/results-unet-aug-bf16-fold5/model.h5: no such model file" in capsys.readouterr().err
    assert not out.exists()  # refused before any table or figure is written


def test_a_table_written_by_another_command_is_not_replaced(real_data, tmp_path, capsys):
    """The README quotes `results/missing_sequences-<recipe>.json` as written by one command (`--below 0.5
    --fold-models`: its figures and their facts); another command (no `--below`) replaced it, facts and all, and
    left its figures unlisted."""
    out = tmp_path / "out"
    out.mkdir()
    earlier = out / "missing_sequences-unet-aug-flair-bf16.json"
    written = "python benchmarks/misses.py --recipe unet-aug-flair-bf16 --below 0.5 --fold-models"
    earlier.write_text(json.dumps({"command": written, "drawn": {"TCGA_DU_7018_19911220": {}}}))
    before = earlier.read_bytes()
    with pytest.raises(SystemExit):
        misses.main(["--data", str(real_data), "--out", str(out), "--recipe", "unet-aug-flair-bf16"])
    assert f"was written by `{written}`, not `python benchmarks/misses.py --recipe unet-aug-flair-bf16`" in (
        capsys.readouterr().err
    )
    assert earlier.read_bytes() == before and sorted(out.iterdir()) == [earlier]
    assert json.loads((misses.RESULTS / earlier.name).read_text())["command"] == written  # what the README quotes
    # the same settings spelled otherwise, or recorded before --recipe was: the same table, let through (to the
    # next refusal here: the fold models are not in this checkout's runs/)
    (out / "missing_sequences-unet.json").write_text(
        json.dumps({"command": "python benchmarks/misses.py --model runs/results-unet-again/model.h5"})
    )
    for argv in (["--recipe", "unet-aug-flair-bf16", "--fold-models", "--below", "0.50"],
                 ["--model", str(ROOT / "runs" / "results-unet-again" / "model.h5")]):  # fmt: skip
        with pytest.raises(SystemExit):
            misses.main(["--data", str(real_data), "--out", str(out), *argv])
        assert "was written by" not in capsys.readouterr().err
