"""Choose a recipe's post-processing on the validation cases of all its folds together, and measure
what that changes against each fold's own choice, patient by patient.

    python benchmarks/pooled_postprocessing.py --data data --name unet-aug-flair-160-bf16 \\
        runs/results-unet-aug-flair-160-bf16 runs/results-unet-aug-flair-160-bf16-fold2

`train` chooses the threshold, the small-component removal, the largest 3-D component and flip TTA
on its own fold's validation cases (5-12 patients), and on so few one small tumor can tip it: the
seed-1 model of the shipped recipe's fold 1 chose threshold 0.6 and the largest 3-D component
without flip TTA, which kept a false alarm and scored TCGA_CS_5395 0 (the seed-0 model: 0.739;
`results/EXPERIMENTS.md`). Here every run folder (one per fold of one recipe, each a finished
segmenter run) scores every candidate setting on every one of its validation and test cases
(`lgg.postprocess.case_dice_by_setting`). Then, for each fold, the setting is chosen
(`lgg.postprocess.choose`, as `train` chooses) on the validation cases of all the folds together,
leaving out that fold's test patients wherever they were another fold's validation case, and that
fold's test cases are scored with it: no test patient's own score enters the choice it is scored
with (the other folds' models did train on it, as in any cross-validation). nnU-Net decides its
post-processing once over its cross-validation in the same spirit.

Written, never over anything that exists: `results/pooled-postprocessing-<name>.csv` (the Dice of
every case, validation and test, under every setting, per fold: any other rule can be checked from
it without the models) and `results/pooled-postprocessing-<name>.json` (per fold the two choices and
their test figures; pooled over the folds the per-case comparison, pooled choice minus own choice).
"""

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from results import ABSENT_MEANS, RECIPE_KEYS  # noqa: E402

SETTING = ["threshold", "min_component_px", "largest_3d", "hflip_tta"]
RUN_FILES = ("model.h5", "config.json", "split.csv", "postprocess.json", "val_postprocessing.csv", "test_cases.csv")
# the run's own figures rescored here: the same on the CPU that scored them; elsewhere a probability at the
# threshold may flip a few pixels (`lgg.evaluate`: probabilities differ by about 1e-5 between CPUs)
SAME_DICE = 0.01


def read_split(run):
    from lgg import data

    table = data.read_split(run / "split.csv")
    if not {"case_id", "split"} <= set(table.columns):
        raise SystemExit(f"{run / 'split.csv'} is not a split file: it needs the columns case_id and split")
    return table[["case_id", "split"]].drop_duplicates("case_id")


def check_runs(runs):
    """Finished segmenter run folders of one recipe, each once, splitting the same patients with disjoint test
    patients, each with validation cases and a readable post-processing; or a clear error."""
    from lgg import postprocess

    if len(runs) < 2:
        raise SystemExit("give the run folders of two or more folds: one fold's choice is its own")
    if len({run.resolve() for run in runs}) < len(runs):
        raise SystemExit(f"a run folder is named twice ({', '.join(map(str, runs))}): give each fold once")
    if len({run.name for run in runs}) < len(runs):
        raise SystemExit("two run folders have the same name: the tables tell folds apart by it")
    tested, recipe, patients = {}, None, None
    for run in runs:
        if (run / "test_slices.csv").is_file():
            raise SystemExit(f"{run} is a classifier's run: only segmenters have a post-processing")
        missing = [name for name in RUN_FILES if not (run / name).is_file()]
        if missing:
            raise SystemExit(f"{run} is not a finished segmenter run folder: it has no {', '.join(missing)}")
        try:
            postprocess.load(run / "model.h5")
            config = json.loads((run / "config.json").read_text())
        except ValueError as error:
            raise SystemExit(f"{run}: {error}") from None
        this = {key: config.get(key, ABSENT_MEANS.get(key)) for key in RECIPE_KEYS if key != "split"}
        if recipe is not None and this != recipe:
            differ = sorted(key for key in this if this[key] != recipe[key])
            raise SystemExit(f"{run} is of another recipe than {runs[0]} (config.json differs in {differ}): pool the "
                             "folds of one recipe")  # fmt: skip
        recipe = this
        split = read_split(run)
        if patients is not None and set(split.case_id) != patients:
            raise SystemExit(f"{run / 'split.csv'} splits other patients than {runs[0] / 'split.csv'}")
        patients = set(split.case_id)
        for case in split.query("split == 'test'").case_id:
            if case in tested:
                raise SystemExit(f"{case} is a test patient of both {tested[case]} and {run}: give each fold once")
            tested[case] = run
        if split.query("split == 'val'").empty:
            raise SystemExit(f"{run} has no validation cases in its split.csv")


