"""Evaluate a trained model on held-out cases.

Scoring writes nothing: `score` predicts, post-processes and scores one split and returns an
`Evaluation` (arrays, per-case or per-slice table, summary). `save_tables` and `save_plots` write
it into a run folder; `evaluate_run` does all three, as `train` and `evaluate` run it.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from lgg import data, guards, metrics, plots, postprocess
from lgg.data import DatasetError
from lgg.files import file_sha256, save_csv, save_json
from lgg.inference import model_task, predict_probabilities, predict_with_mirror


def segment(model, images, case_ids, settings, slice_indices=None):
    """`(probabilities, masks)` of a segmenter on uint8 slices, with the post-processing `settings`
    (flip TTA only when they ask for it; `slice_indices`: the slices' numbers, so the 3-D step
    does not join across missing slices). What `predict` and the two-stage pipeline run."""
    if settings["hflip_tta"]:
        probabilities = predict_with_mirror(model, images)[1]
    else:
        probabilities = predict_probabilities(model, images)
    return probabilities, postprocess.masks_from_probabilities(probabilities, case_ids, settings, slice_indices)


def tune_postprocessing(model, slices, run_dir):
    """Choose the post-processing (threshold, small components, largest 3-D component, flip TTA)
    with the best mean case Dice on the validation cases at native resolution; write every
    setting's scores to `val_postprocessing.csv` (each case's in `val_postprocessing_cases.csv`) and the choice to
    `postprocess.json`."""
    rows = slices[slices["split"] == "val"]
    if rows.empty:
        raise ValueError("no validation slices to choose the post-processing on")
    images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
    plain, tta = predict_with_mirror(model, images)
    table, cases = postprocess.score_settings_and_cases(rows, masks, plain, tta)
    save_csv(table, Path(run_dir) / "val_postprocessing.csv")
    save_csv(postprocess.wide_case_table(cases), Path(run_dir) / "val_postprocessing_cases.csv")
    chosen = postprocess.choose(table)
    postprocess.save(chosen, run_dir)
    best = table["case_dice_mean"].max()
    raw = table.query("threshold == 0.5 and min_component_px == 0 and not largest_3d and not hflip_tta")
    print(
        f"Post-processing chosen on {rows['case_id'].nunique()} validation cases: {postprocess.describe(chosen)} "
        f"(val case Dice {raw['case_dice_mean'].iloc[0]:.3f} raw -> {best:.3f})"
    )
    return chosen


@dataclass
class Evaluation:
    """What `score` returns: the scored rows, the arrays at native resolution, and the tables.

    `table` is one row per case (segmenters: `test_cases.csv`) or per slice (classifiers:
    `test_slices.csv`); `steps` is what each post-processing step did on these cases and `cases_by_setting`
    each case's Dice under every candidate setting (`postprocess.wide_case_table`; both for segmenters with a
    chosen post-processing), else None; `summary` is what `<split>_summary.json` holds.
    """

    split: str
    task: str
    rows: pd.DataFrame
    images: np.ndarray
    masks: np.ndarray
    probabilities: np.ndarray
    predicted: np.ndarray | None
    table: pd.DataFrame
    summary: dict
    steps: pd.DataFrame | None = None
    cases_by_setting: pd.DataFrame | None = None


def score(model, slices, split_name="test", threshold=0.5, postprocessing=None):
    """Predict, post-process and score the `split_name` rows of `slices` at native resolution;
    write nothing. Returns an `Evaluation`.

    Segmenters: `postprocessing` (settings like `postprocess.RAW`, chosen on validation cases)
    replaces the plain `threshold`; the summary then also holds the raw figures (threshold 0.5)
    under `"raw"`, `steps` the effect of each step on these cases, and `cases_by_setting` each case's Dice under
    every setting `tune_postprocessing` chooses among (recorded, not chosen by: so that a rule for choosing can be
    tried on finished runs).
    """
    rows = slices[slices["split"] == split_name] if "split" in slices else slices
    if rows.empty:
        raise ValueError(f"no slices in split {split_name!r}")
    images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
    task = model_task(model)
    if task != "segmentation":
        probabilities = predict_probabilities(model, images)
        labels = rows["has_tumor"].values
        summary = metrics.classification_report(labels, probabilities, threshold)
        table = rows[["case_id", "slice_index", "has_tumor"]].assign(probability=probabilities)
        summary = {"model": model.name, "split": split_name, **summary}
        return Evaluation(split_name, task, rows, images, masks, probabilities, None, table, summary)
    settings = dict(postprocessing) if postprocessing else {**postprocess.RAW, "threshold": threshold}
    if postprocessing:
        plain, tta = predict_with_mirror(model, images)
    else:
        plain, tta = predict_probabilities(model, images), None
    probabilities = tta if settings["hflip_tta"] else plain
    predicted = postprocess.masks_from_probabilities(probabilities, rows["case_id"], settings, rows["slice_index"])
    per_case, summary = metrics.segmentation_report(rows, masks, probabilities, predicted=predicted)
    summary["case_dice_mean_ci95"] = list(metrics.mean_confidence_interval(per_case["case_dice"]))
    summary["threshold"] = settings["threshold"]
    summary["postprocessing"] = settings
    steps = by_setting = None
    if postprocessing:
        _, raw = metrics.segmentation_report(rows, masks, plain, 0.5)
        summary["raw"] = {key: raw[key] for key in metrics.SEGMENTATION_SUMMARY_KEYS}
        steps = postprocess.ablation(rows, masks, plain, tta, settings)
        by_setting = postprocess.wide_case_table(postprocess.case_dice_by_setting(rows, masks, plain, tta))
    summary = {"model": model.name, "split": split_name, **summary}
    return Evaluation(
        split_name, task, rows, images, masks, probabilities, predicted, per_case, summary, steps, by_setting
    )


def save_tables(evaluation, run_dir):
    """Write an `Evaluation`'s tables: `<split>_cases.csv` (segmenters) or `<split>_slices.csv`
    (classifiers), `<split>_postprocessing.csv` when it has `steps` (`val_postprocessing_steps.csv`
    for the validation split, whose `val_postprocessing.csv` is the tuning grid) and
    `<split>_postprocessing_cases.csv` when it has `cases_by_setting` (not for the validation split, whose
    `val_postprocessing_cases.csv` tuning writes), and `<split>_summary.json`."""
    run_dir, split = Path(run_dir), evaluation.split
    if evaluation.task == "segmentation":
        save_csv(evaluation.table, run_dir / f"{split}_cases.csv")
        if evaluation.steps is not None:  # val: beside the grid `tune_postprocessing` writes, not over it
            name = "val_postprocessing_steps.csv" if split == "val" else f"{split}_postprocessing.csv"
            save_csv(evaluation.steps, run_dir / name)
        if evaluation.cases_by_setting is not None and split != "val":  # val: tuning's, left as it chose on it
            save_csv(evaluation.cases_by_setting, run_dir / f"{split}_postprocessing_cases.csv")
    else:
        save_csv(evaluation.table, run_dir / f"{split}_slices.csv")
    save_json(evaluation.summary, run_dir / f"{split}_summary.json")


def save_plots(evaluation, run_dir):
    """Draw an `Evaluation`'s plots into the run folder and close them: `<split>_case_dice.png` and
    `<split>_overlays.png` (segmenters) or `<split>_roc_confusion.png` (classifiers)."""
    run_dir, split, e = Path(run_dir), evaluation.split, evaluation
    if e.task == "segmentation":
        plots.plot_case_dice(e.table, save_path=run_dir / f"{split}_case_dice.png")
        overlays = run_dir / f"{split}_overlays.png"
        plots.plot_case_overlays(e.rows, e.images, e.masks, e.predicted.astype(np.float32), e.table, save_path=overlays)
    else:
        labels = e.rows["has_tumor"].values
        plots.plot_classification(
            labels, e.probabilities, e.summary["threshold"], save_path=run_dir / f"{split}_roc_confusion.png"
        )
    plots.plt.close("all")  # the figures are in the run folder; do not pile them up in long sessions


def evaluate_run(model, slices, run_dir, split_name="test", threshold=0.5, postprocessing=None, notes=None):
    """`score`, then `save_tables` and `save_plots` into `run_dir`, printing the tables: what
    `train` and `evaluate` run. `notes` (a dict) go into the summary beside the figures. Returns the summary."""
    evaluation = score(model, slices, split_name, threshold, postprocessing)
    evaluation.summary.update(notes or {})
    if evaluation.steps is not None:
        print(evaluation.steps.to_string(index=False))
    if evaluation.task == "segmentation":
        print(evaluation.table[["case_id", "case_dice", "case_jaccard", "tumor_slices"]].to_string(index=False))
    save_tables(evaluation, run_dir)
    save_plots(evaluation, run_dir)
    print(json.dumps(evaluation.summary, indent=2))
    return evaluation.summary


def load_model(path):
    """Load an lgg model file (`.h5` or `.keras`) with its loss and metrics, or fail clearly."""
    from lgg import losses  # noqa: F401  registers the custom loss and metrics

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        return keras.models.load_model(path)
    except Exception as error:
        raise ValueError(
            f"{path} is not a Keras model this package can load: {type(error).__name__}: {error}"
        ) from None


# Two copies of one float32 model differ only by rounding: the model in memory may predict through XLA, a
# reloaded one through plain kernels, and CPUs (AVX2 or AVX-512 oneDNN kernels, thread order) and GPUs
# (TF32 matmuls) round differently: 1.1e-5 and 1.6e-5 were seen on two CPUs. A model that loaded wrongly
# or only in part is off by 0.1 to 1 (the old .h5 axis bug: 0.99; one layer left at its initial weights:
# tests/test_export.py), so the bar sits far from both.
SAME_MODEL_ATOL = 1e-3


def check_same_predictions(actual, expected, name):
    """Raise `AssertionError` naming `name` unless two copies of one model predict alike within
    `SAME_MODEL_ATOL` (probabilities); return the largest absolute difference."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name} predicts shape {actual.shape}; the model in memory {expected.shape}")
    difference = float(np.abs(actual - expected).max()) if actual.size else 0.0
    if not difference <= SAME_MODEL_ATOL:  # also catches NaN
        raise AssertionError(
            f"{name} does not reproduce the model: its predictions differ by up to {difference:.2e} "
            f"(two copies of one model agree within {SAME_MODEL_ATOL:g})"
        )
    return difference


