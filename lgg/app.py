"""`python -m lgg app`: a web page (Gradio, on localhost) to segment a scan in the browser.

Upload a 4-D NIfTI volume (pre-contrast, FLAIR, post-contrast on its last axis), three 3-D NIfTI
files (one per sequence), a zip of a Kaggle case folder, or single `.tif` / `.png` slices (256 x
256, three channels in the training order). The page shows each slice with the predicted outline
(a slider runs through the volume), the montage of the tumor slices, the tumor volume, and the
files to download: the mask (`_pred.nii.gz` on the scan's grid for NIfTI input) and a zip of
everything `predict` writes. It runs the same code as `python -m lgg predict`, with the model that
ships with the repository unless `--model` names another.
"""

import atexit
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lgg import data, guards, predict, volumes

SLICE_SUFFIXES = (".tif", ".tiff", ".png")
MAX_UNZIPPED_BYTES = 2 * 1024**3  # a Kaggle case is ~10 MB; refuse zip bombs
KEEP_SECONDS = 3600  # earlier requests' folders are removed after an hour
DISPLAY_SIZE = 512
FILL_BOX = '"Only FLAIR?"'  # the checkbox that asks for predict's --fill-from-flair, as messages name it


class UploadError(ValueError):
    """An upload the app cannot use; its message is shown on the page."""


def _unzip(archive, folder, budget):
    """Extract a zip into `folder`, refusing members that would land outside it and more than `budget[0]`
    bytes in all (the request's remaining allowance, decreased here). Returns what `predict` reads:
    the folders holding its slices (for a zip of loose slices, a folder made per case), then any NIfTI
    volumes inside."""
    try:
        with zipfile.ZipFile(archive) as bundle:
            members = [info for info in bundle.infolist() if not info.is_dir()]
            size = sum(info.file_size for info in members)
            if size > budget[0]:
                allowed = f"{MAX_UNZIPPED_BYTES // 1024**3} GB"
                raise UploadError(f"{archive.name}: unpacks to more than the {allowed} allowed per request")
            budget[0] -= size
            for info in members:
                name = info.filename.replace("\\", "/")  # zips made on Windows
                if "__MACOSX" in Path(name).parts or Path(name).name.startswith("."):
                    continue  # macOS resource forks and hidden files are not slices
                target = (folder / name).resolve()
                if not target.is_relative_to(folder.resolve()):
                    raise UploadError(f"{archive.name}: member {info.filename!r} points outside the archive")
                target.parent.mkdir(parents=True, exist_ok=True)
                with bundle.open(info) as source, open(target, "wb") as copy:
                    shutil.copyfileobj(source, copy)
    except (zipfile.BadZipFile, NotImplementedError) as error:  # NotImplementedError: an unsupported compression
        raise UploadError(f"{archive.name}: not a readable zip ({error})") from None
    volumes_inside = sorted(path for path in folder.rglob("*") if volumes.is_nifti(path))
    for path in sorted(folder.rglob("*")):  # slices zipped without their case folder: put each in one
        match = data.SLICE_FILE.match(path.name) if path.is_file() else None
        if match and path.parent.name != match["case_id"]:
            case_dir = folder / match["case_id"]
            case_dir.mkdir(exist_ok=True)
            if (case_dir / path.name).exists():
                raise UploadError(f"{archive.name}: {path.name} twice")
            path.rename(case_dir / path.name)
    # the case folders themselves: a folder the moves left empty, or one of volumes, is no case without slices
    slices = [path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in (".tif", ".tiff")]
    return sorted({path.parent for path in slices}) + volumes_inside


def _png_as_tif(path, target):
    """A .png slice in the training channel order, stored as the .tif `predict` reads: 8-bit RGB only,
    as the .tif slices are (a grey or 16-bit PNG is not the three sequences)."""
    try:
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            if mode != "RGB":
                expected = "8-bit RGB (pre-contrast, FLAIR, post-contrast)"
                raise UploadError(f"{path.name}: a PNG of mode {mode}; expected {expected}")
            if size != (data.NATIVE_SIZE, data.NATIVE_SIZE):
                raise UploadError(f"{path.name}: {size[0]} x {size[1]} pixels, expected 256 x 256")
            pixels = np.asarray(image)
    except UploadError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UploadError(f"{path.name}: not a readable PNG ({type(error).__name__})") from None
    import tifffile

    tifffile.imwrite(target, pixels, photometric="rgb")


