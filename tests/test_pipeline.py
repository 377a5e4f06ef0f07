"""The tf.data pipeline: shapes, identical augmentation of slice and mask, oversampling, speed."""

import re
import time

import cv2
import numpy as np
import pandas as pd
import pytest

from lgg import data


@pytest.fixture(scope="module")
def arrays(real_data):
    slices = data.find_slices(real_data, max_cases=3)
    images, masks = data.load_arrays(slices, 128)
    return slices, images, masks


def test_segmentation_batches(arrays):
    slices, images, masks = arrays
    dataset, steps = data.training_dataset(images, masks, batch_size=8, seed=1, augment=False)
    assert steps == int(np.ceil(len(images) / 8))
    batches = list(dataset.take(2 * steps))
    first_epoch = np.concatenate([x.numpy() for x, _ in batches[:steps]])
    # each slice once per epoch, in a new order each epoch; the last batch is topped up with the
    # epoch's first slices, so that every batch is full and XLA sees one static shape
    order = [int(np.flatnonzero((images == slice_).all(axis=(1, 2, 3)))[0]) for slice_ in first_epoch]
    count = len(images)
    assert count % 8 and len(order) == steps * 8
    assert sorted(order[:count]) == list(range(count)) and order[count:] == order[: steps * 8 - count]
    assert dataset.element_spec[0].shape == (8, 128, 128, 3) and dataset.element_spec[1].shape == (8, 128, 128, 1)
    second_epoch = np.concatenate([x.numpy() for x, _ in batches[steps:]])
    assert not np.array_equal(first_epoch, second_epoch)
    x, y = batches[0]
    assert x.shape == (8, 128, 128, 3) and y.shape == (8, 128, 128, 1)
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}
    assert float(x.numpy().max()) <= 255.0


def test_augmentation_moves_image_and_mask_together():
    # the image's first channel is the mask itself: after augmentation it must still match it
    masks = np.zeros((16, 64, 64, 1), np.uint8)
    masks[:, 20:40, 10:30] = 1
    images = np.repeat(masks * 255, 3, axis=-1)
    dataset, _ = data.training_dataset(images, masks, batch_size=16, seed=3)
    x, y = next(iter(dataset))
    x, y = x.numpy(), y.numpy()
    assert not np.array_equal(y, masks.astype(np.float32))  # something moved
    disagreement = np.mean(np.round(x[..., :1] / 255.0) != y)
    assert disagreement < 0.002


def test_oversampling_reaches_the_requested_tumor_share(arrays):
    slices, images, masks = arrays
    has_tumor = slices.has_tumor.to_numpy()
    dataset, steps = data.training_dataset(
        images, masks, batch_size=16, tumor_fraction=0.5, has_tumor=has_tumor, augment=False
    )
    drawn = np.concatenate([(y.numpy().reshape(len(y), -1).max(axis=1) > 0) for _, y in dataset.take(8 * steps)])
    assert has_tumor.mean() < 0.45
    assert drawn.mean() == pytest.approx(0.5, abs=0.08)


@pytest.fixture(scope="module")
def unequal_cases(real_data):
    """Two real cases, the one with the fewest tumor slices of the first twelve and the one with the most (3 and
    11): what drawing the tumor share case first evens out."""
    slices = data.find_slices(real_data, max_cases=12)
    counts = slices.groupby("case_id").has_tumor.sum()
    rows = slices[slices.case_id.isin([counts.idxmin(), counts.idxmax()])].reset_index(drop=True)
    images, masks = data.load_arrays(rows, 64)
    return rows, images, masks, counts.idxmin(), counts.min() / (counts.min() + counts.max())