def check_reloaded(model, paths, images):
    """Reload each exported file of `model` the way a user would (`compile=False`, no package
    needed) and check that it predicts `images` as the model in memory does. Prints and returns
    the largest difference per file; raises `AssertionError` for a file that does not reproduce it."""
    expected = model.predict(images, verbose=0)
    differences = {}
    for path in map(Path, paths):
        actual = keras.models.load_model(path, compile=False).predict(images, verbose=0)
        differences[path.name] = check_same_predictions(actual, expected, path.name)
        print(f"{path.name} reloaded; max difference on {len(images)} slices: {differences[path.name]:.2e}")
    return differences


def slices_with_split(data_dir, split_file):
    """The slices of `data_dir` with the `split` column of a run's `split.csv`: by case, or by slice where
    the split puts a case's slices in two splits (`--split random-slice-leaky`)."""
    split_file = Path(split_file)
    if not split_file.is_file():
        raise FileNotFoundError(f"split file not found: {split_file}; pass --split-file or --split all")
    try:
        table = data.read_split(split_file)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read {split_file}: {error}") from None
    if not {"case_id", "split"} <= set(table.columns):
        raise ValueError(f"{split_file} is not a split file: it needs the columns case_id and split")
    slices = data.find_slices(data_dir)
    if (table.groupby("case_id")["split"].nunique() > 1).any():  # a split by slice
        if "slice_index" not in table.columns:
            raise ValueError(f"{split_file} puts a case in two splits without a slice_index column to tell them apart")
        split = table.drop_duplicates(["case_id", "slice_index"]).set_index(["case_id", "slice_index"])["split"]
        slices["split"] = pd.MultiIndex.from_frame(slices[["case_id", "slice_index"]]).map(split)
    else:
        slices["split"] = slices["case_id"].map(table.drop_duplicates("case_id").set_index("case_id")["split"])
    if slices["split"].isna().all():
        raise ValueError(f"none of the cases in {data_dir} appear in {split_file}")
    return slices


