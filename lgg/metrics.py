"""Evaluation in numpy: what the results table reports.

Names keep the two kinds of Dice apart:

- `case_dice`: Dice of one case's whole 3-D volume (all its slices), as Buda et al. 2019 report.
  Every case in the dataset has tumor; a case with an empty true and predicted volume scores 1,
  an empty true volume with a non-empty prediction scores 0.
- `batch_dice_smooth1`: the original notebooks' figure, the mean over batches of the smoothed
  training metric (`lgg.losses.dice_coefficient`, smooth=1) on probabilities, empty slices included.
"""

import numpy as np
import pandas as pd
from sklearn import metrics as sk_metrics


def dice_score(true_mask, predicted_mask):
    """Dice of two binary arrays; 1.0 when both are empty (nothing to find, nothing found)."""
    true_mask, predicted_mask = np.asarray(true_mask, bool), np.asarray(predicted_mask, bool)
    total = true_mask.sum() + predicted_mask.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(true_mask, predicted_mask).sum() / total)


def jaccard_score(true_mask, predicted_mask):
    """Intersection over union of two binary arrays; 1.0 when both are empty."""
    true_mask, predicted_mask = np.asarray(true_mask, bool), np.asarray(predicted_mask, bool)
    union = np.logical_or(true_mask, predicted_mask).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(true_mask, predicted_mask).sum() / union)


def batch_dice_smooth1(true_masks, probabilities, batch_size=16, smooth=1.0):
    """The original notebooks' validation Dice: smoothed batch Dice on probabilities, averaged
    over consecutive batches of `batch_size` slices (empty slices included)."""
    scores = []
    for start in range(0, len(true_masks), batch_size):
        truth = np.asarray(true_masks[start : start + batch_size], np.float64).ravel()
        prob = np.asarray(probabilities[start : start + batch_size], np.float64).ravel()
        scores.append((2 * (truth * prob).sum() + smooth) / (truth.sum() + prob.sum() + smooth))
    return float(np.mean(scores))


SEGMENTATION_SUMMARY_KEYS = (
    "case_dice_mean",
    "case_dice_median",
    "case_jaccard_mean",
    "tumor_slice_dice_mean",
    "tumor_free_false_positive_rate",
)


def segmentation_report(slices, true_masks, probabilities, threshold=0.5, predicted=None):
    """Score predicted masks against true ones, per case and per slice.

    Args:
        slices: DataFrame with `case_id` (one row per slice, in the order of the arrays).
        true_masks: array `(N, H, W)` or `(N, H, W, 1)` of 0/1.
        probabilities: array like `true_masks`, tumor probability per pixel.
        threshold: float. Pixels at or above it are tumor. Defaults to `0.5`.
        predicted: optional binary masks like `true_masks` (e.g. post-processed); when given they
            are scored instead of `probabilities >= threshold` (the batch Dice still uses
            `probabilities`).

    Returns:
        `(per_case, summary)`: a DataFrame with one row per case (case_dice, case_jaccard,
        slices, tumor_slices, true_volume_px, predicted_volume_px, false_positive_slices) and a dict:
        mean and median case Dice, mean case Jaccard, tumor-slice Dice (mean over slices with
        tumor), false-positive rate on tumor-free slices, and the original notebooks' batch Dice.
    """
    true_masks = np.asarray(true_masks).reshape(len(slices), -1).astype(bool)
    probabilities = np.asarray(probabilities).reshape(len(slices), -1)
    if true_masks.shape != probabilities.shape:
        raise ValueError(f"true_masks {true_masks.shape} and probabilities {probabilities.shape} differ")
    if predicted is None:
        predicted = probabilities >= threshold
    else:
        predicted = np.asarray(predicted).reshape(probabilities.shape).astype(bool)
    slice_has_tumor = true_masks.any(axis=1)
    slice_predicted_any = predicted.any(axis=1)
    rows = []
    case_ids = np.asarray(slices["case_id"])
    for case_id in pd.unique(case_ids):
        rows_of_case = case_ids == case_id
        truth, guess = true_masks[rows_of_case], predicted[rows_of_case]
        rows.append(
            {
                "case_id": case_id,
                "case_dice": dice_score(truth, guess),
                "case_jaccard": jaccard_score(truth, guess),
                "slices": int(rows_of_case.sum()),
                "tumor_slices": int(slice_has_tumor[rows_of_case].sum()),
                "true_volume_px": int(truth.sum()),
                "predicted_volume_px": int(guess.sum()),
                "false_positive_slices": int((slice_predicted_any & ~slice_has_tumor)[rows_of_case].sum()),
            }
        )
    per_case = pd.DataFrame(rows)
    tumor_slice_dice = [dice_score(t, p) for t, p in zip(true_masks[slice_has_tumor], predicted[slice_has_tumor])]
    empty = ~slice_has_tumor
    summary = {
        "cases": int(len(per_case)),
        "slices": int(len(true_masks)),
        "case_dice_mean": float(per_case["case_dice"].mean()),
        "case_dice_median": float(per_case["case_dice"].median()),
        "case_jaccard_mean": float(per_case["case_jaccard"].mean()),
        "tumor_slice_dice_mean": float(np.mean(tumor_slice_dice)) if tumor_slice_dice else float("nan"),
        "tumor_free_false_positive_rate": float(slice_predicted_any[empty].mean()) if empty.any() else float("nan"),
        "batch_dice_smooth1": batch_dice_smooth1(true_masks, probabilities),
        "threshold": threshold,
    }
    return per_case, summary


