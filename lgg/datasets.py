"""Getting data: the real set from Kaggle (kagglehub), or a small SYNTHETIC set in its layout."""

import glob
import shutil
import tempfile
from pathlib import Path

import numpy as np
import tifffile

from lgg.data import NATIVE_SIZE, find_dataset_root

KAGGLE_DATASET = "mateuszbuda/lgg-mri-segmentation"


def download_kaggle(dest="data"):
    """Download the Kaggle set with kagglehub (needs Kaggle credentials) and link it under `dest`."""
    try:
        import kagglehub

        downloaded = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as error:
        raise RuntimeError(
            f"Could not download {KAGGLE_DATASET} ({type(error).__name__}: {error}). Set up Kaggle "
            "credentials (https://www.kaggle.com/docs/api), or download the archive by hand and "
            "unzip it so that data/kaggle_3m/<case>/ exists."
        ) from None
    root = find_dataset_root(downloaded)
    link = Path(dest) / "kaggle_3m"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
        if link.resolve() != root.resolve():
            raise FileExistsError(
                f"Downloaded to {root}, but {link} already exists and is not that folder (another dataset, the demo "
                f"set, a broken link): it is left as it is; move it away to link the download there, or use "
                f"--data {root.parent}"
            )
        print(f"Dataset at {root}; {link} already points there")
        return link
    try:
        link.symlink_to(root.resolve(), target_is_directory=True)
    except OSError as error:  # Windows lets only administrators and Developer Mode make links
        print(f"Dataset at {root}; not linked as {link} ({error.strerror or error}): use --data {root.parent}")
        return root
    print(f"Dataset at {root}; linked as {link}")
    return link


def _synthetic_slice(rng, size, tumor_center, tumor_radius):
    yy, xx = np.mgrid[:size, :size]
    brain = ((yy - size / 2) / (0.38 * size)) ** 2 + ((xx - size / 2) / (0.32 * size)) ** 2 < 1
    mask = np.zeros((size, size), np.uint8)
    if tumor_radius > 0:
        distance = np.hypot(yy - tumor_center[0], xx - tumor_center[1])
        wobble = 1 + 0.2 * np.sin(np.arctan2(yy - tumor_center[0], xx - tumor_center[1]) * 3)
        mask = ((distance < tumor_radius * wobble) & brain).astype(np.uint8)
    image = np.zeros((size, size, 3), np.float32)
    for channel, (tissue, lesion) in enumerate(((70, 20), (90, 90), (80, 35))):
        image[..., channel] = brain * (tissue + rng.normal(0, 12, (size, size))) + mask * lesion
    return np.clip(image, 0, 255).astype(np.uint8), mask * 255


def _holds_cases(folder):
    """A case folder (`<name>_<n>_mask.tif` inside), or a folder of such case folders."""

    def is_case(path):
        return path.is_dir() and any(path.glob(f"{glob.escape(path.name)}_*_mask.tif"))

    try:
        return is_case(folder) or any(is_case(sub) for sub in folder.iterdir())
    except OSError:  # a folder we may not list holds nothing of ours
        return False


def _is_demo(folder):
    for candidate in (folder, folder.parent):
        readme = candidate / "README.md"
        if readme.is_file() and readme.read_text(errors="replace").startswith("SYNTHETIC demo data"):
            return True
    return False


def write_demo_dataset(dest, cases=8, slices_per_case=20, seed=0):
    """Write SYNTHETIC cases in the Kaggle layout (ellipse 'brain', bright FLAIR blob 'tumor').

    Only for running the code on a machine without the real data; it says nothing about MRI.
    Returns the `kaggle_3m` folder.
    """
    dest = Path(dest)
    root = dest / "kaggle_3m"
    # never inside a dataset (a case folder, or the folder of case folders), never into a real kaggle_3m
    inside = [folder for folder in (dest, *dest.resolve().parents) if _holds_cases(folder) and not _is_demo(folder)]
    if inside or (_holds_cases(root) and not _is_demo(root)):
        raise FileExistsError(
            f"--dest {dest}: {inside[0] if inside else root} holds a dataset, and synthetic cases must not be mixed "
            "into real data; choose an empty folder"
        )
    if root.is_symlink() or (root.exists() and not (root.is_dir() and (_is_demo(root) or not any(root.iterdir())))):
        raise FileExistsError(
            f"--dest {dest}: {root} exists and is not a demo set of ours (no SYNTHETIC README): it is left as it "
            "is; choose another --dest"
        )
    # written beside, then put in place of an earlier demo set whole: a smaller set never keeps cases of a larger one
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-kaggle_3m-", dir=dest))
    try:
        _write_cases(staging, cases, slices_per_case, seed)
        if root.exists():  # a demo set (anything else was refused above)
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _write_cases(root, cases, slices_per_case, seed):
    rng = np.random.default_rng(seed)
    for case in range(cases):
        case_id = f"SYNTH_DEMO_{case:04d}_20000101"
        case_dir = root / case_id
        case_dir.mkdir(parents=True, exist_ok=True)
        center = rng.uniform(0.35, 0.65, 2) * NATIVE_SIZE
        peak = rng.uniform(10, 30)
        first, last = sorted(rng.choice(np.arange(4, slices_per_case - 2), 2, replace=False))
        for index in range(1, slices_per_case + 1):
            radius = peak * np.sin(np.pi * (index - first) / (last - first)) if first <= index <= last else 0
            image, mask = _synthetic_slice(rng, NATIVE_SIZE, center, max(radius, 0))
            tifffile.imwrite(case_dir / f"{case_id}_{index}.tif", image, photometric="rgb")
            tifffile.imwrite(case_dir / f"{case_id}_{index}_mask.tif", mask)
    (root / "README.md").write_text("SYNTHETIC demo data written by `python -m lgg demo-data`. Not MRI.\n")