def drawn_shares(rows, images, batches, case):
    """The share of tumor slices among the slices drawn in `batches` (unaugmented), and of those the share from
    `case`: each drawn slice found by its bytes among the slices (a tumor slice's are unique)."""
    index = {}
    for number, image in enumerate(images):
        index.setdefault(image.tobytes(), []).append(number)
    tumor, from_case = [], []
    for x in batches:
        for image in np.asarray(x).astype(np.uint8):
            numbers = index[image.tobytes()]
            tumor.append(bool(rows.has_tumor[numbers].any()))
            if tumor[-1]:
                assert len(numbers) == 1, "two slices alike, one with tumor"
                from_case.append(rows.case_id[numbers[0]] == case)
    assert len(from_case) > 300
    return np.mean(tumor), np.mean(from_case)


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_case_first_sampling_draws_each_case_equally_often(unequal_cases, pipeline):
    """`tumor_sampling="case"` (`tumor_cases`): a case with 3 tumor slices is drawn as often as one with 11 (half
    the tumor draws each), where drawing slices alike gives it 3 in 14; the tumor share of a batch stays 0.5. With
    about 500 tumor draws, 0.07 is more than three standard deviations of either share."""
    from lgg import batches

    rows, images, masks, few, slice_share = unequal_cases
    assert slice_share < 0.3  # the two cases differ enough for the draws to tell the two samplings apart
    options = {"batch_size": 16, "seed": 2, "augment": False, "tumor_fraction": 0.5, "has_tumor": rows.has_tumor}
    shares = {}
    for cases in (None, rows.case_id.to_numpy()):
        if pipeline == "tf.data":
            dataset, steps = data.training_dataset(images, masks, tumor_cases=cases, **options)
            drawn = [x.numpy() for x, _ in dataset.take(20 * steps)]
        else:
            stream = batches.TrainingBatches(images, masks, tumor_cases=cases, **options)
            drawn = [stream[i][0] for i in range(20 * stream.steps)]
        shares["slice" if cases is None else "case"] = drawn_shares(rows, images, drawn, few)
    assert shares["slice"][1] == pytest.approx(slice_share, abs=0.07)  # slice by slice: the larger case dominates
    assert shares["case"][1] == pytest.approx(0.5, abs=0.07)  # case first: each case half of the tumor draws
    assert shares["slice"][0] == pytest.approx(0.5, abs=0.08) and shares["case"][0] == pytest.approx(0.5, abs=0.08)


