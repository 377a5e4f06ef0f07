"""`benchmarks/detection.py`: the segmenter scored as a slice classifier. Its run folders are checked before anything
is predicted (finished, each patient tested by one fold, every test case in the data), and the shipped U-Net scores
the test slices of its own fold (17 real patients) as a classifier would."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
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
            detection.fold_sources("unet-bf16", runs, real_data, tmp_path / "results")

    (tmp_path / "empty" / "results-unet-bf16").mkdir(parents=True)
    refused(tmp_path / "empty", "results-unet-bf16 is not a finished segmenter run of unet-bf16: it has no model.h5")
    nothing = detection.fold_sources("unet-bf16", tmp_path / "none", real_data, tmp_path / "results")
    assert nothing == dict.fromkeys(detection.fold_rows("unet-bf16"))  # no run folder, no saved scores
    shipped = pd.read_csv(SHIPPED / "split.csv")
    refused(fold_folders(tmp_path / "same", [shipped] * 5), "is a test case of both .*unet-bf16 and .*unet-bf16-fold2")
    runs = fold_folders(tmp_path / "config", partition(shipped.case_id))
    config = json.loads((runs / "results-unet-bf16-fold3" / "config.json").read_text())
    (runs / "results-unet-bf16-fold3" / "config.json").write_text(json.dumps({**config, "precision": "float32"}))
    refused(runs, "fold3/config.json has precision 'float32', the row unet-bf16-fold3 'mixed_bfloat16'")
    # a run of the bfloat16 recipe (standard augmentation, said or left unsaid by an older config.json) is no fold
    # of the candidate with the strong augmentation
    runs = fold_folders(tmp_path / "augmentation", partition(shipped.case_id), recipe="unet-aug-bf16")
    config = json.loads((runs / "results-unet-aug-bf16-fold2" / "config.json").read_text())
    for written in ({**config, "augmentation": "standard"}, {k: v for k, v in config.items() if k != "augmentation"}):
        (runs / "results-unet-aug-bf16-fold2" / "config.json").write_text(json.dumps(written))
        with pytest.raises(SystemExit, match="has augmentation 'standard', the row unet-aug-bf16-fold2 'strong'"):
            detection.fold_sources("unet-aug-bf16", runs, real_data, tmp_path / "results")
    # nor one drawing its tumor slices slice by slice (said, or left unsaid before the setting) a fold of the candidate
    # drawing them case first
    runs = fold_folders(tmp_path / "sampling", partition(shipped.case_id), recipe="unet-aug-flair-case-bf16")
    row = "unet-aug-flair-case-bf16-fold4"
    config = json.loads((runs / f"results-{row}" / "config.json").read_text())
    for written in ({**config, "tumor_sampling": "slice"}, {k: v for k, v in config.items() if k != "tumor_sampling"}):
        (runs / f"results-{row}" / "config.json").write_text(json.dumps(written))
        with pytest.raises(SystemExit, match=f"has tumor_sampling 'slice', the row {row} 'case'"):
            detection.fold_sources("unet-aug-flair-case-bf16", runs, real_data, tmp_path / "results")
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


def test_each_aggregate_reads_the_probability_map_its_own_way():
    """One bright pixel against a faint 20x20 blob: the largest probability prefers the pixel, the mean of the
    100 largest and the post-processed area the blob; the area's ties are broken by the largest probability."""
    maps = np.zeros((3, 64, 64), np.float32)
    maps[0, 5, 5] = 0.99  # one bright pixel, removed by post-processing
    maps[1, 10:30, 10:30] = 0.6  # a faint blob of 400 pixels, kept
    maps[2, 40, 40] = 0.2  # nothing much
    masks = np.zeros_like(maps, bool)
    masks[1] = maps[1] > 0.5
    scores = detection.aggregate(maps, masks)
    assert scores["max"].argmax() == 0
    assert scores["top100"].argmax() == 1 and scores["top100"][1] == pytest.approx(0.6)
    assert scores["top100"][0] == pytest.approx(0.0099)
    assert scores["area"].tolist() == pytest.approx([0.495, 400.3, 0.1])


def test_the_aggregate_is_chosen_on_validation_slices():
    labels = np.array([0, 0, 1, 1, 0, 1])
    table = pd.DataFrame({"has_tumor": labels, "score_max": [0.9, 0.1, 0.8, 0.95, 0.2, 0.7],
                          "score_top100": [0.5, 0.1, 0.8, 0.9, 0.2, 0.7], "score_area": labels * 10.0})  # fmt: skip
    chosen, aucs = detection.choose(table)
    assert chosen == "top100" and aucs["top100"] == aucs["area"] == 1 and aucs["max"] < 1  # a tie: the first
    assert detection.choose(table.assign(score_top100=0.5))[0] == "area"
    with pytest.raises(SystemExit, match="the validation slices are all of one kind"):
        detection.choose(table.assign(has_tumor=1))


