"""Find the Kaggle LGG slices on disk, read them, split by patient, and feed them to Keras.

Layout (as downloaded from Kaggle, `mateuszbuda/lgg-mri-segmentation`):

    kaggle_3m/<case_id>/<case_id>_<n>.tif        3 channels: pre-contrast, FLAIR, post-contrast
    kaggle_3m/<case_id>/<case_id>_<n>_mask.tif   FLAIR abnormality, 0 or 255
    kaggle_3m/data.csv                           clinical and genomic data, one row per patient
"""

import hashlib
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import tifffile

NATIVE_SIZE = 256
CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")
FLAIR_CHANNEL = CHANNELS.index("FLAIR")
SLICE_FILE = re.compile(r"^(?P<case_id>.+)_(?P<slice_index>\d+)(?P<mask>_mask)?\.tiff?$")
SPLITS = ("train", "val", "test")
READ_WORKERS = 4


class DatasetError(ValueError):
    """A dataset file or folder that is missing, unreadable or not what the Kaggle set holds."""


def dataset_candidates(data_dir):
    """The folders `find_dataset_root` looks in for the case folders, in its order: `data_dir` itself, its
    `kaggle_3m/`, and the `kaggle_3m/` of the `lgg-mri-segmentation/` folder Kaggle's archive unpacks to."""
    data_dir = Path(data_dir)
    return (data_dir, data_dir / "kaggle_3m", data_dir / "lgg-mri-segmentation" / "kaggle_3m")


