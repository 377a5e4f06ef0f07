"""`python -m lgg predict`: segment new slices, case folders or whole dataset folders.

Per case it writes the predicted mask of every slice as `<case>_<n>_pred.tif` (never the
dataset's `_mask.tif`, so a prediction can never replace a manual mask), an overlay PNG for each
slice predicted to show tumor (`<case>_<n>_overlay.png`: predicted outline in red on FLAIR, the
true outline in green where a mask exists), a montage of the case's tumor slices
(`<case>_montage.png`), and one row of `cases.csv`: slices, tumor slices, tumor area in pixels per
slice and in total (and in mm² / ml when `pixel_spacing_mm` and `slice_thickness_mm` are given:
the Kaggle .tif files carry no spacing), the slice with the largest area, and the mean tumor
probability inside the predicted mask.

The output folder must lie apart from every input. `cases.csv` and `predict.json` (the manifest:
`"status": "running"` until the last case is done, then `"complete"`) are rewritten after each
case, so a killed run is visibly partial. A folder of earlier predictions is replaced only with
`overwrite`: first what the earlier run wrote is removed (`remove_earlier_predictions`: its `cases.csv`
and `predict.json`, and in the case folders its manifest names the files named as predict names them),
so nothing stale stays, and nothing else is; any other non-empty folder is refused, and so is a second
process writing into the same folder (`.lgg-lock`).

The masks follow the run's `postprocess.json` (chosen on its validation cases) unless a
`threshold` is given. With a `classifier`, only slices it calls tumor keep their mask (the
two-stage pipeline; threshold from the `two_stage.json` beside the segmenter if `evaluate` chose it for
this very classifier, else 0.5; one chosen for another classifier is refused).
"""

import glob
import json
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

from lgg import data, guards, plots, postprocess, volumes
from lgg.evaluate import gate_masks, load_model, segment
from lgg.files import atomic_path, file_sha256, save_csv, save_json
from lgg.inference import model_task, predict_probabilities

TRUE_BGR, PREDICTED_BGR = (0, 255, 0), (0, 0, 255)
# the model that ships with the repository (see its MODEL_CARD.md): what predict uses when given none
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "unet" / "model.h5"
PREDICTED_SUFFIX = "_pred.tif"  # never the dataset's `_mask.tif`: a prediction cannot replace a manual mask
PREDICTED_NIFTI_SUFFIX = "_pred.nii.gz"  # the mask of a NIfTI input, on the input's grid
PREDICT_FILES = ("cases.csv", "predict.json")  # beside the case folders
PARTIAL = ".partial-"  # the temporary name of a write (lgg.files.atomic_path): a killed run may leave one


def case_files(case_id):
    """The names predict writes in the folder of case `case_id` (a compiled pattern, for `fullmatch`), with the
    temporary names of a write a killed run left. Slice numbers as predict writes them: no leading zero."""
    suffixes = "|".join(map(re.escape, (PREDICTED_SUFFIX, "_overlay.png")))
    ending = rf"(_(0|[1-9][0-9]*)({suffixes})|_montage\.png|{re.escape(PREDICTED_NIFTI_SUFFIX)})"
    return re.compile(rf"({re.escape(PARTIAL)})?{re.escape(case_id)}{ending}", re.ASCII)


def _earlier_cases(out_dir):
    """The case folders an earlier predict into `out_dir` wrote or began, from its manifest (`planned`, or for
    manifests written before it, `cases`); none if the manifest is missing or unreadable. Only plain names of
    entries of `out_dir` count: a manifest is never a way out of the folder."""
    manifest = Path(out_dir) / "predict.json"
    try:
        found = json.loads(manifest.read_text()) if manifest.is_file() and not manifest.is_symlink() else {}
    except (OSError, ValueError, RecursionError):
        return set()
    lists = [found.get(key) for key in ("planned", "cases")] if isinstance(found, dict) else []
    names = [name for names in lists if isinstance(names, list) for name in names]
    return {name for name in names if isinstance(name, str) and name not in ("", ".", "..") and "/" not in name}


