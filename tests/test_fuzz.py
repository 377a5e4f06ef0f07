"""Hostile files: every one gives a `DatasetError` naming the file, never another exception,
a hang, or a huge allocation."""

import numpy as np
import pytest
import tifffile
from conftest import REAL_DATA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lgg import data

SETTINGS = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _a_real_slice():
    return next(REAL_DATA.glob("*/*_10.tif"))


@SETTINGS
@given(content=st.binary(max_size=4096))
def test_random_bytes(tmp_path, content):
    path = tmp_path / "TCGA_XX_0001_1.tif"
    path.write_bytes(content)
    for reader in (data.read_image, data.read_mask):
        with pytest.raises(data.DatasetError, match="TCGA_XX_0001_1.tif"):
            reader(path)


@SETTINGS
@given(fraction=st.floats(0.0, 0.99))
def test_truncated_real_slice(real_data, tmp_path, fraction):
    original = _a_real_slice().read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(original[: int(len(original) * fraction)])
    with pytest.raises(data.DatasetError, match="cut.tif"):
        data.read_image(path)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((256, 256, 3), "uint16"),
        ((256, 256, 3), "float32"),
        ((256, 256), "uint8"),
        ((512, 512, 3), "uint8"),
        ((256, 256, 3, 2), "uint8"),
    ],
)
def test_wrong_shape_or_dtype(tmp_path, shape, dtype):
    path = tmp_path / "odd.tif"
    tifffile.imwrite(path, np.zeros(shape, dtype))
    with pytest.raises(data.DatasetError, match="odd.tif: expected uint8"):
        data.read_image(path)


def test_huge_dimensions_are_refused_from_the_header(tmp_path):
    path = tmp_path / "huge.tif"  # 10.8 GB claimed, a sparse file on disk
    tifffile.imwrite(path, shape=(60000, 60000, 3), dtype="uint8", photometric="rgb")
    with pytest.raises(data.DatasetError, match=r"huge.tif: .*found uint8 of shape \(60000, 60000, 3\)"):
        data.read_image(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty_mask.tif"
    path.write_bytes(b"")
    with pytest.raises(data.DatasetError, match="cannot read .*empty_mask.tif"):
        data.read_mask(path)


@SETTINGS
@given(content=st.binary(max_size=2048) | st.text(max_size=500).map(str.encode))
def test_corrupt_data_csv(tmp_path, content):
    root = tmp_path / "kaggle_3m"
    case = root / "TCGA_XX_0001_20000101"
    case.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(case / "TCGA_XX_0001_20000101_1.tif", np.zeros((256, 256, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(case / "TCGA_XX_0001_20000101_1_mask.tif", np.zeros((256, 256), np.uint8))
    (root / "data.csv").write_bytes(content)
    try:
        clinical = data.load_clinical(root)
    except data.DatasetError as error:
        assert "data.csv" in str(error)
    else:
        assert "patient_id" in clinical.columns