def _copy(source, target, names):
    """Copy an upload, refusing two uploads that would land on one name; `names` maps copy -> upload name."""
    if target.exists():
        raise UploadError(f"{source.name} and {names.get(target.name, target.name)}: two uploads of the same name")
    shutil.copyfile(source, target)
    names[target.name] = source.name
    return target


def arrange(files, sequences, folder, names=None):
    """Copy the uploads into `folder` in the layout `predict` reads; return (inputs, sequences).
    `names` (a dict) receives, for each copy whose path differs from its upload's name, the upload's name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = {} if names is None else names
    inputs, slices, budget = [], [], [MAX_UNZIPPED_BYTES]
    for number, path in enumerate(map(Path, files or []), 1):
        name = path.name
        if volumes.is_nifti(name):
            inputs.append(_copy(path, folder / name, names))
        elif name.lower().endswith(".zip"):
            names[f"zip{number}"] = name
            inputs.extend(_unzip(path, folder / f"zip{number}", budget))
        elif name.lower().endswith(SLICE_SUFFIXES):
            slices.append(path)
        else:
            raise UploadError(
                f"{name}: not a NIfTI volume (.nii, .nii.gz), a zip of a case folder, or a .tif / .png slice"
            )
    if slices:
        case_dir = folder / "slices"
        case_dir.mkdir()
        matches = [data.SLICE_FILE.match(path.with_suffix(".tif").name) for path in slices]
        cases = {}  # case id, in lower case (a file system may not tell Scan from scan) -> the upload it came from
        for path, match in zip(slices, matches):
            if match is not None:
                cases.setdefault(match["case_id"].lower(), path.name)
        for number, (path, match) in enumerate(zip(slices, matches), 1):
            if match is None:  # not a Kaggle name: a case of its own (its name, where that can be a case id), for
                # nothing says which scan it is from or where; as slices of one case, the largest 3-D component a
                # run's post-processing may keep would be one region over all of them
                case_id = path.stem if guards.CASE_ID.match(path.stem) else f"upload-{number}"
                if case_id.lower() in cases:
                    raise UploadError(
                        f"{path.name} and {cases[case_id.lower()]}: a slice named {case_id!r} would be read as a slice "
                        "of that case; rename one of them"
                    )
                cases[case_id.lower()] = path.name
                names[f"case:{case_id}"] = path.name
                target = case_dir / f"{case_id}_1.tif"
            elif match["mask"]:  # a manual mask beside its slice: drawn in green on the outlines
                target = case_dir / f"{match['case_id']}_{match['slice_index']}_mask.tif"
            else:
                target = case_dir / f"{match['case_id']}_{match['slice_index']}.tif"
            key = f"slices/{target.name}"
            if key in names:
                raise UploadError(f"{path.name} and {names[key]}: two uploads for one slice")
            names[key] = path.name
            if path.suffix.lower() == ".png":
                _png_as_tif(path, target)
            else:
                shutil.copyfile(path, target)
        slice_files = sorted(path for path in case_dir.iterdir() if not path.name.endswith("_mask.tif"))
        if not slice_files:
            raise UploadError("only masks were uploaded: add the slices they belong to")
        inputs.extend(slice_files)
    given = {name: path for name, path in sequences.items() if path is not None}
    for name, path in given.items():
        if not volumes.is_nifti(path):
            raise UploadError(f"{Path(path).name}: the {name} sequence must be a .nii or .nii.gz file")
        sequence_dir = folder / name
        sequence_dir.mkdir(exist_ok=True)
        given[name] = _copy(Path(path), sequence_dir / Path(path).name, names)
    if not inputs and not given:
        raise UploadError("upload a NIfTI volume, a zip of a case folder, or .tif / .png slices first")
    return inputs, ({name: given.get(name) for name in volumes.SEQUENCES} if given else None)


def _overlay(image, mask):
    """The slice with its predicted outline, RGB at the slice's own size (enlarged only when shown)."""
    return cv2.cvtColor(predict.overlay_image(image, mask), cv2.COLOR_BGR2RGB)


