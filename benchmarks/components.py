"""Which 3-D region the largest-component step keeps, case by case, and what another rule would keep.

    python benchmarks/components.py --data data --name fold-1-xeon runs/results-unet-aug-flair-bf16-again \\
        runs/results-unet-aug-flair-w32-bf16 runs/results-unet-aug-flair-160-bf16

`train` may choose, on its validation cases, to keep only the largest 26-connected region of each case's
predicted volume (`lgg.postprocess.largest_component_3d`, as Buda et al. 2019 did). Beside a larger false
alarm that step drops a small tumor, and the case scores 0 (TCGA_CS_5395 in the fold-1 runs of
`results/EXPERIMENTS.md`). Here, for every validation and test case of each run folder, at the run's own
threshold, small-component removal and flip TTA (its `postprocess.json`; its largest-component switch aside),
every region is listed with its voxels, summed probability, peak probability, slices and the true tumor voxels
inside it, and the case is scored under four rules: every region kept (`all`, no step), the largest by voxels
(`voxels`, the step), the one with the most summed probability (`probability_sum`), the one with the highest
peak probability, ties by summed probability (`peak`).

Written, never over anything that exists: `results/components-<name>.csv` (one row per region) and
`results/components-<name>.json` (per run and split the mean per-case Dice of each rule, and every case on
which the rules differ).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results"

RULES = ("all", "voxels", "probability_sum", "peak")
RUN_FILES = ("model.h5", "postprocess.json", "split.csv")


def regions(probabilities, true_mask, slice_numbers, settings):
    """One case, its slices in order: `(table, kept)`, a row per predicted 3-D region and, per rule of
    `RULES`, the mask volume it keeps."""
    from scipy import ndimage

    from lgg import postprocess

    mask = postprocess.remove_small_components(probabilities >= settings["threshold"], settings["min_component_px"])
    labels, count = postprocess.label_3d(mask, slice_numbers)
    ids = np.arange(1, count + 1)
    if not count:
        columns = ["region", "voxels", "probability_sum", "peak_probability", "first_slice", "last_slice",
                   "true_voxels_inside"]  # fmt: skip
        return pd.DataFrame(columns=columns), dict.fromkeys(RULES, mask)
    voxels = np.asarray(ndimage.sum(mask, labels, ids), int).reshape(-1)
    mass = np.asarray(ndimage.sum(probabilities, labels, ids), float).reshape(-1)
    peak = np.asarray(ndimage.maximum(probabilities, labels, ids), float).reshape(-1)
    inside = np.asarray(ndimage.sum(true_mask, labels, ids), int).reshape(-1)
    extents = ndimage.find_objects(labels)
    table = pd.DataFrame({
        "region": ids,
        "voxels": voxels,
        "probability_sum": mass.round(2),
        "peak_probability": peak.round(6),
        "first_slice": [int(slice_numbers[extent[0].start]) for extent in extents],
        "last_slice": [int(slice_numbers[extent[0].stop - 1]) for extent in extents],
        "true_voxels_inside": inside,
    })  # fmt: skip
    choice = {"voxels": np.argmax(voxels), "probability_sum": np.argmax(mass), "peak": np.lexsort((mass, peak))[-1]}
    return table, {"all": mask, **{rule: labels == ids[index] for rule, index in choice.items()}}


def read_run(run, data_dir, only_cases=None):
    """`(settings, slices)` of a run folder: its post-processing and its validation and test slices in `data_dir`
    (only `only_cases`, each of which must be one), in case and slice order; or a clear error naming the run."""
    from lgg import evaluate, postprocess

    if (run / "test_slices.csv").is_file():
        raise SystemExit(f"{run} is a classifier's run: only a segmenter's predictions have regions")
    missing = [name for name in RUN_FILES if not (run / name).is_file()]
    if missing:
        raise SystemExit(f"{run} is not a segmenter run folder: it has no {', '.join(missing)}")
    try:
        settings = postprocess.load(run / "model.h5")
        slices = evaluate.slices_with_split(data_dir, run / "split.csv")
    except (OSError, ValueError) as error:
        raise SystemExit(f"{run}: {error}") from None
    missing = [] if only_cases else evaluate.missing_cases(slices, run / "split.csv", ["val", "test"])
    if missing:  # a figure over the cases at hand would stand for the run's (--cases asks for a part: checked below)
        raise SystemExit(f"{len(missing)} validation / test cases of {run} are not in {data_dir}: {missing[:4]}")
    slices = slices[slices["split"].isin(["val", "test"])].sort_values(["case_id", "slice_index"])
    if only_cases:
        unknown = sorted(set(only_cases) - set(slices.case_id))
        if unknown:
            raise SystemExit(f"{run}: {unknown} are not validation or test cases of its split.csv in {data_dir}")
        slices = slices[slices["case_id"].isin(only_cases)]
    return settings, slices


def score_run(run, settings, slices):
    """`(regions, dice)` of a run folder's `slices` (`read_run`): a row per region, a row per case and rule."""
    from lgg import data, evaluate, metrics
    from lgg.inference import predict_with_mirror

    try:
        model = evaluate.load_model(run / "model.h5")
    except (OSError, ValueError) as error:
        raise SystemExit(f"{run}: {error}") from None
    found, scored = [], []
    for split, rows in slices.groupby("split"):
        images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
        plain, tta = predict_with_mirror(model, images)
        probabilities = tta if settings["hflip_tta"] else plain
        masks = masks.reshape(probabilities.shape).astype(bool)
        for case_id in pd.unique(rows["case_id"]):
            at = np.flatnonzero(rows["case_id"].to_numpy() == case_id)
            numbers = rows["slice_index"].to_numpy()[at]
            table, kept = regions(probabilities[at], masks[at], numbers, settings)
            found.append(table.assign(run=run.name, split=split, case_id=case_id))
            for rule in RULES:
                dice = metrics.dice_score(masks[at], kept[rule])
                scored.append({"run": run.name, "split": split, "case_id": case_id, "rule": rule, "case_dice": dice})
    return pd.concat(found, ignore_index=True), pd.DataFrame(scored)