def remove_earlier_predictions(out_dir, case_ids):
    """Remove what an earlier predict wrote in `out_dir` (ours: checked by the caller): its `PREDICT_FILES`
    (and their `.partial-` temporaries) and, in the case folders its manifest names, the files `case_files`
    names (a folder left empty goes too). A link of such a name is removed, never followed; anything else
    stays. Refused before anything is removed: a folder where predict writes a file, and a `case_ids` entry
    (the cases about to be predicted) that is in the way and not an earlier case folder (a file, or a folder
    of yours). The manifest goes last, so a kill midway leaves it naming what is left. Returns the names
    kept, sorted (`case/file` inside a case folder)."""
    out_dir = Path(out_dir)
    earlier = _earlier_cases(out_dir)
    for name in case_ids:
        path = out_dir / name
        if (path.exists() or path.is_symlink()) and not (name in earlier and (path.is_symlink() or path.is_dir())):
            raise FileExistsError(
                f"{path} is in the way of the predictions for case {name} and was not written by predict: move it "
                "out of --out, or choose another --out"
            )

    def own_file(path):  # a file of ours to remove; a folder where we write a file is refused
        if path.is_dir() and not path.is_symlink():
            raise FileExistsError(f"{path} is a folder where predict writes a file; move it out of --out")
        return path

    top = {*PREDICT_FILES, *(PARTIAL + name for name in PREDICT_FILES)}
    remove, last, kept = [], [], []
    for path in sorted(out_dir.iterdir()):
        if path.name in (guards.LOCK_FILE, guards.PREDICT_MARKER):
            continue
        if path.name in top:
            last.append(own_file(path))
        elif path.name in earlier and path.is_symlink():
            remove.append(path)
        elif path.name in earlier and path.is_dir():
            ours = case_files(path.name)
            inside = sorted(path.iterdir())
            mine = [own_file(entry) for entry in inside if ours.fullmatch(entry.name)]
            theirs = [entry for entry in inside if entry not in mine]
            if theirs:
                remove += mine
                kept += [f"{path.name}/{entry.name}" for entry in theirs]
            else:
                remove.append(path)
        else:
            kept.append(path.name)
    guards.remove_paths([*remove, *last])
    return kept


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
    # encoded in memory and written by Python: OpenCV's own file writer fails on Windows paths that are not ASCII
    encoded, data = cv2.imencode(".png", image)
    if not encoded:
        raise OSError(f"could not encode {path} as PNG")
    with atomic_path(path) as temporary:
        temporary.write_bytes(data.tobytes())


