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


def test_mean_confidence_interval_matches_the_normal_approximation_for_many_cases():
    scores = np.random.default_rng(1).uniform(0.4, 1.0, 400)
    low, high = metrics.mean_confidence_interval(scores)
    half_width = 1.96 * scores.std(ddof=1) / np.sqrt(len(scores))
    assert low < scores.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert metrics.mean_confidence_interval(scores) == (low, high)  # seeded: the same interval again
    few_low, few_high = metrics.mean_confidence_interval(scores[:10])
    assert few_high - few_low > 4 * (high - low)  # 10 cases pin the mean down far less than 400
    assert all(np.isnan(metrics.mean_confidence_interval([0.8])))


def test_paired_comparison_matches_cases_by_id():
    baseline = pd.DataFrame({"case_id": ["a", "b", "c", "d"], "case_dice": [0.5, 0.6, 0.7, 0.0]})
    ours = pd.DataFrame({"case_id": ["d", "c", "b", "a"], "case_dice": [0.0, 0.65, 0.8, 0.6]})  # other order
    result = metrics.paired_comparison(ours, baseline)
    assert result["mean_difference"] == pytest.approx((0.1 + 0.2 - 0.05 + 0) / 4)
    assert (result["cases"], result["better"], result["worse"]) == (4, 2, 1)
    low, high = result["mean_difference_ci95"]
    assert low <= result["mean_difference"] <= high
    assert 0 < result["wilcoxon_p"] <= 1
    with pytest.raises(ValueError, match="different cases"):
        metrics.paired_comparison(ours.iloc[:3], baseline)


def test_roc_auc_by_patient_on_the_committed_classifier_scores():
    """The classifier's real test probabilities (fold 1: 22 patients, 820 slices): the AUC is sklearn's, the interval
    from resampling patients holds it, the same seed gives the same interval, and a comparison is paired."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    table = pd.read_csv(root / "results" / "classifier" / "test.csv")
    committed = json.loads((root / "results" / "classifier.json").read_text())["test"]["roc_auc"]
    found = metrics.roc_auc_by_patient(table.has_tumor, table.probability, table.case_id, resamples=300)
    assert (found["slices"], found["patients"]) == (820, 22)
    assert found["roc_auc"] == pytest.approx(committed, abs=1e-12)
    low, high = found["roc_auc_ci95"]
    assert low < found["roc_auc"] < high <= 1
    assert metrics.roc_auc_by_patient(table.has_tumor, table.probability, table.case_id, resamples=300) == found
    # the patients are resampled, not the slices: each slice its own "patient" gives a far narrower interval
    slices = metrics.roc_auc_by_patient(table.has_tumor, table.probability, range(len(table)), resamples=300)
    assert slices["patients"] == 820 and slices["roc_auc"] == found["roc_auc"]
    assert np.diff(slices["roc_auc_ci95"])[0] < 0.7 * np.diff(found["roc_auc_ci95"])[0]
    # against itself: no difference in any resample
    same = metrics.roc_auc_by_patient(
        table.has_tumor, table.probability, table.case_id, baseline=table.probability, resamples=100
    )
    assert same["difference"] == 0 and same["difference_ci95"] == [0, 0] and same["resamples_better"] == 0
    # against the same scores turned upside down (AUC 1 - a): better in every resample
    worse = metrics.roc_auc_by_patient(
        table.has_tumor, table.probability, table.case_id, baseline=1 - table.probability, resamples=100
    )
    assert worse["baseline_roc_auc"] == pytest.approx(1 - committed, abs=1e-12)
    assert worse["difference_ci95"][0] > 0 and worse["resamples_better"] == 1


@pytest.mark.parametrize(
    ("labels", "scores", "patients", "resamples", "refusal"),
    [
        ([0, 1, 1], [0.1, 0.9], ["a", "a", "b"], 100, "one value per slice"),
        ([1, 1], [0.1, 0.9], ["a", "b"], 100, "tumor and tumor-free"),
        ([0, 2], [0.1, 0.9], ["a", "b"], 100, "labels must be 0 / 1"),
        ([0, 1, 1], [0.1, 0.9, 0.8], ["a", None, "b"], 100, "1 slices have no patient"),
        ([0, 1], [0.1, 0.9], ["a", "b"], 0, "resamples must be at least 100"),
    ],
)
def test_roc_auc_by_patient_refuses_what_has_no_auc(labels, scores, patients, resamples, refusal):
    with pytest.raises(ValueError, match=refusal):
        metrics.roc_auc_by_patient(labels, scores, patients, resamples=resamples)