def enlarge(picture):
    return cv2.resize(picture, (DISPLAY_SIZE, DISPLAY_SIZE), interpolation=cv2.INTER_NEAREST)


def _summary(rows, seconds):
    lines = [f"**{len(rows)} case{'s' * (len(rows) != 1)}**, segmented in {seconds:.1f} s", ""]
    for row in rows:
        size = (
            f"tumor volume **{row['tumor_volume_ml']:.2f} ml** ({row['tumor_voxels']} voxels of "
            f"{row['voxel_size_mm']} mm)"
            if "tumor_volume_ml" in row
            else f"tumor area {row['tumor_area_px_total']} px (the .tif slices carry no voxel size)"
        )
        lines.append(f"- {row['case_id']}: tumor on {row['tumor_slices']} of {row['slices']} slices, {size}")
        lines += [f"  - Warning: {warning}" for warning in filter(None, row.get("warnings", "").split("; "))]
    return "\n".join(lines)


class Segmenter:
    """Holds the loaded model; `run` turns one set of uploads into what the page shows."""

    def __init__(self, model_path=None):
        self.predictor = predict.load_predictor(model_path)
        self.work_dir = Path(tempfile.mkdtemp(prefix="lgg-app-"))  # ours alone; removed when the app stops
        atexit.register(shutil.rmtree, self.work_dir, ignore_errors=True)
        self.requests = {}  # folder -> time made: only these are ever removed
        self.names = {}  # copy name -> upload name, for messages

    def _new_folder(self):
        for old, made in list(self.requests.items()):  # earlier requests' scans, after an hour
            if time.time() - made > KEEP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
                del self.requests[old]
        folder = Path(tempfile.mkdtemp(prefix="request-", dir=self.work_dir))
        self.requests[folder] = time.time()
        return folder

    def message(self, error):
        """An error as the page shows it: the upload names, not the app's temporary paths."""
        text = str(error)
        for copy, upload in self.names.items():  # the renamed copies (slices/scan_1.tif, zip1/...) by their upload
            if copy.startswith(("slices/", "zip")):
                text = re.sub(rf"\S*/request-[^/\s]+/in/{re.escape(copy)}\b", upload, text)
        text = text.replace("--flair FILE --fill-from-flair", f"the FLAIR file with {FILL_BOX} ticked")
        text = text.replace("add --fill-from-flair", f"tick {FILL_BOX}")
        return re.sub(r"\S*/request-[^/\s]+/(in|out)/((pre|flair|post)/)?", "", text)

    def run(self, files, pre=None, flair=None, post=None, fill_from_flair=False):
        """-> (slice pictures with labels, summary markdown, montage path or None, files to download).
        `fill_from_flair`: a missing pre- or post-contrast file is filled with the FLAIR (`predict`'s
        --fill-from-flair)."""
        start = time.perf_counter()
        folder = self._new_folder()
        self.names = {}
        sequences = {"pre": pre, "flair": flair, "post": post}
        try:
            inputs, sequences = arrange(files, sequences, folder / "in", self.names)
            collected = []
            out = predict.predict_paths(
                None,
                inputs,
                folder / "out",
                sequences=sequences,
                predictor=self.predictor,
                collect=collected,
                fill_from_flair=bool(fill_from_flair and sequences),  # a box left ticked never refuses a 4-D scan
            )
        finally:  # the uploads' copies are not needed past this point (the results stay for their download)
            shutil.rmtree(folder / "in", ignore_errors=True)
        seconds = time.perf_counter() - start
        uploads = {key.removeprefix("case:"): name for key, name in self.names.items() if key.startswith("case:")}
        pictures = [
            (_overlay(image, mask), f"{uploads.get(case_id, case_id)}, slice {index}: {int(mask.sum())} px")
            for case_id, indices, images, masks, _ in collected
            for index, image, mask in zip(indices, images, masks)
        ]
        rows = [{**row, "case_id": uploads.get(row["case_id"], row["case_id"])} for *_, row in collected]
        montages = sorted(out.glob("*/*_montage.png"))
        archive = shutil.make_archive(str(folder / "predictions"), "zip", out)
        downloads = [*sorted(map(str, out.glob(f"*/*{predict.PREDICTED_NIFTI_SUFFIX}"))), archive]
        return pictures, _summary(rows, seconds), str(montages[0]) if montages else None, downloads


