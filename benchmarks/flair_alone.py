"""What `predict --fill-from-flair` costs: every test case of a recipe's five folds scored twice by its fold
model, as the dataset gives it and from its FLAIR alone (pre- and post-contrast replaced by the FLAIR, as
`--fill-from-flair` and the dataset itself fill a missing sequence), paired case by case.

    python benchmarks/flair_alone.py --data data --recipe unet-aug-flair-bf16

Each fold row's model is read from its run folder `runs/results-<row>/` (`model.h5`, `split.csv`,
`postprocess.json`) and scores the test cases of its own split, with its own post-processing, at 256x256:
the same path as `python -m lgg evaluate`. So the scores "as given" must equal the fold's committed
`results/<row>/test.csv` case by case; a fold whose model scores otherwise (another model in the folder,
another dataset) is refused, and nothing is written. The dataset's FLAIR-only cases score the same both
ways (their pre- and post-contrast already are the FLAIR).

Writes `results/flair-alone-<recipe>.csv` (one row per case: fold, the sequences it has, Dice both ways)
and `results/flair-alone-<recipe>.json` (pooled means, the paired comparison, the median case's difference and
the cases under 0.5 each way, per group of sequences),
this script's own files, replaced on each run.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detection import segmenter_recipes  # noqa: E402  (the recipes with five fold rows, as detection.py takes them)
from paired import LOW  # noqa: E402  (a case "under 0.5" is mostly missed: one threshold for both tools)

from lgg.files import save_csv, save_json  # noqa: E402
from results import fold_rows  # noqa: E402

RESULTS, RUNS = ROOT / "results", ROOT / "runs"
TOLERANCE = 5e-3  # per-case Dice "as given" against the committed test.csv: same code, a few pixels may round apart


def flair_alone(images):
    """Slices (N, H, W, 3) with the pre- and post-contrast channels replaced by the FLAIR channel."""
    from lgg.data import FLAIR_CHANNEL

    return np.repeat(np.asarray(images)[..., FLAIR_CHANNEL : FLAIR_CHANNEL + 1], 3, axis=-1)


def score_fold(model_path, data_dir, cases=None):
    """The test cases of the run beside `model_path` (its `split.csv`; `cases` keeps only these), scored as
    given and from the FLAIR alone with the run's post-processing -> DataFrame (case_id, dice_as_given,
    dice_flair_alone)."""
    from lgg import data, evaluate, metrics, postprocess
    from lgg.inference import predict_probabilities, predict_with_mirror

    model_path = Path(model_path)
    slices = evaluate.slices_with_split(data_dir, model_path.parent / "split.csv")
    rows = slices[slices["split"] == "test"]
    if cases is not None:
        rows = rows[rows["case_id"].isin(cases)]
    if rows.empty:
        raise ValueError(f"{model_path.parent / 'split.csv'}: no test cases {'among ' + str(cases) if cases else ''}")
    settings = postprocess.load(model_path)
    model = evaluate.load_model(model_path)
    images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
    table = pd.DataFrame({"case_id": sorted(rows["case_id"].unique())})
    for name, shown in (("as_given", images), ("flair_alone", flair_alone(images))):
        if settings["hflip_tta"]:
            probabilities = predict_with_mirror(model, shown)[1]
        else:
            probabilities = predict_probabilities(model, shown)
        predicted = postprocess.masks_from_probabilities(probabilities, rows["case_id"], settings, rows["slice_index"])
        per_case, _ = metrics.segmentation_report(rows, masks, probabilities, predicted=predicted)
        table[f"dice_{name}"] = table["case_id"].map(per_case.set_index("case_id")["case_dice"])
    return table


def check_reproduced(table, committed_csv):
    """Refuse scores "as given" that differ from the fold's committed per-case Dice."""
    committed = pd.read_csv(committed_csv).set_index("case_id")["case_dice"]
    if set(table["case_id"]) != set(committed.index):
        raise ValueError(f"{committed_csv} holds other test cases than the run's split.csv: another run")
    off = (table.set_index("case_id")["dice_as_given"] - committed).abs()
    if off.max() > TOLERANCE:
        raise ValueError(
            f"{committed_csv}: the model scores {off.idxmax()} {off.max():.4f} away from its committed Dice: "
            "not the model that was scored there"
        )


