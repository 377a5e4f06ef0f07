"""Average the probabilities of U-Nets trained on the same patient split, and measure what that adds,
patient by patient, against the first (the headline recipe's) model of each fold.

    python benchmarks/ensemble.py --data data --name unet+tversky \\
        --fold runs/results-unet-fold4 runs/results-unet-tversky-fold4 \\
        --fold runs/results-unet-fold5 runs/results-unet-tversky-fold5

Each `--fold` names run folders (from `train` or `benchmarks/results.py`) with the same `split.csv`,
so that no model saw the test patients. Per fold, the averaged model (`lgg.models.average_models`:
one input, one output, a single `.h5`) chooses its post-processing on that fold's validation cases,
exactly as a training run does, and is scored on its test cases. Models trained at different sides
(a 128x128 and a 160x160 U-Net) are averaged at the dataset's 256x256, each member resizing inside
the ensemble as `lgg` resizes for it alone. Written: `runs/ensemble-<name>/`
(one folder per fold: `model.h5`, the post-processing, the per-case table; built in
`runs/.partial-ensemble-<name>/` and renamed when every fold is done) and
`results/ensemble-<name>.json` (pooled per-case Dice of the ensemble and of each member, and the
paired comparison with the first member) with `results/ensemble-<name>.csv` beside it (one row per test
patient: its fold, the ensemble's Dice and each member's, so that ensembles measured on other folds can
be pooled and paired case by case). Nothing that exists is overwritten.

Why same-split ensembles: averaging the 5 cross-validation fold models (nnU-Net's way) cannot be
scored on these 88 patients, since each of them trained 4 of the 5 models; two models trained on the
same fold can, on that fold's test patients.
"""

import argparse
import shutil
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def read_split(run):
    from lgg import data

    table = data.read_split(run / "split.csv")[["case_id", "split"]].drop_duplicates("case_id")
    return table.sort_values("case_id").reset_index(drop=True)


def check_fold(runs):
    """Every run folder a finished segmenter run, each once, on the same split as the first, or a clear error."""
    if len({run.resolve() for run in runs}) < len(runs):
        raise SystemExit(f"a --fold names the same run twice ({', '.join(map(str, runs))}): average different models")
    for run in runs:
        if (run / "test_slices.csv").is_file():
            raise SystemExit(f"{run} is a classifier's run: only segmenters are averaged here")
        for name in ("model.h5", "split.csv", "test_cases.csv"):
            if not (run / name).is_file():
                raise SystemExit(f"{run} is not a finished run folder: it has no {name}")
    from lgg.files import file_sha256

    models = {}
    for run in runs:  # a copy of a run (or of its model) under another folder averages a model with itself
        digest = file_sha256(run / "model.h5")
        if digest in models:
            raise SystemExit(f"{run / 'model.h5'} is the same file as {models[digest]} (sha256 {digest[:12]}): "
                             "average different models")  # fmt: skip
        models[digest] = run / "model.h5"
    first = read_split(runs[0])
    for run in runs[1:]:
        if not read_split(run).equals(first):
            raise SystemExit(f"{run} was trained on another split than {runs[0]} (their split.csv differ)")


def check_cases(folds, data_dir):
    """Every validation and test case of every fold in `data_dir` (a partial score could not be paired with the
    members' tables), and no test patient in two folds (each is scored once)."""
    from lgg import data

    present = set(data.find_slices(data_dir).case_id)
    tested = []
    for runs in folds:
        split = read_split(runs[0])
        missing = sorted(set(split.query("split in ('val', 'test')").case_id) - present)
        if missing:
            raise SystemExit(f"{len(missing)} validation / test cases of {runs[0]} are missing in {data_dir}: "
                             f"{missing[:4]}")  # fmt: skip
        tested += list(split.query("split == 'test'").case_id)
    twice = sorted({case for case in tested if tested.count(case) > 1})
    if twice:
        raise SystemExit(f"these test cases are in more than one --fold: {twice[:5]}; give each fold once")


def build_ensemble(runs):
    """The averaged model of one fold's runs, or a clear error (before any prediction: every fold is built first)."""
    from lgg import evaluate, models
    from lgg.data import NATIVE_SIZE

    members = [evaluate.load_model(run / "model.h5") for run in runs]
    mixed = len({member.input_shape[1] for member in members}) > 1  # e.g. a 128x128 and a 160x160 U-Net
    try:
        return models.average_models(members, size=NATIVE_SIZE if mixed else None)
    except ValueError as error:
        raise SystemExit(f"{', '.join(map(str, runs))}: {error}") from None


def ensemble_fold(ensemble, runs, data_dir, out_dir):
    from lgg import evaluate
    from lgg.files import save_model

    slices = evaluate.slices_with_split(data_dir, runs[0] / "split.csv")
    out_dir.mkdir(parents=True)
    settings = evaluate.tune_postprocessing(ensemble, slices, out_dir)
    evaluation = evaluate.score(ensemble, slices, "test", postprocessing=settings)
    evaluate.save_tables(evaluation, out_dir)
    save_model(ensemble, out_dir / "model.h5")
    return evaluation.table


