"""Exact values on hand-drawn masks, empty ones included."""

import numpy as np
import pandas as pd
import pytest

from lgg import metrics

A = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])  # 3 pixels
B = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]])  # 3 pixels, 2 shared with A
EMPTY = np.zeros((3, 3), int)


@pytest.mark.parametrize(
    "truth, guess, dice, jaccard",
    [
        (A, A, 1.0, 1.0),
        (A, B, 2 * 2 / 6, 2 / 4),
        (A, EMPTY, 0.0, 0.0),
        (EMPTY, A, 0.0, 0.0),
        (EMPTY, EMPTY, 1.0, 1.0),
        (A, np.ones((3, 3), int), 2 * 3 / 12, 3 / 9),
    ],
)
def test_dice_and_jaccard_exact(truth, guess, dice, jaccard):
    assert metrics.dice_score(truth, guess) == pytest.approx(dice)
    assert metrics.jaccard_score(truth, guess) == pytest.approx(jaccard)


def test_batch_dice_smooth1_matches_the_original_formula():
    truth = np.stack([A, EMPTY]).astype(float)
    prob = np.stack([B, EMPTY]).astype(float) * 0.5
    # one batch: intersection 2*0.5=1, |truth|=3, |prob|=1.5 -> (2*1+1)/(3+1.5+1)
    assert metrics.batch_dice_smooth1(truth, prob, batch_size=2) == pytest.approx(3 / 5.5)
    # two batches of one: the empty one scores (0+1)/(0+0+1) = 1
    assert metrics.batch_dice_smooth1(truth, prob, batch_size=1) == pytest.approx((3 / 5.5 + 1.0) / 2)


def test_segmentation_report_per_case_and_per_slice():
    # case x: slices [A | EMPTY], predicted [B | A] -> one false-positive empty slice
    # case y: slices [A], predicted [A]
    truth = np.stack([A, EMPTY, A])
    prob = np.stack([B, A, A]).astype(float)
    slices = pd.DataFrame({"case_id": ["x", "x", "y"]})
    per_case, summary = metrics.segmentation_report(slices, truth, prob)
    x = per_case.set_index("case_id").loc["x"]
    # volume of x: truth 3 px, prediction 3 + 3 px, overlap 2 -> 2*2/9
    assert x.case_dice == pytest.approx(4 / 9)
    assert x.false_positive_slices == 1 and x.tumor_slices == 1
    assert summary["case_dice_mean"] == pytest.approx((4 / 9 + 1) / 2)
    assert summary["case_dice_median"] == pytest.approx((4 / 9 + 1) / 2)
    assert summary["tumor_slice_dice_mean"] == pytest.approx((4 / 6 + 1) / 2)
    assert summary["tumor_free_false_positive_rate"] == 1.0
    assert summary["cases"] == 2 and summary["slices"] == 3


def test_segmentation_report_threshold_and_shape_check():
    slices = pd.DataFrame({"case_id": ["x"]})
    _, summary = metrics.segmentation_report(slices, A[None], A[None] * 0.4, threshold=0.5)
    assert summary["case_dice_mean"] == 0.0
    with pytest.raises(ValueError, match="differ"):
        metrics.segmentation_report(slices, A[None], np.zeros((1, 4, 4)))


def test_classification_report_exact():
    labels = [1, 1, 1, 0, 0]
    scores = [0.9, 0.6, 0.2, 0.7, 0.1]
    report = metrics.classification_report(labels, scores)
    assert report["confusion_matrix"] == [[1, 1], [1, 2]]
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["sensitivity"] == pytest.approx(2 / 3)
    assert report["specificity"] == pytest.approx(1 / 2)
    # pairs (pos, neg) ranked correctly: 0.9>0.7,0.9>0.1,0.6>0.1,0.2>0.1 -> 4 of 6
    assert report["roc_auc"] == pytest.approx(4 / 6)
