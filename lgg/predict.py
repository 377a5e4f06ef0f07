"""`python -m lgg predict`: segment new slices, case folders or whole dataset folders.

Per case it writes the predicted mask of every slice in the Kaggle naming
(`<case>_<n>_mask.tif`, so the output can be evaluated like the dataset), an overlay PNG for each
slice predicted to show tumor (`<case>_<n>_overlay.png`: predicted outline in red on FLAIR, the
true outline in green where a mask exists), a montage of the case's tumor slices
(`<case>_montage.png`), and one row of `cases.csv`: slices, tumor slices, tumor area in pixels per
slice and in total (and in mm² / mm³ when `pixel_spacing_mm` and `slice_thickness_mm` are given:
the Kaggle .tif files carry no spacing), the slice with the largest area, and the mean tumor
probability inside the predicted mask.

The masks follow the run's `postprocess.json` (chosen on its validation cases) unless a
`threshold` is given. With a `classifier`, only slices it calls tumor keep their mask (the
two-stage pipeline; threshold from the run's `two_stage.json`, else 0.5).
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from lgg import data, plots, postprocess
from lgg.evaluate import gate_masks, load_model, segment
from lgg.files import atomic_path, save_csv
from lgg.inference import model_task, predict_probabilities

TRUE_BGR, PREDICTED_BGR = (0, 255, 0), (0, 0, 255)


def overlay_image(image, predicted, truth=None):
    """FLAIR as grey BGR with the predicted outline in red and the true outline (if any) in green."""
    flair = image[..., data.FLAIR_CHANNEL]
    canvas = cv2.cvtColor(flair, cv2.COLOR_GRAY2BGR)
    for mask, colour in ((truth, TRUE_BGR), (predicted, PREDICTED_BGR)):
        if mask is not None:
            contours, _ = cv2.findContours(np.squeeze(mask).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(canvas, contours, -1, colour, 1)
    return canvas


def _write_png(path, image):
    with atomic_path(path) as temporary:  # the temporary keeps the .png ending OpenCV goes by
        if not cv2.imwrite(str(temporary), image):
            raise OSError(f"could not write {path}")


def _gather(inputs):
    """Group input paths into `case_id -> [(slice_index, image_path, mask_path or None)]`."""
    cases = {}
    for item in map(Path, inputs):
        if item.is_file():
            match = data.SLICE_FILE.match(item.name)
            if match is None or match["mask"]:
                raise data.DatasetError(f"{item}: expected a slice named <case_id>_<n>.tif")
            mask = item.with_name(f"{item.stem}_mask{item.suffix}")
            cases.setdefault(match["case_id"], []).append(
                (int(match["slice_index"]), item, mask if mask.exists() else None)
            )
        elif item.is_dir():
            case_dirs = (
                [item]
                if any(item.glob(f"{item.name}_*.tif"))
                else sorted(path for path in data.find_dataset_root(item).iterdir() if path.is_dir())
            )
            for case_dir in case_dirs:
                for path in sorted(case_dir.glob("*.tif")):
                    match = data.SLICE_FILE.match(path.name)
                    if match is None or match["case_id"] != case_dir.name:
                        raise data.DatasetError(f"{path}: expected files named {case_dir.name}_<n>.tif")
                    if not match["mask"]:
                        mask = path.with_name(f"{path.stem}_mask{path.suffix}")
                        cases.setdefault(case_dir.name, []).append(
                            (int(match["slice_index"]), path, mask if mask.exists() else None)
                        )
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if not cases:
        raise data.DatasetError(f"no slices found in {', '.join(map(str, inputs))}")
    return {case_id: sorted(entries) for case_id, entries in sorted(cases.items())}


def _gate_threshold(model_path, gate_threshold):
    if gate_threshold is not None:
        return gate_threshold
    path = Path(model_path).parent / "two_stage.json"
    return float(json.loads(path.read_text())["gate_threshold"]) if path.is_file() else 0.5


def predict_paths(
    model_path,
    inputs,
    out_dir,
    threshold=None,
    classifier_path=None,
    gate_threshold=None,
    pixel_spacing_mm=None,
    slice_thickness_mm=None,
):
    model = load_model(model_path)
    if model_task(model) != "segmentation":
        raise ValueError(f"{model_path} is a classifier ({model.output_shape}); predict needs a segmenter")
    settings = postprocess.load(model_path) if threshold is None else {**postprocess.RAW, "threshold": threshold}
    print(f"Post-processing: {postprocess.describe(settings)}")
    classifier = None
    if classifier_path is not None:
        classifier = load_model(classifier_path)
        if model_task(classifier) != "classification":
            raise ValueError(f"{classifier_path} outputs {classifier.output_shape}: --classifier needs a classifier")
        gate_threshold = _gate_threshold(model_path, gate_threshold)
        print(f"Two-stage: slices with classifier probability < {gate_threshold} get an empty mask")
    out_dir = Path(out_dir)
    cases = _gather(inputs)
    rows = []
    for number, (case_id, entries) in enumerate(cases.items(), 1):
        images = np.stack([data.read_image(path) for _, path, _ in entries])
        masks = [data.read_mask(mask) if mask else None for _, _, mask in entries]
        probabilities, predicted = segment(model, images, [case_id] * len(entries), settings)
        if classifier is not None:
            predicted = gate_masks(predicted, predict_probabilities(classifier, images), gate_threshold)
        case_dir = out_dir / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        areas = predicted.reshape(len(entries), -1).sum(axis=1)
        for (index, _, _), mask, image, truth, area in zip(entries, predicted, images, masks, areas):
            with atomic_path(case_dir / f"{case_id}_{index}_mask.tif") as temporary:
                tifffile.imwrite(temporary, mask.astype(np.uint8) * 255)
            if area:
                _write_png(case_dir / f"{case_id}_{index}_overlay.png", overlay_image(image, mask, truth))
        tumor = np.flatnonzero(areas)
        if len(tumor):
            figure = plots.plot_overlays(
                images[tumor],
                [masks[i] for i in tumor],
                predicted[tumor].astype(np.float32),
                [f"{case_id} slice {entries[i][0]}, {areas[i]} px" for i in tumor],
                save_path=case_dir / f"{case_id}_montage.png",
            )
            plots.plt.close(figure)
        row = {
            "case_id": case_id,
            "slices": len(entries),
            "tumor_slices": int(len(tumor)),
            "tumor_area_px_total": int(areas.sum()),
            "tumor_area_px_per_slice": " ".join(str(int(a)) for a in areas),
            "largest_slice_index": int(entries[int(np.argmax(areas))][0]) if len(tumor) else None,
            "mean_probability_in_mask": float(probabilities[predicted].mean()) if predicted.any() else 0.0,
        }
        if pixel_spacing_mm:
            row["tumor_area_mm2_total"] = float(areas.sum() * pixel_spacing_mm**2)
            if slice_thickness_mm:
                row["tumor_volume_ml"] = float(areas.sum() * pixel_spacing_mm**2 * slice_thickness_mm / 1000)
        rows.append(row)
        print(
            f"[{number}/{len(cases)}] {case_id}: {len(tumor)} of {len(entries)} slices with tumor, "
            f"{int(areas.sum())} px"
        )
    save_csv(pd.DataFrame(rows), out_dir / "cases.csv")
    return out_dir