def test_tumor_pools_weigh_every_case_alike(unequal_cases):
    rows = unequal_cases[0]
    tumor, free, weights = data.tumor_pools(0.5, rows.has_tumor, rows.case_id)
    assert sorted(np.concatenate([tumor, free])) == list(range(len(rows)))
    assert weights.sum() == pytest.approx(1.0)
    per_case = pd.Series(weights).groupby(rows.case_id.to_numpy()[tumor]).sum()
    np.testing.assert_allclose(per_case.to_numpy(), 0.5)
    assert data.tumor_pools(0.5, rows.has_tumor)[2] is None  # without cases: every tumor slice alike
    with pytest.raises(ValueError, match="one case id per slice"):
        data.tumor_pools(0.5, rows.has_tumor, rows.case_id[:-1])


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_area_sampling_draws_a_cases_tumor_slices_by_their_area(unequal_cases, pipeline):
    """`tumor_sampling="area"` (`tumor_areas`): each case half of the tumor draws, as case first, and within the case
    with 11 tumor slices its larger half by area drawn in proportion to their pixels, where case first draws each
    slice alike. About 250 draws of that case: 0.09 is more than three standard deviations."""
    from lgg import batches

    rows, images, masks, few, _ = unequal_cases
    areas = masks.reshape(len(masks), -1).sum(1)
    many = rows.case_id[rows.case_id != few].iloc[0]
    in_many = np.flatnonzero((rows.case_id == many).to_numpy() & rows.has_tumor.to_numpy())
    large = in_many[np.argsort(areas[in_many])[len(in_many) // 2 :]]
    by_area, by_count = areas[large].sum() / areas[in_many].sum(), len(large) / len(in_many)
    assert by_area - by_count > 0.2  # the slices' areas differ enough for the draws to tell the samplings apart
    index = {image.tobytes(): number for number, image in enumerate(images) if rows.has_tumor[number]}
    options = {"batch_size": 16, "seed": 3, "augment": False, "tumor_fraction": 0.5, "has_tumor": rows.has_tumor,
               "tumor_cases": rows.case_id.to_numpy(), "tumor_areas": areas}  # fmt: skip
    if pipeline == "tf.data":
        dataset, steps = data.training_dataset(images, masks, **options)
        drawn = [x.numpy() for x, _ in dataset.take(20 * steps)]
    else:
        stream = batches.TrainingBatches(images, masks, **options)
        drawn = [stream[i][0] for i in range(20 * stream.steps)]
    numbers = np.array([index.get(image.tobytes(), -1) for x in drawn for image in np.asarray(x).astype(np.uint8)])
    tumor = numbers[numbers >= 0]
    assert (numbers >= 0).mean() == pytest.approx(0.5, abs=0.08)
    assert np.isin(tumor, in_many).mean() == pytest.approx(0.5, abs=0.07)
    assert np.isin(tumor[np.isin(tumor, in_many)], large).mean() == pytest.approx(by_area, abs=0.09)


def test_tumor_pools_weigh_slices_by_area_within_a_case(unequal_cases):
    rows, _, masks = unequal_cases[:3]
    areas = masks.reshape(len(masks), -1).sum(1).astype(np.float64)
    tumor, _, weights = data.tumor_pools(0.5, rows.has_tumor, rows.case_id, areas)
    cases = rows.case_id.to_numpy()[tumor]
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pd.Series(weights).groupby(cases).sum().to_numpy(), 0.5)
    for case in set(cases):  # within a case, in proportion to the tumor pixels
        np.testing.assert_allclose(weights[cases == case] / weights[cases == case].sum(),
                                   areas[tumor][cases == case] / areas[tumor][cases == case].sum())  # fmt: skip
    lost = areas.copy()
    lost[tumor[0]] = 0  # a tumor slice whose mask lost its pixels in resizing: drawn as one pixel, not never
    assert data.tumor_pools(0.5, rows.has_tumor, rows.case_id, lost)[2][0] > 0
    first = tumor[0]
    for wrong, message in ((areas[:-1], "one tumor area per slice"), (-areas, f"slice {first} has -{areas[first]}"),
                           (np.where(areas > 0, np.nan, 0), f"slice {first} has nan")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            data.tumor_pools(0.5, rows.has_tumor, rows.case_id, wrong)
    with pytest.raises(ValueError, match="areas needs cases"):
        data.tumor_pools(0.5, rows.has_tumor, None, areas)
    with pytest.raises(ValueError, match="tumor_areas needs tumor_cases"):
        data.training_dataset(unequal_cases[1], masks, tumor_fraction=0.5, has_tumor=rows.has_tumor, tumor_areas=areas)


def test_case_first_sampling_without_a_tumor_share_is_refused(unequal_cases):
    from lgg import batches
    from lgg.config import RunConfig

    rows, images, masks = unequal_cases[:3]
    with pytest.raises(ValueError, match="needs tumor_fraction"):
        data.training_dataset(images, masks, has_tumor=rows.has_tumor, tumor_cases=rows.case_id)
    with pytest.raises(ValueError, match="needs tumor_fraction"):
        batches.TrainingBatches(images, masks, has_tumor=rows.has_tumor, tumor_cases=rows.case_id)
    with pytest.raises(ValueError, match="tumor_sampling 'case' draws the tumor share"):
        RunConfig(tumor_sampling="case")
    with pytest.raises(ValueError, match="tumor_sampling must be one of"):
        RunConfig(tumor_fraction=0.5, tumor_sampling="patient")
    assert RunConfig(tumor_fraction=0.5, tumor_sampling="case").tumor_sampling == "case"
    with pytest.raises(ValueError, match="tumor_sampling 'area' draws the tumor share"):
        RunConfig(tumor_sampling="area")
    assert RunConfig(tumor_fraction=0.5, tumor_sampling="area").tumor_sampling == "area"


def test_a_batch_larger_than_the_training_slices_is_refused_not_waited_for(arrays, real_data, tmp_path, capsys):
    """`train --batch-size 4096` on 89 training slices printed "Decoded" and then waited forever: an epoch, one
    permutation topped up with its first slices, never filled one batch. Now refused, by `train` before decoding."""
    from lgg import batches

    _, images, masks = arrays
    for make in (data.training_dataset, batches.TrainingBatches):
        for size in (len(images) + 1, 2 * len(images) + 1):  # one more than the slices; and where it hung
            with pytest.raises(ValueError, match=f"batch size {size} is larger than the {len(images)}"):
                make(images, masks, batch_size=size)
    dataset, steps = data.training_dataset(images, masks, batch_size=len(images), augment=False)
    assert steps == 1 and next(iter(dataset))[0].shape[0] == len(images)  # all of them: one full batch
    from lgg import guards
    from lgg.__main__ import main

    earlier = guards.mark_folder(tmp_path / "earlier", guards.RUN_MARKER)  # a finished run, --overwrite given
    (earlier / "model.h5").write_text("an hour of training")
    for out, extra in [(tmp_path / "run", []), (earlier, ["--overwrite"])]:
        try:
            code = main(["train", "unet", "--data", str(real_data), "--out", str(out), "--max-cases", "3",
                         "--batch-size", "4096", "--epochs", "1", *extra])  # fmt: skip
        except SystemExit as stop:
            code = stop.code
        err = capsys.readouterr().err
        assert code == 2 and "batch size 4096 is larger than the" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    assert sorted(path.name for path in earlier.iterdir()) == [guards.RUN_MARKER, "model.h5"]
    assert (earlier / "model.h5").read_text() == "an hour of training"


def test_evaluation_pipeline_keeps_order(arrays):
    _, images, masks = arrays
    dataset = data.evaluation_dataset(images, masks, batch_size=7)
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in dataset]), images.astype(np.float32))


