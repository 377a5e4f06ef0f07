"""Training-time losses and metrics, written with `keras.ops` so they run on any Keras 3 backend.

These are *batch* quantities: the whole batch is flattened into one set of pixels and smoothed
with `smooth=1`, exactly as the original notebooks computed them, so their numbers compare with
theirs. They are not the evaluation Dice the results table reports; that one is computed per case
over the whole 3-D volume in `lgg.metrics`.
"""

import keras
from keras import ops

from lgg.config import DICE_LOSSES

PACKAGE = "lgg"
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7  # weights of false positives and misses (Salehi et al. 2017)


@keras.saving.register_keras_serializable(package=PACKAGE)
def dice_coefficient(y_true, y_pred, smooth=1.0):
    """Batch Dice, `(2|A∩B| + smooth) / (|A| + |B| + smooth)` over all pixels of the batch."""
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (-1,)), "float32")
    intersection = ops.sum(y_true * y_pred)
    return (2.0 * intersection + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)


@keras.saving.register_keras_serializable(package=PACKAGE)
def jaccard_index(y_true, y_pred, smooth=1.0):
    """Batch Jaccard (intersection over union), smoothed like `dice_coefficient`."""
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (-1,)), "float32")
    intersection = ops.sum(y_true * y_pred)
    union = ops.sum(y_true) + ops.sum(y_pred) - intersection
    return (intersection + smooth) / (union + smooth)


def slice_dice_coefficient(y_true, y_pred, smooth=1.0):
    """Soft Dice of each slice on its own, averaged over the batch: a small tumor weighs as much
    as a large one (in the batch Dice its few pixels hardly count), and a tumor-free slice scores
    `smooth / (|B| + smooth)`, which pushes its prediction towards empty."""
    batch = ops.shape(y_true)[0]
    y_true = ops.cast(ops.reshape(y_true, (batch, -1)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (batch, -1)), "float32")
    intersection = ops.sum(y_true * y_pred, axis=1)
    return ops.mean((2.0 * intersection + smooth) / (ops.sum(y_true, axis=1) + ops.sum(y_pred, axis=1) + smooth))


def tversky_index(y_true, y_pred, smooth=1.0, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA):
    """Batch Tversky index, `(TP + smooth) / (TP + alpha FP + beta FN + smooth)` over all pixels of the
    batch (Salehi et al. 2017). With `beta > alpha` a missed tumor pixel costs more than a false
    alarm, which pushes a model that under-segments towards recall; `alpha = beta = 0.5` is the Dice."""
    y_true = ops.cast(ops.reshape(y_true, (-1,)), "float32")
    y_pred = ops.cast(ops.reshape(y_pred, (-1,)), "float32")
    true_positive = ops.sum(y_true * y_pred)
    false_positive = ops.sum((1.0 - y_true) * y_pred)
    false_negative = ops.sum(y_true * (1.0 - y_pred))
    return (true_positive + smooth) / (true_positive + alpha * false_positive + beta * false_negative + smooth)


@keras.saving.register_keras_serializable(package=PACKAGE)
class BCEDiceLoss(keras.losses.Loss):
    """`bce_weight * binary_crossentropy + dice_weight * (1 - Dice)`.

    Args:
        bce_weight: float. Weight of the pixel-wise binary cross-entropy. Defaults to `1.0`.
        dice_weight: float. Weight of the soft Dice loss. Defaults to `1.0`.
        smooth: float. Smoothing of the Dice term. Defaults to `1.0`, as the original notebooks.
        dice: `"batch"` (`dice_coefficient` over the whole batch, as the original notebooks),
            `"slice"` (`slice_dice_coefficient`, each slice's Dice averaged) or `"tversky"`
            (`tversky_index` over the whole batch, misses weighted 0.7 and false alarms 0.3).
            Defaults to `"batch"`.

    Example:
        >>> model.compile(optimizer="adam", loss=BCEDiceLoss(bce_weight=1.0, dice_weight=1.0))
    """

    def __init__(self, bce_weight=1.0, dice_weight=1.0, smooth=1.0, dice="batch", name="bce_dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        if self.reduction != "sum_over_batch_size":  # `call` returns per-slice values whose batch mean is the loss
            raise ValueError(
                f"BCEDiceLoss is a batch figure: its reduction is sum_over_batch_size; received {self.reduction!r}"
            )
        if dice not in DICE_LOSSES:
            raise ValueError(f"dice must be one of {DICE_LOSSES}; received {dice!r}")
        self.dice = dice
        if bce_weight < 0 or dice_weight < 0 or bce_weight + dice_weight == 0:
            raise ValueError(
                "bce_weight and dice_weight must be non-negative and not both zero; "
                f"received bce_weight={bce_weight}, dice_weight={dice_weight}"
            )
        if smooth < 0:
            raise ValueError(f"smooth must be non-negative; received smooth={smooth}")
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        # one value per slice, whose batch mean is the loss: the slice's cross-entropy plus the overlap term
        # (a batch figure, the same for every slice). Keras reduces it and, under tf.distribute, divides it
        # by the replicas before their gradients are summed; a scalar it would pass through unscaled.
        pixel_bce = keras.losses.binary_crossentropy(y_true, y_pred)
        bce = ops.mean(pixel_bce, axis=tuple(range(1, len(pixel_bce.shape))))
        overlap = {"batch": dice_coefficient, "slice": slice_dice_coefficient, "tversky": tversky_index}[self.dice]
        dice = overlap(y_true, y_pred, self.smooth)
        return self.bce_weight * bce + self.dice_weight * (1.0 - dice)

    def get_config(self):
        config = super().get_config()
        config.update(bce_weight=self.bce_weight, dice_weight=self.dice_weight, smooth=self.smooth, dice=self.dice)
        return config


SEGMENTATION_METRICS = [dice_coefficient, jaccard_index]
