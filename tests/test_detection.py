"""`benchmarks/detection.py`: the segmenter scored as a slice classifier. Its run folders are checked before anything
is predicted (finished, each patient tested by one fold, every test case in the data), and the shipped U-Net scores
the test slices of its own fold (17 real patients) as a classifier would."""

import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import detection  # noqa: E402

SHIPPED = ROOT / "models" / "unet"


def fold_folders(runs, recipe="unet-bf16", splits=None):
    """A run folder per fold row of `recipe`, each holding the shipped model's files (and `splits[k]` as split.csv)."""
    for index, row in enumerate(detection.fold_rows(recipe)):
        folder = runs / f"results-{row}"
        folder.mkdir(parents=True)
        for name in detection.RUN_FILES:
            shutil.copy(SHIPPED / name, folder / name)
        if splits:
            splits[index].to_csv(folder / "split.csv", index=False)
    return runs


def test_the_folds_are_checked_before_anything_is_predicted(tmp_path, real_data):
    with pytest.raises(SystemExit, match="results-unet-bf16 is not a finished segmenter run of unet-bf16: it has no"):
        detection.fold_runs("unet-bf16", tmp_path / "runs", real_data)
    runs = fold_folders(tmp_path / "runs")  # five copies of one fold: its patients would count five times
    with pytest.raises(SystemExit, match="is a test case of both .*results-unet-bf16 and .*results-unet-bf16-fold2"):
        detection.fold_runs("unet-bf16", runs, real_data)
    split = pd.read_csv(SHIPPED / "split.csv")
    others = [split.assign(split="train")] * 4  # the four other folds test nothing here ...
    others[3] = pd.concat([others[3], pd.DataFrame({"case_id": ["TCGA_XX_0001_20000101"], "split": ["test"]})])
    runs = fold_folders(tmp_path / "runs2", splits=[split, *others])  # ... but one tests a patient not in the data
    with pytest.raises(SystemExit, match="1 test cases of the unet-bf16 folds are missing in .*TCGA_XX_0001"):
        detection.fold_runs("unet-bf16", runs, real_data)
    for recipe in ("classifier", "unet-nonsense"):
        with pytest.raises(SystemExit, match=f"--recipe '{recipe}' is not a segmenter recipe with folds"):
            detection.main(["--recipe", recipe, "--data", str(real_data), "--runs", str(tmp_path / "runs")])


def test_the_shipped_unet_scores_its_test_slices_as_a_classifier(real_data):
    scores = detection.segmenter_scores(SHIPPED, real_data)
    split = pd.read_csv(SHIPPED / "split.csv")
    assert set(scores.case_id) == set(split.loc[split["split"] == "test", "case_id"])
    assert scores.score.between(0, 1).all() and not scores.duplicated(["case_id", "slice_index"]).any()
    assert set(scores.fold) == {"unet"}  # the folder's name without "results-"
    # the model card's fold: the U-Net finds tumor slices far better than chance (0.980 measured here)
    assert roc_auc_score(scores.has_tumor, scores.score) > 0.97
