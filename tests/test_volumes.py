"""NIfTI in and out (`lgg.volumes`, `predict` on volumes): a real case written as a NIfTI volume, at
another intensity scale and in another axis order, must give the masks of its .tif slices, on the
volume's own grid, with a volume in ml from the header's voxel size."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import tifffile
from nibabel import orientations
from test_safety import run

from lgg import data, predict, volumes

CASE = "TCGA_CS_4941_19960909"  # a tumor case whose three channels span 0-255, as most cases' do
SPACING = (0.94, 0.94, 3.0)


def kaggle_volume(real_data, case_id=CASE):
    images, _ = data.case_slice_files(real_data / case_id)
    return np.stack([data.read_image(images[k]) for k in sorted(images)])


as_ras = volumes.planes_to_ras  # Kaggle slices (Z, rows, cols, 3) -> RAS+ voxels (X, Y, Z, 3)


def reorient(voxels, affine, codes):
    """The same volume stored in another axis order (e.g. ("P", "S", "L")), with the matching affine."""
    transform = orientations.ornt_transform(volumes.RAS, orientations.axcodes2ornt(codes))
    return orientations.apply_orientation(voxels, transform), affine @ orientations.inv_ornt_aff(
        transform, voxels.shape[:3]
    )


@pytest.fixture(scope="module")
def predictor():
    return predict.load_predictor()


@pytest.fixture(scope="module")
def tif_prediction(real_data, predictor, tmp_path_factory):
    out = predict.predict_paths(None, [real_data / CASE], tmp_path_factory.mktemp("tif") / "out", predictor=predictor)
    files = sorted((out / CASE).glob(f"*{predict.PREDICTED_SUFFIX}"), key=lambda p: int(p.name.split("_")[-2]))
    return np.stack([tifffile.imread(path) > 0 for path in files]), pd.read_csv(out / "cases.csv").iloc[0]


def test_a_scaled_reoriented_4d_volume_gives_the_masks_of_its_tif_slices(
    real_data, predictor, tif_prediction, tmp_path
):
    slices = kaggle_volume(real_data)
    ras = as_ras(slices).astype(np.float32) * np.float32([3.7, 11.0, 0.25]) + np.float32([100, -40, 7])
    voxels, affine = reorient(ras, np.diag([*SPACING, 1.0]), ("P", "S", "L"))
    source = tmp_path / "in" / f"{CASE}.nii.gz"
    source.parent.mkdir()
    nib.save(nib.Nifti1Image(voxels, affine), source)

    volume = volumes.load_4d(source)
    np.testing.assert_array_equal(volume.images, slices)  # the Kaggle mapping recovers the 8-bit slices exactly
    assert volume.warnings == []

    out = predict.predict_paths(None, [source], tmp_path / "out", predictor=predictor)
    written = nib.load(out / CASE / f"{CASE}{predict.PREDICTED_NIFTI_SUFFIX}")
    assert written.shape == voxels.shape[:3]
    np.testing.assert_allclose(written.affine, affine, atol=1e-6)
    np.testing.assert_allclose(written.header.get_zooms(), np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), rtol=1e-6)
    mask = np.asarray(written.dataobj)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(mask)) <= {0, 1}

    tif_masks, tif_row = tif_prediction
    assert tif_masks.sum() > 1000  # a real tumor, not two empty masks agreeing
    to_ras = orientations.ornt_transform(orientations.io_orientation(affine), volumes.RAS)
    back = volumes.ras_to_planes(orientations.apply_orientation(mask, to_ras))
    np.testing.assert_array_equal(back > 0, tif_masks)  # identical masks, voxel for voxel

    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert row.tumor_voxels == mask.sum() == tif_row.tumor_area_px_total
    # a NIfTI file's folder is not read as data: --out beside the file is fine, --out the file itself is not
    predict.predict_paths(None, [source], source.parent / "pred", predictor=predictor)
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        predict.predict_paths(None, [source], source, predictor=predictor)
    assert row.tumor_volume_ml == pytest.approx(mask.sum() * np.prod(SPACING) / 1000, rel=1e-6)
    assert (out / CASE / f"{CASE}_montage.png").is_file()


def test_three_3d_sequences_give_the_same_as_the_4d_volume(real_data, predictor, tif_prediction, tmp_path):
    ras = as_ras(kaggle_volume(real_data)).astype(np.float32)
    affine = np.diag([*SPACING, 1.0])
    paths = {}
    (tmp_path / "in").mkdir()
    for channel, name in enumerate(volumes.SEQUENCES):
        paths[name] = tmp_path / "in" / f"{CASE}_{name}.nii.gz"
        nib.save(nib.Nifti1Image(ras[..., channel] * (channel + 2), affine), paths[name])
    out = predict.predict_paths(None, [], tmp_path / "out", sequences=paths, predictor=predictor)
    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert row.case_id == f"{CASE}_flair"  # named after the FLAIR file
    assert row.tumor_voxels == tif_prediction[1].tumor_area_px_total


def test_a_flair_alone_filled_gives_the_masks_of_a_flair_only_kaggle_case(real_data, predictor, tmp_path):
    case = "TCGA_HT_A61B_19991127"  # FLAIR only (the set filled its pre and post with it), spanning 0-255
    slices = kaggle_volume(real_data, case)
    assert (slices[..., 0] == slices[..., 1]).all() and (slices[..., 2] == slices[..., 1]).all()
    tifs = predict.predict_paths(None, [real_data / case], tmp_path / "tif", predictor=predictor)
    tif_row = pd.read_csv(tifs / "cases.csv").iloc[0]
    assert tif_row.tumor_area_px_total > 1000  # a real tumor, not two empty masks agreeing
    affine = np.diag([*SPACING, 1.0])
    flair = tmp_path / "in" / f"{case}.nii.gz"
    flair.parent.mkdir()
    nib.save(nib.Nifti1Image(as_ras(slices)[..., 1].astype(np.float32) * 7.5 + 20, affine), flair)
    with pytest.raises(volumes.VolumeError, match="add --fill-from-flair"):
        predict.predict_paths(None, [], tmp_path / "refused", sequences={"flair": flair}, predictor=predictor)
    assert not (tmp_path / "refused").exists()

    out = predict.predict_paths(None, [], tmp_path / "out", sequences={"pre": None, "flair": flair, "post": None},
                                predictor=predictor, fill_from_flair=True)  # fmt: skip
    mask = np.asarray(nib.load(out / case / f"{case}{predict.PREDICTED_NIFTI_SUFFIX}").dataobj)
    tif_masks = [tifffile.imread(tifs / case / f"{case}_{n}{predict.PREDICTED_SUFFIX}") > 0
                 for n in range(1, len(slices) + 1)]  # fmt: skip
    np.testing.assert_array_equal(volumes.ras_to_planes(mask) > 0, np.stack(tif_masks))  # voxel for voxel
    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert row.tumor_voxels == tif_row.tumor_area_px_total
    assert row.warnings.startswith("pre-contrast and post-contrast filled with FLAIR (--fill-from-flair)")
    assert row.input == str(flair)  # the file read, once


@pytest.mark.parametrize("shape", [(240, 240, 5), (200, 256, 4), (300, 180, 3), (160, 160, 2)])
def test_masks_go_back_to_any_grid(shape, tmp_path):
    """A mask drawn on the volume's grid, carried to the model's 256 x 256 view and back, lands where it
    was: the same voxels up to the resampling's edge, and no shift (centroid within 0.1 voxel)."""
    rng = np.random.default_rng(1)
    voxels = rng.uniform(0, 500, (*shape, 3)).astype(np.float32)
    x, y = np.mgrid[: shape[0], : shape[1]]
    disk = ((x - shape[0] * 0.4) ** 2 + (y - shape[1] * 0.55) ** 2) < (min(shape[:2]) / 6) ** 2
    truth = np.repeat(disk[..., None], shape[2], axis=2).astype(np.uint8)
    for codes in (("R", "A", "S"), ("L", "P", "S"), ("A", "I", "R")):
        stored, affine = reorient(voxels, np.diag([1.0, 1.2, 2.5, 1.0]), codes)
        stored_truth, _ = reorient(truth, np.diag([1.0, 1.2, 2.5, 1.0]), codes)
        nib.save(nib.Nifti1Image(stored, affine), tmp_path / "v.nii")
        volume = volumes.load_4d(tmp_path / "v.nii")
        assert volume.images.shape == (shape[2], 256, 256, 3)
        # the truth as the model sees it: the same geometry as the image channels
        view = volumes.to_slices(np.repeat(truth[..., None] * 255, 3, axis=-1))[..., 0] > 127
        back = volumes.mask_to_volume(view, volume)
        assert back.shape == stored_truth.shape
        dice = 2 * (back & stored_truth).sum() / (back.sum() + stored_truth.sum())
        assert dice > 0.98, (codes, dice)
        shift = np.argwhere(back).mean(axis=0) - np.argwhere(stored_truth).mean(axis=0)
        assert np.abs(shift).max() < 0.1, (codes, shift)


