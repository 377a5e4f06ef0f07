"""The loader on the real restored cases (exact counts) and on small cases with broken files."""

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import write_case

from lgg import data


@pytest.fixture(scope="module")
def real_slices(real_data):
    return data.find_slices(real_data)


def test_real_counts(real_slices):
    assert real_slices["case_id"].nunique() == 88
    assert len(real_slices) == 3150
    assert int(real_slices["has_tumor"].sum()) == 1068
    assert real_slices.groupby("case_id")["has_tumor"].any().all()  # every case has tumor


def test_slices_in_numeric_order(real_slices):
    case = real_slices[real_slices.case_id == real_slices.case_id.iloc[0]]
    assert list(case.slice_index) == list(range(1, len(case) + 1))
    assert case.image_path.iloc[1].endswith("_2.tif")


def test_parent_and_outer_folders_are_found(real_data, tmp_path):
    assert data.find_dataset_root(real_data.parent) == real_data
    (tmp_path / "lgg-mri-segmentation").mkdir()
    (tmp_path / "lgg-mri-segmentation" / "kaggle_3m").symlink_to(real_data)
    assert data.find_dataset_root(tmp_path).name == "kaggle_3m"


def test_macos_metadata_beside_the_slices_is_not_a_slice(real_data, tmp_path):
    """A case copied by a Mac to a USB or network drive gets a `._<name>` file beside each file; it used to
    stop training as a misnamed slice."""
    case = sorted(path for path in real_data.iterdir() if path.is_dir())[0]
    copy = tmp_path / "kaggle_3m" / case.name
    shutil.copytree(case, copy)
    for path in sorted(copy.iterdir()):
        (copy / f"._{path.name}").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    images, masks = data.case_slice_files(copy)
    expected_images, expected_masks = data.case_slice_files(case)
    assert sorted(images) == sorted(expected_images) and sorted(masks) == sorted(expected_masks)
    assert all(not Path(path).name.startswith("._") for path in [*images.values(), *masks.values()])
    assert len(data.find_slices(tmp_path)) == len(expected_images)


def test_a_download_that_cannot_be_linked_says_where_it_is(tmp_path, monkeypatch, capsys):
    """Windows makes links for administrators and Developer Mode only: the download is not lost for that."""
    import kagglehub

    from lgg import datasets

    downloaded = tmp_path / "cache" / "lgg-mri-segmentation"
    write_case(downloaded / "kaggle_3m")
    monkeypatch.setattr(kagglehub, "dataset_download", lambda name: str(downloaded))

    def no_links(self, target, target_is_directory=False):
        raise OSError(1314, "A required privilege is not held by the client")

    monkeypatch.setattr(Path, "symlink_to", no_links)
    found = datasets.download_kaggle(tmp_path / "data")
    assert found == downloaded / "kaggle_3m" and not (tmp_path / "data" / "kaggle_3m").exists()
    out = capsys.readouterr().out
    assert "not linked" in out and f"--data {downloaded}" in out


def test_channels_keep_the_stored_order(real_slices):
    path = real_slices.image_path.iloc[20]
    image = data.read_image(path)
    assert image.shape == (256, 256, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, cv2.imread(path, cv2.IMREAD_UNCHANGED)[..., ::-1])  # OpenCV gives BGR


def test_clinical_table_joins_by_patient(real_data, real_slices):
    clinical = data.load_clinical(real_data)
    joined = real_slices.merge(clinical, on="patient_id", how="left", validate="many_to_one")
    assert joined["age_at_initial_pathologic"].notna().mean() > 0.9


def test_patient_split_has_no_leak_and_is_stable(real_slices):
    split = data.split_by_patient(real_slices.case_id)
    assert set(split.values()) == {"train", "val", "test"}
    counts = {name: list(split.values()).count(name) for name in data.SPLITS}
    assert counts["test"] >= 10 and counts["val"] >= 4 and counts["train"] >= 40
    # a case's split does not depend on which other cases are present
    subset = sorted(split)[::3]
    assert data.split_by_patient(subset, 0.1, 0.2) == {case: split[case] for case in subset} or len(subset) < 10
    assert all(data.split_by_patient(sorted(split)[5:])[case] == split[case] for case in sorted(split)[5:])
    by_patient = real_slices.assign(split=real_slices.case_id.map(split)).groupby("patient_id")["split"].nunique()
    assert (by_patient == 1).all()


def test_patient_folds_test_every_case_once(real_slices):
    case_ids = real_slices.case_id.unique()
    folds = [data.patient_fold(case_ids, f"patient-fold-{k}-of-5") for k in range(1, 6)]
    assert folds[0] == data.split_by_patient(case_ids)  # fold 1 of 5 is the default split
    table = data.split_table(real_slices, "patient-fold-2-of-5")  # what `train --split` uses
    assert table.split.equals(real_slices.case_id.map(folds[1]))
    tested = [case for fold in folds for case, name in fold.items() if name == "test"]
    assert sorted(tested) == sorted(case_ids)  # every case tested exactly once over the folds
    for fold in folds:
        counts = {name: list(fold.values()).count(name) for name in data.SPLITS}
        assert 10 <= counts["test"] <= 26 and 4 <= counts["val"] <= 14, counts