def run_grid(run, data_dir):
    """The Dice of every validation and test case of a run folder under every candidate setting (one row per
    split, setting and case), after checking that the run's own choice gives its test_cases.csv again."""
    from lgg import data, evaluate, postprocess
    from lgg.inference import predict_with_mirror

    try:
        slices = evaluate.slices_with_split(data_dir, run / "split.csv")
        wanted = read_split(run).query("split in ('val', 'test')").case_id
        missing = sorted(set(wanted) - set(slices.case_id))
        if missing:
            raise SystemExit(f"{len(missing)} validation / test cases of {run} are not in {data_dir}: {missing[:4]}")
        model = evaluate.load_model(run / "model.h5")
    except (OSError, ValueError) as error:
        raise SystemExit(f"{run}: {error}") from None
    grids = []
    for split in ("val", "test"):
        rows = slices[slices["split"] == split]
        images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
        plain, tta = predict_with_mirror(model, images)
        grids.append(postprocess.case_dice_by_setting(rows, masks, plain, tta).assign(split=split))
    grid = pd.concat(grids, ignore_index=True).assign(fold=run.name)
    check_against_run(grid, run)
    return grid


def check_against_run(grid, run):
    """The run's own figures again from `grid`: its validation grid (`val_postprocessing.csv`, setting by setting)
    and its test cases under its own choice (`test_cases.csv`); else the data, the model or the CPU differ."""
    from lgg import postprocess

    validation = grid[grid["split"] == "val"].groupby(SETTING)["case_dice"].mean()
    written = pd.read_csv(run / "val_postprocessing.csv").set_index(SETTING)["case_dice_mean"]
    own = test_dice(grid, postprocess.load(run / "model.h5"))
    tested = pd.read_csv(run / "test_cases.csv").set_index("case_id")["case_dice"]
    if (
        set(validation.index) != set(written.index)
        or (validation - written.loc[validation.index]).abs().max() > SAME_DICE
        or set(own.index) != set(tested.index)
        or (own - tested.loc[own.index]).abs().max() > SAME_DICE
    ):
        raise SystemExit(f"{run}: its model does not give its val_postprocessing.csv and test_cases.csv again here "
                         "(other data, a model file changed since, or another CPU by more than a few pixels); "
                         "nothing was written")  # fmt: skip


def test_dice(grid, settings):
    """Per-case test Dice (indexed by case_id) of one fold's grid under `settings`."""
    from lgg import postprocess

    try:
        return postprocess.dice_under(grid[grid["split"] == "test"], settings)
    except ValueError as error:
        raise SystemExit(str(error)) from None


def pooled_choice(grid, fold):
    """The setting `lgg.postprocess.choose` takes on the validation cases of every fold in `grid`, leaving out
    `fold`'s test patients; and how many validation cases (fold and case pairs) it rested on."""
    from lgg import postprocess

    test_cases = set(grid.query("fold == @fold and split == 'test'").case_id)
    validation = grid[(grid["split"] == "val") & ~grid["case_id"].isin(test_cases)]
    cases = len(validation.drop_duplicates(["fold", "case_id"]))
    return postprocess.choose_from_cases(validation), cases