def test_pipeline_is_far_faster_than_a_training_step(arrays):
    # a 16-filter U-Net trains at about 12 slices/s at 128x128 on a 2-core CPU; the pipeline must
    # stay several times faster even on a loaded machine (unloaded it gives over 1000 slices/s)
    _, images, masks = arrays
    dataset, steps = data.training_dataset(images, masks, batch_size=16)
    list(dataset.take(2))
    start = time.perf_counter()
    count = sum(len(x) for x, _ in dataset.take(3 * steps))
    rate = count / (time.perf_counter() - start)
    assert rate > 60, f"input pipeline gives only {rate:.0f} slices/s"


@pytest.mark.parametrize("augmentation", ["standard", "strong"])
@pytest.mark.parametrize(
    "tumor_fraction, tumor_sampling", [(None, "slice"), (0.5, "slice"), (0.5, "case"), (0.5, "area")]
)
def test_a_resumed_stream_repeats_the_same_epochs(arrays, tumor_fraction, tumor_sampling, augmentation):
    # what makes a resumed run equal an uninterrupted one: epoch e's batches (order, oversampling,
    # augmentation) depend only on (seed, e), not on how many epochs this process has seen
    slices, images, masks = arrays
    options = {"batch_size": 16, "seed": 5, "tumor_fraction": tumor_fraction, "augmentation": augmentation}
    options["has_tumor"] = slices.has_tumor.to_numpy()
    options["tumor_cases"] = slices.case_id.to_numpy() if tumor_sampling in ("case", "area") else None
    options["tumor_areas"] = masks.reshape(len(masks), -1).sum(1) if tumor_sampling == "area" else None
    full, steps = data.training_dataset(images, masks, **options)
    resumed, _ = data.training_dataset(images, masks, start_epoch=2, **options)
    expected = list(full.skip(2 * steps).take(steps))
    for (x, y), (x_expected, y_expected) in zip(resumed.take(steps), expected):
        np.testing.assert_array_equal(x.numpy(), x_expected.numpy())
        np.testing.assert_array_equal(y.numpy(), y_expected.numpy())
    first = next(iter(full))[0].numpy()
    assert not np.array_equal(first, expected[0][0].numpy())  # epochs differ