def missing_cases(slices, split_file, split_names):
    """The cases `split_file` puts in `split_names` that are not among `slices`' cases, sorted."""
    split = data.read_split(split_file)
    return sorted(set(split.loc[split["split"].isin(split_names), "case_id"]) - set(slices["case_id"]))


def refuse_missing_cases(slices, split_file, split_names, data_dir, out_dir, run_dir):
    """Name the cases `split_file` puts in `split_names` that `data_dir` lacks. Writing a partial
    score into the run's own folder (`out_dir` None or `run_dir`) is refused; elsewhere it is noted."""
    missing = missing_cases(slices, split_file, split_names)
    if not missing:
        return
    named = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    what = f"{len(missing)} {'/'.join(split_names)} cases of the run are missing from {data_dir}: {named}"
    if out_dir is None or Path(out_dir).resolve() == Path(run_dir).resolve():
        raise DatasetError(
            f"{what}. Scoring the rest would replace the run's own results with a partial score; "
            "pass --out to write it elsewhere"
        )
    print(f"Note: {what}; they are not scored")


def output_folder(out_dir, model_paths, data_dir, settings_differ=None):
    """The folder `evaluate` writes into, refused before anything is written where that would replace
    what it did not make. The run folder of a model scored (`model_paths`; the first one's is the
    default): only if `train` made it and only for the run's own scoring (`settings_differ` names an
    option that would replace the run's scores with others: give --out then). Another folder: a new
    or empty one, or one `evaluate` wrote before (its marker); never another run's, never on the data."""
    own = [Path(path).parent for path in model_paths]
    target = own[0] if out_dir is None else Path(out_dir)
    if target.resolve() in {folder.resolve() for folder in own}:
        if not guards.is_ours(target, guards.RUN_MARKER):
            raise FileExistsError(
                f"{target} is not a run folder made by train (the shipped models/, a folder of yours): "
                "give --out FOLDER, apart from it, for the results"
            )
        if settings_differ:
            raise FileExistsError(
                f"{settings_differ} would replace the run's own scores in {target}; give --out FOLDER for these"
            )
        return target
    guards.check_apart(target, [data_dir])
    if guards.is_ours(target, guards.RUN_MARKER):
        raise FileExistsError(f"--out {target} is another run's folder, scored by its own model; choose another")
    guards.check_output_folder(target, guards.EVALUATE_MARKER, True, "evaluate")  # evaluate's own: scored again
    models = [str(Path(path).resolve()) for path in model_paths]
    marker = target / guards.EVALUATE_MARKER
    try:
        recorded = json.loads(marker.read_text() or "{}").get("models") if marker.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded and recorded != models:  # the scores of one model beside another's, with nothing to tell them apart
        raise FileExistsError(
            f"--out {target} holds the scores of {', '.join(recorded)}; choose another --out for {', '.join(models)}"
        )
    guards.mark_folder(target, guards.EVALUATE_MARKER)
    marker.write_text(json.dumps({"models": models}))
    return target


