"""`python -m lgg predict`: segment new slices, case folders or whole dataset folders.

Per case it writes the predicted mask of every slice in the Kaggle naming
(`<case>_<n>_mask.tif`, so the output can be evaluated like the dataset), an overlay PNG with the
predicted outline on FLAIR for each slice predicted to show tumor (true outline too where a mask
exists), and one row of `cases.csv`: slices, tumor slices, tumor area in pixels per slice and in
total, the slice with the largest area, and the mean tumor probability inside the predicted mask.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from lgg import data, plots
from lgg.evaluate import load_model
from lgg.files import save_csv
from lgg.inference import model_task, predict_probabilities


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


def predict_paths(model_path, inputs, out_dir, threshold=0.5):
    model = load_model(model_path)
    if model_task(model) != "segmentation":
        raise ValueError(f"{model_path} is a classifier ({model.output_shape}); predict needs a segmenter")
    out_dir = Path(out_dir)
    cases = _gather(inputs)
    rows = []
    for number, (case_id, entries) in enumerate(cases.items(), 1):
        images = np.stack([data.read_image(path) for _, path, _ in entries])
        masks = [data.read_mask(mask) if mask else None for _, _, mask in entries]
        probabilities = predict_probabilities(model, images)
        predicted = probabilities >= threshold
        case_dir = out_dir / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        for (index, _, _), mask in zip(entries, predicted):
            tifffile.imwrite(case_dir / f"{case_id}_{index}_mask.tif", mask.astype(np.uint8) * 255)
        areas = predicted.reshape(len(entries), -1).sum(axis=1)
        tumor = np.flatnonzero(areas)
        if len(tumor):
            figure = plots.plot_overlays(
                images[tumor],
                [masks[i] for i in tumor],
                probabilities[tumor],
                [f"{case_id} slice {entries[i][0]}, {areas[i]} px" for i in tumor],
                threshold,
                save_path=case_dir / f"{case_id}_overlays.png",
            )
            plots.plt.close(figure)
        rows.append(
            {
                "case_id": case_id,
                "slices": len(entries),
                "tumor_slices": int(len(tumor)),
                "tumor_area_px_total": int(areas.sum()),
                "tumor_area_px_per_slice": " ".join(str(int(a)) for a in areas),
                "largest_slice_index": int(entries[int(np.argmax(areas))][0]) if len(tumor) else None,
                "mean_probability_in_mask": float(probabilities[predicted].mean()) if predicted.any() else 0.0,
            }
        )
        print(
            f"[{number}/{len(cases)}] {case_id}: {len(tumor)} of {len(entries)} slices with tumor, "
            f"{int(areas.sum())} px"
        )
    save_csv(pd.DataFrame(rows), out_dir / "cases.csv")
    return out_dir
