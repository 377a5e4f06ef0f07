"""Does a slice hold tumor? The segmenter answers too: score each slice from its tumor probabilities, pool the
scores over a recipe's cross-validation, and compare the ROC AUC with the classifier's on the same slices.

    python benchmarks/detection.py --recipe unet-bf16 --data data

Each fold row of the recipe (`benchmarks/results.py`: `<recipe>`, `<recipe>-fold2` ... `-fold5`) is scored from
its run folder `runs/results-<row>/` (`model.h5`, `split.csv`, `postprocess.json`); its model scores the test
slices of its own split, so that every slice is scored by a model that never saw its patient. A slice's score is
an aggregate of the probability map the run's post-processing uses (with flip TTA when it chose it): its largest
pixel probability, the mean of its 100 largest, or the tumor area of the post-processed mask (`AGGREGATES`).
Each fold chooses one on its own validation cases (never its test cases; in `lgg.data`'s folds they are test
cases of another fold, so a choice pooled over the folds would have seen test patients) and scores its test
slices with it; the others' test figures are recorded beside it, not used. Those validation cases also chose
the fold's checkpoint and post-processing, so they flatter the `area` (the only aggregate that reads the
post-processed mask) more than the others: the choice leans to it, the test figure does not. The classifier's pooled
probabilities (`results/classifier-cross-validation.csv`, written by `benchmarks/results.py --collect-only`) are
compared on the slices both scored, paired, with intervals from resampling patients
(`lgg.metrics.roc_auc_by_patient`).

Run folders are not committed, and a session's machine keeps them only until it ends, while a recipe's five
folds take more than one session to train. So each fold scored from its run folder leaves its validation and
test slices' scores, every aggregate, in `results/<row>/slice-scores.csv` with the sha256 of the model that
scored them; a later run takes a fold whose run folder is gone from that file, if `results/<row>.json` scored
the same model. With fewer than five folds it scores and saves what it has, and stops saying which folds lack.

Written: `results/slice-detection-<recipe>.json` and `.csv` (one row per test slice: fold, case, slice, tumor
or not, the chosen score, each aggregate's score) and `results/<row>/slice-scores.csv`, this script's own
files, replaced on each run.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from lgg.files import file_sha256  # noqa: E402
from results import CONFIGS, fold_rows, recipe_mismatch  # noqa: E402

RUN_FILES = ("model.h5", "split.csv", "postprocess.json", "config.json")
AGGREGATES = {  # a slice's score from its probability map, in the order a tie on validation is settled
    "max": "the largest pixel probability",
    "top100": "the mean of the 100 largest pixel probabilities",
    "area": "the tumor pixels of the post-processed mask (ties broken by the largest probability)",
}
TOP = 100
SCORE_FILE = "slice-scores.csv"  # results/<fold row>/: what a run folder left for a later run
HOW = (
    "each test slice scored from its fold's U-Net probabilities at 256x256 (flip TTA where the run chose it on "
    "validation cases) by the aggregate with the highest ROC AUC on that fold's own validation slices; the five "
    "fold models' scores pooled"
)


def segmenter_recipes():
    return sorted(n for n, c in CONFIGS.items() if c.kind != "classifier" and all(r in CONFIGS for r in fold_rows(n)))


def fold_sources(recipe, runs_dir, data_dir, results_dir):
    """Where each fold row of `recipe` is scored from, checked before anything is predicted -> {row: source}: its
    run folder `runs_dir/results-<row>/` (a finished run of its row: its files, its `config.json` agreeing with the
    row, a valid post-processing file, and the model `results/<row>.json` scored, if that records one), else the
    scores such a folder left (`committed_scores`), else None. The test cases found are each one fold's, all in
    `data_dir`, and with all five folds cover every patient of the split."""
    from lgg import data, postprocess

    sources, tested, patients, split_cases = {}, {}, set(), None

    def claim(cases, owner):
        for case in sorted(cases):
            if case in tested:
                raise SystemExit(f"{case} is a test case of both {tested[case]} and {owner}: each fold once")
            tested[case] = owner

    for row in fold_rows(recipe):
        folder = Path(runs_dir) / f"results-{row}"
        if not folder.exists():
            sources[row] = committed_scores(row, results_dir)
            if sources[row] is not None:
                claim(set(sources[row].case_id[sources[row].split == "test"]), row)
                patients.add(int(sources[row].split_patients.iloc[0]))
            continue
        missing = [name for name in RUN_FILES if not (folder / name).is_file()]
        if missing:
            raise SystemExit(f"{folder} is not a finished segmenter run of {recipe}: it has no {', '.join(missing)}")
        config = json.loads((folder / "config.json").read_text())
        mismatch = recipe_mismatch(config, row)
        if mismatch:
            raise SystemExit(f"{folder / 'config.json'} {mismatch}")
        result_file = Path(results_dir) / f"{row}.json"
        scored = json.loads(result_file.read_text()).get("model_sha256") if result_file.is_file() else None
        if scored and scored != file_sha256(folder / "model.h5"):
            raise SystemExit(f"{folder / 'model.h5'} is not the model {result_file} scored: collect this run "
                             "first (`python benchmarks/results.py --collect-only`)")  # fmt: skip
        try:
            postprocess.load(folder / "model.h5")
        except ValueError as error:
            raise SystemExit(str(error)) from None
        split = pd.read_csv(folder / "split.csv")
        if not {"case_id", "split"} <= set(split.columns):
            raise SystemExit(f"{folder / 'split.csv'} is not a split file: it needs the columns case_id and split")
        if split_cases is not None and set(split.case_id) != split_cases:
            raise SystemExit(f"{folder / 'split.csv'} splits other patients than the other folds' split.csv")
        split_cases = set(split.case_id)
        claim(set(split.loc[split["split"] == "test", "case_id"]), folder)
        patients.add(len(split_cases))
        sources[row] = folder
    if len(patients) > 1:
        raise SystemExit(f"the {recipe} folds split different numbers of patients ({sorted(patients)}): other data")
    if all(source is not None for source in sources.values()) and patients != {len(tested)}:
        untested = sorted(split_cases - set(tested)) if split_cases else []
        raise SystemExit(f"{max(patients) - len(tested)} patients of the split are in no fold's test cases: "
                         f"{untested[:4]}")  # fmt: skip
    found = data.find_slices(data_dir)
    missing = sorted(set(tested) - set(found.case_id))
    if missing:
        raise SystemExit(f"{len(missing)} test cases of the {recipe} folds are missing in {data_dir}: {missing[:4]}")
    for row, source in sources.items():
        if isinstance(source, pd.DataFrame):
            keys = ["case_id", "slice_index"]
            ours = found.loc[found.case_id.isin(set(source.case_id)), [*keys, "has_tumor"]]
            both = source[[*keys, "has_tumor"]].merge(ours, on=keys, how="outer", suffixes=("", "_data"))
            if len(both) != len(source) or len(both) != len(ours) or not (both.has_tumor == both.has_tumor_data).all():
                raise SystemExit(f"results/{row}/{SCORE_FILE} and {data_dir} disagree on the slices of its cases or "
                                 "their labels: scored on other data")  # fmt: skip
    return sources


def committed_scores(row, results_dir):
    """The validation and test slice scores a run folder of `row` left in `results/<row>/slice-scores.csv`, with
    `fold`, `run_split` and `split_patients` added; None without the file. Refused unless they are of the model
    that `results/<row>.json` scored (its `model_sha256`: a run trained again leaves the old scores stale), and of
    as many validation and test cases as it counts."""
    file = Path(results_dir) / row / SCORE_FILE
    if not file.is_file():
        return None
    table = pd.read_csv(file, float_precision="round_trip")
    needed = {"split", "case_id", "slice_index", "has_tumor", "model_sha256", *(f"score_{n}" for n in AGGREGATES)}
    if not needed <= set(table.columns):
        raise SystemExit(f"{file} lacks the columns {sorted(needed - set(table.columns))}")
    result_file = Path(results_dir) / f"{row}.json"
    if not result_file.is_file():
        raise SystemExit(f"{result_file} not found: nothing to check {file} against (it comes with the fold's results)")
    result = json.loads(result_file.read_text())
    if not result.get("model_sha256") or "split" not in result or "split_counts" not in result:
        raise SystemExit(f"{result_file} records no model_sha256, split or split_counts to check {file} against")
    if set(table.model_sha256) != {result["model_sha256"]}:
        raise SystemExit(f"{file} holds the scores of another model than the one {result_file} scored")
    if table.duplicated(["case_id", "slice_index"]).any():
        raise SystemExit(f"{file} scores some slices twice")
    counts = {part["split"]: part["cases"] for part in result["split_counts"]}
    for part in ("val", "test"):
        if table.case_id[table.split == part].nunique() != counts.get(part):
            raise SystemExit(f"{file} holds {table.case_id[table.split == part].nunique()} {part} cases, "
                             f"{result_file} {counts.get(part)}")  # fmt: skip
    return table.assign(fold=row, run_split=result["split"], split_patients=sum(counts.values()))


def aggregate(probabilities, masks):
    """Each slice's score under each of `AGGREGATES`, from its probability map and post-processed mask."""
    flat = probabilities.reshape(len(probabilities), -1)
    largest = flat.max(axis=1).astype(np.float64)
    area = masks.reshape(len(masks), -1).sum(axis=1)
    return {
        "max": largest,
        "top100": np.partition(flat, -TOP, axis=1)[:, -TOP:].astype(np.float64).mean(axis=1),
        # ranked by area, then by the largest probability: a slice's probability is at most 1, so on the scale
        # area + largest / 2 it only orders slices of equal area
        "area": area + largest / 2,
    }