def test_the_shipped_unet_scores_its_test_slices_as_a_classifier(real_data):
    table = detection.segmenter_scores(SHIPPED, real_data)
    split = pd.read_csv(SHIPPED / "split.csv")
    for part in ("val", "test"):
        assert set(table.case_id[table.split == part]) == set(split.loc[split["split"] == part, "case_id"])
    assert table.score_max.between(0, 1).all() and not table.duplicated(["case_id", "slice_index"]).any()
    assert set(table.fold) == {"unet"}  # the folder's name without "results-"
    # the model card's fold: the U-Net finds tumor slices far better than chance (0.977 for unet-aug-bf16-fold2)
    scores = table[table.split == "test"]
    assert roc_auc_score(scores.has_tumor, scores.score_max) > 0.97
    with pytest.raises(SystemExit, match="validation slices of x are all of one kind"):
        detection.choose(table[table.split == "val"].assign(has_tumor=True), "the validation slices of x")


def test_each_fold_chooses_on_its_validation_slices_not_its_test_slices(tmp_path, monkeypatch):
    """Validation slices that `area` separates and `max` does not, test slices the other way round: `main` must
    score the test slices with `area`, and say so per fold. Each fold's slice scores are saved with its model's
    sha256; once the run folders are gone they give the same pooled figures, but only for the model that
    `results/<row>.json` scored, and with a fold missing nothing is pooled."""
    rows = detection.fold_rows("unet-bf16")
    folders = {}
    for k, row in enumerate(rows):
        folder = tmp_path / "runs" / f"results-{row}"
        folder.mkdir(parents=True)
        (folder / "model.h5").write_bytes(b"weights of fold %d" % k)
        (folder / "config.json").write_text(json.dumps({"split": f"patient-fold-{k + 1}-of-5"}))
        folders[row] = folder

    def scores(folder, data_dir):
        labels = np.tile([0, 1], 10)
        good, bad = labels * 0.5 + 0.25, np.where(np.arange(20) % 4 < 2, 0.9, 0.1)  # bad: AUC 0.5
        tables = []
        for part, max_score, area_score in (("val", bad, good * 100), ("test", good, bad * 100)):
            cases = [f"{folder.name}-{part}-{i // 2}" for i in range(20)]
            tables.append(pd.DataFrame({"split": part, "case_id": cases, "slice_index": np.arange(20) % 2 + 1,
                                        "has_tumor": labels.astype(bool), "score_max": max_score,
                                        "score_top100": bad, "score_area": area_score}))  # fmt: skip
        return pd.concat(tables, ignore_index=True).assign(fold=folder.name.removeprefix("results-"))

    real_fold_sources = detection.fold_sources
    monkeypatch.setattr(detection, "fold_sources", lambda recipe, runs, data, results: dict(folders))
    monkeypatch.setattr(detection, "segmenter_scores", scores)
    monkeypatch.setattr(detection, "ROOT", tmp_path)  # results/ of the scratch folder, not the repository's
    results = tmp_path / "results"
    results.mkdir()
    command = ["--recipe", "unet-bf16", "--data", str(tmp_path), "--runs", str(tmp_path / "runs")]
    detection.main(command)
    written = results / "slice-detection-unet-bf16.json"
    found = json.loads(written.read_text())
    assert [f["aggregate"] for f in found["per_fold"]] == ["area"] * 5
    assert all(f["validation_roc_auc"] == {"max": 0.5, "top100": 0.5, "area": 1.0} for f in found["per_fold"])
    assert found["segmenter"]["roc_auc"] == 0.5 and found["test_roc_auc_by_aggregate"]["max"] == 1.0
    table = pd.read_csv(results / "slice-detection-unet-bf16.csv")
    assert len(table) == 100 and (table.score == table.score_area).all() and set(table["aggregate"]) == {"area"}
    digests = {row: hashlib.sha256(b"weights of fold %d" % k).hexdigest() for k, row in enumerate(rows)}
    for row in rows:
        saved = pd.read_csv(results / row / detection.SCORE_FILE)
        assert len(saved) == 40 and set(saved.model_sha256) == {digests[row]} and set(saved.split) == {"val", "test"}

    # the run folders gone (a later session): the saved scores, checked against results/<row>.json
    shutil.rmtree(tmp_path / "runs")
    labels = pd.concat([scores(Path(f"results-{row}"), None) for row in rows])[["case_id", "slice_index", "has_tumor"]]
    monkeypatch.setattr("lgg.data.find_slices", lambda data_dir: labels)
    monkeypatch.setattr(detection, "fold_sources", real_fold_sources)
    for k, row in enumerate(rows):
        counts = [{"split": "train", "cases": 30}, {"split": "val", "cases": 10}, {"split": "test", "cases": 10}]
        (results / f"{row}.json").write_text(json.dumps({"split": f"patient-fold-{k + 1}-of-5", "split_counts": counts,
                                                         "model_sha256": digests[row]}))  # fmt: skip
    before, pooled = written.read_text(), (results / "slice-detection-unet-bf16.csv").read_text()
    written.unlink()
    detection.main(command)
    assert written.read_text() == before and (results / "slice-detection-unet-bf16.csv").read_text() == pooled
    mislabelled = labels.assign(has_tumor=~labels.has_tumor)
    monkeypatch.setattr("lgg.data.find_slices", lambda data_dir: mislabelled)
    with pytest.raises(
        SystemExit,
        match=f"results/{rows[0]}/slice-scores.csv and .* disagree on the slices of its cases or their labels",
    ):
        detection.main(command)
    monkeypatch.setattr("lgg.data.find_slices", lambda data_dir: labels)
    kept = json.loads((results / f"{rows[2]}.json").read_text())
    (results / f"{rows[2]}.json").write_text(json.dumps({**kept, "model_sha256": "0" * 64}))
    with pytest.raises(SystemExit, match=f"{rows[2]}/slice-scores.csv holds the scores of another model"):
        detection.main(command)
    (results / f"{rows[2]}.json").write_text(json.dumps({"split": "patient-fold-3-of-5"}))
    with pytest.raises(SystemExit, match=f"{rows[2]}.json records no model_sha256"):
        detection.main(command)
    shutil.rmtree(results / rows[2])
    written.unlink()
    with pytest.raises(SystemExit, match=f"4 of 5 folds of unet-bf16 scored .*{rows[2]} has no run folder"):
        detection.main(command)
    assert not written.exists()