def evaluate_model_file(
    model_path, data_dir, split_file=None, split_name="test", out_dir=None, threshold=None, tune=False
):
    """`python -m lgg evaluate`: score a saved model on one split (or `all`) of a data folder.

    The split comes from `split_file`, by default the `split.csv` next to the model, so a run is
    scored on exactly the cases it held out. The post-processing is the run's `postprocess.json`
    (chosen on its validation cases) unless `threshold` is given, which scores a plain threshold;
    `tune=True` chooses it again on the validation cases first (and rewrites `postprocess.json`
    in `out_dir`).
    """
    model_path = Path(model_path)
    model = load_model(model_path)
    if tune and model_task(model) != "segmentation":
        raise ValueError(
            f"{model_path} is a classifier: tuning chooses a segmenter's post-processing, a classifier has none "
            "(leave --tune-postprocessing out)"
        )
    notes = None
    if split_name == "all":
        slices = data.find_slices(data_dir).assign(split="all")
        seen = cases_trained_on(model_path, slices["case_id"].unique(), ("train", "val"))
        notes = {"cases_seen_in_training": None if seen is None else len(seen)}
        if seen:  # scored beside the others, as asked; said, so that the figure is never read as held out
            print(
                f"Note: {len(seen)} of the {slices['case_id'].nunique()} cases scored were training or validation "
                f"cases of {model_path}'s run ({model_path.parent / 'split.csv'}): these figures flatter the model "
                "(its test cases alone: leave --split out)"
            )
    else:
        slices = slices_with_split(data_dir, split_file or model_path.parent / "split.csv")
    if split_name != "all":
        scored = [split_name, "val"] if tune else [split_name]  # tuning chooses on the validation cases
        split_path = split_file or model_path.parent / "split.csv"
        refuse_missing_cases(slices, split_path, scored, data_dir, out_dir, model_path.parent)
    own_split = split_file is None or Path(split_file).resolve() == (model_path.parent / "split.csv").resolve()
    if not own_split and split_name in ("test", "val"):
        refuse_seen_cases(model_path, slices, split_name, split_file, tune)
    differ = " and ".join(
        flag for flag, given in [("--threshold", threshold is not None), ("--split-file", not own_split)] if given
    )
    out_dir = output_folder(out_dir, [model_path], data_dir, differ)
    with guards.folder_lock(out_dir):
        if threshold is not None or model_task(model) != "segmentation":
            threshold = 0.5 if threshold is None else threshold
            return evaluate_run(model, slices, out_dir, split_name, threshold=threshold, notes=notes)
        if tune:
            settings = tune_postprocessing(model, slices, out_dir)
        else:
            settings = postprocess.load(model_path)
            print(f"Post-processing ({model_path.parent / postprocess.FILENAME}): {postprocess.describe(settings)}")
        return evaluate_run(model, slices, out_dir, split_name, postprocessing=settings, notes=notes)