def segmenter_scores(folder, data_dir, splits=("val", "test")):
    """One row per slice of each of `splits` of the run in `folder`: split, case, slice, tumor or not, and the
    slice's score under each aggregate (`score_<name>`). Every case of those splits must be in `data_dir`."""
    from lgg import data, evaluate, postprocess
    from lgg.inference import model_task

    model = evaluate.load_model(folder / "model.h5")
    if model_task(model) != "segmentation":
        raise SystemExit(f"{folder / 'model.h5'} is not a segmenter")
    split_file = pd.read_csv(folder / "split.csv")
    slices = evaluate.slices_with_split(data_dir, folder / "split.csv")
    settings = postprocess.load(folder / "model.h5")  # the probabilities `predict` uses: flip TTA if chosen
    tables = []
    for split in splits:
        cases = set(split_file.loc[split_file["split"] == split, "case_id"])
        if not cases:
            raise SystemExit(f"{folder / 'split.csv'} has no {split} cases")
        rows = slices[slices.split == split]
        absent = sorted(cases - set(rows.case_id))
        if absent:
            raise SystemExit(f"{len(absent)} {split} cases of {folder / 'split.csv'} are missing in {data_dir}: "
                             f"{absent[:4]}")  # fmt: skip
        images = data.load_arrays(rows, data.NATIVE_SIZE, with_masks=False)
        probabilities, masks = evaluate.segment(model, images, rows["case_id"], settings, rows["slice_index"])
        scores = {f"score_{name}": score for name, score in aggregate(probabilities, masks).items()}
        tables.append(rows[["split", "case_id", "slice_index", "has_tumor"]].assign(**scores))
    return pd.concat(tables, ignore_index=True).assign(fold=folder.name.removeprefix("results-"))