def _gather(inputs, sequences=None, fill_from_flair=False):
    """Group input paths into `case_id -> [(slice_index, image_path, mask_path or None)]`, or
    `case_id -> volumes.Volume` for a 4-D NIfTI file and for `sequences` (a dict of the three
    3-D files by `volumes.SEQUENCES` name; the case is named after the FLAIR file; `fill_from_flair`:
    a missing pre- or post-contrast file is filled with the FLAIR, see `volumes.load_sequences`).

    A case found twice (two inputs holding it) or a slice number given twice is refused with
    both paths named: nothing is merged or dropped silently."""
    cases, sources = {}, {}

    def add_volume(volume):
        if volume.case_id in sources:
            raise data.DatasetError(
                f"case {volume.case_id} found twice: in {sources[volume.case_id]} and in {volume.sources[0]}"
            )
        sources[volume.case_id] = volume.sources[0]
        cases[volume.case_id] = volume

    def add(case_id, index, path, source):
        if case_id in sources and sources[case_id] != source:
            raise data.DatasetError(f"case {case_id} found twice: in {sources[case_id]} and in {source}")
        sources[case_id] = source
        entries = cases.setdefault(case_id, {})
        if index in entries:
            raise data.DatasetError(f"{entries[index][0]} and {path}: two files for slice {index} of {case_id}")
        mask = path.with_name(f"{path.stem}_mask{path.suffix}")
        entries[index] = (path, mask if mask.is_file() else None)

    for item in map(Path, inputs):
        if item.is_dir():
            # a folder holding slices is a case folder (named unlike its files: the file is named, not "no case
            # folders"); else a dataset of case folders
            slices_here = [p for p in item.iterdir() if p.suffix.lower() in (".tif", ".tiff") and p.name[:2] != "._"]
            case_dirs = (
                [item]
                if slices_here
                else sorted(path for path in data.find_dataset_root(item, with_masks=False).iterdir() if path.is_dir())
            )
            for case_dir in case_dirs:
                images, _ = data.case_slice_files(case_dir, with_masks=False)  # no case folder passed over unsaid
                for index, path in images.items():
                    add(case_dir.name, index, path, case_dir.resolve())
        elif item.exists() and not item.is_file():
            raise data.DatasetError(f"{item}: not a regular file or a folder")
        elif volumes.is_nifti(item):
            add_volume(volumes.load_4d(item))
        elif item.is_file():
            match = data.SLICE_FILE.match(item.name)
            if match is None or match["mask"]:
                raise data.DatasetError(f"{item}: expected a slice named <case_id>_<n>.tif")
            guards.check_case_id(match["case_id"], item)
            add(match["case_id"], int(match["slice_index"]), item, item.resolve().parent)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    if sequences and any(path is not None for path in sequences.values()):
        add_volume(volumes.load_sequences(**sequences, fill_from_flair=fill_from_flair))
    elif fill_from_flair:
        raise volumes.VolumeError("--fill-from-flair fills the sequences missing beside --flair FILE: give --flair")
    if not cases:
        raise data.DatasetError(f"no slices found in {', '.join(map(str, inputs)) or 'no inputs'}")
    # its folder would take the place of predict's own file (on macOS and Windows, whatever the letter case)
    clash = sorted(case_id for case_id in cases if case_id.casefold() in PREDICT_FILES)
    if clash:
        raise data.DatasetError(
            f"{sources[clash[0]]}: case id {clash[0]!r} is the name of a file predict writes beside the case folders; "
            "rename the case"
        )
    return {
        case_id: entries if isinstance(entries, volumes.Volume) else [(i, *entries[i]) for i in sorted(entries)]
        for case_id, entries in sorted(cases.items())
    }


def _gate_threshold(model_path, classifier_path, gate_threshold):
    """The gate threshold given, else the one `evaluate` chose beside the segmenter for this very classifier
    (its sha256 recorded there), else 0.5; a threshold chosen for another classifier is refused."""
    if gate_threshold is not None:
        return gate_threshold
    path = Path(model_path).parent / "two_stage.json"
    if not path.is_file():
        return 0.5
    try:
        record = json.loads(path.read_text())
        threshold = guards.probability("gate_threshold", record["gate_threshold"])
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid two-stage file: {error}") from None
    choose = (
        f"pass --gate-threshold, or choose one for it with `python -m lgg evaluate --model {model_path} "
        f"--classifier {classifier_path}`"
    )
    if "classifier_sha256" not in record:
        raise ValueError(f"{path} was written before it recorded which classifier its gate threshold is for: {choose}")
    if record["classifier_sha256"] != file_sha256(classifier_path):
        raise ValueError(
            f"{path} holds a gate threshold chosen for another classifier ({record.get('classifier')!r}), not "
            f"{classifier_path}: {choose}"
        )
    return threshold


def _holds_case_folders(folder):
    """True for a folder of case folders (`<case>/<case>_<n>.tif`), like `kaggle_3m/`."""
    return any(sub.is_dir() and any(sub.glob(f"{glob.escape(sub.name)}_*.tif")) for sub in folder.iterdir())


@dataclass
class Predictor:
    """The loaded models and settings of a prediction; load once, predict many times (the web app)."""

    model_path: Path
    model: object
    settings: dict  # post-processing
    classifier: object = None
    gate_threshold: float = None


