"""From tumor probabilities to masks: threshold, small components, largest 3-D component, flip TTA.

Every step is optional and chosen on the validation cases (`tune`), never on the test cases.
The chosen settings travel with the model as `postprocess.json` next to it, and `evaluate` and
`predict` apply them. `largest_3d` keeps, per case, the largest connected tumor region of the
whole volume (26-connectivity across slices), as Buda et al. 2019 did.
"""

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from lgg import metrics
from lgg.files import save_json

RAW = {"threshold": 0.5, "min_component_px": 0, "largest_3d": False, "hflip_tta": False}
FILENAME = "postprocess.json"

# what `tune` tries (pixels are at the native 256x256)
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6)
MIN_COMPONENT_PX = (0, 50, 150)
TIE_TOLERANCE = 0.001  # settings within this of the best mean case Dice count as tied (`choose`)


def remove_small_components(masks, min_pixels):
    """Drop 8-connected regions smaller than `min_pixels` from each 2-D mask `(N, H, W)`."""
    masks = np.asarray(masks, bool)
    if min_pixels <= 0:
        return masks
    kept = np.zeros_like(masks)
    for index, mask in enumerate(masks):
        count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        large = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] >= min_pixels)
        large = large[large != 0]  # label 0 is background
        kept[index] = np.isin(labels, large)
    return kept


def label_3d(volume, slice_indices=None):
    """The 26-connected regions of one case's mask volume `(slices, H, W)` -> `(labels, count)`, as
    `scipy.ndimage.label` gives them. With `slice_indices` (the slices' numbers, in order), the slices
    on either side of missing numbers are not neighbours: a blank slice is put between them, so no
    region is joined across the gap."""
    volume = np.asarray(volume, bool)
    breaks = np.array([], int)
    if slice_indices is not None:
        breaks = np.flatnonzero(np.diff(np.asarray(slice_indices)) != 1) + 1
    labels, count = ndimage.label(np.insert(volume, breaks, False, axis=0), structure=np.ones((3, 3, 3), bool))
    return np.delete(labels, breaks + np.arange(len(breaks)), axis=0), count


def largest_component_3d(volume, slice_indices=None):
    """Keep the largest 26-connected region of one case's mask volume `(slices, H, W)` (`label_3d`;
    with `slice_indices`, never joined across missing slices)."""
    volume = np.asarray(volume, bool)
    labels, count = label_3d(volume, slice_indices)
    if count <= 1:
        return volume
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def masks_from_probabilities(probabilities, case_ids, settings=None, slice_indices=None):
    """Binary masks `(N, H, W)` from probabilities, with `settings` like `RAW`. The slices of a
    case must be in slice order for `largest_3d`; with `slice_indices` (their numbers), slices
    on either side of missing numbers are not joined."""
    settings = {**RAW, **(settings or {})}
    masks = np.asarray(probabilities) >= settings["threshold"]
    masks = remove_small_components(masks, settings["min_component_px"])
    if settings["largest_3d"]:
        case_ids = np.asarray(case_ids)
        for case_id in pd.unique(case_ids):
            rows = case_ids == case_id
            numbers = None if slice_indices is None else np.asarray(slice_indices)[rows]
            masks[rows] = largest_component_3d(masks[rows], numbers)
    return masks


def candidates():
    """Every combination `tune` scores: thresholds x minimum component sizes x largest 3-D x TTA."""
    grid = itertools.product(THRESHOLDS, MIN_COMPONENT_PX, (False, True), (False, True))
    for threshold, min_px, largest, tta in grid:
        yield {"threshold": threshold, "min_component_px": min_px, "largest_3d": largest, "hflip_tta": tta}


def _reports(slices, true_masks, probabilities, probabilities_tta):
    """`(settings, per_case, summary)` of every candidate setting (TTA ones need `probabilities_tta`)."""
    for settings in candidates():
        if settings["hflip_tta"] and probabilities_tta is None:
            continue
        source = probabilities_tta if settings["hflip_tta"] else probabilities
        predicted = masks_from_probabilities(source, slices["case_id"], settings, slices.get("slice_index"))
        yield settings, *metrics.segmentation_report(slices, true_masks, source, predicted=predicted)