def classification_report(labels, probabilities, threshold=0.5):
    """Accuracy, sensitivity, specificity, ROC AUC and the confusion matrix of a slice classifier."""
    labels = np.asarray(labels).astype(int).ravel()
    probabilities = np.asarray(probabilities, np.float64).ravel()
    predicted = (probabilities >= threshold).astype(int)
    (tn, fp), (fn, tp) = sk_metrics.confusion_matrix(labels, predicted, labels=[0, 1])
    both_classes = len(np.unique(labels)) == 2
    return {
        "slices": int(len(labels)),
        "tumor_slices": int(labels.sum()),
        "accuracy": float((tp + tn) / len(labels)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "roc_auc": float(sk_metrics.roc_auc_score(labels, probabilities)) if both_classes else float("nan"),
        "confusion_matrix": [[int(tn), int(fp)], [int(fn), int(tp)]],
        "threshold": threshold,
    }


def mean_confidence_interval(values, confidence=0.95, resamples=10_000, seed=0):
    """Bootstrap confidence interval of the mean of per-case scores (BCa, `scipy.stats.bootstrap`).

    The cases are the unit that was sampled, so this is how far the mean could move with another
    draw of patients of the same kind; it says nothing of training noise (seeds). Deterministic
    for a given `seed`.

    Returns:
        `(low, high)`, or `(nan, nan)` with fewer than two cases or identical scores.
    """
    from scipy import stats

    values = np.asarray(values, np.float64)
    if len(values) < 2 or np.ptp(values) == 0:
        return float("nan"), float("nan")
    result = stats.bootstrap(
        (values,), np.mean, confidence_level=confidence, n_resamples=resamples, rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def paired_comparison(per_case, baseline, column="case_dice"):
    """Compare two models on the same cases: `per_case` minus `baseline`, matched by `case_id`.

    Returns a dict: the number of cases, the mean difference with its 95 % bootstrap interval
    (`mean_confidence_interval` of the per-case differences), how many cases are better / worse,
    and the two-sided Wilcoxon signed-rank p-value (`scipy.stats.wilcoxon`).

    Raises:
        ValueError: when the two tables do not hold the same cases.
    """
    from scipy import stats

    ours, theirs = per_case.set_index("case_id")[column], baseline.set_index("case_id")[column]
    if set(ours.index) != set(theirs.index):
        missing = sorted(set(ours.index) ^ set(theirs.index))
        raise ValueError(f"the two tables hold different cases (in one only: {missing[:5]}...)")
    difference = (ours - theirs.loc[ours.index]).to_numpy()
    low, high = mean_confidence_interval(difference)
    nonzero = difference[difference != 0]
    return {
        "cases": int(len(difference)),
        "mean_difference": float(difference.mean()),
        "mean_difference_ci95": [low, high],
        "better": int((difference > 0).sum()),
        "worse": int((difference < 0).sum()),
        "wilcoxon_p": float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0,
    }


def roc_auc_by_patient(labels, scores, patients, baseline=None, resamples=2000, seed=0):
    """ROC AUC of slice scores, with its 95 % interval from resampling patients (a percentile cluster bootstrap:
    the slices of one patient are not independent draws, the patients are), and, given `baseline` (another
    model's scores of the same slices), the paired difference `scores` minus `baseline` with its interval from
    the same resamples. Deterministic for a given `seed`.

    Returns a dict: `slices`, `patients`, `roc_auc`, `roc_auc_ci95`, and with a baseline `baseline_roc_auc`,
    `difference`, `difference_ci95`, and `resamples_better` (the share of resamples where `scores` wins).

    Raises:
        ValueError: unequal lengths, a slice without a patient, labels other than 0 / 1 or of one kind only,
            or fewer than 100 resamples.
    """
    labels, patients = np.asarray(labels), pd.Series(np.asarray(patients, dtype=object))
    columns = [np.asarray(scores, np.float64).ravel()]
    if baseline is not None:
        columns.append(np.asarray(baseline, np.float64).ravel())
    if labels.ndim != 1 or any(len(values) != len(labels) for values in (*columns, patients)):
        raise ValueError("labels, scores, baseline and patients must hold one value per slice")
    if patients.isna().any():
        raise ValueError(f"{int(patients.isna().sum())} slices have no patient: every slice needs one")
    if not set(np.unique(labels)) <= {0, 1}:  # True and False are 1 and 0
        raise ValueError(f"labels must be 0 / 1 (tumor or not); received {sorted(set(np.unique(labels)))[:5]}")
    labels = labels.astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError("a ROC AUC needs tumor and tumor-free slices")
    if resamples < 100:
        raise ValueError(f"resamples must be at least 100 for a 95 % interval; received {resamples}")
    codes, uniques = pd.factorize(patients)
    members = [np.flatnonzero(codes == i) for i in range(len(uniques))]
    rng = np.random.default_rng(seed)
    draws = []
    while len(draws) < resamples:
        picked = np.concatenate([members[i] for i in rng.integers(len(members), size=len(members))])
        if len(np.unique(labels[picked])) == 2:  # a draw of patients without tumor slices has no AUC
            draws.append([sk_metrics.roc_auc_score(labels[picked], column[picked]) for column in columns])
    draws = np.asarray(draws)
    result = {
        "slices": int(len(labels)),
        "patients": int(len(uniques)),
        "roc_auc": float(sk_metrics.roc_auc_score(labels, columns[0])),
        "roc_auc_ci95": [float(v) for v in np.percentile(draws[:, 0], [2.5, 97.5])],
    }
    if baseline is not None:
        difference = draws[:, 0] - draws[:, 1]
        result["baseline_roc_auc"] = float(sk_metrics.roc_auc_score(labels, columns[1]))
        result["difference"] = result["roc_auc"] - result["baseline_roc_auc"]
        result["difference_ci95"] = [float(v) for v in np.percentile(difference, [2.5, 97.5])]
        result["resamples_better"] = float((difference > 0).mean())
    return result
