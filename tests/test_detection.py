"""`benchmarks/detection.py`: the segmenter scored as a slice classifier. Its run folders are checked before anything
is predicted (finished, each patient tested by one fold, every test case in the data), and the shipped U-Net scores
the test slices of its own fold (17 real patients) as a classifier would."""

import json
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


def fold_folders(runs, splits, recipe="unet-bf16"):
    """A run folder per fold row of `recipe`: the shipped model's files, `splits[k]` as split.csv, and the row's
    settings as config.json."""
    for row, split in zip(detection.fold_rows(recipe), splits, strict=True):
        folder = runs / f"results-{row}"
        folder.mkdir(parents=True)
        for name in ("model.h5", "postprocess.json"):
            shutil.copy(SHIPPED / name, folder / name)
        split.to_csv(folder / "split.csv", index=False)
        (folder / "config.json").write_text(json.dumps(detection.CONFIGS[row].to_dict()))
    return runs


def partition(cases, extra=()):
    """Five splits of `cases` (and `extra`, tested by the last fold) in which each case is tested once."""
    cases = sorted(set(cases)) + list(extra)
    return [
        pd.DataFrame({"case_id": cases, "split": ["test" if i % 5 == k else "train" for i in range(len(cases))]})
        for k in range(5)
    ]


def test_the_folds_are_checked_before_anything_is_predicted(tmp_path, real_data):
    def refused(runs, message):
        with pytest.raises(SystemExit, match=message):
            detection.fold_runs("unet-bf16", runs, real_data)

    refused(tmp_path / "none", "results-unet-bf16 is not a finished segmenter run of unet-bf16: it has no model.h5")
    shipped = pd.read_csv(SHIPPED / "split.csv")
    refused(fold_folders(tmp_path / "same", [shipped] * 5), "is a test case of both .*unet-bf16 and .*unet-bf16-fold2")
    runs = fold_folders(tmp_path / "config", partition(shipped.case_id))
    config = json.loads((runs / "results-unet-bf16-fold3" / "config.json").read_text())
    (runs / "results-unet-bf16-fold3" / "config.json").write_text(json.dumps({**config, "precision": "float32"}))
    refused(runs, "fold3/config.json has precision 'float32', the row unet-bf16-fold3 'mixed_bfloat16'")
    untested = [shipped] + [shipped.assign(split="train")] * 4  # folds 2-5 test nobody
    refused(fold_folders(tmp_path / "untested", untested), "patients of the split are in no fold's test cases")
    absent = partition(shipped.case_id, extra=["TCGA_XX_0001_20000101"])
    refused(fold_folders(tmp_path / "absent", absent), "1 test cases of the unet-bf16 folds are missing in .*TCGA_XX")
    with pytest.raises(SystemExit, match="data folder not found"):  # the message, not a traceback
        detection.main(["--recipe", "unet-bf16", "--data", str(tmp_path / "none"), "--runs", str(tmp_path / "absent")])
    for recipe in ("classifier", "unet-seed1", "unet-nonsense"):
        with pytest.raises(SystemExit, match=f"--recipe '{recipe}' is not a segmenter recipe with folds"):
            detection.main(["--recipe", recipe, "--data", str(real_data), "--runs", str(tmp_path / "runs")])
    assert "unet-bf16" in detection.segmenter_recipes() and "unet" in detection.segmenter_recipes()


def test_the_classifier_is_compared_on_the_same_slices(tmp_path):
    """Against the classifier's own pooled file (the committed fold-1 scores): the same scores differ by nothing;
    a file that labels a slice otherwise is refused; a missing file gives no comparison."""
    table = pd.read_csv(ROOT / "results" / "classifier" / "test.csv").assign(fold="classifier")
    pooled = tmp_path / "classifier-cross-validation.csv"
    table.to_csv(pooled, index=False)
    scores = table.rename(columns={"probability": "score"}).assign(fold="unet-bf16")
    same = detection.compare(scores, pooled)
    assert (same["slices"], same["patients"], same["classifier_folds"]) == (820, 22, ["classifier"])
    assert same["difference"] == 0 and same["difference_ci95"] == [0, 0]
    table.assign(has_tumor=~table.has_tumor).to_csv(pooled, index=False)
    with pytest.raises(SystemExit, match="labels some slices otherwise than the data"):
        detection.compare(scores, pooled)
    assert detection.compare(scores, tmp_path / "absent.csv") is None


def test_the_shipped_unet_scores_its_test_slices_as_a_classifier(real_data):
    scores = detection.segmenter_scores(SHIPPED, real_data)
    split = pd.read_csv(SHIPPED / "split.csv")
    assert set(scores.case_id) == set(split.loc[split["split"] == "test", "case_id"])
    assert scores.score.between(0, 1).all() and not scores.duplicated(["case_id", "slice_index"]).any()
    assert set(scores.fold) == {"unet"}  # the folder's name without "results-"
    # the model card's fold: the U-Net finds tumor slices far better than chance (0.980 measured here)
    assert roc_auc_score(scores.has_tumor, scores.score) > 0.97