def compare(grid, runs):
    """Per fold: its own choice and the pooled one, with their test figures; and both per case, pooled."""
    from lgg import metrics, postprocess

    folds, own_cases, pooled_cases = [], [], []
    for run in runs:
        fold = grid[grid["fold"] == run.name]
        own = postprocess.load(run / "model.h5")
        pooled, cases = pooled_choice(grid, run.name)
        own_dice, pooled_dice = test_dice(fold, own), test_dice(fold, pooled)
        own_cases.append(own_dice.reset_index())
        pooled_cases.append(pooled_dice.reset_index())
        folds.append({
            "fold": run.name,
            "test_cases": int(len(own_dice)),
            "own_validation_cases": int(fold.query("split == 'val'").case_id.nunique()),
            "pooled_validation_cases": cases,
            "own_choice": postprocess.describe(own),
            "pooled_choice": postprocess.describe(pooled),
            "own_case_dice_mean": float(own_dice.mean()),
            "pooled_case_dice_mean": float(pooled_dice.mean()),
        })  # fmt: skip
    own_cases, pooled_cases = pd.concat(own_cases), pd.concat(pooled_cases)
    return {
        "cases": int(len(own_cases)),
        "own_case_dice_mean": float(own_cases.case_dice.mean()),
        "pooled_case_dice_mean": float(pooled_cases.case_dice.mean()),
        "pooled_vs_own": metrics.paired_comparison(pooled_cases, own_cases),
        "folds": folds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, one per fold of one recipe")
    parser.add_argument("--name", required=True, help="names results/pooled-postprocessing-NAME.{csv,json}")
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    args = parser.parse_args(argv)
    from lgg.files import check_new_results, save_csv, save_json

    table_path = ROOT / "results" / f"pooled-postprocessing-{args.name}.csv"
    result_path = table_path.with_suffix(".json")
    check_new_results(args.name, [table_path, result_path])
    runs = [Path(run) for run in args.runs]
    check_runs(runs)

    grids = []
    for run in runs:
        print(f"Scoring every setting on the validation and test cases of {run}", flush=True)
        grids.append(run_grid(run, args.data))
    grid = pd.concat(grids, ignore_index=True)
    result = {
        "name": args.name,
        "runs": [str(run) for run in runs],
        "how": "mean per-case Dice at native 256x256 on each fold's test patients, pooled over the folds; own: the "
        "post-processing the fold chose on its validation cases; pooled: chosen the same way on the validation "
        "cases of all the folds together, less the fold's test patients",
        **compare(grid, runs),
    }
    check_new_results(args.name, [table_path, result_path], written=True)
    save_csv(grid[["fold", "split", "case_id", *SETTING, "case_dice"]].round({"case_dice": 5}), table_path)
    save_json(result, result_path)
    paired = result["pooled_vs_own"]
    low, high = paired["mean_difference_ci95"]
    for fold in result["folds"]:
        print(f"{fold['fold']}: own ({fold['own_validation_cases']} validation cases) {fold['own_choice']}: "
              f"{fold['own_case_dice_mean']:.3f}; pooled ({fold['pooled_validation_cases']}) {fold['pooled_choice']}: "
              f"{fold['pooled_case_dice_mean']:.3f}")  # fmt: skip
    print(
        f"{result['cases']} test patients: pooled choice {result['pooled_case_dice_mean']:.3f}, own choices "
        f"{result['own_case_dice_mean']:.3f}; {paired['mean_difference']:+.3f} ({low:+.3f} to {high:+.3f}), "
        f"{paired['better']} better / {paired['worse']} worse, Wilcoxon p {paired['wilcoxon_p']:.2g}. "
        f"Wrote {table_path} and {result_path}"
    )


if __name__ == "__main__":
    sys.exit(main())