def summarize(table, recipe, command):
    """The figures of `recipe`'s per-case `table` (`case_id`, `dice_as_given`, `dice_flair_alone`, `sequences`)
    -> the summary JSON's dict; `command` is recorded as given."""
    from lgg import metrics

    given = table[["case_id"]].assign(case_dice=table["dice_as_given"])
    alone = table[["case_id"]].assign(case_dice=table["dice_flair_alone"])
    return {
        "command": command,
        "recipe": recipe,
        "how": "each fold's test cases scored by its model (mean per-case Dice at 256x256, the run's "
        "post-processing) as given and with pre- and post-contrast replaced by the FLAIR",
        "cases": len(table),
        "case_dice_mean_as_given": float(table["dice_as_given"].mean()),
        "case_dice_mean_flair_alone": float(table["dice_flair_alone"].mean()),
        "case_dice_mean_flair_alone_ci95": list(metrics.mean_confidence_interval(table["dice_flair_alone"])),
        "cases_at_dice_0_flair_alone": sorted(table.loc[table["dice_flair_alone"] == 0, "case_id"]),
        "paired_flair_alone_vs_as_given": metrics.paired_comparison(alone, given),
        "median_case_difference": float((table["dice_flair_alone"] - table["dice_as_given"]).median()),
        f"cases_under_{LOW}_as_given": int((table["dice_as_given"] < LOW).sum()),
        f"cases_under_{LOW}_flair_alone": int((table["dice_flair_alone"] < LOW).sum()),
        "groups": {
            name: {
                "cases": len(group),
                "as_given": float(group["dice_as_given"].mean()),
                "flair_alone": float(group["dice_flair_alone"].mean()),
            }
            for name, group in table.groupby("sequences")
        },
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--recipe", required=True, choices=segmenter_recipes(), help="a recipe with five fold rows")
    args = parser.parse_args(argv)

    from misses import sequence_copies  # which sequences each case has (the dataset's copies of its FLAIR)

    from lgg import data

    needed = ("model.h5", "split.csv")
    missing = [
        row for row in fold_rows(args.recipe) if not all((RUNS / f"results-{row}" / n).is_file() for n in needed)
    ]
    if missing:
        raise SystemExit(f"no run folder for {', '.join(missing)} in {RUNS}: train them first (benchmarks/results.py)")
    missing = [str(RESULTS / row / "test.csv") for row in fold_rows(args.recipe)
               if not (RESULTS / row / "test.csv").is_file()]  # fmt: skip
    if missing:
        raise SystemExit(
            f"no committed test table {', '.join(missing)}: collect the folds first (benchmarks/results.py)"
        )
    from lgg import evaluate

    try:
        present = data.find_slices(args.data)
    except (data.DatasetError, FileNotFoundError) as error:
        raise SystemExit(f"{args.data}: {error}") from None
    for row in fold_rows(args.recipe):  # every test case of every fold, before any is predicted
        lacking = evaluate.missing_cases(present, RUNS / f"results-{row}" / "split.csv", ["test"])
        if lacking:
            raise SystemExit(f"{len(lacking)} test cases of {row} are not in {args.data}: {lacking[:4]}")
    tables = []
    for row in fold_rows(args.recipe):
        table = score_fold(RUNS / f"results-{row}" / "model.h5", args.data)
        check_reproduced(table, RESULTS / row / "test.csv")
        tables.append(table.assign(fold=row))
        print(
            f"{row}: {table['dice_as_given'].mean():.3f} as given, {table['dice_flair_alone'].mean():.3f} FLAIR alone"
        )
    table = pd.concat(tables, ignore_index=True)
    slices = present
    sequences = sequence_copies(slices[slices["case_id"].isin(table["case_id"])]).set_index("case_id")["sequences"]
    table["sequences"] = table["case_id"].map(sequences)
    summary = summarize(
        table, args.recipe, f"python benchmarks/flair_alone.py --data {args.data} --recipe {args.recipe}"
    )
    save_csv(table, RESULTS / f"flair-alone-{args.recipe}.csv")
    save_json(summary, RESULTS / f"flair-alone-{args.recipe}.json")
    paired = summary["paired_flair_alone_vs_as_given"]
    print(
        f"{len(table)} cases: {summary['case_dice_mean_as_given']:.3f} as given, "
        f"{summary['case_dice_mean_flair_alone']:.3f} from the FLAIR alone ({paired['mean_difference']:+.3f}, "
        f"{paired['better']} better / {paired['worse']} worse)"
    )


if __name__ == "__main__":
    main()
