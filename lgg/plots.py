"""Figures: training curves, example slices, outlines of predicted and true tumor, per-case Dice,
ROC and confusion matrix. Each function returns the figure and, given `save_path`, writes a PNG."""

import matplotlib.pyplot as plt
import numpy as np

from lgg.data import CHANNELS, FLAIR_CHANNEL
from lgg.files import save_figure

TRUE_COLOUR, PREDICTED_COLOUR = "lime", "red"


def _finish(figure, save_path, top=1.0):
    figure.tight_layout(rect=(0, 0, 1, top))  # above `top` (a fraction of the height): room for a long suptitle
    if save_path is not None:
        save_figure(figure, save_path)
    return figure


def plot_history(history, task="segmentation", save_path=None):
    """Loss and the validation metrics per epoch, train and validation (the curves users come for)."""
    names = ["loss", "dice_coefficient", "jaccard_index"] if task == "segmentation" else ["loss", "accuracy", "auc"]
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
    epochs = np.asarray(history["epoch"]) + 1
    for axis, name in zip(axes, names):
        axis.plot(epochs, history[name], "o-", label="train")
        if f"val_{name}" in history:
            axis.plot(epochs, history[f"val_{name}"], "o-", label="validation")
        axis.set(title=name.replace("_", " "), xlabel="epoch")
        axis.grid(alpha=0.3)
        axis.legend()
    return _finish(figure, save_path)


def _outline(axis, mask, colour):
    if np.any(mask):
        axis.contour(np.asarray(mask, float), levels=[0.5], colors=colour, linewidths=1.2)


def plot_examples(images, masks, titles=None, save_path=None):
    """One row per slice: each of the three channels (named), then the mask outline on FLAIR."""
    rows = len(images)
    figure, axes = plt.subplots(rows, 4, figsize=(11, 2.8 * rows), squeeze=False)
    for row in range(rows):
        for channel, name in enumerate(CHANNELS):
            axes[row, channel].imshow(images[row][..., channel], cmap="gray")
            axes[row, channel].set_title(name if titles is None else f"{titles[row]}\n{name}", fontsize=8)
        axes[row, 3].imshow(images[row][..., FLAIR_CHANNEL], cmap="gray")
        _outline(axes[row, 3], np.squeeze(masks[row]), TRUE_COLOUR)
        axes[row, 3].set_title("FLAIR + true outline", fontsize=8)
    for axis in axes.ravel():
        axis.axis("off")
    return _finish(figure, save_path)


def plot_channel_outlines(images, true_masks, predicted_masks, titles, title, save_path=None):
    """One row per slice: each of the three channels with the true (green) and predicted (red) outline."""
    rows = len(images)
    figure, axes = plt.subplots(rows, 3, figsize=(8.4, 2.9 * rows + 0.4), squeeze=False)
    for row in range(rows):
        for channel, name in enumerate(CHANNELS):
            axis = axes[row, channel]
            axis.imshow(images[row][..., channel], cmap="gray")
            _outline(axis, np.squeeze(true_masks[row]), TRUE_COLOUR)
            _outline(axis, np.squeeze(predicted_masks[row]), PREDICTED_COLOUR)
            axis.set_title(f"{titles[row]}\n{name}" if channel == 0 else name, fontsize=8)
            axis.axis("off")
    title = f"{title}\ntrue outline green, predicted red"
    figure.suptitle(title, fontsize=9)
    return _finish(figure, save_path, top=1 - (0.2 * title.count("\n") + 0.3) / figure.get_figheight())


def plot_overlays(images, true_masks, probabilities, titles, threshold=0.5, save_path=None, columns=4):
    """FLAIR with the true (green) and predicted (red) tumor outline, one panel per slice."""
    count = len(images)
    rows = int(np.ceil(count / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.8 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, truth, probability, title in zip(axes.ravel(), images, true_masks, probabilities, titles):
        axis.imshow(image[..., FLAIR_CHANNEL], cmap="gray")
        if truth is not None:
            _outline(axis, np.squeeze(truth), TRUE_COLOUR)
        _outline(axis, np.squeeze(probability) >= threshold, PREDICTED_COLOUR)
        axis.set_title(title, fontsize=8)
    figure.suptitle("FLAIR: true outline green, predicted red", fontsize=10)
    return _finish(figure, save_path)


def plot_case_overlays(slices, images, true_masks, probabilities, per_case, threshold=0.5, save_path=None, per_side=4):
    """Overlays of the largest-tumor slice of the best and the worst cases by case Dice."""
    ranked = per_case.sort_values("case_dice")
    chosen = list(ranked.tail(per_side)["case_id"])[::-1] + list(ranked.head(per_side)["case_id"])
    picks, titles = [], []
    case_ids = np.asarray(slices["case_id"])
    area = np.asarray(true_masks).reshape(len(true_masks), -1).sum(axis=1)
    for case_id in dict.fromkeys(chosen):
        index = np.flatnonzero(case_ids == case_id)
        best = index[np.argmax(area[index])]
        picks.append(best)
        dice = float(per_case.loc[per_case.case_id == case_id, "case_dice"].iloc[0])
        titles.append(f"{case_id}\nslice {slices['slice_index'].iloc[best]}, case Dice {dice:.2f}")
    return plot_overlays(images[picks], true_masks[picks], probabilities[picks], titles, threshold, save_path)


def plot_case_dice(per_case, save_path=None):
    """Distribution of Dice per case (whole volume), with mean and median."""
    values = per_case["case_dice"].to_numpy()
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.6), gridspec_kw={"width_ratios": [1, 2]})
    left.hist(values, bins=np.linspace(0, 1, 21), color="tab:blue", edgecolor="white")
    left.axvline(values.mean(), color="k", label=f"mean {values.mean():.3f}")
    left.axvline(np.median(values), color="k", linestyle="--", label=f"median {np.median(values):.3f}")
    left.set(xlabel="Dice per case (whole volume)", ylabel="cases")
    left.legend()
    ordered = per_case.sort_values("case_dice")
    right.bar(range(len(ordered)), ordered["case_dice"], color="tab:blue")
    right.set_xticks(range(len(ordered)), ordered["case_id"], rotation=90, fontsize=6)
    right.set(ylabel="Dice", ylim=(0, 1), title=f"{len(ordered)} held-out cases")
    return _finish(figure, save_path)


def plot_classification(labels, probabilities, threshold=0.5, save_path=None):
    """ROC curve with AUC, and the confusion matrix at `threshold`."""
    from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    RocCurveDisplay.from_predictions(labels, probabilities, ax=left, name="classifier")
    left.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    ConfusionMatrixDisplay.from_predictions(
        np.asarray(labels, int),
        (np.asarray(probabilities) >= threshold).astype(int),
        display_labels=["no tumor", "tumor"],
        ax=right,
        colorbar=False,
    )
    return _finish(figure, save_path)


def plot_time_curve(curve, save_path=None):
    """Mean per-case test Dice of the weights kept after N minutes of training (raw and post-processed)."""
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    axis.plot(curve["elapsed_min"], curve["case_dice_mean"], "o-", label="post-processed (chosen on val)")
    axis.plot(curve["elapsed_min"], curve["raw_case_dice_mean"], "s--", label="raw, threshold 0.5")
    for row in curve.itertuples():
        axis.annotate(f"{row.case_dice_mean:.3f}", (row.elapsed_min, row.case_dice_mean), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
    axis.set(xlabel="training minutes (CPU)", ylabel="mean per-case Dice, test cases", ylim=(0, 1))
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    return _finish(figure, save_path)