@pytest.mark.parametrize(
    "name", ["patient-fold-0-of-5", "patient-fold-6-of-5", "patient-fold-1-of-2", "patient-fold-x"]
)
def test_malformed_fold_names_are_refused(name):
    with pytest.raises(ValueError, match=f"received '{name}'"):
        data.split_table(pd.DataFrame({"case_id": ["TCGA_AA_0001_20000101"]}), name)


def test_tiny_subsets_still_get_validation_and_test_cases():
    split = data.split_by_patient([f"TCGA_AA_{i:04d}_20000101" for i in range(4)])
    assert sorted(split.values()).count("train") == 2 and set(split.values()) == {"train", "val", "test"}


def test_leaky_random_slice_split_reproduces_90_5_5(real_slices):
    split = data.random_slice_split(real_slices, random_state=0)
    assert split.value_counts().to_dict() == {"train": 2835, "val": 157, "test": 158}
    assert split.equals(data.random_slice_split(real_slices, random_state=0))


def test_load_arrays_resizes_images_and_masks(real_slices):
    rows = real_slices[real_slices.has_tumor].head(4)
    images, masks = data.load_arrays(rows, 128)
    assert images.shape == (4, 128, 128, 3) and images.dtype == np.uint8
    assert masks.shape == (4, 128, 128, 1) and set(np.unique(masks)) <= {0, 1}
    # area is preserved to within the boundary pixels
    assert masks.sum() == pytest.approx(rows.tumor_area_px.sum() / 4, rel=0.1)


# ---------------------------------------------------------------- broken inputs: clear errors naming the file
def test_missing_folder(tmp_path):
    with pytest.raises(data.DatasetError, match="not found.*download"):
        data.find_slices(tmp_path / "nowhere")


def test_folder_without_cases(tmp_path):
    (tmp_path / "kaggle_3m").mkdir()
    with pytest.raises(data.DatasetError, match="no case folders"):
        data.find_slices(tmp_path)


@pytest.mark.parametrize(
    "remove, expected",
    [("_2_mask.tif", "_2.tif: its mask is missing"), ("_3.tif", "_3_mask.tif: its image is missing")],
)
def test_image_without_mask_and_mask_without_image(tmp_path, remove, expected):
    case_dir = write_case(tmp_path)
    (case_dir / f"{case_dir.name}{remove}").unlink()
    with pytest.raises(data.DatasetError, match=expected):
        data.find_slices(tmp_path)


def test_truncated_tif_is_named(tmp_path):
    case_dir = write_case(tmp_path)
    path = case_dir / f"{case_dir.name}_2_mask.tif"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(data.DatasetError, match=f"cannot read .*{path.name}"):
        data.find_slices(tmp_path)


@pytest.mark.parametrize(
    "array, expected",
    [
        (np.zeros((128, 128, 3), np.uint8), r"shape \(128, 128, 3\)"),
        (np.zeros((256, 256, 3), np.uint16), "found uint16"),
        (np.zeros((256, 256), np.uint8), r"shape \(256, 256\)"),
    ],
)
def test_image_of_wrong_shape_or_dtype(tmp_path, array, expected):
    case_dir = write_case(tmp_path)
    path = case_dir / f"{case_dir.name}_1.tif"
    tifffile.imwrite(path, array)
    slices = data.find_slices(tmp_path)
    with pytest.raises(data.DatasetError, match=f"{path.name}: expected uint8 of shape.*{expected}"):
        data.load_arrays(slices)


def test_mask_with_other_values_is_refused(tmp_path):
    case_dir = write_case(tmp_path)
    tifffile.imwrite(case_dir / f"{case_dir.name}_1_mask.tif", np.full((256, 256), 7, np.uint8))
    with pytest.raises(data.DatasetError, match="_1_mask.tif: a mask holds 0 and 255"):
        data.find_slices(tmp_path)


def test_misnamed_file_is_refused(tmp_path):
    case_dir = write_case(tmp_path)
    shutil.copy(case_dir / f"{case_dir.name}_1.tif", case_dir / "scan_final.tif")
    with pytest.raises(data.DatasetError, match="scan_final.tif: expected files named"):
        data.find_slices(tmp_path)


def test_paths_with_spaces_and_non_ascii(tmp_path):
    root = tmp_path / "données IRM" / "kaggle_3m"
    write_case(root, tumor_slices=(1, 2))
    slices = data.find_slices(root.parent)
    assert len(slices) == 3 and slices.has_tumor.sum() == 2