def choose(validation, where="the validation slices"):
    """The aggregate with the highest ROC AUC on `validation` (one fold's validation slices; the first of
    `AGGREGATES` on a tie) -> (its name, each aggregate's validation AUC)."""
    from lgg import metrics

    if validation.has_tumor.nunique() < 2:
        raise SystemExit(f"{where} are all of one kind: no aggregate can be chosen on them")
    aucs = {name: metrics.classification_report(validation.has_tumor, validation[f"score_{name}"])["roc_auc"]
            for name in AGGREGATES}  # fmt: skip
    return max(AGGREGATES, key=lambda name: (aucs[name], -list(AGGREGATES).index(name))), aucs


def compare(scores, classifier_file):
    """The segmenter against the classifier on the slices both scored; None (and says why) without them."""
    from lgg import metrics

    if not classifier_file.is_file():
        print(f"No comparison with the classifier: {classifier_file} not found (train its folds, then "
              "`python benchmarks/results.py --collect-only`)")  # fmt: skip
        return None
    classifier = pd.read_csv(classifier_file)
    needed = {"case_id", "slice_index", "has_tumor", "probability", "fold"}
    if not needed <= set(classifier.columns):
        raise SystemExit(f"{classifier_file} lacks the columns {sorted(needed - set(classifier.columns))}")
    both = scores.merge(classifier, on=["case_id", "slice_index"], suffixes=("", "_classifier"))
    if both.empty:
        print(f"No comparison with the classifier: {classifier_file} shares no slices with these folds")
        return None
    if not (both.has_tumor == both.has_tumor_classifier).all():
        raise SystemExit(f"{classifier_file} labels some slices otherwise than the data: was it scored on other data?")
    paired = metrics.roc_auc_by_patient(both.has_tumor, both.score, both.case_id, baseline=both.probability)
    return {**paired, "classifier_folds": sorted(both.fold_classifier.unique())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="unet-bf16", help="a segmenter recipe with five fold runs")
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--runs", default="runs", help="where the run folders are (default: runs)")
    args = parser.parse_args(argv)
    if args.recipe not in segmenter_recipes():
        raise SystemExit(f"--recipe {args.recipe!r} is not a segmenter recipe with folds; choose from "
                         f"{segmenter_recipes()}")  # fmt: skip
    from lgg import metrics
    from lgg.data import DatasetError
    from lgg.files import save_csv, save_json

    results_dir = ROOT / "results"
    tables, per_fold = [], []
    try:
        sources = fold_sources(args.recipe, args.runs, args.data, results_dir)
        for row, source in sources.items():  # each fold chooses on its own validation slices, then scores its test
            if source is None:
                continue
            if isinstance(source, Path):
                table = segmenter_scores(source, args.data)
                digest = file_sha256(source / "model.h5")
                split = json.loads((source / "config.json").read_text())["split"]
                (results_dir / row).mkdir(parents=True, exist_ok=True)
                save_csv(table.drop(columns="fold").assign(model_sha256=digest), results_dir / row / SCORE_FILE)
            else:
                table, digest, split = source, source.model_sha256.iloc[0], source.run_split.iloc[0]
                table = table.drop(columns=["model_sha256", "run_split", "split_patients"])
            validation = table[table.split == "val"]
            chosen, aucs = choose(validation, f"the validation slices of {row}")
            test = table[table.split == "test"].drop(columns="split")
            tables.append(test.assign(score=test[f"score_{chosen}"], aggregate=chosen))
            auc = metrics.classification_report(test.has_tumor, test[f"score_{chosen}"])["roc_auc"]
            per_fold.append({"fold": row, "split": split, "roc_auc": auc, "model_sha256": digest, "aggregate": chosen,
                             "validation_slices": len(validation),
                             "validation_patients": int(validation.case_id.nunique()),
                             "validation_roc_auc": aucs})  # fmt: skip
    except (DatasetError, ValueError, OSError) as error:  # a damaged file or missing data: the message, no trace
        raise SystemExit(str(error)) from None
    stem = f"slice-detection-{args.recipe}"
    lacking = [row for row, source in sources.items() if source is None]
    if lacking:
        stale = ""
        if (results_dir / f"{stem}.json").is_file():  # pooled from models of which one is no longer a fold's
            earlier = {
                f["fold"]: f["model_sha256"] for f in json.loads((results_dir / f"{stem}.json").read_text())["per_fold"]
            }
            if any(earlier.get(f["fold"]) != f["model_sha256"] for f in per_fold):
                for suffix in (".json", ".csv"):
                    (results_dir / f"{stem}{suffix}").unlink(missing_ok=True)
                stale = f"; results/{stem}.json and .csv, pooled from another model of some fold, removed"
        raise SystemExit(
            f"{len(tables)} of {len(sources)} folds of {args.recipe} scored (each one's slices in "
            f"results/<row>/{SCORE_FILE}); the pooled figures need all of them: {', '.join(lacking)} "
            f"{'has' if len(lacking) == 1 else 'have'} no run folder in {args.runs} and no {SCORE_FILE}{stale}"
        )
    scores = pd.concat(tables, ignore_index=True)
    found = {
        "recipe": args.recipe,
        "how": HOW,
        "aggregates": AGGREGATES,
        # recorded, not used to choose: what each aggregate would have scored on all the test slices
        "test_roc_auc_by_aggregate": {
            name: metrics.classification_report(scores.has_tumor, scores[f"score_{name}"])["roc_auc"]
            for name in AGGREGATES
        },
        "segmenter": metrics.roc_auc_by_patient(scores.has_tumor, scores.score, scores.case_id),
        "per_fold": per_fold,
        "vs_classifier": compare(scores, results_dir / "classifier-cross-validation.csv"),
    }
    save_csv(scores, results_dir / f"{stem}.csv")
    save_json(found, results_dir / f"{stem}.json")
    s = found["segmenter"]
    for fold in per_fold:
        print(f"{fold['fold']}: {fold['aggregate']} chosen on {fold['validation_slices']} validation slices ("
              + ", ".join(f"{n} {a:.3f}" for n, a in fold["validation_roc_auc"].items()) + ")")  # fmt: skip
    print(f"{args.recipe} as a slice classifier: ROC AUC {s['roc_auc']:.3f} ({s['roc_auc_ci95'][0]:.3f}-"
          f"{s['roc_auc_ci95'][1]:.3f}) over {s['patients']} patients, {s['slices']} slices")  # fmt: skip
    if found["vs_classifier"]:
        v = found["vs_classifier"]
        print(f"  vs the classifier on {v['slices']} slices of {v['patients']} patients: {v['roc_auc']:.3f} vs "
              f"{v['baseline_roc_auc']:.3f} ({v['difference']:+.3f}, {v['difference_ci95'][0]:+.3f} to "
              f"{v['difference_ci95'][1]:+.3f})")  # fmt: skip
    print(f"Wrote results/{stem}.json and .csv (`benchmarks/results.py --collect-only`: into the README)")


if __name__ == "__main__":
    sys.exit(main())