def test_numpy_and_tf_pipelines_warp_alike(arrays):
    # the two pipelines share the pixel map (lgg.data.affine_components); OpenCV's bilinear warp must
    # match TensorFlow's ImageProjectiveTransformV3 for the same map, up to OpenCV's 1/32-pixel grid
    import tensorflow as tf

    from lgg import batches

    _, images, masks = arrays
    stacked = np.concatenate([images[:8], masks[:8] * 255], axis=-1).astype(np.float32)
    transforms = batches.random_affine(np.random.default_rng(0), 8, 128, 10.0, 0.05, 0.05, True)
    ours = batches.warp(stacked, transforms)
    flat = np.concatenate([transforms.reshape(8, 6), np.zeros((8, 2))], axis=1).astype(np.float32)
    theirs = tf.raw_ops.ImageProjectiveTransformV3(
        images=stacked, transforms=flat, output_shape=[128, 128], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT",
    ).numpy()  # fmt: skip
    assert not np.allclose(ours, stacked, atol=1)  # the transforms moved the slices
    difference = np.abs(ours - theirs)
    assert difference.mean() < 0.5 and np.percentile(difference, 99.9) < 12, (difference.mean(), difference.max())


@pytest.mark.parametrize("augmentation", ["standard", "strong"])
@pytest.mark.parametrize(
    "tumor_fraction, tumor_sampling", [(None, "slice"), (0.5, "slice"), (0.5, "case"), (0.5, "area")]
)
def test_numpy_batches_are_keyed_by_seed_epoch_and_batch(arrays, tumor_fraction, tumor_sampling, augmentation):
    from lgg import batches

    slices, images, masks = arrays
    options = {"batch_size": 16, "seed": 5, "tumor_fraction": tumor_fraction, "has_tumor": slices.has_tumor.to_numpy(),
               "augmentation": augmentation}  # fmt: skip
    options["tumor_cases"] = slices.case_id.to_numpy() if tumor_sampling in ("case", "area") else None
    options["tumor_areas"] = masks.reshape(len(masks), -1).sum(1) if tumor_sampling == "area" else None
    full = batches.TrainingBatches(images, masks, **options)
    resumed = batches.TrainingBatches(images, masks, start_epoch=2, **options)
    steps = full.steps
    assert full.num_batches is None and steps == int(np.ceil(len(images) / 16))
    for step in (0, steps - 1):  # epoch 2 of the uninterrupted stream == epoch 0 of the resumed one
        for expected, actual in zip(full[2 * steps + step], resumed[step]):
            np.testing.assert_array_equal(actual, expected)
    x, y = full[0]
    assert x.shape == (16, 128, 128, 3) and x.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    assert not np.array_equal(full[0][0], full[steps][0])  # epochs differ
    if tumor_fraction is None:  # each slice once per epoch, the last batch topped up
        order = full.epoch_indices(0)
        assert sorted(order[: len(images)]) == list(range(len(images)))
    else:
        drawn = np.concatenate([slices.has_tumor.to_numpy()[full.epoch_indices(epoch)] for epoch in range(8)])
        assert drawn.mean() == pytest.approx(0.5, abs=0.08)


def test_numpy_augmentation_moves_image_and_mask_together():
    from lgg import batches

    masks = np.zeros((16, 64, 64, 1), np.uint8)
    masks[:, 20:40, 10:30] = 1
    images = np.repeat(masks * 255, 3, axis=-1)
    x, y = batches.TrainingBatches(images, masks, batch_size=16, seed=3)[0]
    assert not np.array_equal(y, masks.astype(np.float32))
    assert np.mean(np.round(x[..., :1] / 255.0) != y) < 0.002


def test_evaluation_batches_keep_order(arrays):
    from lgg import batches

    _, images, masks = arrays
    dataset = batches.EvaluationBatches(images, masks, batch_size=7)
    np.testing.assert_array_equal(
        np.concatenate([dataset[i][0] for i in range(len(dataset))]), images.astype(np.float32)
    )