def load_predictor(model_path=None, threshold=None, classifier_path=None, gate_threshold=None):
    if model_path is None:
        model_path = SHIPPED_MODEL
        if not model_path.is_file():
            raise FileNotFoundError(f"no --model given and no shipped model at {model_path}; pass --model RUN/model.h5")
        print(f"Model: {model_path} (shipped; see MODEL_CARD.md beside it)")
    model = load_model(model_path)
    if model_task(model) != "segmentation":
        raise ValueError(f"{model_path} is a classifier ({model.output_shape}); predict needs a segmenter")
    if threshold is None:
        settings = postprocess.load(model_path)
    else:
        settings = {**postprocess.RAW, "threshold": guards.probability("threshold", threshold)}
    print(f"Post-processing: {postprocess.describe(settings)}")
    classifier = None
    if classifier_path is not None:
        classifier = load_model(classifier_path)
        if model_task(classifier) != "classification":
            raise ValueError(f"{classifier_path} outputs {classifier.output_shape}: --classifier needs a classifier")
        gate_threshold = _gate_threshold(model_path, classifier_path, gate_threshold)
        gate_threshold = guards.probability("gate threshold", gate_threshold)
        print(f"Two-stage: slices with classifier probability < {gate_threshold} get an empty mask")
    return Predictor(Path(model_path), model, settings, classifier, gate_threshold)