def find_dataset_root(data_dir, with_masks=True):
    """Return the folder holding the case folders: `data_dir` itself, or a `kaggle_3m` inside it.

    Accepts `kaggle_3m/`, its parent (e.g. `data/`), and the `lgg-mri-segmentation/` folder that
    Kaggle's archive unpacks to. `with_masks=False` (predict) also accepts case folders of slices
    without masks.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(
            f"data folder not found: {data_dir}. Download the dataset with `python -m lgg download` "
            "(Kaggle account needed) or make a synthetic demo set with `python -m lgg demo-data`."
        )
    for candidate in dataset_candidates(data_dir):
        if candidate.is_dir() and any(candidate.glob("*/*_mask.tif" if with_masks else "*/*.tif")):
            return candidate
    if not with_masks:
        raise DatasetError(f"no case folders (<case_id>/<case_id>_<n>.tif) found in {data_dir} or its kaggle_3m/")
    raise DatasetError(
        f"no case folders (<case_id>/<case_id>_<n>_mask.tif) found in {data_dir} or its kaggle_3m/ "
        "subfolder. Point --data at the kaggle_3m folder of the Kaggle LGG MRI Segmentation set."
    )


def check_header(path, expected_shapes):
    """Check a `.tif` header (shape, dtype) without reading its pixels; `DatasetError` naming the file."""
    _read_tif(path, expected_shapes, pixels=False)


def _read_tif(path, expected_shapes, pixels=True):
    """Read a one-page `.tif` after checking its header, so a damaged or huge file fails fast
    with a `DatasetError` naming it (a header claiming 60000x60000 pixels is refused before any
    memory is allocated)."""
    path = Path(path)
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            if page.shape not in expected_shapes or page.dtype != np.uint8:
                raise DatasetError(
                    f"{path}: expected uint8 of shape {' or '.join(map(str, expected_shapes))}; "
                    f"found {page.dtype} of shape {page.shape}"
                )
            if len(tif.pages) != 1:  # a stack of slices would be read as its first page, the others dropped unsaid
                raise DatasetError(f"{path}: holds {len(tif.pages)} pages; a slice is a one-page .tif")
            return page.asarray() if pixels else None
    except DatasetError:
        raise
    except Exception as error:  # tifffile raises many types for damaged files
        raise DatasetError(f"cannot read {path}: {type(error).__name__}: {error}") from None


def read_image(path):
    """Read one slice as uint8 `(256, 256, 3)` in the stored channel order, or raise `DatasetError`.

    tifffile returns the channels as stored (OpenCV's `imread` would reverse them to BGR).
    """
    return _read_tif(path, [(NATIVE_SIZE, NATIVE_SIZE, 3)])


# a few re-saved masks carry colour channels; the first one is the mask
MASK_SHAPES = [(NATIVE_SIZE, NATIVE_SIZE), (NATIVE_SIZE, NATIVE_SIZE, 3), (NATIVE_SIZE, NATIVE_SIZE, 4)]


def read_mask(path):
    """Read one mask as uint8 `(256, 256)` with values 0 and 1, or raise `DatasetError`."""
    mask = _read_tif(path, MASK_SHAPES)
    if mask.ndim == 3:
        mask = mask[..., 0]
    values = np.unique(mask)
    if not set(values.tolist()) <= {0, 1, 255}:
        raise DatasetError(f"{path}: a mask holds 0 and 255 only; found values {values[:10].tolist()}")
    return (mask > 0).astype(np.uint8)


def patient_id(case_id):
    """`TCGA_CS_4941_19960909` -> `TCGA_CS_4941`, the key of `data.csv`."""
    return "_".join(case_id.split("_")[:3])


def find_slices(data_dir, max_cases=None):
    """One row per slice: case_id, patient_id, slice_index, image_path, mask_path, has_tumor,
    tumor_area_px. Cases sorted by id, slices in numeric order (`_2` before `_10`).

    Every mask is read (to measure the tumor area), so a damaged mask fails here, naming the file.
    An image without its mask, a mask without its image, or a `.tif` not named like the dataset's
    raises `DatasetError`; nothing is skipped.

    Args:
        data_dir: path. `kaggle_3m/` or a folder containing it.
        max_cases: int or None. Keep only the first `max_cases` cases (sorted by id).
    """
    root = find_dataset_root(data_dir)
    case_dirs = sorted(path for path in root.iterdir() if path.is_dir())
    if max_cases is not None:
        if max_cases < 1:
            raise ValueError(f"max_cases must be at least 1 or None; received {max_cases}")
        case_dirs = case_dirs[:max_cases]
    rows = []
    for case_dir in case_dirs:
        images, masks = case_slice_files(case_dir)
        report_gaps(case_dir.name, images)
        rows += [
            {
                "case_id": case_dir.name,
                "patient_id": patient_id(case_dir.name),
                "slice_index": index,
                "image_path": str(images[index]),
                "mask_path": str(masks[index]),
            }
            for index in sorted(images)
        ]
    if not rows:
        raise DatasetError(f"no cases found in {root}")
    slices = pd.DataFrame(rows)
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        areas = list(pool.map(lambda path: int(read_mask(path).sum()), slices["mask_path"]))
    slices["tumor_area_px"] = areas
    slices["has_tumor"] = slices["tumor_area_px"] > 0
    return slices


def case_slice_files(case_dir, with_masks=True):
    """`(images, masks)`: slice number -> path of one case folder's `.tif` files. Refuses, naming the
    file, a case id unusable as a file name, a file named unlike the case, anything but a regular
    file (a FIFO would hang the reader), two files for one slice number (`_7` and `_07`), a folder
    without slices, and a mask without its slice (or, `with_masks`, a slice without its mask)."""
    from lgg import guards

    case_dir = Path(case_dir)
    guards.check_case_id(case_dir.name, case_dir)
    images, masks = {}, {}
    for path in sorted(case_dir.iterdir()):
        if path.suffix.lower() not in (".tif", ".tiff") or path.name.startswith("._"):
            continue  # `._<name>`: macOS's metadata beside each file on USB and network drives, not a slice
        match = SLICE_FILE.match(path.name)
        if match is None or match["case_id"] != case_dir.name:
            raise DatasetError(f"{path}: expected files named {case_dir.name}_<n>.tif and {case_dir.name}_<n>_mask.tif")
        if not path.is_file():
            raise DatasetError(f"{path}: not a regular file")
        found = masks if match["mask"] else images
        index = int(match["slice_index"])
        if index in found:
            raise DatasetError(f"{found[index]} and {path.name}: two files for slice {index} of {case_dir.name}")
        found[index] = path
    if not images and not masks:
        raise DatasetError(f"{case_dir}: case folder holds no slices")
    for index in sorted(images.keys() ^ masks.keys() if with_masks else masks.keys() - images.keys()):
        present = images.get(index) or masks.get(index)
        raise DatasetError(f"{present}: its {'mask' if index in images else 'image'} is missing")
    return images, masks


def slice_gaps(slice_indices):
    """The missing runs `[(first, last), ...]` in sorted slice numbers (a case numbered 1 to n has none)."""
    indices = sorted(slice_indices)
    return [(before + 1, after - 1) for before, after in zip(indices, indices[1:]) if after - before > 1]


def report_gaps(case_id, slice_indices):
    """Print a note for each run of missing slice numbers: the 3-D step will not join across it."""
    for first, last in slice_gaps(slice_indices):
        missing = f"slice {first}" if first == last else f"slices {first}-{last}"
        print(f"Note: {case_id}: {missing} missing; the slices on either side are not treated as neighbours")


def load_clinical(data_dir):
    """`data.csv` (one row per patient), keyed by `patient_id`; join with `find_slices` on it."""
    path = find_dataset_root(data_dir) / "data.csv"
    try:
        clinical = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read {path}: {error}") from None
    if "Patient" not in clinical.columns:
        raise DatasetError(f"{path}: expected a 'Patient' column; found {list(clinical.columns)[:8]}")
    return clinical.rename(columns={"Patient": "patient_id"})


def _unit_hash(text):
    """A number in [0, 1) fixed by `text` alone (same on every machine and Python version)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


def split_by_patient(case_ids, val_fraction=0.1, test_fraction=0.2, salt="lgg-split-v1", test_start=0.0):
    """Assign each case to train, val or test by a hash of its patient id.

    Each patient gets a number in [0, 1) from a hash of its id; test is the window
    `[test_start, test_start + test_fraction)` of those numbers, val the `val_fraction` after it
    (wrapping round past 1), train the rest. A case's split depends on its own id only, so it does
    not move when cases are added or missing, and every slice of a patient lands in the same split.
    Only when a split would be empty (a handful of cases) is the train case nearest to it by hash
    moved there. Moving `test_start` by `test_fraction` gives the folds of a cross-validation
    (`patient_fold`).

    Returns:
        dict `case_id -> "train" | "val" | "test"`.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"fractions must be in [0, 1) and sum below 1; received val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}"
        )
    case_ids = sorted(set(case_ids))
    position = {case: (_unit_hash(f"{salt}:{patient_id(case)}") - test_start) % 1.0 for case in case_ids}
    split = {
        case: "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"
        for case, u in position.items()
    }
    for name, fraction in (("test", test_fraction), ("val", val_fraction)):
        train_cases = [case for case in case_ids if split[case] == "train"]
        if fraction > 0 and name not in split.values() and len(train_cases) > 1:
            split[min(train_cases, key=position.get)] = name
    return split


FOLD_PATTERN = re.compile(r"patient-fold-(\d+)-of-(\d+)")


def patient_fold(case_ids, name, val_fraction=0.1):
    """The split of one cross-validation fold by patient, named like `"patient-fold-2-of-5"`.

    Fold K of N tests the K-th N-th of the patients by hash; run folds 1 to N and every patient is
    tested exactly once. Fold 1 of 5 is the default `"patient"` split.

    Returns:
        dict `case_id -> "train" | "val" | "test"`, as `split_by_patient`.
    """
    match = FOLD_PATTERN.fullmatch(name)
    fold, folds = (int(match[1]), int(match[2])) if match else (0, 0)
    if not (folds >= 3 and 1 <= fold <= folds):
        raise ValueError(f"a fold split is named patient-fold-K-of-N with N >= 3 and 1 <= K <= N; received {name!r}")
    return split_by_patient(case_ids, val_fraction, 1.0 / folds, test_start=(fold - 1) / folds)


def random_slice_split(slices, random_state=0):
    """The original notebooks' split: slices shuffled into 90/5/5 with `random_state=0`.

    LEAKY: slices of one patient land in train and in validation/test, so scores on it are
    optimistic. Use it only to reproduce the original notebooks' numbers.

    Returns:
        pandas Series of "train" / "val" / "test", indexed like `slices`.
    """
    from sklearn.model_selection import train_test_split

    train_index, held_out = train_test_split(slices.index, test_size=0.1, random_state=random_state)
    val_index, test_index = train_test_split(held_out, test_size=0.5, random_state=random_state)
    split = pd.Series("train", index=slices.index)
    split[val_index], split[test_index] = "val", "test"
    return split


def check_split_name(name):
    """Refuse a split name other than `patient`, `patient-fold-K-of-N` or `random-slice-leaky`."""
    if name.startswith("patient-fold-"):
        patient_fold([], name)  # raises ValueError for a malformed fold name
    elif name not in ("patient", "random-slice-leaky"):
        raise ValueError(f"split must be 'patient', 'patient-fold-K-of-N' or 'random-slice-leaky'; received {name!r}")


def split_table(slices, split_name="patient", seed=0, val_fraction=0.1, test_fraction=0.2):
    """`slices` with a `split` column: by patient (default), one cross-validation fold by patient
    (`"patient-fold-K-of-N"`, `patient_fold`), or the original leaky slice split."""
    check_split_name(split_name)  # before anything is written
    slices = slices.copy()
    if split_name == "patient":
        assignment = split_by_patient(slices["case_id"], val_fraction, test_fraction)
        slices["split"] = slices["case_id"].map(assignment)
    elif split_name.startswith("patient-fold-"):
        slices["split"] = slices["case_id"].map(patient_fold(slices["case_id"], split_name, val_fraction))
    else:
        slices["split"] = random_slice_split(slices, random_state=seed)
    return slices


def read_split(split_file):
    """A run's `split.csv` with its case ids as written (`001` stays `001`, `NA` stays `NA`: pandas would read
    them as 1 and NaN)."""
    return pd.read_csv(split_file, dtype={"case_id": str, "split": str}, keep_default_na=False)


def split_counts(slices):
    """Cases, slices and tumor slices per split."""
    return slices.groupby("split").agg(
        cases=("case_id", "nunique"), slices=("case_id", "size"), tumor_slices=("has_tumor", "sum")
    )


def check_split_counts(slices):
    """Refuse a split that leaves a part without cases (e.g. too few cases for a patient split):
    training would have nothing to learn from or nothing to choose or report on."""
    counts = slices.groupby("split")["case_id"].nunique()
    empty = [name for name in SPLITS if counts.get(name, 0) == 0]
    if empty:
        found = ", ".join(f"{name} {counts.get(name, 0)}" for name in SPLITS)
        raise ValueError(
            f"the split leaves no {' and no '.join(empty)} cases ({found} cases of {slices['case_id'].nunique()}); "
            "use more cases (--max-cases), at least about 10 for a patient split"
        )


def resize_image(image, size):
    if image.shape[0] == size:
        return image
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def resize_mask(mask, size):
    """Resize a 0/1 mask by area averaging, then threshold at one half (keeps small tumors)."""
    if mask.shape[0] == size:
        return mask
    resized = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (resized >= 0.5).astype(np.uint8)


def load_arrays(slices, image_size=NATIVE_SIZE, with_masks=True):
    """Decode the slices of a `find_slices` table into memory.

    Returns:
        images uint8 `(N, S, S, 3)` and, if `with_masks`, masks uint8 `(N, S, S, 1)` of 0/1.
        The 88 shared cases at 256x256 take 620 MB + 207 MB; the arrays are allocated once and
        filled in place, so decoding needs no second copy.
    """

    def load(position, row):  # each worker writes its slice straight into the output arrays
        images[position] = resize_image(read_image(row.image_path), image_size)
        if with_masks:
            masks[position, ..., 0] = resize_mask(read_mask(row.mask_path), image_size)

    images = np.empty((len(slices), image_size, image_size, 3), np.uint8)
    masks = np.empty((len(slices), image_size, image_size, 1), np.uint8) if with_masks else None
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        list(pool.map(load, range(len(slices)), slices.itertuples()))  # list() re-raises a worker's error
    return (images, masks) if with_masks else images


# Augmentation ranges, close to the original notebooks' ImageDataGenerator settings.
AUGMENTATION = {"rotation_degrees": 10.0, "shift_fraction": 0.05, "zoom_fraction": 0.05, "horizontal_flip": True}
# The augmentations a run may choose (`RunConfig.augmentation`). "strong": wider affine ranges and, per slice and
# channel, a gamma drawn log-uniformly in [0.7, 1.5] (nnU-Net's range): the one change of intensity the models'
# per-slice standardization (`lgg.models._standardize`) does not undo, since it removes any scale and offset.
# "elastic": "strong" and then an elastic warp (Ronneberger et al. 2015: random displacements on a coarse grid,
# interpolated to every pixel), the displacements' standard deviation a fraction of the side (`elastic_fields`).
STRONG = {"rotation_degrees": 20.0, "shift_fraction": 0.1, "zoom_fraction": 0.15, "horizontal_flip": True,
          "gamma": (0.7, 1.5)}  # fmt: skip
AUGMENTATIONS = {"standard": AUGMENTATION, "strong": STRONG, "elastic": {**STRONG, "elastic": 0.025}}
ELASTIC_GRID = 5  # control points per side of the coarse displacement grid (at 128 px, one every 25.6 px)
ELASTIC_MAX = 0.1  # the largest displacement scale a run may ask for (4x the one measured, 0.025; larger is unmeasured)


def describe_augmentation(name):
    """An augmentation of `AUGMENTATIONS` in words, from its ranges (help texts and results quote this)."""
    params, gamma, elastic = augmentation_ranges(name)
    words = [
        f"rotation up to {params['rotation_degrees']:g} degrees",
        f"shift up to {params['shift_fraction'] * 100:g} %",
        f"zoom up to {params['zoom_fraction'] * 100:g} %",
    ]
    words += ["horizontal flip"] if params["horizontal_flip"] else []
    words += [f"a gamma in {gamma[0]:g}-{gamma[1]:g} per slice and channel"] if gamma else []
    words += [
        f"an elastic warp (displacements on a {ELASTIC_GRID}x{ELASTIC_GRID} grid, standard deviation "
        f"{elastic * 100:g} % of the side, interpolated linearly)"
    ] if elastic else []  # fmt: skip
    return ", ".join(words)


def augmentation_ranges(augmentation):
    """`(affine ranges, gamma range or None, elastic scale or None)` of an augmentation: a name of `AUGMENTATIONS`
    or a dict of ranges (keys as `AUGMENTATION`'s, `gamma` and `elastic`), the ranges not named taken from
    `AUGMENTATION`."""
    if isinstance(augmentation, str):
        if augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}; received {augmentation!r}")
        augmentation = AUGMENTATIONS[augmentation]
    params = {**AUGMENTATION, **(augmentation or {})}
    gamma, elastic = params.pop("gamma", None), params.pop("elastic", None)
    unknown = set(params) - set(AUGMENTATION)
    if unknown:
        raise ValueError(
            f"unknown augmentation settings {sorted(unknown)}; known: {[*AUGMENTATION, 'gamma', 'elastic']}"
        )
    if gamma is not None and not (
        isinstance(gamma, (tuple, list)) and len(gamma) == 2 and all(isinstance(g, (int, float)) for g in gamma)
        and 0 < gamma[0] <= gamma[1] < float("inf")
    ):  # fmt: skip
        raise ValueError(f"gamma must be a range (low, high) with 0 < low <= high; received {gamma!r}")
    if elastic is not None and not (
        isinstance(elastic, (int, float)) and not isinstance(elastic, bool) and 0 <= elastic <= ELASTIC_MAX
    ):
        raise ValueError(
            f"elastic must be a fraction of the side from 0 to {ELASTIC_MAX:g} (the displacements' standard "
            f"deviation); received {elastic!r}"
        )
    return params, gamma, elastic or None


def _random_affine(batch_size, size, seed, rotation_degrees, shift_fraction, zoom_fraction, horizontal_flip):
    """Per-sample projective transforms (output -> input pixel maps) for `ImageProjectiveTransformV3`."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, 5)
    angle = tf.random.stateless_uniform([batch_size], seeds[0], -1.0, 1.0) * (rotation_degrees * np.pi / 180)
    zoom = 1.0 + tf.random.stateless_uniform([batch_size], seeds[1], -1.0, 1.0) * zoom_fraction
    shift = tf.random.stateless_uniform([batch_size, 2], seeds[2], -1.0, 1.0) * (shift_fraction * size)
    flip = tf.ones([batch_size])
    if horizontal_flip:
        flip = tf.where(tf.random.stateless_uniform([batch_size], seeds[3]) < 0.5, -1.0, 1.0)
    cos, sin = tf.cos(angle) / zoom, tf.sin(angle) / zoom
    zeros = tf.zeros([batch_size])
    return tf.stack([*affine_components(cos, sin, flip, shift[:, 0], shift[:, 1], size), zeros, zeros], axis=1)


def affine_components(cos, sin, flip, shift_x, shift_y, size):
    """The output -> input pixel map `(a0, a1, a2, b0, b1, b2)` of a rotation and zoom (`cos`, `sin`
    already divided by the zoom), a horizontal flip (`flip` -1 or 1) and a shift, about the centre
    of a `size` x `size` image: input = R/zoom * F * (output - center) + center + shift. Arithmetic
    only, so the TensorFlow pipeline (tensors) and `lgg.batches` (NumPy arrays) share it."""
    center = (size - 1) / 2.0
    a0, a1 = cos * flip, -sin
    b0, b1 = sin * flip, cos
    a2 = center - a0 * center - a1 * center + shift_x
    b2 = center - b0 * center - b1 * center + shift_y
    return a0, a1, a2, b0, b1, b2


def augment_batch(images, masks, seed, augmentation=None):
    """Apply one random affine transform per sample, identically to the image and its mask, with a
    gamma range (`"strong"`) first a random gamma per sample and channel to the image (`apply_gamma`), and
    with an elastic scale (`"elastic"`) then a random elastic warp per sample, the image and its mask alike
    (displacements drawn on an `ELASTIC_GRID` grid, resized bilinearly to every pixel: `sample_bilinear`).

    Args:
        images: float32 tensor `(B, S, S, 3)`, values 0-255.
        masks: float32 tensor `(B, S, S, 1)` or None.
        seed: int32 tensor of shape (2,), for stateless (reproducible) randomness.
        augmentation: a name of `AUGMENTATIONS` or a dict of ranges (`augmentation_ranges`). Defaults to
            `AUGMENTATION`.
    """
    import tensorflow as tf

    params, gamma, elastic = augmentation_ranges(augmentation)
    batch_size, size = tf.shape(images)[0], tf.shape(images)[1]
    if gamma is not None:  # drawn from its own stream, so the affine draws stay as they are
        uniform = tf.random.stateless_uniform(
            tf.stack([batch_size, 1, 1, 3]), tf.random.experimental.stateless_fold_in(seed, 2)
        )
        images = apply_gamma(images, gamma_exponents(uniform, gamma, tf.exp))
    transforms = _random_affine(batch_size, tf.cast(size, tf.float32), seed, **params)
    stacked = images if masks is None else tf.concat([images, masks], axis=-1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked,
        transforms=transforms,
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    if elastic is not None:  # after the affine map, from a stream of its own, so the affine draws stay
        coarse = tf.random.stateless_normal(
            tf.stack([batch_size, ELASTIC_GRID, ELASTIC_GRID, 2]), tf.random.experimental.stateless_fold_in(seed, 3)
        )
        fields = tf.image.resize(coarse * (elastic * tf.cast(size, tf.float32)), tf.stack([size, size]))
        warped = sample_bilinear(warped, fields)
    if masks is None:
        return warped
    return warped[..., :3], tf.round(warped[..., 3:])


def sample_bilinear(images, fields):
    """Each pixel `(row, column)` of each image read at `(row + fields[..., 0], column + fields[..., 1])`, bilinear,
    zero outside the image: `cv2.remap` with `INTER_LINEAR` and a constant border of 0, as `lgg.batches` warps.
    `images` `(B, S, S, C)`, `fields` `(B, S, S, 2)` displacements in pixels (row, column)."""
    import tensorflow as tf

    last = tf.cast(tf.shape(images)[1] - 1, tf.float32)
    pixels = tf.range(tf.shape(images)[1], dtype=tf.float32)
    rows, columns = pixels[None, :, None] + fields[..., 0], pixels[None, None, :] + fields[..., 1]
    top, left = tf.floor(rows), tf.floor(columns)
    down, right = rows - top, columns - left
    out = tf.zeros_like(images)
    for row, column, weight in (
        (top, left, (1 - down) * (1 - right)),
        (top, left + 1, (1 - down) * right),
        (top + 1, left, down * (1 - right)),
        (top + 1, left + 1, down * right),
    ):
        inside = (row >= 0) & (row <= last) & (column >= 0) & (column <= last)
        index = tf.cast(tf.stack([tf.clip_by_value(row, 0, last), tf.clip_by_value(column, 0, last)], -1), tf.int32)
        out += tf.gather_nd(images, index, batch_dims=1) * (weight * tf.cast(inside, images.dtype))[..., None]
    return out


def gamma_exponents(uniform, gamma, exp):
    """Exponents log-uniform in the `gamma` range from `uniform` draws in [0, 1) (`(B, 1, 1, 3)`: one per
    sample and channel); `exp` the array library's. Arithmetic only, as `affine_components`: the TensorFlow
    pipeline and `lgg.batches` share it."""
    low, high = np.log(gamma[0]), np.log(gamma[1])
    return exp(low + uniform * (high - low))


def apply_gamma(images, exponents):
    """Each channel of each slice (values 0-255) raised to its exponent on the 0-1 scale: dark and bright keep
    their place, the contrast between them bends."""
    return 255.0 * (images / 255.0) ** exponents


def fill_with_flair(images, seed, share):
    """Per sample, with probability `share`, the pre-contrast and post-contrast channels replaced by
    FLAIR: what the dataset does for a case that lacks those sequences (4 of the 88 shared cases are
    FLAIR only, `benchmarks/misses.py`), so that training sees such slices more often. `seed`: as
    `augment_batch`'s, folded so that the affine draws stay as they are."""
    import tensorflow as tf

    draw = tf.random.stateless_uniform([tf.shape(images)[0]], tf.random.experimental.stateless_fold_in(seed, 1))
    flair = tf.repeat(images[..., FLAIR_CHANNEL : FLAIR_CHANNEL + 1], 3, axis=-1)
    return tf.where((draw < share)[:, None, None, None], flair, images)


def _gather(images, targets, index, static_batch):
    """The slices at `index` as float32 tensors, read from the numpy arrays themselves: no copy of
    the data set is made inside TensorFlow (a captured constant, and tf.data's graph rewrites of it,
    cost 2-3 extra copies: 4.2 GB peak building the 256x256 pipeline, 1.5 GB without)."""
    import tensorflow as tf

    batch_images, batch_targets = tf.numpy_function(
        lambda rows: (images[rows], targets[rows]), [index], (tf.uint8, tf.as_dtype(targets.dtype)), stateful=False
    )
    batch_images.set_shape((static_batch,) + images.shape[1:])
    batch_targets.set_shape((static_batch,) + targets.shape[1:])
    return tf.cast(batch_images, tf.float32), tf.cast(batch_targets, tf.float32)


TUMOR_SAMPLINGS = ("slice", "case", "area")  # how the tumor share of a batch is drawn: `tumor_pools`


def check_batch_size(batch_size, training_slices):
    """Refuse a batch of more slices than there are to train on: an epoch is one permutation of them
    (its last batch topped up with its first slices), which such a batch cannot fill (it once waited
    forever for a batch that never came)."""
    if batch_size > training_slices:
        raise ValueError(
            f"batch size {batch_size} is larger than the {training_slices} training slices: give a batch size "
            f"(batch_size, --batch-size) of at most {training_slices}, or more cases (max_cases, --max-cases)"
        )


def check_tumor_sampling(tumor_sampling, tumor_fraction):
    """Refuse a `tumor_sampling` not in `TUMOR_SAMPLINGS`, or one other than `"slice"` without a tumor share to
    draw (`tumor_fraction`)."""
    if tumor_sampling not in TUMOR_SAMPLINGS:
        raise ValueError(f"tumor_sampling must be one of {TUMOR_SAMPLINGS}; received {tumor_sampling!r}")
    if tumor_sampling != "slice" and tumor_fraction is None:
        raise ValueError(
            f"tumor_sampling {tumor_sampling!r} draws the tumor share of each batch: it needs tumor_fraction "
            "(--tumor-fraction)"
        )


def sampling_of(tumor_cases, tumor_areas):
    """The `tumor_sampling` (`TUMOR_SAMPLINGS`) that a pipeline's `tumor_cases` and `tumor_areas` ask for."""
    if tumor_areas is not None and tumor_cases is None:
        raise ValueError("tumor_areas needs tumor_cases: the area sampling draws a case first")
    return "slice" if tumor_cases is None else "case" if tumor_areas is None else "area"


def tumor_pools(tumor_fraction, has_tumor, cases=None, areas=None):
    """The indices of the tumor slices and of the tumor-free ones, for drawing `tumor_fraction` of
    each batch from the first, and the probability of each tumor slice in that draw: None (every tumor
    slice equally likely) without `cases`; with `cases` (the case id of every slice), a case drawn
    uniformly among those with tumor, then one of its tumor slices, so that a case with 3 tumor slices
    is drawn as often as one with 30 (`tumor_sampling="case"`; brain-segmentation-pytorch draws a
    patient first too); with `areas` too (each slice's tumor pixels), that slice in proportion to its
    tumor area (`tumor_sampling="area"`, after brain-segmentation-pytorch, which also draws a case's
    tumor-free slices, each as a tenth of the case's mean area, where `tumor_fraction` draws them here; a
    tumor slice whose mask lost its last pixel in resizing counts as one pixel). Refuses a fraction outside
    (0, 1), slices of one kind only, `cases` or `areas` of another length, `areas` without `cases`, or a
    negative or non-finite area."""
    if has_tumor is None or not 0 < tumor_fraction < 1:
        raise ValueError(f"tumor_fraction needs has_tumor and a value in (0, 1); received {tumor_fraction}")
    has_tumor = np.asarray(has_tumor, bool)
    if has_tumor.all() or not has_tumor.any():
        raise ValueError("tumor_fraction needs slices both with and without tumor")
    tumor, free = np.flatnonzero(has_tumor), np.flatnonzero(~has_tumor)
    if cases is None:
        if areas is not None:
            raise ValueError("areas needs cases: the area sampling draws a case first")
        return tumor, free, None
    cases = np.asarray(cases)
    if cases.shape != has_tumor.shape:
        raise ValueError(f"cases needs one case id per slice: {cases.shape} for {has_tumor.shape} slices")
    _, case_of_slice, slices_of_case = np.unique(cases[tumor], return_inverse=True, return_counts=True)
    if areas is None:
        return tumor, free, 1.0 / (slices_of_case[case_of_slice] * len(slices_of_case))
    areas = np.asarray(areas, np.float64)
    if areas.shape != has_tumor.shape:
        raise ValueError(f"areas needs one tumor area per slice: {areas.shape} for {has_tumor.shape} slices")
    wrong = np.flatnonzero(~np.isfinite(areas) | (areas < 0))
    if len(wrong):
        raise ValueError(f"areas must be tumor pixels, finite and not negative: slice {wrong[0]} has {areas[wrong[0]]}")
    tumor_areas = np.maximum(areas[tumor], 1.0)
    case_areas = np.bincount(case_of_slice, weights=tumor_areas)
    return tumor, free, tumor_areas / (case_areas[case_of_slice] * len(case_areas))


def evaluation_dataset(images, targets, batch_size=16):
    """A `tf.data` pipeline over slices decoded in memory, for validation: in order, no
    augmentation, one pass, the last batch as short as it comes.

    Args:
        images: uint8 array `(N, S, S, 3)`.
        targets: uint8 masks `(N, S, S, 1)` (segmentation) or labels `(N,)` (classification).
        batch_size: int. Defaults to `16`.
    """
    import tensorflow as tf

    images, targets = np.asarray(images), np.asarray(targets)
    dataset = tf.data.Dataset.range(len(images)).batch(batch_size)
    gather = lambda index: _gather(images, targets, index, None)  # noqa: E731
    return dataset.map(gather, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def training_dataset(
    images,
    targets,
    batch_size=16,
    seed=0,
    augment=True,
    tumor_fraction=None,
    has_tumor=None,
    start_epoch=0,
    flair_only=0.0,
    augmentation="standard",
    tumor_cases=None,
    tumor_areas=None,
):
    """A `tf.data` pipeline of training batches over slices decoded in memory.

    An endless stream of epochs (pass `steps_per_epoch` to `fit`), each one shuffled, optionally
    oversampling tumor slices to `tumor_fraction`, and augmented per sample (same transform for a
    slice and its mask), then prefetched. Every batch is full (the last one of an epoch is topped up
    with the epoch's first slices), so batch shapes are static. Every random draw is keyed by
    `(seed, epoch, batch)`, so epoch `e` is the same whether a run gets there uninterrupted or
    resumes at `start_epoch=e`.

    Args:
        images: uint8 array `(N, S, S, 3)`.
        targets: uint8 masks `(N, S, S, 1)` (segmentation) or labels `(N,)` (classification).
        batch_size: int. Defaults to `16`, as the original notebooks.
        seed: int. Seeds shuffling, oversampling and augmentation. Defaults to `0`.
        augment: bool. Apply `augment_batch`. Defaults to `True`.
        tumor_fraction: float or None. Draw tumor slices with this probability (needs
            `has_tumor`); each epoch then has as many slices as the data, drawn with replacement.
            Defaults to `None` (each slice once per epoch).
        has_tumor: bool array `(N,)`. Which slices show tumor; for `tumor_fraction`.
        start_epoch: int. First epoch of the stream (to resume a run). Defaults to `0`.
        flair_only: float. With `augment`, the share of slices whose pre- and post-contrast
            channels are replaced by FLAIR (`fill_with_flair`). Defaults to `0` (none).
        augmentation: with `augment`, a name of `AUGMENTATIONS` or a dict of ranges (`augment_batch`).
            Defaults to `"standard"`.
        tumor_cases: array `(N,)` of case ids, or None. With `tumor_fraction`, the tumor slices are
            drawn case first (`tumor_pools`): each case with tumor equally often, whatever its number of
            tumor slices. Defaults to `None` (every tumor slice equally often).
        tumor_areas: array `(N,)` of tumor pixels per slice, or None. With `tumor_cases`, a case's tumor
            slices drawn in proportion to their tumor area (`tumor_pools`). Defaults to `None` (each alike).

    Returns:
        `(dataset, steps_per_epoch)`.
    """
    import tensorflow as tf

    images, targets = np.asarray(images), np.asarray(targets)
    augmentation_ranges(augmentation)  # a wrong name or range refused here, not inside the pipeline
    segmentation = targets.ndim == 4
    check_batch_size(batch_size, len(images))
    steps = int(np.ceil(len(images) / batch_size))
    check_tumor_sampling(sampling_of(tumor_cases, tumor_areas), tumor_fraction)
    if tumor_fraction is not None:
        *pools, weights = tumor_pools(tumor_fraction, has_tumor, tumor_cases, tumor_areas)
        pools = [tf.constant(pool) for pool in pools]
        if weights is not None:
            log_weights = tf.constant(np.log(weights)[None], tf.float32)
    count = steps * batch_size  # every batch full: static shapes, so XLA compiles the step once

    def epoch_indices(epoch):
        """Slice indices of one epoch, from stateless draws keyed by (seed, epoch)."""
        key = tf.stack([tf.constant(seed, tf.int64), epoch])
        if tumor_fraction is None:  # a permutation, its first few repeated to fill the last batch
            order = tf.cast(tf.argsort(tf.random.stateless_uniform([len(images)], key)), tf.int64)
            return tf.concat([order, order[: count - len(images)]], 0)
        draws = tf.random.experimental.stateless_split(key, 3)
        tumor = tf.random.stateless_uniform([count], draws[0]) < tumor_fraction

        def uniform(pool, draw):
            return tf.gather(pool, tf.random.stateless_uniform([count], draw, 0, tf.shape(pool, tf.int64)[0], tf.int64))

        if weights is None:
            tumor_picks = uniform(pools[0], draws[1])
        else:  # the tumor slices case first (and by area): a categorical draw over them, from the same key
            tumor_picks = tf.gather(pools[0], tf.random.stateless_categorical(log_weights, count, draws[1])[0])
        return tf.where(tumor, tumor_picks, uniform(pools[1], draws[2]))

    def epoch_batches(epoch):
        batches = tf.data.Dataset.from_tensor_slices(epoch_indices(epoch)).batch(batch_size, drop_remainder=True)
        return batches.enumerate().map(lambda step, index: (epoch, step, index))

    def load(epoch, step, index):
        batch_images, batch_targets = _gather(images, targets, index, batch_size)
        if not augment:
            return batch_images, batch_targets
        batch_seed = tf.cast(tf.stack([seed, epoch * steps + step]), tf.int32)
        if segmentation:
            batch_images, batch_targets = augment_batch(batch_images, batch_targets, batch_seed, augmentation)
        else:
            batch_images = augment_batch(batch_images, None, batch_seed, augmentation)
        if flair_only:  # after the gamma, so a filled slice has three equal channels (the same warp for each)
            batch_images = fill_with_flair(batch_images, batch_seed, flair_only)
        return batch_images, batch_targets

    epochs = tf.data.Dataset.range(start_epoch, np.iinfo(np.int32).max).flat_map(epoch_batches)
    return epochs.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE), steps