def summarize(dice):
    """Per run and split: cases and the mean per-case Dice of each rule; and the cases on which the rules differ."""
    wide = dice.pivot_table(index=["run", "split", "case_id"], columns="rule", values="case_dice")[list(RULES)]
    means = wide.groupby(level=["run", "split"]).mean()
    counts = wide.groupby(level=["run", "split"]).size()
    differ = wide[wide.max(axis=1) - wide.min(axis=1) > 1e-9]
    return {
        "mean_case_dice": [
            {
                "run": run,
                "split": split,
                "cases": int(counts[(run, split)]),
                **means.loc[(run, split)].round(4).to_dict(),
            }
            for run, split in means.index
        ],
        "cases_where_rules_differ": [
            {"run": run, "split": split, "case_id": case, **row.round(4).to_dict()}
            for (run, split, case), row in differ.iterrows()
        ],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="segmenter run folders (model.h5, postprocess.json, "
                        "split.csv)")  # fmt: skip
    parser.add_argument("--name", required=True, help="names results/components-NAME.{csv,json}")
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument(
        "--cases", nargs="+", metavar="CASE", help="only these validation / test cases (after the run folders)"
    )
    args = parser.parse_args(argv)
    from lgg.files import check_new_results, save_csv, save_json

    table_path = RESULTS / f"components-{args.name}.csv"
    result_path = table_path.with_suffix(".json")
    check_new_results(args.name, [table_path, result_path])
    runs = [Path(run) for run in args.runs]
    if len({run.name for run in runs}) < len(runs):
        raise SystemExit("two run folders have the same name: the tables tell runs apart by it")
    inputs = [read_run(run, args.data, args.cases) for run in runs]  # every run checked before any prediction

    found, scored = [], []
    for run, (settings, slices) in zip(runs, inputs, strict=True):
        print(f"Listing the predicted regions of the validation and test cases of {run}", flush=True)
        regions_of_run, dice_of_run = score_run(run, settings, slices)
        found.append(regions_of_run)
        scored.append(dice_of_run)
    found, scored = pd.concat(found, ignore_index=True), pd.concat(scored, ignore_index=True)
    result = {
        "name": args.name,
        "runs": [str(run) for run in runs],
        "how": "per-case Dice at native 256x256 (whole volume); each run's own threshold, small-component removal "
        "and flip TTA; the rule decides which 26-connected 3-D region is kept: all (no step), the largest by "
        "voxels (the step), the most summed probability, the highest peak probability",
        **summarize(scored),
    }
    check_new_results(args.name, [table_path, result_path], written=True)
    columns = ["run", "split", "case_id", "region", "voxels", "probability_sum", "peak_probability", "first_slice",
               "last_slice", "true_voxels_inside"]  # fmt: skip
    save_csv(found[columns], table_path)
    save_json(result, result_path)
    for row in result["mean_case_dice"]:
        rules = ", ".join(f"{rule} {row[rule]:.3f}" for rule in RULES)
        print(f"{row['run']} {row['split']} ({row['cases']} cases): {rules}")
    print(f"Wrote {table_path} and {result_path}")


if __name__ == "__main__":
    main()