def predict_paths(
    model_path,
    inputs,
    out_dir,
    threshold=None,
    classifier_path=None,
    gate_threshold=None,
    pixel_spacing_mm=None,
    slice_thickness_mm=None,
    overwrite=False,
    sequences=None,
    predictor=None,
    collect=None,
    fill_from_flair=False,
):
    """Predict every case in `inputs` (and the NIfTI `sequences`, a dict with keys `pre`, `flair`,
    `post`; with `fill_from_flair` a missing pre- or post-contrast is filled with the FLAIR) into
    `out_dir`. A `predictor` from `load_predictor` replaces the model arguments; a
    `collect` list receives `(case_id, slice_indices, images, predicted masks, cases.csv row)` per case."""
    out_dir = Path(out_dir)
    cases = _gather(inputs, sequences, fill_from_flair)
    volume_files = [path for case in cases.values() if isinstance(case, volumes.Volume) for path in case.sources]
    slice_cases = {case_id: entries for case_id, entries in cases.items() if not isinstance(entries, volumes.Volume)}
    if not slice_cases and (pixel_spacing_mm is not None or slice_thickness_mm is not None):
        raise ValueError(
            "--pixel-spacing-mm and --slice-thickness-mm size .tif slices, which carry no voxel size; a NIfTI "
            f"volume's comes from its header, and every input here is one ({', '.join(map(str, volume_files[:3]))}): "
            "leave them out"
        )
    # apart from the inputs, the folders holding their case folders (an output folder there would pass for
    # a case the next time the data is read) and the model files (which --overwrite would delete)
    case_folders = {path.parent for entries in slice_cases.values() for _, path, _ in entries}
    roots = {folder.parent for folder in case_folders if _holds_case_folders(folder.parent)}
    slice_inputs = [item for item in inputs if not volumes.is_nifti(item)]
    guards.check_apart(out_dir, [*slice_inputs, *case_folders, *roots])
    # a NIfTI file's folder is never read as data: --out may lie beside it, only not hold it or be it
    guards.check_not_within(out_dir, volume_files)
    for folder in Path(out_dir).resolve().parents:  # nor inside a dataset, where it would pass for a case
        if folder.is_dir() and _holds_case_folders(folder):
            raise FileExistsError(f"--out {out_dir} lies inside the dataset folder {folder}: choose a folder apart")
    if predictor is None:
        model_files = [SHIPPED_MODEL if model_path is None else model_path, classifier_path]
    else:
        model_files = [predictor.model_path]
    guards.check_not_within(out_dir, [path for path in model_files if path is not None])
    if pixel_spacing_mm is not None:
        guards.positive("pixel_spacing_mm", pixel_spacing_mm)
    if slice_thickness_mm is not None:
        guards.positive("slice_thickness_mm", slice_thickness_mm)
    guards.check_output_folder(out_dir, guards.PREDICT_MARKER, overwrite, "predict")
    if predictor is None:
        predictor = load_predictor(model_path, threshold, classifier_path, gate_threshold)
    for entries in slice_cases.values():  # every slice's and mask's header, before earlier predictions are replaced
        for _, path, mask in entries:
            data.check_header(path, [(data.NATIVE_SIZE, data.NATIVE_SIZE, 3)])
            if mask is not None:
                data.check_header(mask, data.MASK_SHAPES)
    inputs = [str(item) for item in inputs]
    inputs += [str(path) for path in volume_files if str(path) not in inputs]
    with guards.folder_lock(out_dir):
        guards.check_output_folder(out_dir, guards.PREDICT_MARKER, overwrite, "predict")  # again, now locked
        if out_dir.is_dir():  # ours (checked above): nothing stale stays beside the new results
            kept = remove_earlier_predictions(out_dir, list(cases))
            if kept:
                print(f"Kept in {out_dir} (not written by predict): {', '.join(kept)}")
        guards.mark_folder(out_dir, guards.PREDICT_MARKER)
        manifest = {"status": "running", "model": str(predictor.model_path), "inputs": inputs,
                    "planned": list(cases), "cases": []}  # fmt: skip
        save_json(manifest, out_dir / "predict.json")
        rows = []
        model, classifier, settings, gate = (predictor.model, predictor.classifier, predictor.settings,
                                             predictor.gate_threshold)  # fmt: skip
        try:
            for number, (case_id, entries) in enumerate(cases.items(), 1):
                if isinstance(entries, volumes.Volume):
                    result = _predict_volume(model, classifier, entries, settings, gate, out_dir)
                else:
                    result = _predict_case(model, classifier, case_id, entries, settings, gate, out_dir,
                                           pixel_spacing_mm, slice_thickness_mm)  # fmt: skip
                rows.append(result[-1])
                if collect is not None:
                    collect.append((case_id, *result))
                save_csv(pd.DataFrame(rows), out_dir / "cases.csv")  # case by case: a killed run keeps what it did
                manifest["cases"].append(case_id)
                save_json(manifest, out_dir / "predict.json")
                row = rows[-1]
                volume = f", {row['tumor_volume_ml']:.2f} ml" if "tumor_volume_ml" in row else ""
                print(
                    f"[{number}/{len(cases)}] {case_id}: {row['tumor_slices']} of {row['slices']} slices with "
                    f"tumor, {row['tumor_area_px_total']} px{volume}"
                )
        except Exception as error:
            save_json({**manifest, "status": f"failed: {type(error).__name__}: {error}"}, out_dir / "predict.json")
            raise
        save_json({**manifest, "status": "complete"}, out_dir / "predict.json")
    return out_dir


def _segment_case(model, classifier, case_id, images, slice_indices, settings, gate_threshold):
    data.report_gaps(case_id, slice_indices)
    probabilities, predicted = segment(model, images, [case_id] * len(images), settings, slice_indices)
    if classifier is not None:
        predicted = gate_masks(predicted, predict_probabilities(classifier, images), gate_threshold)
    return probabilities, predicted


def _write_pictures(case_dir, case_id, images, truths, predicted, slice_indices, areas):
    """An overlay PNG per slice with predicted tumor, and the montage of those slices."""
    for index, mask, image, truth, area in zip(slice_indices, predicted, images, truths, areas):
        if area:
            _write_png(case_dir / f"{case_id}_{index}_overlay.png", overlay_image(image, mask, truth))
    tumor = np.flatnonzero(areas)
    if len(tumor):
        figure = plots.plot_overlays(
            images[tumor],
            [truths[i] for i in tumor],
            predicted[tumor].astype(np.float32),
            [f"{case_id} slice {slice_indices[i]}, {areas[i]} px" for i in tumor],
            save_path=case_dir / f"{case_id}_montage.png",
        )
        plots.plt.close(figure)