def score_settings_and_cases(slices, true_masks, probabilities, probabilities_tta=None):
    """`(summary, cases)` of every candidate setting, in one pass: the summary metrics, one row per setting
    (`score_settings`), and the Dice of every case, one row per setting and case (the setting's keys, `case_id`,
    `case_dice`: `case_dice_by_setting`). TTA settings need `probabilities_tta`."""
    summaries, cases = [], []
    for settings, per_case, summary in _reports(slices, true_masks, probabilities, probabilities_tta):
        summaries.append({**settings, **{key: summary[key] for key in metrics.SEGMENTATION_SUMMARY_KEYS}})
        cases.append(per_case[["case_id", "case_dice"]].assign(**settings))
    return pd.DataFrame(summaries), pd.concat(cases, ignore_index=True)[[*RAW, "case_id", "case_dice"]]


def score_settings(slices, true_masks, probabilities, probabilities_tta=None):
    """Summary metrics of every candidate setting, one row each (TTA rows need `probabilities_tta`)."""
    return score_settings_and_cases(slices, true_masks, probabilities, probabilities_tta)[0]


def case_dice_by_setting(slices, true_masks, probabilities, probabilities_tta=None):
    """The Dice of every case under every candidate setting: one row per setting and case (the
    setting's keys, `case_id`, `case_dice`), so that a choice can be made over cases pooled from
    several runs (`benchmarks/pooled_postprocessing.py`)."""
    return score_settings_and_cases(slices, true_masks, probabilities, probabilities_tta)[1]


def setting_key(settings):
    """A short column name for a setting: `t0.4_c150_3d_tta` (threshold, smallest component kept, largest 3-D
    component, flip TTA; the last two only where on)."""
    return (
        f"t{_plain(settings['threshold']):g}_c{int(settings['min_component_px'])}"
        + ("_3d" if settings["largest_3d"] else "")
        + ("_tta" if settings["hflip_tta"] else "")
    )


def parse_setting_key(key):
    """The settings of a `setting_key` (only a key `setting_key` writes, with valid settings), or `ValueError`
    naming the key."""
    parts = str(key).split("_")
    try:
        if not (parts[0].startswith("t") and parts[1].startswith("c")):
            raise ValueError
        settings = check(
            {
                "threshold": float(parts[0][1:]),
                "min_component_px": int(parts[1][1:]),
                "largest_3d": "3d" in parts[2:],
                "hflip_tta": "tta" in parts[2:],
            }
        )
        if setting_key(settings) != key:  # another spelling of a setting: two columns would be one setting
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(f"{key!r} is not a post-processing setting key like 't0.4_c150_3d_tta'") from None
    return settings


def wide_case_table(cases, decimals=4):
    """`case_dice_by_setting`'s rows as one row per case and one column per setting (`setting_key`), the Dice
    rounded to `decimals`: what a run folder keeps as `<split>_postprocessing_cases.csv` (60 settings of 20 cases
    in about 9 KB), so that a rule for choosing the setting can be tried on finished runs."""
    keyed = cases.assign(setting=[setting_key(row) for row in cases[list(RAW)].to_dict("records")])
    order = list(dict.fromkeys(keyed["setting"]))
    wide = keyed.pivot(index="case_id", columns="setting", values="case_dice")[order].round(decimals)
    wide.columns.name = None
    return wide.reset_index()


def long_case_table(wide):
    """A `wide_case_table` (or the file of one) back as `case_dice_by_setting`'s rows."""
    wide = pd.read_csv(wide) if isinstance(wide, (str, Path)) else wide
    long = wide.melt(id_vars="case_id", var_name="setting", value_name="case_dice")
    settings = pd.DataFrame([parse_setting_key(key) for key in long["setting"]])
    return pd.concat([settings, long[["case_id", "case_dice"]]], axis=1)


def mean_by_setting(cases):
    """One row per setting of a `case_dice_by_setting` table, with its mean over the cases (`case_dice_mean`), as
    `score_settings` gives it."""
    table = cases.groupby(list(RAW), as_index=False)["case_dice"].mean()
    return table.rename(columns={"case_dice": "case_dice_mean"})


def choose_from_cases(cases, tolerance=TIE_TOLERANCE):
    """`choose` on the mean Dice of each setting over the cases of a `case_dice_by_setting` table."""
    return choose(mean_by_setting(cases), tolerance)


