"""`benchmarks/flair_alone.py`: a fold model scores its test cases as `evaluate` does (the committed figures
come back), and from the FLAIR alone; a FLAIR-only case scores the same both ways; the committed summary comes back
from its per-case table."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import data_without, flat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import flair_alone  # noqa: E402

SHIPPED = ROOT / "models" / "unet" / "model.h5"  # fold 2's model of unet-aug-flair-bf16, saved without optimizer
COMMITTED = ROOT / "results" / "unet-aug-flair-bf16-fold2" / "test.csv"  # what its run scored on its test cases
CASES = ["TCGA_HT_7877_19980917", "TCGA_DU_5871_19941206"]  # FLAIR only; all three sequences (both fold-2 tests)


def test_flair_alone_copies_the_flair_into_the_other_channels():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    alone = flair_alone.flair_alone(images)
    assert alone.shape == images.shape and (alone == images[..., 1:2]).all()


@pytest.mark.slow
def test_a_fold_model_scores_its_committed_figures_and_a_flair_only_case_the_same_both_ways(real_data, tmp_path):
    table = flair_alone.score_fold(SHIPPED, real_data, cases=CASES).set_index("case_id")
    committed = pd.read_csv(COMMITTED).set_index("case_id").loc[CASES, "case_dice"]
    assert committed.min() > 0.8  # real tumors found, not two empty masks agreeing
    np.testing.assert_allclose(table.loc[CASES, "dice_as_given"], committed, atol=flair_alone.TOLERANCE)
    assert table.loc[CASES[0], "dice_flair_alone"] == table.loc[CASES[0], "dice_as_given"]  # already FLAIR only
    assert table.loc[CASES[1], "dice_flair_alone"] != table.loc[CASES[1], "dice_as_given"]  # its inputs changed
    subset = tmp_path / "test.csv"
    pd.read_csv(COMMITTED).set_index("case_id").loc[CASES].reset_index().to_csv(subset, index=False)
    flair_alone.check_reproduced(table.reset_index(), subset)
    wrong = pd.read_csv(subset)
    wrong.loc[1, "case_dice"] -= 0.02  # another model's figure
    wrong.to_csv(subset, index=False)
    with pytest.raises(ValueError, match="not the model that was scored there"):
        flair_alone.check_reproduced(table.reset_index(), subset)


def test_the_folds_test_cases_are_all_found_before_any_is_predicted(real_data, tmp_path, monkeypatch):
    """A `--data` lacking a test case was found only after a fold had been predicted, and blamed as "another run"."""
    monkeypatch.setattr(flair_alone, "RUNS", tmp_path / "runs")
    split = pd.read_csv(ROOT / "models" / "unet" / "split.csv")
    left_out = sorted(set(split.query("split == 'test'").case_id))[0]
    for row in flair_alone.fold_rows("unet-aug-flair-bf16"):
        run = tmp_path / "runs" / f"results-{row}"
        run.mkdir(parents=True)
        (run / "model.h5").write_bytes(b"not read")
        shutil.copy(ROOT / "models" / "unet" / "split.csv", run / "split.csv")
    part = data_without(real_data, tmp_path / "part", left_out)
    with pytest.raises(SystemExit, match=f"1 test cases of unet-aug-flair-bf16 are not in {part}: \\['{left_out}"):
        flair_alone.main(["--data", str(part), "--recipe", "unet-aug-flair-bf16"])


def test_the_committed_summary_comes_back_from_its_per_case_table():
    """What `main` writes from its table: the committed JSON's figures, from the committed CSV (the README quotes
    both); the median case and the cases under 0.5, added later, as the README quotes them."""
    table = pd.read_csv(ROOT / "results" / "flair-alone-unet-aug-flair-bf16.csv")
    committed = json.loads((ROOT / "results" / "flair-alone-unet-aug-flair-bf16.json").read_text())
    summary = flair_alone.summarize(table, "unet-aug-flair-bf16", committed["command"])
    assert flat({key: summary[key] for key in committed}) == pytest.approx(flat(committed), abs=1e-9)
    assert round(summary["median_case_difference"], 3) == -0.009
    assert (summary["cases_under_0.5_flair_alone"], summary["cases_under_0.5_as_given"]) == (6, 4)