def _case_row(case_id, slice_indices, probabilities, predicted, areas):
    tumor = np.flatnonzero(areas)
    return {
        "case_id": case_id,
        "slices": len(slice_indices),
        "tumor_slices": int(len(tumor)),
        "tumor_area_px_total": int(areas.sum()),
        "tumor_area_px_per_slice": " ".join(str(int(a)) for a in areas),
        "largest_slice_index": int(slice_indices[int(np.argmax(areas))]) if len(tumor) else None,
        "mean_probability_in_mask": float(probabilities[predicted].mean()) if predicted.any() else 0.0,
    }


def _predict_case(
    model, classifier, case_id, entries, settings, gate_threshold, out_dir, pixel_spacing_mm, slice_thickness_mm
):
    """Predict one case of .tif slices and write its masks, overlays and montage; return the slice
    numbers, images, masks and its `cases.csv` row."""
    images = np.stack([data.read_image(path) for _, path, _ in entries])
    truths = [data.read_mask(mask) if mask else None for _, _, mask in entries]
    slice_indices = [index for index, _, _ in entries]
    probabilities, predicted = _segment_case(model, classifier, case_id, images, slice_indices, settings,
                                             gate_threshold)  # fmt: skip
    case_dir = out_dir / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    areas = predicted.reshape(len(entries), -1).sum(axis=1)
    for index, mask in zip(slice_indices, predicted):
        with atomic_path(case_dir / f"{case_id}_{index}{PREDICTED_SUFFIX}") as temporary:
            tifffile.imwrite(temporary, mask.astype(np.uint8) * 255)
    _write_pictures(case_dir, case_id, images, truths, predicted, slice_indices, areas)
    row = _case_row(case_id, slice_indices, probabilities, predicted, areas)
    if pixel_spacing_mm:
        row["tumor_area_mm2_total"] = float(areas.sum() * pixel_spacing_mm**2)
        if slice_thickness_mm:
            row["tumor_volume_ml"] = float(areas.sum() * pixel_spacing_mm**2 * slice_thickness_mm / 1000)
    return slice_indices, images, predicted, row


def _predict_volume(model, classifier, volume, settings, gate_threshold, out_dir):
    """Predict one NIfTI volume: the mask as `<case>_pred.nii.gz` on the scan's grid (its affine and
    header), overlays and montage of the model's view (slices numbered 1.. from inferior to
    superior), and a `cases.csv` row with the tumor volume in ml from the voxel size in the header.
    Returns what `_predict_case` returns."""
    case_id, images = volume.case_id, volume.images
    slice_indices = list(range(1, len(images) + 1))
    probabilities, predicted = _segment_case(model, classifier, case_id, images, slice_indices, settings,
                                             gate_threshold)  # fmt: skip
    case_dir = out_dir / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    mask = volumes.mask_to_volume(predicted, volume)
    volumes.save_mask(mask, volume, case_dir / f"{case_id}{PREDICTED_NIFTI_SUFFIX}")
    areas = predicted.reshape(len(images), -1).sum(axis=1)
    _write_pictures(case_dir, case_id, images, [None] * len(images), predicted, slice_indices, areas)
    voxels = int(mask.sum())
    for warning in volume.warnings:
        print(f"Warning, {case_id}: {warning}")
    row = {
        **_case_row(case_id, slice_indices, probabilities, predicted, areas),
        "input": " ".join(str(path) for path in volume.sources),
        "volume_shape": "x".join(str(n) for n in volume.shape),
        "voxel_size_mm": "x".join(f"{z:.4g}" for z in volume.voxel_mm),
        "tumor_voxels": voxels,
        "tumor_volume_ml": voxels * volume.voxel_ml,
        "warnings": "; ".join(volume.warnings),
    }
    return slice_indices, images, predicted, row