def per_case_table(ensemble, members, folds):
    """One row per test patient: `case_id`, `fold` (1 for the first --fold), the ensemble's `case_dice` and
    each member's (`member_1_case_dice`, ...), matched by case (a member missing a case is an error)."""
    table = ensemble[["case_id", "case_dice"]].assign(fold=folds.to_numpy())[["case_id", "fold", "case_dice"]]
    for index, member in enumerate(members, start=1):
        dice = member.set_index("case_id").case_dice
        missing = sorted(set(table.case_id) - set(dice.index))
        if missing:
            raise ValueError(f"member {index} has no test score for {missing[:5]}")
        table[f"member_{index}_case_dice"] = dice.loc[table.case_id].to_numpy()
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fold", action="append", nargs="+", required=True, metavar="RUN",
                        help="run folders trained on one split; the first is the baseline")  # fmt: skip
    parser.add_argument("--name", required=True, help="names runs/ensemble-NAME and results/ensemble-NAME.json")
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    args = parser.parse_args(argv)

    folds = [[Path(run) for run in runs] for runs in args.fold]
    sizes = {len(runs) for runs in folds}
    if min(sizes) < 2 or len(sizes) > 1:
        raise SystemExit(f"each --fold needs the same number (two or more) of run folders; received {sorted(sizes)}")
    from lgg.files import check_new_results, save_json

    out_root, result_path = ROOT / "runs" / f"ensemble-{args.name}", ROOT / "results" / f"ensemble-{args.name}.json"
    table_path = result_path.with_suffix(".csv")
    check_new_results(args.name, [out_root, result_path, table_path])
    for runs in folds:
        check_fold(runs)
    check_cases(folds, args.data)
    averaged = [build_ensemble(runs) for runs in folds]  # a member that cannot be averaged: refused here

    ensemble, members = [], [[] for _ in folds[0]]
    staging = out_root.with_name(f".partial-{out_root.name}")  # renamed to runs/ensemble-NAME once all folds are in
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:  # made here or refused: another run of the same --name at once would share it, and clear it on failing
        staging.mkdir()
    except FileExistsError:
        raise SystemExit(
            f"{staging} exists (another run of this script with --name {args.name} is writing it, or one was "
            "interrupted): remove it first"
        ) from None
    try:
        for index, (runs, model) in enumerate(zip(folds, averaged), start=1):
            print(f"Fold {index}: averaging {', '.join(str(run) for run in runs)}", flush=True)
            ensemble.append(ensemble_fold(model, runs, args.data, staging / f"fold-{index}"))
            for member, run in zip(members, runs):
                member.append(pd.read_csv(run / "test_cases.csv"))
        folds_of = [pd.Series(index, index=table.index) for index, table in enumerate(ensemble, start=1)]
        ensemble, members = pd.concat(ensemble, ignore_index=True), [pd.concat(m, ignore_index=True) for m in members]
        table = per_case_table(ensemble, members, pd.concat(folds_of, ignore_index=True))
        check_new_results(args.name, [out_root, result_path, table_path], written=True)
    except BaseException:  # nothing half-done stays behind: the staging folder is this run's own
        shutil.rmtree(staging, ignore_errors=True)
        raise
    from lgg import metrics
    from lgg.files import save_csv

    result = {
        "name": args.name,
        "folds": [[str(run) for run in runs] for runs in folds],
        "cases": int(len(ensemble)),
        "how": "mean per-case Dice at native 256x256 on each fold's test patients, pooled over the folds; each "
        "model (and the ensemble) with the post-processing chosen on its fold's validation cases",
        "ensemble_case_dice_mean": float(ensemble.case_dice.mean()),
        "ensemble_case_dice_median": float(ensemble.case_dice.median()),
        "member_case_dice_mean": [float(m.case_dice.mean()) for m in members],
        "ensemble_vs_first_member": metrics.paired_comparison(ensemble, members[0]),
        "ensemble_vs_each_member": [metrics.paired_comparison(ensemble, m) for m in members],
    }
    staging.rename(out_root)
    save_csv(table, table_path)
    save_json(result, result_path)
    paired = result["ensemble_vs_first_member"]
    low, high = paired["mean_difference_ci95"]
    print(
        f"{result['cases']} patients: ensemble {result['ensemble_case_dice_mean']:.3f}, members "
        + ", ".join(f"{value:.3f}" for value in result["member_case_dice_mean"])
        + f"; ensemble - first member {paired['mean_difference']:+.3f} ({low:+.3f} to {high:+.3f}), "
        f"{paired['better']} better / {paired['worse']} worse, Wilcoxon p {paired['wilcoxon_p']:.2g}. "
        f"Wrote {result_path}"
    )


if __name__ == "__main__":
    sys.exit(main())