def test_fit_walks_the_numpy_stream_across_epochs(arrays):
    # TrainingBatches is endless and keyed by its index: under fit(steps_per_epoch=...) Keras must keep one
    # iterator across epochs (indices 0, 1, 2, ... never restarting), or every epoch would replay the first
    import keras

    from lgg import batches, models, train

    class Recording(batches.TrainingBatches):
        def __getitem__(self, index):
            seen.append(index)
            return super().__getitem__(index)

    seen = []
    _, images, masks = arrays
    small, small_masks = images[:24, ::4, ::4], masks[:24, ::4, ::4]  # 32x32
    stream = Recording(small, small_masks, batch_size=8, seed=1, workers=2)
    model = train.compile_model(models.build_unet((32, 32, 3), base_filters=4, depth=2), "segmentation")
    keras.utils.set_random_seed(0)
    model.fit(stream, steps_per_epoch=stream.steps, epochs=3, verbose=0,
              validation_data=batches.EvaluationBatches(small, small_masks, batch_size=8))  # fmt: skip
    assert stream.steps == 3
    # Keras peeks at the first batches for their shapes and workers fetch ahead: the distinct indices count
    assert sorted(set(seen))[: 3 * stream.steps] == list(range(3 * stream.steps))


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_flair_only_slices_are_drawn_at_the_share_asked_the_rest_as_before(arrays, pipeline):
    """`flair_only`: that share of the training slices gets FLAIR in all three channels (the
    dataset's fill for a missing sequence), the same affine draws as without it, masks untouched."""
    from lgg import batches

    slices, images, masks = arrays

    def stream(share):
        if pipeline == "numpy":
            return [
                batches.TrainingBatches(images, masks, batch_size=16, seed=2, flair_only=share)[i] for i in range(6)
            ]
        dataset, _ = data.training_dataset(images, masks, batch_size=16, seed=2, flair_only=share)
        return [(x.numpy(), y.numpy()) for x, y in dataset.take(6)]

    plain, half, every = stream(0.0), stream(0.5), stream(1.0)
    filled = []
    for (x0, y0), (x5, y5), (x1, y1) in zip(plain, half, every):
        np.testing.assert_array_equal(y5, y0)  # the masks and the geometry are the same draws
        np.testing.assert_array_equal(y1, y0)
        np.testing.assert_array_equal(x1[..., 1], x0[..., 1])  # FLAIR itself untouched
        assert (x1[..., 0] == x1[..., 1]).all() and (x1[..., 2] == x1[..., 1]).all()
        copies = (x5[..., 0] == x5[..., 1]).reshape(16, -1).all(axis=1) & (x5[..., 2] == x5[..., 1]).reshape(
            16, -1
        ).all(axis=1)
        shown = x0[..., 1].reshape(16, -1).max(axis=1) > 0  # blank slices are copies of FLAIR anyway
        np.testing.assert_array_equal(x5[~copies], x0[~copies])  # the others exactly as without the option
        filled += list(copies[shown])
    assert 0.3 < np.mean(filled) < 0.7, np.mean(filled)


STILL = {"rotation_degrees": 0.0, "shift_fraction": 0.0, "zoom_fraction": 0.0, "horizontal_flip": False}