def test_folds_scored_in_an_earlier_session_pool_with_run_folders(tmp_path, real_data):
    """Three folds from their run folders, two from the slice scores an earlier session left: accepted together (the
    mixed case once crashed comparing a table with None). Refused: a saved file that lacks a slice of its cases, one
    that counts other test cases than its results file, and a run folder whose model its results file did not score."""
    from lgg import data

    shipped = pd.read_csv(SHIPPED / "split.csv")
    splits = partition(shipped.case_id)
    runs, results = fold_folders(tmp_path / "runs", splits), tmp_path / "results"
    slices, rows = data.find_slices(real_data), detection.fold_rows("unet-bf16")
    for k in (3, 4):
        shutil.rmtree(runs / f"results-{rows[k]}")
        test = set(splits[k].case_id[splits[k].split == "test"])
        val = set(sorted(set(splits[k].case_id) - test)[:3])
        part = slices[slices.case_id.isin(test | val)]
        table = part[["case_id", "slice_index", "has_tumor"]].assign(
            split=np.where(part.case_id.isin(test), "test", "val"),
            score_max=0.5,
            score_top100=0.5,
            score_area=1.0,
            model_sha256="a" * 64,
        )
        (results / rows[k]).mkdir(parents=True)
        table.to_csv(results / rows[k] / detection.SCORE_FILE, index=False)
        counts = [{"split": "test", "cases": len(test)}, {"split": "val", "cases": 3},
                  {"split": "train", "cases": len(splits[k]) - len(test) - 3}]  # fmt: skip
        result = {"split": f"patient-fold-{k + 1}-of-5", "model_sha256": "a" * 64, "split_counts": counts}
        (results / f"{rows[k]}.json").write_text(json.dumps(result))
    sources = detection.fold_sources("unet-bf16", runs, real_data, results)
    assert [isinstance(source, Path) for source in sources.values()] == [True, True, True, False, False]
    assert len(sources[rows[3]]) + len(sources[rows[4]]) > 0

    saved = results / rows[4] / detection.SCORE_FILE
    whole = saved.read_text()
    pd.read_csv(saved).iloc[1:].to_csv(saved, index=False)  # one slice of its cases left out
    with pytest.raises(SystemExit, match=f"{rows[4]}/slice-scores.csv and .* disagree on the slices"):
        detection.fold_sources("unet-bf16", runs, real_data, results)
    saved.write_text(whole)
    result = json.loads((results / f"{rows[4]}.json").read_text())
    result["split_counts"][0]["cases"] += 1
    (results / f"{rows[4]}.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit, match=f"holds {result['split_counts'][0]['cases'] - 1} test cases, .*json "):
        detection.fold_sources("unet-bf16", runs, real_data, results)
    (results / f"{rows[0]}.json").write_text(json.dumps({"model_sha256": "b" * 64}))
    with pytest.raises(SystemExit, match=f"results-{rows[0]}/model.h5 is not the model .* scored: collect this run"):
        detection.fold_sources("unet-bf16", runs, real_data, results)
