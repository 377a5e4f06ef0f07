"""Rules for choosing a fold model's weights and post-processing, tried on finished runs from their committed tables.

    python benchmarks/selection_rules.py --rows unet-aug-flair-160-tf70-bf16-fold4 unet-aug-flair-160-tf70-bf16-fold3 \\
        --out results/selection-unet-aug-flair-160-tf70-bf16.json

Each fold run chooses its weights (the epoch with the best validation score) and its post-processing (the setting
with the best mean validation case Dice, `lgg.postprocess.choose`) on 5-12 validation patients. From the tables
`benchmarks/results.py` keeps in `results/<row>/` (each case's Dice under every setting, on the validation and on the
test cases, for the kept weights and for the last snapshot: `lgg.postprocess.wide_case_table`), this scores other
rules on the same test cases without a model. The rules were fixed before any test figure of the runs they were
first tried on existed:

- weights `kept` (the best validation epoch, as the runs ship) or `last` (the weights at the end of the schedule,
  as nnU-Net ships them);
- setting `validation` (the rule runs use), `no-largest-3d` (the same among the settings without the largest 3-D
  component, the step that took a 3-slice tumor to Dice 0 in four runs), `tta-on-ties` (the same, but flip TTA
  preferred among the tied settings: it costs inference time, not a choice on the validation cases), `raw`
  (threshold 0.5, nothing chosen).

The test cases choose nothing: every rule reads the validation table only, and the test table only to score it.
`kept` with `validation` must give each run's committed test figures again (`results/<row>/test.csv`), and `last`
with `validation` its last snapshot's (`after_minutes_cases.csv`): a run whose tables do not is refused. Reported
for each pair of weights and rule: the mean per-case Dice over the runs' test cases, per run, and paired with the
runs' own choice (`kept`, `validation`; `lgg.metrics.paired_comparison`). With `--out`, written as JSON (this
script's own file, replaced only by the same rows or more) and one row per case, weights and rule in the `.csv` beside
it.
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lgg import metrics, postprocess  # noqa: E402
from lgg.evaluate import snapshot_folder  # noqa: E402
from lgg.files import check_own_json, save_csv, save_json  # noqa: E402

RESULTS = ROOT / "results"
KEYS = ("command", "rows", "rules")  # what marks a file of this script
AGREE = 2e-4  # the tables keep each Dice to 4 decimals; a rule that reproduces a run's figures agrees within this
WEIGHTS = ("kept", "last")
CASE_COLUMNS = ("row", "weights", "rule", "case_id", "case_dice")  # the .csv beside --out


def _tta_on_ties(grid):
    """`postprocess.choose`, with flip TTA preferred among the tied settings where any of them has it: the simplest
    of the tied settings with TTA, never one outside the tie."""
    table = postprocess.mean_by_setting(grid)
    tied = table[table["case_dice_mean"] >= table["case_dice_mean"].max() - postprocess.TIE_TOLERANCE]
    if not tied["hflip_tta"].any():
        return postprocess.choose(table)
    return postprocess.choose(tied[tied["hflip_tta"]], tolerance=float("inf"))  # all tied: the simplest


RULES = {
    "validation": postprocess.choose_from_cases,
    "no-largest-3d": lambda grid: postprocess.choose_from_cases(grid[~grid["largest_3d"]]),
    "tta-on-ties": _tta_on_ties,
    "raw": lambda grid: dict(postprocess.RAW),
}


def _read(path, columns):
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable CSV ({error})") from None
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: no column {', '.join(missing)}")
    return table


def _grid(path):
    """A `<split>_postprocessing_cases.csv` as `case_dice_by_setting` rows, checked: numbers in [0, 1], each case
    once under every candidate setting."""
    if not path.is_file():
        raise ValueError(f"{path} not found: the row was collected before its runs kept each case's Dice by setting")
    table = _read(path, ["case_id"])
    if table.empty:
        raise ValueError(f"{path}: no cases")
    try:
        grid = postprocess.long_case_table(table)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    settings = {postprocess.setting_key(s) for s in postprocess.candidates()}
    dice = pd.to_numeric(grid["case_dice"], errors="coerce")
    if set(table.columns[1:]) != settings or table["case_id"].duplicated().any():
        raise ValueError(f"{path}: not one row per case and one column per candidate setting ({len(settings)})")
    if dice.isna().any() or not dice.between(0, 1).all():
        raise ValueError(f"{path}: each case's Dice must be a number in [0, 1]")
    return grid.assign(case_dice=dice)


def grids(row):
    """{weights: (validation grid, test grid, the row's own setting, the row's own per-case test Dice)} from the
    row's committed files; `ValueError` naming the file where one is missing or not what it should be."""
    folder, path = RESULTS / row, RESULTS / f"{row}.json"
    try:
        result = json.loads(path.read_text())
        own_setting = postprocess.describe(postprocess.check(result["test"]["postprocessing"]))
        limit = result["time_limit_minutes"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a row of benchmarks/results.py with its post-processing ({error!r})") from None
    curve = _read(folder / "dice_vs_minutes.csv", ["minutes", "postprocessing"])
    if curve.empty:
        raise ValueError(f"{folder / 'dice_vs_minutes.csv'}: no snapshot")
    last = curve["minutes"].iloc[-1]
    if last != limit:
        raise ValueError(f"{folder / 'dice_vs_minutes.csv'}: its last snapshot, after {last:g} minutes, is not the "
                         f"end of the run's {limit} minutes")  # fmt: skip
    after = _read(folder / "after_minutes_cases.csv", ["minutes", "case_id", "case_dice"])
    if not (after["minutes"] == last).any():
        raise ValueError(f"{folder / 'after_minutes_cases.csv'}: no cases after {last:g} minutes")
    kept = _read(folder / "test.csv", ["case_id", "case_dice"]).set_index("case_id")["case_dice"]
    name = snapshot_folder(Path(), last).name
    found = {
        "kept": (
            _grid(folder / "val_postprocessing_cases.csv"),
            _grid(folder / "test_postprocessing_cases.csv"),
            own_setting,
            kept,
        ),
        "last": (
            _grid(folder / f"{name}_val_postprocessing_cases.csv"),
            _grid(folder / f"{name}_test_postprocessing_cases.csv"),
            curve["postprocessing"].iloc[-1],
            after[after["minutes"] == last].set_index("case_id")["case_dice"],
        ),
    }
    for weights, (validation, test, _, own) in found.items():
        if set(validation["case_id"]) & set(test["case_id"]):
            raise ValueError(f"{folder}: the {weights} weights' validation and test tables share cases")
        if set(test["case_id"]) != set(own.index):
            raise ValueError(f"{folder}: the {weights} weights' test table holds other cases than the run's figures")
    return found


def selection(rows, command):
    """Every rule and weights on every row -> (figures, one row per case, weights and rule)."""
    cases, chosen, seen = [], {}, {}
    for row in rows:
        found = grids(row)
        for case_id in found["kept"][1]["case_id"].unique():
            if case_id in seen:  # a patient twice would be paired with itself, and weigh twice
                raise ValueError(f"case {case_id} is a test case of both {seen[case_id]} and {row}: pool rows of "
                                 "different patients (the folds of one recipe)")  # fmt: skip
            seen[case_id] = row
        for weights, (validation, test, own_setting, own_dice) in found.items():
            for rule, choose in RULES.items():
                settings = choose(validation)
                dice = postprocess.dice_under(test, settings)
                if rule == "validation" and (
                    postprocess.describe(settings) != own_setting
                    or (dice - own_dice.loc[dice.index]).abs().max() > AGREE
                ):
                    raise ValueError(
                        f"{row}: on its {weights} weights' validation table the run's own rule chooses "
                        f"{postprocess.describe(settings)} (the run chose {own_setting}), or scores its test cases "
                        f"otherwise than its figures (the tables keep 4 decimals: a tie within "
                        f"{postprocess.TIE_TOLERANCE} may fall the other way); not scored"
                    )
                chosen[(row, weights, rule)] = postprocess.describe(settings)
                cases.append(pd.DataFrame(dict(zip(CASE_COLUMNS, (row, weights, rule, dice.index, dice.to_numpy())))))
    cases = pd.concat(cases, ignore_index=True)
    baseline = cases[(cases.weights == "kept") & (cases.rule == "validation")]
    summary = []
    for (weights, rule), group in cases.groupby(["weights", "rule"], sort=False):
        paired = metrics.paired_comparison(group, baseline)
        if paired["better"] + paired["worse"] == 0 or not all(map(math.isfinite, paired["mean_difference_ci95"])):
            # one difference on every case (none, mostly): no interval to bootstrap
            paired["mean_difference_ci95"] = [paired["mean_difference"]] * 2
        summary.append(
            {
                "weights": weights,
                "rule": rule,
                "cases": int(len(group)),
                "mean_case_dice": float(group.case_dice.mean()),
                "per_row": {
                    row: {"mean_case_dice": float(part.case_dice.mean()), "setting": chosen[(row, weights, rule)]}
                    for row, part in group.groupby("row", sort=False)
                },
                "vs_kept_validation": paired,
            }
        )
    return {"command": command, "rows": list(rows), "rules": summary}, cases


def check_out(out, rows):
    """Refuse (SystemExit) an `--out` that is not a `.json` this script may write, or its file of rows not all among
    `rows` (a file is replaced by the same rows, or by more: the folds of a recipe as they come), and a `.csv`
    beside it that this script did not write with that file."""
    if out.suffix != ".json":
        raise SystemExit(f"--out {out}: a .json file (its cases go beside it as .csv)")
    check_own_json(out, KEYS, "benchmarks/selection_rules.py", inputs=[RESULTS / row for row in rows])
    found = json.loads(out.read_text())["rows"] if out.exists() else None
    if found is not None and not (
        isinstance(found, list) and found and all(isinstance(row, str) for row in found) and set(found) <= set(rows)
    ):
        raise SystemExit(f"{out} holds the rules of other rows: choose another --out")
    table = out.with_suffix(".csv")
    if table.exists():
        try:
            header = table.read_text().splitlines()[0] if found is not None else None
        except (OSError, UnicodeDecodeError, IndexError):
            header = None
        if header != ",".join(CASE_COLUMNS):
            raise SystemExit(f"{table} exists and was not written with {out}: choose another --out")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", required=True, help="fold rows of results/ (their folders' tables)")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file (and the cases beside it)")
    args = parser.parse_args(argv)
    if len(set(args.rows)) != len(args.rows):
        raise SystemExit("a row is named twice: each run's test cases count once")
    if args.out is not None:
        check_out(args.out, args.rows)
    command = shlex.join(["python", "benchmarks/selection_rules.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        result, cases = selection(args.rows, command)
    except (OSError, KeyError, ValueError) as error:
        raise SystemExit(str(error)) from None
    for entry in result["rules"]:
        paired = entry["vs_kept_validation"]
        low, high = paired["mean_difference_ci95"]
        print(
            f"{entry['weights']:4s} {entry['rule']:13s} {entry['mean_case_dice']:.3f} on {entry['cases']} cases; "
            f"vs kept/validation {paired['mean_difference']:+.3f} ({low:+.3f} to {high:+.3f}), "
            f"{paired['better']} better / {paired['worse']} worse; per row "
            + ", ".join(f"{v['mean_case_dice']:.3f} ({v['setting']})" for v in entry["per_row"].values())
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_csv(cases, args.out.with_suffix(".csv"))
        save_json(result, args.out)
        print(f"wrote {args.out} and {args.out.with_suffix('.csv')}")


if __name__ == "__main__":
    main()