def _first_tumor_slice(pictures):
    for number, (_, label) in enumerate(pictures, 1):
        if not label.endswith(": 0 px"):
            return number
    return 1


def build(segmenter):
    import gradio as gr

    def segment(files, pre, flair, post, fill_from_flair):
        try:
            pictures, summary, montage, downloads = segmenter.run(files, pre, flair, post, fill_from_flair)
        except (data.DatasetError, ValueError, OSError, RuntimeError, NotImplementedError) as error:
            raise gr.Error(segmenter.message(error), print_exception=False) from None
        except Exception as error:  # a case nobody foresaw: still a message on the page, and the app serves on
            message = f"could not segment this upload ({type(error).__name__}: {segmenter.message(error)})"
            raise gr.Error(message, print_exception=True) from None
        first = _first_tumor_slice(pictures)
        # a Gradio slider needs minimum < maximum; `show` keeps a single slice's slider at that slice
        slider = gr.Slider(minimum=1, maximum=max(len(pictures), 2), step=1, value=first, interactive=len(pictures) > 1)
        image, label = pictures[first - 1]
        return pictures, slider, enlarge(image), label, summary, montage, downloads

    def show(pictures, number):
        if not pictures:
            return None, ""
        image, label = pictures[min(int(number), len(pictures)) - 1]
        return enlarge(image), label

    def clear():  # an earlier result never stays on the page beside a new upload's error
        return [], gr.Slider(minimum=1, maximum=2, value=1, interactive=False), None, "", "", None, None

    # Gradio's own copies of uploads and results are removed after an hour too (checked every hour)
    with gr.Blocks(title="LGG tumor segmentation", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "# Lower-grade glioma: FLAIR abnormality segmentation\n"
            "Upload a 4-D NIfTI (pre-contrast, FLAIR, post-contrast on the last axis), a zip of a Kaggle case "
            "folder, or `.tif` / `.png` slices; or give the three sequences as 3-D NIfTI files below. "
            f"Model: `{segmenter.predictor.model_path.name}` from `{segmenter.predictor.model_path.parent}`. "
            "A research tool, not a medical device."
        )
        pictures = gr.State([])
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="Scan or slices", file_count="multiple", elem_id="upload")
                with gr.Accordion("Three 3-D NIfTI files, one per sequence", open=False):
                    pre = gr.File(label="pre-contrast", elem_id="pre")
                    flair = gr.File(label="FLAIR", elem_id="flair")
                    post = gr.File(label="post-contrast", elem_id="post")
                    fill = gr.Checkbox(
                        label=f"{FILL_BOX[1:-1]} Fill a missing pre- or post-contrast with it (as the Kaggle set does)",
                        elem_id="fill-from-flair",
                    )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
                summary = gr.Markdown(elem_id="summary")
                downloads = gr.File(label="Download: mask and all outputs", file_count="multiple", elem_id="downloads")
            with gr.Column():
                slider = gr.Slider(
                    minimum=1, maximum=2, step=1, value=1, label="Slice", elem_id="slider", interactive=False
                )
                slice_label = gr.Markdown(elem_id="slice-label")
                picture = gr.Image(label="Predicted outline (red) on FLAIR", elem_id="slice", type="numpy")
                montage = gr.Image(label="Tumor slices", elem_id="montage", type="filepath")
        shown = [pictures, slider, picture, slice_label, summary, montage, downloads]
        button.click(clear, None, shown).then(segment, [upload, pre, flair, post, fill], shown)
        slider.change(show, [pictures, slider], [picture, slice_label])
    return page


def serve(model_path=None, host="127.0.0.1", port=7860):
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    segmenter = Segmenter(model_path)
    page = build(segmenter)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` too removes the app's temporary files (atexit)
    page.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=False,
        quiet=True,
        max_file_size="1gb",
        prevent_thread_lock=True,
    )
    print(f"Serving on http://{host}:{port} (Ctrl+C stops it)", flush=True)
    page.block_thread()
