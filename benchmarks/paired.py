"""Two recipes (or two runs) case by case on the same patients, from their committed per-case tables: the paired
figures the README quotes where no `-vs-` file of `results.py` holds them (another partner, a subgroup).

    python benchmarks/paired.py --candidate results/unet-aug-flair-bf16-cross-validation.csv \\
        --other results/unet-aug-bf16-cross-validation.csv \\
        --groups results/missing_sequences-unet-aug-flair-bf16.csv \\
        --out results/paired/unet-aug-flair-bf16-vs-unet-aug-bf16.json

`--candidate` and `--other` each take one or more per-case tables (a `*-cross-validation.csv`, or the
`test.csv` of fold runs, concatenated); both sides must hold the same cases, each once. Reported: both means, the
paired difference candidate minus other (`lgg.metrics.paired_comparison`: mean with its 95 % bootstrap interval,
cases better / worse, Wilcoxon p; null where fewer than two cases differ), the median case's difference and the
cases under 0.5 on each side, overall (with both medians) and by quarter of true tumor volume (`true_volume_px`,
equal on both sides; equal quarters by rank, ties by case id; none under 8 cases). With `--groups` (a
`missing_sequences-*.csv` of `benchmarks/misses.py`: each case's sequences), also within each group of sequences
and outside it, among the tables' cases. Prints the figures; with `--out`, writes them as JSON (this script's own
file, replaced only by the same pairing; never another file).
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

from lgg.files import check_own_json, file_sha256, save_json  # noqa: E402
from lgg.guards import check_case_id  # noqa: E402

COLUMNS = ("case_id", "case_dice", "true_volume_px")
KEYS = ("command", "candidate", "other", "paired")  # what marks a file of this script
LOW = 0.5  # a case "under 0.5" is mostly missed


def read_cases(paths):
    """The per-case tables at `paths`, concatenated -> DataFrame. Refuses (ValueError, naming the file) a file
    that is not such a table (no rows, a blank case id, a Dice outside [0, 1], a tumor volume that is not a whole
    number of pixels), and a case found twice."""
    tables = []
    for path in paths:
        try:
            table = pd.read_csv(path, dtype={"case_id": str})
        except (OSError, ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not a readable CSV ({error})") from None
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(missing)}: not a per-case table of this repository")
        if table.empty:
            raise ValueError(f"{path}: no cases")
        if table.case_id.isna().any():
            raise ValueError(f"{path}: a blank case_id")
        for case_id in table.case_id:
            check_case_id(case_id, path)  # a DatasetError (a ValueError) naming the file and the id
        dice = pd.to_numeric(table.case_dice, errors="coerce")
        if dice.isna().any() or not dice.between(0, 1).all():
            raise ValueError(f"{path}: case_dice must be numbers in [0, 1]")
        volume = pd.to_numeric(table.true_volume_px, errors="coerce")
        if volume.isna().any() or (volume < 0).any() or (volume != volume.round()).any():
            raise ValueError(f"{path}: true_volume_px must be whole numbers of pixels, 0 or more")
        tables.append(table.assign(case_dice=dice, true_volume_px=volume.astype(int), source=str(path)))
    cases = pd.concat(tables, ignore_index=True)
    twice = cases[cases.case_id.duplicated(keep=False)]
    if len(twice):
        first = twice.iloc[0]
        where = ", ".join(sorted(set(twice[twice.case_id == first.case_id].source)))
        raise ValueError(f"case {first.case_id} appears twice ({where}): each case belongs on one row per side")
    return cases


def groups_of(path, case_ids):
    """The groups of sequences of a `missing_sequences-*.csv` (one row per case: `case_id`, `sequences`), among
    `case_ids` -> {group: set of case ids}. Refuses (ValueError, naming the file) another table, a case twice, and
    a table lacking some of `case_ids`."""
    try:
        table = pd.read_csv(path, dtype={"case_id": str, "sequences": str})
        by_case = table.set_index("case_id")["sequences"]
        if not by_case.index.is_unique:
            raise ValueError(f"case {by_case.index[by_case.index.duplicated()][0]} twice")
    except (OSError, ValueError, KeyError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a missing_sequences CSV of benchmarks/misses.py ({error})") from None
    lacking = sorted(set(case_ids) - set(by_case.index))
    if lacking or by_case.isna().any():
        raise ValueError(f"{path}: no sequences for {lacking[:5] or 'some cases'}: group the cases the tables hold")
    ours = by_case.loc[sorted(case_ids)]
    return {str(name): set(members.index) for name, members in ours.groupby(ours)}


def compare(candidate, other, cases=None):
    """Paired figures of `candidate` against `other` (DataFrames), over `cases` (default all)."""
    from lgg import metrics

    if cases is not None:
        candidate, other = candidate[candidate.case_id.isin(cases)], other[other.case_id.isin(cases)]
    ours = candidate.set_index("case_id").case_dice
    theirs = other.set_index("case_id").case_dice.loc[ours.index]
    difference = ours - theirs
    figures = metrics.paired_comparison(candidate, other)
    if np.isnan(figures["mean_difference_ci95"][0]):  # fewer than two cases, or all differences equal: no interval
        figures["mean_difference_ci95"] = None
    result = {
        "cases": int(len(ours)),
        "candidate_mean": float(ours.mean()),
        "other_mean": float(theirs.mean()),
        "paired": figures,
        "median_case_difference": float(np.median(difference)),
        f"candidate_cases_under_{LOW}": int((ours < LOW).sum()),
        f"other_cases_under_{LOW}": int((theirs < LOW).sum()),
    }
    if len(ours) <= 5:
        result["differences"] = {case: float(d) for case, d in difference.sort_index().items()}
    return result


def paired(candidate_paths, other_paths, groups_path=None, command=None):
    """Everything the script reports -> dict (see the module's docstring); `command` is recorded as given."""
    same = {Path(p).resolve() for p in candidate_paths} & {Path(p).resolve() for p in other_paths}
    if same:
        raise ValueError(f"{sorted(same)[0]} is on both sides: pair two recipes or runs, not one with itself")
    candidate, other = read_cases(candidate_paths), read_cases(other_paths)
    if set(candidate.case_id) != set(other.case_id):
        one_side = sorted(set(candidate.case_id) ^ set(other.case_id))
        raise ValueError(
            f"the two sides hold different cases (on one side only: {one_side[:5]}): pair the same patients"
        )
    volumes = other.set_index("case_id").true_volume_px
    apart = volumes.index[candidate.set_index("case_id").true_volume_px.loc[volumes.index] != volumes]
    if len(apart):
        raise ValueError(
            f"true_volume_px of {apart[0]} differs between the sides ({len(apart)} cases): the tables come from "
            "different masks or sizes"
        )
    result = {
        "command": command,
        "candidate": {str(p): file_sha256(p) for p in candidate_paths},
        "other": {str(p): file_sha256(p) for p in other_paths},
        "how": "mean per-case Dice as the tables hold it, candidate minus other, matched by case_id",
        "candidate_median": float(candidate.case_dice.median()),
        "other_median": float(other.case_dice.median()),
        **compare(candidate, other),
    }
    order = volumes.reset_index().sort_values(["true_volume_px", "case_id"]).case_id  # ties of volume by case id
    rank = pd.Series(np.arange(len(order)), index=order.to_numpy())
    quarter = pd.qcut(rank, 4, labels=False) if len(volumes) >= 8 else None
    result["by_tumor_volume_quarter"] = (
        None
        if quarter is None
        else [
            {
                "true_volume_px": [int(volumes[quarter == q].min()), int(volumes[quarter == q].max())],
                **compare(candidate, other, set(quarter.index[quarter == q])),
            }
            for q in range(4)
        ]
    )
    if groups_path is not None:
        result["groups_from"] = {str(groups_path): file_sha256(groups_path)}
        result["by_group"] = {}
        for name, members in groups_of(groups_path, set(other.case_id)).items():
            outside = set(other.case_id) - members
            result["by_group"][name] = {
                "within": compare(candidate, other, members) if members else None,
                "outside": compare(candidate, other, outside) if outside else None,
            }
    return result


def line(name, figures):
    p = figures["paired"]
    interval = (
        "no interval" if p["mean_difference_ci95"] is None else "{:+.3f} to {:+.3f}".format(*p["mean_difference_ci95"])
    )
    cases = f"{figures['cases']} case{'s' if figures['cases'] != 1 else ''}"
    return (
        f"{name}: {cases}, {figures['candidate_mean']:.3f} vs {figures['other_mean']:.3f}, "
        f"{p['mean_difference']:+.3f} ({interval}), {p['better']} better / {p['worse']} worse, "
        f"Wilcoxon p {p['wilcoxon_p']:.2g}; median case {figures['median_case_difference']:+.3f}; "
        f"under {LOW}: {figures[f'candidate_cases_under_{LOW}']} vs {figures[f'other_cases_under_{LOW}']}"
    )


def check_out(out, candidate_paths, other_paths, groups_path):
    """Refuse (SystemExit) an `--out` that is not a JSON file this script may write (`check_own_json`), or this
    script's file of another pairing: a pairing (its tables and groups) is replaced only by itself."""
    check_own_json(out, KEYS, "benchmarks/paired.py")
    if Path(out).exists():
        found = json.loads(Path(out).read_text())

        def resolved(paths):  # as given from the working directory, as this run's are
            return {str(Path(p).resolve()) for p in paths}

        theirs = [resolved(found["candidate"]), resolved(found["other"]), resolved(found.get("groups_from") or {})]
        ours = [resolved(candidate_paths), resolved(other_paths), resolved([groups_path] if groups_path else [])]
        if theirs != ours:
            raise SystemExit(f"{out} holds the pairing of other tables: choose another --out")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidate", nargs="+", type=Path, required=True, help="per-case table(s) of one side")
    parser.add_argument("--other", nargs="+", type=Path, required=True, help="per-case table(s) of the other side")
    parser.add_argument("--groups", type=Path, help="a missing_sequences-*.csv of benchmarks/misses.py")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file (this script's own)")
    args = parser.parse_args(argv)
    if args.out is not None:
        check_out(args.out, args.candidate, args.other, args.groups)
    try:
        command = shlex.join(["python", "benchmarks/paired.py", *(sys.argv[1:] if argv is None else argv)])
        result = paired(args.candidate, args.other, args.groups, command)
    except ValueError as error:
        raise SystemExit(str(error)) from None
    print(line("all", result))
    if result["by_tumor_volume_quarter"] is None:
        print(f"no quarters of tumor volume: {result['cases']} cases, fewer than 8")
    for q, figures in enumerate(result["by_tumor_volume_quarter"] or (), 1):
        low, high = figures["true_volume_px"]
        print(line(f"tumor volume quarter {q} ({low}-{high} px)", figures))
    for name, group in result.get("by_group", {}).items():
        print(line(name, group["within"]) if group["within"] else f"{name}: none of these cases")
        if group["outside"]:
            print(line(f"all but {name}", group["outside"]))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_json(result, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
