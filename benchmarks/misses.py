"""The cases a cross-validated recipe misses: which cases lack an MRI sequence, and a look at each case
it scores 0 (or under `--below`).

The dataset fills a sequence a case lacks with its FLAIR (the pre-contrast or post-contrast channel of
every slice is then a copy of the FLAIR channel). This script finds those cases in the data, joins them
with the per-case Dice of a recipe's pooled cross-validation (`results/<recipe>-cross-validation.csv`),
and draws every case at Dice 0 there (every case under `--below D`): its tumor slices and the slices a
U-Net that never saw the case marks, in the three channels, the true outline green and the predicted
one red.

    python benchmarks/misses.py --data data --model runs/results-unet-again/model.h5
    python benchmarks/misses.py --data data --recipe unet-aug-bf16 --below 0.5 --fold-models

Writes `results/missing_sequences-<recipe>.csv` (one row per case), `results/missing_sequences-<recipe>.json`
(per group: cases, mean per-case Dice; what was drawn) and `results/misses/<recipe>/<case>.png`.
`--model` draws every case with one model; `--fold-models` draws each with the fold model that scored it
in the cross-validation (`runs/results-<fold row>/model.h5`). Either way the model must be a run whose
split kept the drawn case out of its training and validation cases (its `split.csv` says so; anything
else is refused, before anything is written).
"""

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from detection import segmenter_recipes  # noqa: E402  (the recipes with five fold rows, as detection.py takes them)

from lgg import data, guards, plots  # noqa: E402
from lgg.files import save_csv, save_json  # noqa: E402

RESULTS, RUNS = ROOT / "results", ROOT / "runs"
PRE, FLAIR, POST = range(3)  # lgg.data.CHANNELS
GROUPS = {  # (pre-contrast is FLAIR, post-contrast is FLAIR) -> what the case lacks
    (False, False): "all three sequences",
    (True, True): "FLAIR only",
    (False, True): "no post-contrast",
    (True, False): "no pre-contrast",
}
ROWS_PER_FIGURE = 8


def sequence_copies(slices):
    """Per case: its slices, and the share of its non-blank slices (any FLAIR signal) whose
    pre-contrast and post-contrast channels equal the FLAIR channel pixel for pixel."""
    rows = []
    for case_id, case in slices.groupby("case_id", sort=True):
        images = data.load_arrays(case, with_masks=False)
        shown = images[..., FLAIR].reshape(len(images), -1).max(axis=1) > 0
        same = {
            name: (images[shown][..., channel] == images[shown][..., FLAIR]).reshape(int(shown.sum()), -1).all(axis=1)
            for name, channel in (("pre", PRE), ("post", POST))
        }
        row = {"case_id": case_id, "slices": len(case), "non_blank_slices": int(shown.sum())}
        row |= {f"{name}_is_flair_share": float(values.mean()) if len(values) else 0.0 for name, values in same.items()}
        row["sequences"] = GROUPS[(row["pre_is_flair_share"] == 1.0, row["post_is_flair_share"] == 1.0)]
        rows.append(row)
    return pd.DataFrame(rows)


def by_group(table):
    """Cases and mean per-case Dice (pooled cross-validation) per group of sequences."""
    groups = {}
    for name, group in table.groupby("sequences", sort=False):
        groups[name] = {
            "cases": int(len(group)),
            "case_dice_mean": float(group["case_dice"].mean()),
            "cases_at_dice_0": sorted(group.loc[group["case_dice"] == 0, "case_id"]),
            "case_ids": sorted(group["case_id"]) if len(group) <= 10 else None,
        }
    return groups


def check_unseen(model_path, case_ids):
    """Refuse a model whose run trained on, or chose its epoch on, any of `case_ids` (its `split.csv`
    says so), or that has no `split.csv` to tell."""
    from lgg import evaluate

    if not Path(model_path).is_file():
        raise ValueError(f"{model_path}: no such model file")
    seen = evaluate.cases_trained_on(model_path, case_ids, parts=("train", "val"))
    if seen is None:
        raise ValueError(
            f"{model_path} has no split.csv beside it: draw a case with a model known never to have seen it"
        )
    if seen:
        raise ValueError(
            f"{model_path} trained or chose its epoch on {', '.join(seen)}: draw with a model that never saw it"
        )


