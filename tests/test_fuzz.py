"""Hostile files: every one gives a `DatasetError` naming the file, never another exception,
a hang, or a huge allocation."""

import json

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


@pytest.fixture(scope="module")
def tiny_segmenter(tmp_path_factory):
    from lgg import files, models

    path = tmp_path_factory.mktemp("model") / "model.h5"
    files.save_model(models.build_unet((32, 32, 3), base_filters=2, depth=1), path)
    return path


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.binary(max_size=4096)
    | st.floats(0.0, 0.99).map(lambda fraction: ("cut", fraction))
    | st.sampled_from([((256, 256), "uint8"), ((256, 256, 3), "uint16"), ((64, 64, 3), "uint8"), ((1, 1, 3), "uint8")])
)
def test_predict_on_hostile_slices_names_the_file(real_data, tiny_segmenter, tmp_path, content):
    # `predict` on a case folder holding one good slice and one hostile one: a DatasetError naming
    # the hostile file, nothing written for the case
    from lgg.predict import predict_paths

    case = tmp_path / "in" / "TCGA_XX_0002_20000101"
    case.mkdir(parents=True, exist_ok=True)
    (case / "TCGA_XX_0002_20000101_1.tif").write_bytes(_a_real_slice().read_bytes())
    hostile = case / "TCGA_XX_0002_20000101_2.tif"
    if isinstance(content, bytes):
        hostile.write_bytes(content)
    elif content[0] == "cut":
        original = _a_real_slice().read_bytes()
        hostile.write_bytes(original[: int(len(original) * content[1])])
    else:
        tifffile.imwrite(hostile, np.zeros(*content))
    out = tmp_path / "out"
    with pytest.raises(data.DatasetError, match="TCGA_XX_0002_20000101_2.tif"):
        predict_paths(tiny_segmenter, [case], out, overwrite=True)  # hypothesis reuses tmp_path
    if (out / "predict.json").exists():  # a header fault is refused before anything is written
        assert json.loads((out / "predict.json").read_text())["status"] != "complete"
    assert not (out / "TCGA_XX_0002_20000101").exists()