def snapshot_folder(run_dir, minutes):
    """Where `evaluate_snapshots` scores the weights kept after `minutes`: `snapshots/after-<minutes>min/`."""
    return Path(run_dir) / "snapshots" / f"after-{minutes:g}min"


def evaluate_snapshots(run_dir, data_dir):
    """Test scores of the weights a run kept after N minutes (`TimeSnapshots`): for each snapshot
    the post-processing is chosen on the validation cases, as at the end of a run. Writes and
    returns `snapshots/curve.csv` (minutes, epoch, raw and post-processed test figures)."""
    run_dir = Path(run_dir)
    table = pd.read_csv(run_dir / "snapshots" / "snapshots.csv")
    model = load_model(run_dir / "model.h5")
    slices = slices_with_split(data_dir, run_dir / "split.csv")
    rows = []
    for snapshot in table.itertuples():
        model.load_weights(run_dir / "snapshots" / snapshot.file)
        scratch = snapshot_folder(run_dir, snapshot.minutes)
        scratch.mkdir(exist_ok=True)
        settings = tune_postprocessing(model, slices, scratch)
        summary = evaluate_run(model, slices, scratch, "test", postprocessing=settings)
        rows.append(
            {
                "minutes": snapshot.minutes,
                "epoch": snapshot.epoch + 1,
                "elapsed_min": snapshot.elapsed_min,
                **{f"raw_{key}": value for key, value in summary["raw"].items()},
                **{key: summary[key] for key in metrics.SEGMENTATION_SUMMARY_KEYS},
                "postprocessing": postprocess.describe(settings),
            }
        )
    curve = pd.DataFrame(rows)
    save_csv(curve, run_dir / "snapshots" / "curve.csv")
    return curve


def refuse_seen_cases(model_path, slices, split_name, split_file, tune):
    """Refuse, before anything is written, a `split_file` whose `split_name` cases (and, when tuning, validation
    cases) include cases the model's own run trained on (or, for a test score, chose its epoch and post-processing
    on): their score would be reported as held out and flatter the model."""
    checks = [(split_name, ("train", "val") if split_name == "test" else ("train",))]
    if tune and split_name != "val":
        checks.append(("val", ("train",)))
    for part, seen_as in checks:
        seen = cases_trained_on(model_path, slices.loc[slices.split == part, "case_id"].unique(), seen_as)
        if seen:
            more = "..." if len(seen) > 3 else ""
            raise ValueError(
                f"{len(seen)} of the cases {split_file} puts in '{part}' were {' or '.join(seen_as)} cases of "
                f"{model_path}'s own run ({model_path.parent / 'split.csv'}): {seen[:3]}{more}; a score on them "
                f"would flatter the model. Give a split whose {part} cases it never saw, or --split all to score "
                "every case knowingly"
            )


def cases_trained_on(model_path, case_ids, parts=("train",)):
    """The cases among `case_ids` that the run of `model_path` put in `parts` of its split (the
    `split.csv` beside the model), sorted: scores on them would flatter the model. A model without
    a `split.csv` (trained elsewhere) cannot be checked: None, not an empty list."""
    split_file = Path(model_path).parent / "split.csv"
    if not split_file.is_file():
        return None
    split = data.read_split(split_file)
    return sorted(set(split.loc[split["split"].isin(parts), "case_id"]) & set(case_ids))