def first_batch(pipeline, images, masks, augmentation):
    """The first training batch (seed 3, 16 slices) of `pipeline`: `tf.data` or `lgg.batches` ("numpy")."""
    from lgg import batches

    if pipeline == "numpy":
        return batches.TrainingBatches(images, masks, batch_size=16, seed=3, augmentation=augmentation)[0]
    dataset, _ = data.training_dataset(images, masks, batch_size=16, seed=3, augmentation=augmentation)
    x, y = next(iter(dataset))
    return x.numpy(), y.numpy()


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_strong_augmentation_draws_a_gamma_per_slice_and_channel_and_wider_affines(arrays, pipeline):
    """`augmentation="strong"`: each channel of each slice raised to its own gamma in the range, drawn
    from a stream of its own (a gamma range alone leaves the affine draws, so the masks, as they were),
    and the wider affine ranges move the masks further than the standard ones."""

    _, images, masks = arrays
    tumor = masks.reshape(len(masks), -1).max(axis=1) > 0
    images, masks = images[tumor][:16], masks[tumor][:16]  # one batch, every slice with a mask to move

    def batch(augmentation):
        return first_batch(pipeline, images, masks, augmentation)

    # no movement, gamma only: the batch's order is the same draw, so slice i is images[order[i]]
    x, y = batch({**STILL, "gamma": (0.5, 2.0)})
    x_plain, y_plain = batch(STILL)
    np.testing.assert_array_equal(y, y_plain)
    exponents = []
    for out, source in zip(x, x_plain):
        for channel in range(3):
            inside = (source[..., channel] > 10) & (source[..., channel] < 245)
            fitted = np.log(out[..., channel][inside] / 255.0) / np.log(source[..., channel][inside] / 255.0)
            assert fitted.max() - fitted.min() < 2e-3 * fitted.mean()  # one exponent for the whole channel
            exponents.append(float(fitted.mean()))
    assert 0.5 - 1e-3 < min(exponents) and max(exponents) < 2.0 + 1e-3
    exponents = np.log(np.reshape(exponents, (16, 3)))  # log-uniform: uniform in log(0.5)..log(2), sd 0.4
    assert (exponents.std(axis=0) > 0.15).all() and (exponents.std(axis=1) > 0.05).mean() > 0.7  # per slice, channel
    # the gamma draws do not move the affine draws: the standard masks, with or without a gamma range
    np.testing.assert_array_equal(batch({"gamma": (0.7, 1.5)})[1], batch("standard")[1])
    # the strong ranges move the masks more than the standard ones, from the same slices and draws (the flip,
    # the same in both, left out)
    moved = {
        name: np.abs(batch({**data.AUGMENTATIONS[name], "horizontal_flip": False})[1] - y_plain).mean()
        for name in ("standard", "strong")
    }
    assert moved["strong"] > 1.5 * moved["standard"] > 0


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_an_unknown_augmentation_is_refused_before_any_batch(arrays, pipeline):
    from lgg import batches

    _, images, masks = arrays
    build = batches.TrainingBatches if pipeline == "numpy" else data.training_dataset
    with pytest.raises(ValueError, match="augmentation must be one of standard, strong, elastic; received 'heavy'"):
        build(images, masks, batch_size=16, augmentation="heavy")
    with pytest.raises(ValueError, match="gamma must be a range"):
        build(images, masks, batch_size=16, augmentation={"gamma": (1.5, 0.7)})
    with pytest.raises(ValueError, match="unknown augmentation settings"):
        build(images, masks, batch_size=16, augmentation={"shear": 0.1})
    for elastic in (0.5, -0.01, True, "0.02", (0.01, 0.02)):
        refused = "elastic must be a fraction of the side from 0 to 0.1.*" + re.escape(repr(elastic))
        with pytest.raises(ValueError, match=refused):
            build(images, masks, batch_size=16, augmentation={"elastic": elastic})


def test_the_words_for_an_augmentation_are_its_ranges(monkeypatch):
    """Help texts and the results' candidate lines quote `describe_augmentation`: it follows the ranges."""
    assert data.describe_augmentation("standard") == (
        "rotation up to 10 degrees, shift up to 5 %, zoom up to 5 %, horizontal flip"
    )
    assert data.describe_augmentation("strong").endswith("zoom up to 15 %, horizontal flip, a gamma in 0.7-1.5 per "
                                                         "slice and channel")  # fmt: skip
    assert data.describe_augmentation("elastic") == data.describe_augmentation("strong") + (
        ", an elastic warp (displacements on a 5x5 grid, standard deviation 2.5 % of the side, interpolated linearly)"
    )
    monkeypatch.setitem(data.AUGMENTATIONS, "strong", {**data.AUGMENTATIONS["strong"], "gamma": (0.8, 1.25)})
    assert "a gamma in 0.8-1.25 per slice" in data.describe_augmentation("strong")
    with pytest.raises(ValueError, match="augmentation must be one of"):
        data.describe_augmentation("heavy")


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_strong_augmentation_keeps_flair_only_slices_flair_only_and_labels_as_they_are(arrays, pipeline):
    """The gamma comes before the FLAIR fill: a filled slice keeps three equal channels, as the dataset's FLAIR-only
    cases have; a classifier's labels pass through untouched."""
    from lgg import batches

    slices, images, masks = arrays
    labels = slices.has_tumor.to_numpy(np.float32)

    def first(targets, **options):
        if pipeline == "numpy":
            return batches.TrainingBatches(images, targets, batch_size=16, seed=4, augmentation="strong", **options)[0]
        dataset, _ = data.training_dataset(images, targets, batch_size=16, seed=4, augmentation="strong", **options)
        return tuple(part.numpy() for part in next(iter(dataset)))

    x, _ = first(masks, flair_only=1.0)
    assert (x[..., 0] == x[..., 1]).all() and (x[..., 2] == x[..., 1]).all()
    x, y = first(labels)
    assert x.shape == (16, 128, 128, 3) and y.shape == (16,) and set(np.unique(y)) <= {0.0, 1.0}
    assert not np.array_equal(x[..., 0], x[..., 1])  # the channels are their own, each with its gamma


