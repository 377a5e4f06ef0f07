"""Two recipes (or two runs) case by case on the same patients, from their committed per-case tables: the paired
figures the README quotes where no `-vs-` file of `results.py` holds them (another partner, a subgroup).

    python benchmarks/paired.py --candidate results/unet-aug-flair-bf16-cross-validation.csv \\
        --other results/unet-aug-bf16-cross-validation.csv \\
        --groups results/missing_sequences-unet-aug-flair-bf16.json --out results/paired/flair-vs-aug.json

`--candidate` and `--other` each take one or more per-case tables (a `*-cross-validation.csv`, or the
`test.csv` of fold runs, concatenated); both sides must hold the same cases, each once. Reported: both means and
medians, the paired difference candidate minus other (`lgg.metrics.paired_comparison`: mean with its 95 %
bootstrap interval, cases better / worse, Wilcoxon p), the median case's difference, the cases under 0.5 on
each side, and the same by quarter of true tumor volume (`true_volume_px`, equal on both sides). With `--groups`
(a `missing_sequences-*.json` of `benchmarks/misses.py`), also within each group of sequences and outside it
(among the tables' cases).
Prints the figures; with `--out`, writes them as JSON (this script's own file: never over another).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lgg.files import check_own_json, file_sha256, save_json  # noqa: E402

COLUMNS = ("case_id", "case_dice", "true_volume_px")
KEYS = ("command", "candidate", "other", "paired")  # what marks a file of this script
LOW = 0.5  # a case "under 0.5" is mostly missed


def read_cases(paths):
    """The per-case tables at `paths`, concatenated -> DataFrame. Refuses (ValueError, naming the file) a file
    that is not such a table, and a case found twice."""
    tables = []
    for path in paths:
        try:
            table = pd.read_csv(path)
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a readable CSV ({error})") from None
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)}: not a per-case table of this repository")
        dice = pd.to_numeric(table.case_dice, errors="coerce")
        if dice.isna().any() or not dice.between(0, 1).all():
            raise ValueError(f"{path}: case_dice must be numbers in [0, 1]")
        tables.append(table.assign(source=str(path)))
    cases = pd.concat(tables, ignore_index=True)
    twice = cases[cases.case_id.duplicated(keep=False)]
    if len(twice):
        first = twice.iloc[0]
        where = ", ".join(sorted(set(twice[twice.case_id == first.case_id].source)))
        raise ValueError(f"case {first.case_id} appears twice ({where}): each case belongs on one row per side")
    return cases


def groups_of(path, case_ids):
    """The groups of sequences of a `missing_sequences-*.json`, among `case_ids` -> {group: set of case ids};
    the group whose `case_ids` is null (all three sequences) holds the cases no other group lists."""
    try:
        groups = json.loads(Path(path).read_text())["groups"]
        listed = {name: set(group["case_ids"]) for name, group in groups.items() if group["case_ids"] is not None}
        rest = [name for name, group in groups.items() if group["case_ids"] is None]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a missing_sequences JSON of benchmarks/misses.py ({error})") from None
    named = set().union(*listed.values())
    return {
        **{name: members & set(case_ids) for name, members in listed.items()},
        **{name: set(case_ids) - named for name in rest},
    }


def compare(candidate, other, cases=None):
    """Paired figures of `candidate` against `other` (DataFrames), over `cases` (default all)."""
    from lgg import metrics

    if cases is not None:
        candidate, other = candidate[candidate.case_id.isin(cases)], other[other.case_id.isin(cases)]
    ours = candidate.set_index("case_id").case_dice
    theirs = other.set_index("case_id").case_dice.loc[ours.index]
    difference = ours - theirs
    result = {
        "cases": int(len(ours)),
        "candidate_mean": float(ours.mean()),
        "other_mean": float(theirs.mean()),
        "paired": metrics.paired_comparison(candidate, other),
        "median_case_difference": float(np.median(difference)),
        f"candidate_cases_under_{LOW}": int((ours < LOW).sum()),
        f"other_cases_under_{LOW}": int((theirs < LOW).sum()),
    }
    if len(ours) <= 5:
        result["differences"] = {case: float(d) for case, d in difference.sort_index().items()}
    return result


def paired(candidate_paths, other_paths, groups_path=None, command=None):
    """Everything the script reports -> dict (see the module's docstring); `command` is recorded as given."""
    candidate, other = read_cases(candidate_paths), read_cases(other_paths)
    if set(candidate.case_id) != set(other.case_id):
        one_side = sorted(set(candidate.case_id) ^ set(other.case_id))
        raise ValueError(
            f"the two sides hold different cases (on one side only: {one_side[:5]}): pair the same patients"
        )
    volumes = other.set_index("case_id").true_volume_px
    if not (candidate.set_index("case_id").true_volume_px.loc[volumes.index] == volumes).all():
        raise ValueError("true_volume_px differs between the sides: the tables come from different masks or sizes")
    result = {
        "command": command,
        "candidate": {str(p): file_sha256(p) for p in candidate_paths},
        "other": {str(p): file_sha256(p) for p in other_paths},
        "how": "mean per-case Dice as the tables hold it, candidate minus other, matched by case_id",
        "candidate_median": float(candidate.case_dice.median()),
        "other_median": float(other.case_dice.median()),
        **compare(candidate, other),
    }
    quarter = pd.qcut(volumes, 4, labels=False, duplicates="drop")
    result["by_tumor_volume_quarter"] = [
        {
            "true_volume_px": [int(volumes[quarter == q].min()), int(volumes[quarter == q].max())],
            **compare(candidate, other, set(quarter.index[quarter == q])),
        }
        for q in sorted(quarter.unique())
    ]
    if groups_path is not None:
        result["groups_from"] = str(groups_path)
        result["by_group"] = {}
        for name, members in groups_of(groups_path, set(other.case_id)).items():
            if members:
                outside = set(other.case_id) - members
                result["by_group"][name] = {
                    "within": compare(candidate, other, members),
                    "outside": compare(candidate, other, outside) if outside else None,
                }
    return result


def line(name, figures):
    p = figures["paired"]
    low, high = p["mean_difference_ci95"]
    return (
        f"{name}: {figures['cases']} cases, {figures['candidate_mean']:.3f} vs {figures['other_mean']:.3f}, "
        f"{p['mean_difference']:+.3f} ({low:+.3f} to {high:+.3f}), {p['better']} better / {p['worse']} worse, "
        f"Wilcoxon p {p['wilcoxon_p']:.2g}; median case {figures['median_case_difference']:+.3f}; "
        f"under {LOW}: {figures[f'candidate_cases_under_{LOW}']} vs {figures[f'other_cases_under_{LOW}']}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", nargs="+", type=Path, required=True, help="per-case table(s) of one side")
    parser.add_argument("--other", nargs="+", type=Path, required=True, help="per-case table(s) of the other side")
    parser.add_argument("--groups", type=Path, help="a missing_sequences-*.json of benchmarks/misses.py")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file (this script's own)")
    args = parser.parse_args(argv)
    if args.out is not None:
        check_own_json(args.out, KEYS, "benchmarks/paired.py")
    try:
        command = " ".join(["python", "benchmarks/paired.py", *(sys.argv[1:] if argv is None else argv)])
        result = paired(args.candidate, args.other, args.groups, command)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(line("all", result))
    for q, figures in enumerate(result["by_tumor_volume_quarter"], 1):
        low, high = figures["true_volume_px"]
        print(line(f"tumor volume quarter {q} ({low}-{high} px)", figures))
    for name, group in result.get("by_group", {}).items():
        print(line(name, group["within"]))
        if group["outside"]:
            print(line(f"all but {name}", group["outside"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