def repository_path(path):
    """A path as the figures and tables name it: inside the repository, relative to it (no machine's layout)."""
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def draw_case(model_path, case_slices, dice, save_path):
    """The case's tumor slices (evenly spread, at most half the rows) and the slices the model marks
    without tumor there; each row the three channels with the true (green) and predicted (red) outlines.
    Returns what was drawn and what the model did on the whole case (its own per-case Dice)."""
    from lgg import evaluate, metrics, postprocess

    case_id = case_slices["case_id"].iloc[0]
    check_unseen(model_path, [case_id])
    case_slices = case_slices.sort_values("slice_index")
    images, masks = data.load_arrays(case_slices)
    model = evaluate.load_model(model_path)
    settings = postprocess.load(model_path)
    _, predicted = evaluate.segment(
        model, images, case_slices["case_id"].to_numpy(), settings, case_slices["slice_index"].to_numpy()
    )
    predicted, masks = np.asarray(predicted).reshape(masks.shape[:3]), masks.reshape(masks.shape[:3])
    own_dice = float(metrics.dice_score(masks, predicted))
    numbers = case_slices["slice_index"].to_numpy()
    true_area = masks.reshape(len(masks), -1).sum(axis=1)
    predicted_area = predicted.reshape(len(predicted), -1).sum(axis=1)
    tumor = np.flatnonzero(true_area > 0)
    marked_only = np.flatnonzero((predicted_area > 0) & (true_area == 0))
    keep_marked = marked_only[: ROWS_PER_FIGURE // 2]
    keep_tumor = tumor[np.linspace(0, len(tumor) - 1, min(len(tumor), ROWS_PER_FIGURE - len(keep_marked))).astype(int)]
    rows = sorted(set(keep_tumor) | set(keep_marked))
    titles = [f"slice {numbers[i]}: true {true_area[i]} px, predicted {predicted_area[i]} px" for i in rows]
    named = repository_path(model_path)
    title = (
        f"{case_id}: per-case Dice {dice:.2f} in the cross-validation\n"
        f"drawn by {named} (Dice {own_dice:.2f} here)\n"
        f"shown: {len(keep_tumor)} of {len(tumor)} tumor slices, "
        f"{len(keep_marked)} of {len(marked_only)} marked without tumor"
    )
    plots.plot_channel_outlines(images[rows], masks[rows], predicted[rows], titles, title, save_path)
    return {
        "model": named,
        "model_case_dice": own_dice,
        "tumor_slices": [int(numbers[i]) for i in tumor],
        "largest_tumor_px": int(true_area.max()),
        "marked_slices_without_tumor": [int(numbers[i]) for i in marked_only],
        "predicted_px": int(predicted_area.sum()),
        "rows_drawn": [int(numbers[i]) for i in rows],
    }


def drawing_settings(args):
    """What a table of this script depends on: the recipe, the Dice it draws under, and the model(s) drawing."""
    model = Path(args.model).resolve() if args.model else None
    return args.recipe, args.below, model, args.fold_models


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument(
        "--recipe", default="unet", help="whose cross-validation: results/<recipe>-cross-validation.csv (default: unet)"
    )
    parser.add_argument(
        "--below",
        type=guards.argparse_type(guards.positive, "--below", maximum=1),
        help="draw every case under this per-case Dice (default: the cases at Dice 0)",
    )
    drawing = parser.add_mutually_exclusive_group()
    drawing.add_argument("--model", help="one U-Net run's model.h5 that never saw the drawn cases")
    drawing.add_argument(
        "--fold-models",
        action="store_true",
        help="draw each case with the fold model that scored it: runs/results-<fold row>/model.h5",
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder of the tables and figures (default: results)")
    args = parser.parse_args(argv)
    try:
        guards.check_apart(args.out, [args.data])  # tables and figures never land among the data
    except FileExistsError as error:
        parser.error(str(error))
    if args.recipe not in segmenter_recipes():  # it also names files: only the recipes benchmarks/results.py has
        parser.error(
            f"--recipe {args.recipe!r} is not a segmenter recipe with folds; choose from {segmenter_recipes()}"
        )
    pooled = RESULTS / f"{args.recipe}-cross-validation.csv"
    if not pooled.is_file():
        parser.error(
            f"{pooled} is missing: `python benchmarks/results.py --collect-only` writes it from the five folds"
        )
    cross_validation = pd.read_csv(pooled)[["case_id", "case_dice", "fold"]]
    slices = data.find_slices(args.data)
    missing = sorted(set(cross_validation["case_id"]) - set(slices["case_id"]))
    if missing:
        parser.error(f"{len(missing)} cross-validated cases are not in {args.data}: {', '.join(missing[:5])}")
    left_out = sorted(set(slices["case_id"]) - set(cross_validation["case_id"]))
    if left_out:  # e.g. the full Kaggle download: 110 cases, of which the cross-validation scored 88
        print(f"{len(left_out)} cases of {args.data} are not in the cross-validation; left out")
    slices = slices[slices["case_id"].isin(cross_validation["case_id"])]
    drawn_rows = cross_validation[
        cross_validation["case_dice"] < args.below if args.below else cross_validation["case_dice"] == 0
    ].sort_values("case_dice")
    options = [f"--recipe {args.recipe}"] + ([f"--below {args.below:g}"] if args.below else [])
    options += [f"--model {args.model}"] if args.model else ["--fold-models"] if args.fold_models else []
    command = "python benchmarks/misses.py " + " ".join(options)
    earlier = Path(args.out) / f"missing_sequences-{args.recipe}.json"
    if earlier.is_file():  # another command's figures and facts (the README quotes them) are not replaced unasked
        try:
            written = json.loads(earlier.read_text())["command"]
            before = parser.parse_args(shlex.split(written)[2:])  # as this command's settings, --recipe unet if absent
        except (ValueError, KeyError, TypeError, SystemExit):
            parser.error(f"{earlier} exists and is not a table of this script: give another --out")
        if drawing_settings(before) != drawing_settings(args):
            parser.error(f"{earlier} was written by `{written}`, not `{command}`: run that command again, give "
                         "another --out, or move the file and its figures away first")  # fmt: skip
    models = {}  # case -> the model that draws it
    if args.model or args.fold_models:
        for case_id, fold in zip(drawn_rows["case_id"], drawn_rows["fold"]):
            models[case_id] = Path(args.model) if args.model else RUNS / f"results-{fold}" / "model.h5"
        try:
            for case_id, model in models.items():
                check_unseen(model, [case_id])  # before anything is written
        except ValueError as error:
            parser.error(str(error))
    table = sequence_copies(slices).merge(cross_validation, on="case_id", how="inner", validate="one_to_one")
    summary = {
        "command": command,
        "recipe": args.recipe,
        "drawn_below": args.below,
        "cases": int(len(table)),
        "cases_left_out": left_out,
        "groups": by_group(table),
        "drawn": {},
    }
    for name, group in summary["groups"].items():
        print(f"{name}: {group['cases']} cases, mean per-case Dice {group['case_dice_mean']:.3f}")
    out = Path(args.out)
    figures = out / "misses" / args.recipe
    if models:
        figures.mkdir(parents=True, exist_ok=True)
        for case_id, model in models.items():
            row = table.loc[table["case_id"] == case_id].iloc[0]
            path = figures / f"{case_id}.png"
            drawn = draw_case(model, slices[slices["case_id"] == case_id], row["case_dice"], path)
            summary["drawn"][case_id] = {
                "figure": path.relative_to(out).as_posix(),
                "sequences": row["sequences"],
                "case_dice": float(row["case_dice"]),
                "fold": row["fold"],
                **drawn,
            }
            print(f"Drew {path}")
    out.mkdir(parents=True, exist_ok=True)
    save_csv(table, out / f"missing_sequences-{args.recipe}.csv")
    save_json(summary, out / f"missing_sequences-{args.recipe}.json")


if __name__ == "__main__":
    main()
