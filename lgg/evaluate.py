"""Evaluate a trained model on held-out cases: per-case CSV, summary JSON, plots."""

import json
from pathlib import Path

import keras
import pandas as pd

from lgg import data, metrics, plots
from lgg.files import save_csv, save_json
from lgg.inference import predict_probabilities


def evaluate_run(model, slices, run_dir, split_name="test", threshold=0.5):
    """Evaluate `model` on the `split_name` rows of `slices` at native resolution; write the
    per-case CSV (segmentation) or per-slice CSV (classification), the summary JSON and plots."""
    run_dir = Path(run_dir)
    rows = slices[slices["split"] == split_name] if "split" in slices else slices
    if rows.empty:
        raise ValueError(f"no slices in split {split_name!r}")
    images, masks = data.load_arrays(rows, data.NATIVE_SIZE)
    probabilities = predict_probabilities(model, images)
    task = "segmentation" if probabilities.ndim == 3 else "classification"
    if task == "segmentation":
        per_case, summary = metrics.segmentation_report(rows, masks, probabilities, threshold)
        save_csv(per_case, run_dir / f"{split_name}_cases.csv")
        plots.plot_case_dice(per_case, save_path=run_dir / f"{split_name}_case_dice.png")
        plots.plot_case_overlays(
            rows, images, masks, probabilities, per_case, threshold, save_path=run_dir / f"{split_name}_overlays.png"
        )
        print(per_case[["case_id", "case_dice", "case_jaccard", "tumor_slices"]].to_string(index=False))
    else:
        labels = rows["has_tumor"].values
        summary = metrics.classification_report(labels, probabilities, threshold)
        save_csv(
            rows[["case_id", "slice_index", "has_tumor"]].assign(probability=probabilities),
            run_dir / f"{split_name}_slices.csv",
        )
        plots.plot_classification(
            labels, probabilities, threshold, save_path=run_dir / f"{split_name}_roc_confusion.png"
        )
    plots.plt.close("all")  # figures are in the run folder; do not pile them up in long sessions
    summary = {"model": model.name, "split": split_name, **summary}
    save_json(summary, run_dir / f"{split_name}_summary.json")
    print(json.dumps(summary, indent=2))
    return summary


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


def evaluate_model_file(model_path, data_dir, split_file=None, split_name="test", out_dir=None, threshold=0.5):
    """`python -m lgg evaluate`: score a saved model on one split (or `all`) of a data folder.

    The split comes from `split_file`, by default the `split.csv` next to the model, so a run is
    scored on exactly the cases it held out.
    """
    model_path = Path(model_path)
    model = load_model(model_path)
    slices = data.find_slices(data_dir)
    if split_name != "all":
        split_file = Path(split_file) if split_file else model_path.parent / "split.csv"
        if not split_file.is_file():
            raise FileNotFoundError(f"split file not found: {split_file}; pass --split-file or --split all")
        split = pd.read_csv(split_file).drop_duplicates("case_id").set_index("case_id")["split"]
        slices["split"] = slices["case_id"].map(split)
        missing = slices.loc[slices["split"].isna(), "case_id"].unique()
        if split_name != "all" and len(missing) == slices["case_id"].nunique():
            raise ValueError(f"none of the cases in {data_dir} appear in {split_file}")
    else:
        slices["split"] = "all"
    out_dir = Path(out_dir) if out_dir else model_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    return evaluate_run(model, slices, out_dir, split_name=split_name, threshold=threshold)