def test_a_gamma_without_its_own_stream_is_refused():
    from lgg import batches

    images = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="a gamma range needs a generator of its own"):
        batches.augment_batch(images, None, np.random.default_rng(0), "strong")
    with pytest.raises(ValueError, match="an elastic warp needs a generator of its own"):
        batches.augment_batch(images, None, np.random.default_rng(0), {"elastic": 0.02})


@pytest.mark.parametrize("pipeline", ["tf.data", "numpy"])
def test_the_elastic_warp_moves_a_slice_and_its_mask_alike_and_leaves_the_affine_draws(arrays, pipeline, monkeypatch):
    """`augmentation="elastic"`: after the affine map, one smooth random warp per slice, the same for the slice
    and its mask, from a stream of its own (the affine draws, so the standard masks, stay as they were)."""
    from lgg import batches

    _, images, masks = arrays
    tumor = masks.reshape(len(masks), -1).max(axis=1) > 0
    masks = masks[tumor][:16]
    images = np.repeat(masks, 3, axis=-1) * 255  # each channel the mask: where the mask goes, the slice goes

    def batch(augmentation):
        return first_batch(pipeline, images, masks, augmentation)

    x_plain, y_plain = batch(STILL)
    x, y = batch({**STILL, "elastic": 0.03})
    assert set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.round(x[..., 1:2] / 255), y)  # the slice and its mask warped alike
    moved = np.abs(y - y_plain).reshape(16, -1).sum(axis=1)
    assert (moved > 0).all()  # every slice warped, its own way
    assert (y.reshape(16, -1).sum(axis=1) > 0.5 * y_plain.reshape(16, -1).sum(axis=1)).all()  # bent, not torn
    # a wider scale moves the masks further, from the same draws
    assert np.abs(batch({**STILL, "elastic": 0.06})[1] - y_plain).mean() > 1.5 * moved.mean() / y[0].size
    # the elastic draws do not move the affine draws: the standard masks, with the elastic draws made and their warp
    # left out, or without them
    monkeypatch.setattr(data, "sample_bilinear", lambda images, fields: images)
    monkeypatch.setattr(batches, "remap", lambda images, fields: images)
    np.testing.assert_array_equal(batch({"elastic": 0.03})[1], batch("standard")[1])


def test_the_two_pipelines_warp_elastically_alike():
    """The `tf.data` pipeline (`lgg.data.sample_bilinear` on `tf.image.resize`d draws) and `lgg.batches`
    (`cv2.remap` on `cv2.resize`d draws) compute the same warp from the same coarse displacements."""
    import tensorflow as tf

    from lgg import batches

    noise = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 4)).astype(np.float32)
    images = np.stack([cv2.GaussianBlur(image, (0, 0), 2.0) for image in noise])  # smooth, as an MRI slice is
    fields = batches.elastic_fields(np.random.default_rng(1), 3, 64, 0.05)
    coarse = np.random.default_rng(1).normal(size=(3, data.ELASTIC_GRID, data.ELASTIC_GRID, 2)) * (0.05 * 64)
    np.testing.assert_allclose(tf.image.resize(coarse.astype(np.float32), [64, 64]).numpy(), fields, atol=1e-4)
    assert 1.0 < fields.std() < 3.2  # at most the grid's 3.2 px, less between the points
    warped = data.sample_bilinear(tf.constant(images), tf.constant(fields)).numpy()
    # OpenCV 5 interpolates exactly; OpenCV 4 (which pyproject.toml allows) rounds remap's coordinates to 1/32 pixel,
    # a difference of at most the image's steepest step between pixels over 32 on a smooth image
    np.testing.assert_allclose(warped, batches.remap(images, fields), atol=1.0)
    assert np.abs(warped - images).mean() > 2  # it moved
    np.testing.assert_array_equal(data.sample_bilinear(tf.constant(images), tf.zeros((3, 64, 64, 2))), images)
