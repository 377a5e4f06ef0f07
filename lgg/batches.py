"""Training and evaluation batches on any Keras backend: `keras.utils.PyDataset` over the slices in memory.

With TensorFlow as the Keras backend, `lgg.train.make_datasets` uses the `tf.data` pipelines of
`lgg.data`; with PyTorch (tested, with TensorFlow absent) or JAX (untested) it uses these. Both do the same thing:
every batch full, tumor slices drawn with probability `tumor_fraction`, the same random affine
augmentation (`lgg.data.AUGMENTATIONS`, the same pixel map `lgg.data.affine_components`) applied to a
slice and its mask alike, with `"strong"` a gamma per slice and channel first (`lgg.data.apply_gamma`), with
`"elastic"` an elastic warp after (`cv2.remap`, as `lgg.data.sample_bilinear`),
and every draw keyed by `(seed, epoch)` and `(seed, epoch, batch)`, so a
resumed run sees the same batches as one never interrupted. The draws are NumPy's, not TensorFlow's:
the two pipelines give batches alike in distribution, not equal number for number.
"""

import cv2
import keras
import numpy as np

from lgg.data import (
    ELASTIC_GRID,
    FLAIR_CHANNEL,
    affine_components,
    apply_gamma,
    augmentation_ranges,
    check_batch_size,
    check_tumor_sampling,
    gamma_exponents,
    sampling_of,
    tumor_pools,
)


def random_affine(rng, batch_size, size, rotation_degrees, shift_fraction, zoom_fraction, horizontal_flip):
    """`(batch_size, 2, 3)` output -> input pixel maps drawn from `rng`, as `lgg.data._random_affine` draws them."""
    angle = rng.uniform(-1.0, 1.0, batch_size) * (rotation_degrees * np.pi / 180)
    zoom = 1.0 + rng.uniform(-1.0, 1.0, batch_size) * zoom_fraction
    shift = rng.uniform(-1.0, 1.0, (batch_size, 2)) * (shift_fraction * size)
    flip = np.where(rng.uniform(size=batch_size) < 0.5, -1.0, 1.0) if horizontal_flip else np.ones(batch_size)
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    return np.stack(affine_components(cos, sin, flip, shift[:, 0], shift[:, 1], size), axis=1).reshape(-1, 2, 3)


def warp(images, transforms):
    """Apply one `(2, 3)` output -> input pixel map per sample: bilinear, zero outside the image
    (what `ImageProjectiveTransformV3` does in the `tf.data` pipeline). float32 `(B, S, S, C)`."""
    size = images.shape[1]
    out = np.empty(images.shape, np.float32)
    for index, matrix in enumerate(transforms):
        warped = cv2.warpAffine(
            np.ascontiguousarray(images[index], np.float32),
            matrix.astype(np.float64),
            (size, size),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        out[index] = warped.reshape(out.shape[1:])
    return out


def elastic_fields(rng, batch_size, size, elastic):
    """`(batch_size, size, size, 2)` displacements in pixels (row, column): normal draws on an `ELASTIC_GRID`
    grid, standard deviation `elastic` times the side, resized bilinearly (half-pixel centres, as
    `tf.image.resize`), as `lgg.data.augment_batch` draws them."""
    coarse = (rng.normal(size=(batch_size, ELASTIC_GRID, ELASTIC_GRID, 2)) * (elastic * size)).astype(np.float32)
    return np.stack([cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR) for grid in coarse])