def dice_under(cases, settings):
    """Each case's Dice (indexed by `case_id`) under `settings`, from a `case_dice_by_setting` table; `ValueError`
    unless the table holds that setting once for each of its cases."""
    chosen = cases[(cases[list(RAW)] == pd.Series({key: settings[key] for key in RAW})).all(axis=1)]
    if len(chosen) != cases["case_id"].nunique() or chosen["case_id"].duplicated().any():
        raise ValueError(
            f"the setting {describe(settings)} is not scored once for each case ({len(chosen)} rows for "
            f"{cases['case_id'].nunique()} cases)"
        )
    return chosen.set_index("case_id")["case_dice"]


def choose(table, tolerance=TIE_TOLERANCE):
    """The setting with the best mean case Dice. Settings within `tolerance` of the best count as
    ties, and a tie goes to the simplest: fewest steps switched on, then the threshold nearest 0.5;
    so a step is kept only where it helps on the validation cases."""
    steps = (table["min_component_px"] > 0).astype(int) + table[["largest_3d", "hflip_tta"]].astype(int).sum(axis=1)
    ranked = table.assign(
        _tied=table["case_dice_mean"] >= table["case_dice_mean"].max() - tolerance,
        _steps=steps,
        _distance=(table["threshold"] - RAW["threshold"]).abs(),
        _dice=-table["case_dice_mean"],
    ).sort_values(["_tied", "_steps", "_distance", "_dice"], ascending=[False, True, True, True])
    row = ranked.iloc[0]
    return {key: _plain(row[key]) for key in RAW}


def ablation(slices, true_masks, probabilities, probabilities_tta, chosen):
    """Effect of each step alone, from raw (threshold 0.5) to the chosen setting."""
    steps = [("raw, threshold 0.5", dict(RAW))]

    def then(name, **change):
        steps.append((name, {**steps[-1][1], **change}))

    then(f"threshold {chosen['threshold']}", threshold=chosen["threshold"])
    if chosen["min_component_px"]:
        then(f"+ drop components < {chosen['min_component_px']} px", min_component_px=chosen["min_component_px"])
    then("+ largest 3-D component", largest_3d=True)
    if probabilities_tta is not None:
        then("+ horizontal-flip TTA", hflip_tta=True)
    steps.append(("chosen on validation", chosen))
    rows = []
    for name, settings in steps:
        source = probabilities_tta if settings["hflip_tta"] else probabilities
        predicted = masks_from_probabilities(source, slices["case_id"], settings, slices.get("slice_index"))
        _, summary = metrics.segmentation_report(slices, true_masks, source, predicted=predicted)
        rows.append({"step": name, **settings, **{k: summary[k] for k in metrics.SEGMENTATION_SUMMARY_KEYS}})
    return pd.DataFrame(rows)


def save(settings, run_dir):
    save_json({key: _plain(settings[key]) for key in RAW}, Path(run_dir) / FILENAME)


def load(model_path):
    """The `postprocess.json` next to a model file, or `RAW` when there is none."""
    path = Path(model_path).parent / FILENAME
    if not path.is_file():
        return dict(RAW)
    try:
        settings = json.loads(path.read_text())
        return check({**RAW, **settings} if isinstance(settings, dict) else settings)
    except ValueError as error:
        raise ValueError(f"{path} is not a valid post-processing file: {error}") from None


def check(settings):
    """`settings` with the types and ranges of `RAW`, or `ValueError` naming the key: a threshold in
    (0, 1), a whole number of pixels >= 0, true / false for the switches (never a string)."""
    from lgg import guards

    if not isinstance(settings, dict):
        raise ValueError(f"expected an object with the keys {sorted(RAW)}; found {type(settings).__name__}")
    unknown = set(settings) - set(RAW)
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)}")
    for key in ("largest_3d", "hflip_tta"):
        if not isinstance(settings[key], bool):
            raise ValueError(f"{key} must be true or false; found {settings[key]!r}")
    return {
        **settings,
        "threshold": guards.probability("threshold", settings["threshold"]),
        "min_component_px": guards.non_negative(
            "min_component_px", settings["min_component_px"], integer=True, maximum=256 * 256
        ),
    }


def describe(settings):
    parts = [f"threshold {settings['threshold']}"]
    if settings["min_component_px"]:
        parts.append(f"components < {settings['min_component_px']} px dropped")
    if settings["largest_3d"]:
        parts.append("largest 3-D component per case")
    if settings["hflip_tta"]:
        parts.append("horizontal-flip TTA")
    return ", ".join(parts)


def _plain(value):
    return value.item() if hasattr(value, "item") else value