def test_the_volume_in_ml_follows_the_affine_and_the_units(tmp_path):
    voxels = np.random.default_rng(0).uniform(0, 9, (32, 32, 4, 3)).astype(np.float32)
    affine = np.diag([0.5, 0.5, 3.0, 1.0])
    image = nib.Nifti1Image(voxels, affine)
    image.header.set_zooms((1.0, 1.0, 1.0, 1.0))  # pixdim left at 1 by a tool; the sform is what viewers use
    nib.save(image, tmp_path / "sform.nii")
    assert volumes.load_4d(tmp_path / "sform.nii").voxel_ml == pytest.approx(0.75 / 1000)
    image = nib.Nifti1Image(voxels, np.diag([0.0005, 0.0005, 0.003, 1.0]))
    image.header.set_xyzt_units("meter")
    nib.save(image, tmp_path / "metres.nii")
    volume = volumes.load_4d(tmp_path / "metres.nii")
    assert volume.voxel_ml == pytest.approx(0.75 / 1000) and volume.voxel_mm == pytest.approx((0.5, 0.5, 3.0))


def test_doubtful_geometry_is_said_in_the_results(tmp_path):
    voxels = np.random.default_rng(0).uniform(0, 9, (40, 40, 4, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(voxels, np.diag([0.5, 2.0, 3.0, 1.0])), tmp_path / "stretched.nii")
    assert "not square" in " ".join(volumes.load_4d(tmp_path / "stretched.nii").warnings)
    bare = nib.Nifti1Image(voxels, None)  # no qform, no sform: nibabel assumes 1 mm voxels
    nib.save(bare, tmp_path / "bare.nii")
    assert "no qform or sform" in " ".join(volumes.load_4d(tmp_path / "bare.nii").warnings)
    nib.save(nib.Nifti1Image(voxels, np.diag([0.9, 0.9, 3.0, 1.0])), tmp_path / "fine.nii")
    assert volumes.load_4d(tmp_path / "fine.nii").warnings == []


@pytest.mark.parametrize("spike", [50, -50])
def test_a_few_outlier_voxels_that_squeeze_a_sequence_are_said_in_the_results(
    real_data, predictor, tif_prediction, tmp_path, spike
):
    """One voxel per sequence at 50 times the rest (a spike, a float artefact), or 50 times below it, took the brain
    to a few grey levels under the Kaggle mapping, and the shipped model found no tumor in a case where it finds 7
    slices' worth, with no warning: a confident wrong answer. Now the results say which sequences are squeezed and
    what to do."""
    ras = as_ras(kaggle_volume(real_data)).astype(np.float32)
    ras[0, 0, 0] = spike * 255  # in every sequence
    nib.save(nib.Nifti1Image(ras, np.diag([*SPACING, 1.0])), tmp_path / "spiked.nii.gz")
    out = predict.predict_paths(None, [tmp_path / "spiked.nii.gz"], tmp_path / "out", predictor=predictor)
    row = pd.read_csv(out / "cases.csv").iloc[0]
    assert row.tumor_slices == 0 < tif_prediction[1].tumor_slices  # what the warning is for
    for name in data.CHANNELS:
        assert f"the {name} sequence is squeezed" in row.warnings
    assert "clip the volume at its 0.1th and 99.9th percentiles" in row.warnings


def test_no_shared_case_is_called_squeezed(real_data):
    """The warning's threshold against the real scans: none of the cases in data/ (88 shared, or Kaggle's 110) gets
    it, and the fewest grey levels a sequence spans are where the message says they are."""
    fewest = 255.0
    for case_dir in sorted(path for path in real_data.iterdir() if path.is_dir()):
        stack = kaggle_volume(real_data, case_dir.name)
        assert volumes.intensity_warnings(stack) == [], case_dir.name
        fewest = min(fewest, *(volumes.grey_levels(stack[..., channel]) for channel in range(3)))
    assert fewest >= 46 > volumes.FEW_GREY_LEVELS


def test_predictions_never_land_inside_a_dataset(real_data, predictor, tmp_path):
    dataset = tmp_path / "kaggle_3m"
    shutil.copytree(real_data / CASE, dataset / CASE)
    source = tmp_path / f"{CASE}.nii.gz"
    nib.save(nib.Nifti1Image(as_ras(kaggle_volume(real_data)).astype(np.float32), np.eye(4)), source)
    with pytest.raises(FileExistsError, match="inside the dataset folder"):
        predict.predict_paths(None, [source], dataset / "preds", predictor=predictor)
    assert sorted(path.name for path in dataset.iterdir()) == [CASE]


def test_file_names_become_usable_case_ids(tmp_path):
    assert volumes.case_id_of("t1 mprage(1).nii.gz") == "t1_mprage_1_"
    assert volumes.case_id_of("..hidden.nii") == "hidden"
    assert volumes.case_id_of("sub-01_FLAIR.nii.gz") == "sub-01_FLAIR"


def test_volumes_the_model_cannot_use_are_refused_by_name(capsys, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    affine = np.diag([*SPACING, 1.0])
    one = np.random.default_rng(0).uniform(0, 100, (32, 32, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(one, affine), folder / "flair.nii.gz")
    nib.save(nib.Nifti1Image(one * 2, affine), folder / "pre.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([one, one], axis=-1), affine), folder / "two.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([one] * 3, axis=-1), affine), folder / "good.nii.gz")
    nib.save(nib.Nifti1Image(one, np.diag([1.0, 1.0, 1.5, 1.0])), folder / "moved.nii.gz")
    nib.save(nib.Nifti1Image(np.full_like(one, 7.0), affine), folder / "const.nii.gz")
    nan = one.copy()
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(np.stack([nan] * 3, axis=-1), affine), folder / "nan.nii.gz")
    whole = (folder / "good.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(whole[: len(whole) // 2])
    (folder / "short.nii.gz").write_bytes(gzip.compress(gzip.decompress(whole)[:400]))
    (folder / "paper.nii").write_bytes(b"%PDF-1.4\n" + bytes(500))
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), folder / "rgb.nii")
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1000, 3), np.float32) * np.arange(3), affine), folder / "needle.nii.gz")
    huge = nib.Nifti1Header()
    huge.set_data_shape((4000, 4000, 4000, 3))  # a header that claims 192 G values, and no data behind it
    (folder / "huge.nii").write_bytes(huge.binaryblock + bytes(4 + 1000))
    cases = {
        ("flair.nii.gz",): "one sequence",
        ("two.nii.gz",): "not (X, Y, Z, 3)",
        ("nan.nii.gz",): "NaN",
        ("truncated.nii.gz",): "not a readable NIfTI",
        ("short.nii.gz",): "not a readable NIfTI",
        ("paper.nii",): "not a readable NIfTI",
        ("rgb.nii",): "expected real numbers",
        ("huge.nii",): "far more than a scan",
        ("needle.nii.gz",): "expected planes of at least 32 x 32",
        ("--pre", "flair.nii.gz", "--flair", "flair.nii.gz", "--post", "flair.nii.gz"): "hold the same image",
        ("--flair", "flair.nii.gz"): "missing --pre, --post",
        ("--pre", "pre.nii.gz", "--fill-from-flair"): "give --flair",
        ("good.nii.gz", "--fill-from-flair"): "give --flair",
        ("--fill-from-flair", "--flair", "const.nii.gz"): "the FLAIR sequence is constant",
        ("--pre", "flair.nii.gz", "--flair", "flair.nii.gz", "--fill-from-flair"): "leave it out and add --fill",
        ("--pre", "pre.nii.gz", "--flair", "flair.nii.gz", "--post", "moved.nii.gz"): "not on the same grid",
        ("--pixel-spacing-mm", "1", "good.nii.gz"): "a NIfTI volume's comes from its header",
        ("--pixel-spacing-mm", "1", "--slice-thickness-mm", "5", "good.nii.gz"): "leave them out",
    }
    for args, message in cases.items():
        code, _, error = run(capsys, "predict", *[folder / a if a.endswith((".nii", ".gz")) else a for a in args],
                             "--out", tmp_path / "out")  # fmt: skip
        assert code == 2 and len(error.strip().splitlines()) == 1, (args, error)
        assert message in error and args[-1] in error, (args, error)  # what is wrong, and with which file
        assert not (tmp_path / "out").exists()