GATE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def gate_masks(masks, slice_probabilities, threshold):
    """Two-stage pipeline: keep a slice's predicted mask only where the classifier's tumor
    probability reaches `threshold`."""
    keep = np.asarray(slice_probabilities) >= threshold
    return np.asarray(masks, bool) & keep[:, None, None]


def evaluate_two_stage(segmenter_path, classifier_path, data_dir, out_dir=None):
    """Classifier first, segmenter only on the slices it calls tumor, against the segmenter alone.

    Both models are scored on the segmenter run's test cases (its `split.csv`); the classifier's
    run must not have trained on them. The classifier threshold is chosen on the validation
    cases (best mean case Dice). The segmenter keeps its own post-processing (`postprocess.json`).
    Writes `two_stage.json` and `two_stage_<split>.csv` (one row per gate threshold) to `out_dir`
    (default: the segmenter's run folder) and returns the summary.
    """
    segmenter_path, classifier_path = Path(segmenter_path), Path(classifier_path)
    segmenter, classifier = load_model(segmenter_path), load_model(classifier_path)
    if model_task(segmenter) != "segmentation" or model_task(classifier) != "classification":
        raise ValueError(f"expected a segmenter and a classifier; got {segmenter_path} and {classifier_path}")
    slices = slices_with_split(data_dir, segmenter_path.parent / "split.csv")
    refuse_missing_cases(slices, segmenter_path.parent / "split.csv", ["val", "test"], data_dir, out_dir,
                         segmenter_path.parent)  # fmt: skip
    # the classifier may share the segmenter's validation cases (the gate threshold is chosen there), never
    # have trained on them, nor trained or chosen its epoch on the test cases
    cases = {part: slices.loc[slices["split"] == part, "case_id"] for part in ("val", "test")}
    leaked = cases_trained_on(classifier_path, cases["val"])
    if leaked is None:
        print(f"Note: no split.csv beside {classifier_path}: whether it saw the segmenter's cases is unknown")
    else:
        leaked += cases_trained_on(classifier_path, cases["test"], parts=("train", "val"))
    if leaked:
        raise ValueError(f"{classifier_path} was trained on {len(leaked)} of the segmenter's val/test cases: {leaked}")
    settings = postprocess.load(segmenter_path)
    summary = {"segmenter": str(segmenter_path), "classifier": str(classifier_path),
               "classifier_sha256": file_sha256(classifier_path), "postprocessing": settings}  # fmt: skip
    out_dir = output_folder(out_dir, [segmenter_path, classifier_path], data_dir)
    with guards.folder_lock(out_dir):
        return _score_two_stage(segmenter, classifier, slices, settings, summary, out_dir)


def _score_two_stage(segmenter, classifier, slices, settings, summary, out_dir):
    for split_name in ("val", "test"):
        rows = slices[slices["split"] == split_name]
        images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
        probabilities, predicted = segment(segmenter, images, rows["case_id"], settings, rows["slice_index"])
        tumor_probability = predict_probabilities(classifier, images)
        table = []
        for threshold in (None, *GATE_THRESHOLDS):
            gated = predicted if threshold is None else gate_masks(predicted, tumor_probability, threshold)
            _, scores = metrics.segmentation_report(rows, masks, probabilities, predicted=gated)
            table.append({"gate_threshold": threshold, **{k: scores[k] for k in metrics.SEGMENTATION_SUMMARY_KEYS}})
        table = pd.DataFrame(table)
        save_csv(table, out_dir / f"two_stage_{split_name}.csv")
        if split_name == "val":
            gated_rows = table.dropna(subset=["gate_threshold"])
            chosen = float(gated_rows.loc[gated_rows["case_dice_mean"].idxmax(), "gate_threshold"])
            summary["gate_threshold"] = chosen
        else:
            alone = table[table["gate_threshold"].isna()].iloc[0]
            gated = table[table["gate_threshold"] == summary["gate_threshold"]].iloc[0]
            summary["test_cases"] = int(rows["case_id"].nunique())
            summary["segmenter_alone"] = {k: float(alone[k]) for k in metrics.SEGMENTATION_SUMMARY_KEYS}
            summary["two_stage"] = {k: float(gated[k]) for k in metrics.SEGMENTATION_SUMMARY_KEYS}
    save_json(summary, out_dir / "two_stage.json")
    print(json.dumps(summary, indent=2))
    return summary
