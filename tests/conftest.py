import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPOSITORY = Path(__file__).resolve().parents[1]
REAL_DATA = REPOSITORY / "data" / "kaggle_3m"


@pytest.fixture(scope="session")
def real_data():
    """The restored Kaggle cases; CI restores them, so their absence is a failure, not a skip."""
    if not any(REAL_DATA.glob("*/*_mask.tif")):
        pytest.fail(f"real data missing at {REAL_DATA}: run `python ../shared/lgg/restore.py data`")
    return REAL_DATA


def data_without(real_data, folder, case_id):
    """`folder` made a dataset of the real cases less `case_id` (each case folder a link): what a run's figure over
    the cases at hand would be computed from."""
    folder = Path(folder)
    folder.mkdir()
    for case in real_data.iterdir():
        if case.is_dir() and case.name != case_id:
            (folder / case.name).symlink_to(case)
    return folder


def write_case(root, case_id="TCGA_XX_0001_20000101", slices=3, tumor_slices=(2,), size=256):
    """Write a small case in the Kaggle layout (for tests that need a special or broken file)."""
    case_dir = Path(root) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(1, slices + 1):
        image = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        if index in tumor_slices:
            mask[100:120, 100:130] = 255
        tifffile.imwrite(case_dir / f"{case_id}_{index}.tif", image, photometric="rgb")
        tifffile.imwrite(case_dir / f"{case_id}_{index}_mask.tif", mask)
    return case_dir


def flat(value, prefix=""):
    """Nested figures as {path: number or text}, for comparing them within a tolerance CPUs agree on."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}/{key}").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}/{i}").items()}
    return {prefix: value}