def remap(images, fields):
    """Each image read at its pixels moved by `fields` (`elastic_fields`): bilinear, zero outside the image
    (what `lgg.data.sample_bilinear` does in the `tf.data` pipeline). float32 `(B, S, S, C)`."""
    pixels = np.arange(images.shape[1], dtype=np.float32)
    out = np.empty(images.shape, np.float32)
    for index, field in enumerate(fields):
        warped = cv2.remap(
            np.ascontiguousarray(images[index], np.float32),
            pixels[None, :] + field[..., 1],
            pixels[:, None] + field[..., 0],
            interpolation=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        out[index] = warped.reshape(out.shape[1:])
    return out


def augment_batch(images, masks, rng, augmentation=None, gamma_rng=None, elastic_rng=None):
    """`lgg.data.augment_batch` in NumPy and OpenCV: one random affine transform per sample, the
    same for the slice and its mask (`masks` None for a classifier's batch), with a gamma range
    first a gamma per sample and channel drawn from `gamma_rng` (values 0-255), and with an elastic scale
    then an elastic warp per sample drawn from `elastic_rng`, the slice and its mask alike."""
    params, gamma, elastic = augmentation_ranges(augmentation)
    for name, stream, wanted in (("a gamma range", gamma_rng, gamma), ("an elastic warp", elastic_rng, elastic)):
        if wanted is not None and stream is None:  # the affine draws stay the same only on a stream of their own
            raise ValueError(f"{name} needs a generator of its own, apart from the affine draws' rng")
    if gamma is not None:
        uniform = gamma_rng.uniform(size=(len(images), 1, 1, 3)).astype(np.float32)
        images = apply_gamma(images, gamma_exponents(uniform, gamma, np.exp)).astype(np.float32)
    transforms = random_affine(rng, len(images), images.shape[1], **params)
    stacked = images if masks is None else np.concatenate([images, masks], axis=-1)
    warped = warp(stacked, transforms)
    if elastic is not None:
        warped = remap(warped, elastic_fields(elastic_rng, len(images), images.shape[1], elastic))
    if masks is None:
        return warped
    return warped[..., :3], np.round(warped[..., 3:])


class TrainingBatches(keras.utils.PyDataset):
    """`lgg.data.training_dataset` on any backend: an endless stream of shuffled (or tumor-enriched),
    augmented batches; pass `steps_per_epoch` to `fit`. Batch `i` is batch `i % steps` of epoch
    `start_epoch + i // steps`, whatever the order the workers fetch them in.

    Args:
        images: uint8 array `(N, S, S, 3)`.
        targets: uint8 masks `(N, S, S, 1)` (segmentation) or labels `(N,)` (classification).
        batch_size, seed, augment, tumor_fraction, has_tumor, start_epoch, flair_only, augmentation,
            tumor_cases, tumor_areas: as `training_dataset`.
        workers: threads preparing batches (OpenCV releases the GIL). Defaults to `2`.
    """

    def __init__(
        self,
        images,
        targets,
        batch_size=16,
        seed=0,
        augment=True,
        tumor_fraction=None,
        has_tumor=None,
        start_epoch=0,
        workers=2,
        flair_only=0.0,
        augmentation="standard",
        tumor_cases=None,
        tumor_areas=None,
    ):
        super().__init__(workers=workers, use_multiprocessing=False)
        augmentation_ranges(augmentation)  # a wrong name or range refused here, not in a worker
        self.images, self.targets = np.asarray(images), np.asarray(targets)
        check_batch_size(batch_size, len(self.images))
        self.batch_size, self.seed, self.augment, self.start_epoch = batch_size, seed, augment, start_epoch
        self.tumor_fraction, self.flair_only, self.augmentation = tumor_fraction, flair_only, augmentation
        check_tumor_sampling(sampling_of(tumor_cases, tumor_areas), tumor_fraction)
        self.pools, self.tumor_weights = None, None
        if tumor_fraction is not None:
            *self.pools, self.tumor_weights = tumor_pools(tumor_fraction, has_tumor, tumor_cases, tumor_areas)
        self.steps = int(np.ceil(len(self.images) / batch_size))

    @property
    def num_batches(self):
        return None  # endless: `fit(steps_per_epoch=...)` cuts it into epochs

    def epoch_indices(self, epoch):
        """The slice indices of one epoch, `steps * batch_size` of them, from draws keyed by (seed, epoch)."""
        # a spawn key of its own: NumPy pads a seed list with zeros, so [seed, epoch] would be step 0's [seed, epoch, 0]
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch], spawn_key=(1,)))
        count = self.steps * self.batch_size
        if self.pools is None:  # a permutation, its first few repeated to fill the last batch
            order = rng.permutation(len(self.images))
            return np.concatenate([order, order[: count - len(order)]])
        tumor = rng.uniform(size=count) < self.tumor_fraction
        tumor_pool, free_pool = self.pools
        if self.tumor_weights is None:
            tumor_picks = tumor_pool[rng.integers(0, len(tumor_pool), count)]
        else:  # the tumor slices case first, and by area with tumor_areas (lgg.data.tumor_pools)
            tumor_picks = tumor_pool[rng.choice(len(tumor_pool), count, p=self.tumor_weights)]
        return np.where(tumor, tumor_picks, free_pool[rng.integers(0, len(free_pool), count)])

    def __getitem__(self, index):
        epoch, step = self.start_epoch + index // self.steps, index % self.steps
        rows = self.epoch_indices(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        images, targets = self.images[rows].astype(np.float32), self.targets[rows].astype(np.float32)
        if not self.augment:
            return images, targets
        rng = np.random.default_rng([self.seed, epoch, step])
        gamma_rng = np.random.default_rng([self.seed, epoch, step, 2])  # streams of their own, as flair_only's
        elastic_rng = np.random.default_rng([self.seed, epoch, step, 3])
        if targets.ndim == 4:
            images, targets = augment_batch(images, targets, rng, self.augmentation, gamma_rng, elastic_rng)
        else:
            images = augment_batch(images, None, rng, self.augmentation, gamma_rng, elastic_rng)
        if self.flair_only:  # lgg.data.fill_with_flair, drawn from its own stream so the affine draws stay; after
            # the gamma, so a filled slice has three equal channels (the same warp for each)
            filled = np.random.default_rng([self.seed, epoch, step, 1]).uniform(size=len(images)) < self.flair_only
            images[filled] = images[filled][..., [FLAIR_CHANNEL] * 3]
        return images, targets


class EvaluationBatches(keras.utils.PyDataset):
    """`lgg.data.evaluation_dataset` on any backend: the slices in order, one pass, no augmentation."""

    def __init__(self, images, targets, batch_size=16):
        super().__init__()
        self.images, self.targets, self.batch_size = np.asarray(images), np.asarray(targets), batch_size

    def __len__(self):
        return int(np.ceil(len(self.images) / self.batch_size))

    def __getitem__(self, index):
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.images[rows].astype(np.float32), self.targets[rows].astype(np.float32)
