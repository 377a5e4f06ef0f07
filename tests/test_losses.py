import keras
import numpy as np
import pytest

from lgg import losses

A = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], "float32")
B = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], "float32")


def test_batch_dice_and_jaccard_with_smoothing():
    truth, guess = np.stack([A, A])[..., None], np.stack([B, A])[..., None]
    # intersection 2 + 3 = 5, |truth| = 6, |guess| = 6
    assert float(losses.dice_coefficient(truth, guess)) == pytest.approx((2 * 5 + 1) / (12 + 1))
    assert float(losses.jaccard_index(truth, guess)) == pytest.approx((5 + 1) / (7 + 1))
    empty = np.zeros((1, 3, 3, 1), "float32")
    assert float(losses.dice_coefficient(empty, empty)) == pytest.approx(1.0)


def test_bce_dice_loss_is_the_weighted_sum():
    truth = A[None, ..., None]
    prob = np.clip(B[None, ..., None], 0.1, 0.9)
    bce = float(np.mean(keras.losses.binary_crossentropy(truth, prob)))
    dice = float(losses.dice_coefficient(truth, prob))
    loss = losses.BCEDiceLoss(bce_weight=0.5, dice_weight=2.0)
    assert float(loss(truth, prob)) == pytest.approx(0.5 * bce + 2.0 * (1 - dice), rel=1e-5)


def test_slice_dice_weighs_a_small_tumor_like_a_large_one():
    large = np.zeros((8, 8), "float32")
    large[:6, :6] = 1
    small = np.zeros((8, 8), "float32")
    small[0, 0] = 1
    truth = np.stack([large, small])[..., None]
    guess = np.stack([large, np.zeros_like(small)])[..., None]  # the small tumor missed
    per_slice = [(2 * 36 + 1) / (72 + 1), (0 + 1) / (1 + 1)]
    assert float(losses.slice_dice_coefficient(truth, guess)) == pytest.approx(np.mean(per_slice))
    # over the batch the miss hardly counts: (72 + 1) / (73 + 1)
    assert float(losses.dice_coefficient(truth, guess)) == pytest.approx(73 / 74)
    loss = losses.BCEDiceLoss(bce_weight=0.0, dice="slice")
    assert float(loss(truth, guess)) == pytest.approx(1 - np.mean(per_slice), rel=1e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert restored.dice == "slice"


@pytest.mark.parametrize(
    "kwargs", [{"bce_weight": -1}, {"bce_weight": 0, "dice_weight": 0}, {"smooth": -1}, {"dice": "volume"}]
)
def test_bce_dice_loss_rejects_bad_weights(kwargs):
    with pytest.raises(ValueError, match="received"):
        losses.BCEDiceLoss(**kwargs)


def test_loss_and_metrics_are_registered_for_loading():
    assert keras.saving.get_registered_object("lgg>BCEDiceLoss") is losses.BCEDiceLoss
    assert keras.saving.get_registered_object("lgg>dice_coefficient") is losses.dice_coefficient
    config = keras.saving.serialize_keras_object(losses.BCEDiceLoss(bce_weight=0.3))
    assert keras.saving.deserialize_keras_object(config).bce_weight == pytest.approx(0.3)


def test_tversky_weighs_a_miss_more_than_a_false_alarm():
    truth = A[None, ..., None]  # 3 tumor pixels
    missed = truth.copy()
    missed[0, 0, 0] = 0  # one tumor pixel missed: TP 2, FN 1
    extra = truth.copy()
    extra[0, 2, 2] = 1  # one false alarm: TP 3, FP 1
    tversky = lambda guess: float(losses.tversky_index(truth, guess))  # noqa: E731
    assert tversky(missed) == pytest.approx((2 + 1) / (2 + 0.7 * 1 + 1))
    assert tversky(extra) == pytest.approx((3 + 1) / (3 + 0.3 * 1 + 1))
    dice = lambda guess: float(losses.dice_coefficient(truth, guess))  # noqa: E731
    # both prefer the false alarm to the miss, the Tversky index far more: 0.930 vs 0.811 against 0.875 vs 0.833
    assert tversky(extra) - tversky(missed) > 2 * (dice(extra) - dice(missed)) > 0
    # with alpha = beta = 0.5 it is the Dice, (TP + s) / (TP + (FP + FN) / 2 + s) = (2TP + 2s) / (|A| + |B| + 2s)
    half = float(losses.tversky_index(truth, missed, alpha=0.5, beta=0.5))
    assert half == pytest.approx((2 * 2 + 2) / (3 + 2 + 2))
    loss = losses.BCEDiceLoss(bce_weight=0.0, dice="tversky")
    assert float(loss(truth, missed)) == pytest.approx(1 - tversky(missed), rel=1e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert restored.dice == "tversky"


def test_bce_dice_loss_refuses_a_reduction_that_would_change_its_value():
    # its per-slice values repeat the batch's overlap term: summed, or left per slice, they are not the loss
    for reduction in ("sum", "none", None):
        with pytest.raises(ValueError, match="reduction is sum_over_batch_size"):
            losses.BCEDiceLoss(reduction=reduction)
