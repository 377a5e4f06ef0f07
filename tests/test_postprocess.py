import json

import numpy as np
import pandas as pd
import pytest

from lgg import metrics, postprocess


def test_remove_small_components_keeps_large_regions_only():
    mask = np.zeros((1, 32, 32), bool)
    mask[0, 2:12, 2:12] = True  # 100 px
    mask[0, 20:23, 20:23] = True  # 9 px
    kept = postprocess.remove_small_components(mask, 50)
    assert kept[0, 2:12, 2:12].all() and not kept[0, 20:23, 20:23].any()
    assert (postprocess.remove_small_components(mask, 0) == mask).all()


def test_largest_component_3d_connects_across_slices():
    volume = np.zeros((3, 16, 16), bool)
    volume[0, 2:5, 2:5] = volume[1, 4:7, 4:7] = True  # touch diagonally across slices: one region of 18 px
    volume[2, 10:14, 10:14] = True  # 16 px, separate
    kept = postprocess.largest_component_3d(volume)
    assert kept[0].sum() == 9 and kept[1].sum() == 9 and not kept[2].any()


def test_masks_from_probabilities_applies_largest_component_per_case():
    probabilities = np.zeros((4, 16, 16), np.float32)
    probabilities[0, :4, :4] = 0.9  # case a: 16 px
    probabilities[1, 10:12, 10:12] = 0.9  # case a: 4 px, dropped
    probabilities[2, 10:12, 10:12] = 0.45  # case b: only region, kept at threshold 0.4
    cases = ["a", "a", "b", "b"]
    masks = postprocess.masks_from_probabilities(probabilities, cases, {"threshold": 0.4, "largest_3d": True})
    assert masks[0].sum() == 16 and masks[1].sum() == 0 and masks[2].sum() == 4
    raw = postprocess.masks_from_probabilities(probabilities, cases)
    assert raw[1].sum() == 4 and raw[2].sum() == 0


def test_choose_prefers_the_simplest_setting_among_ties():
    rows = [
        {**postprocess.RAW, "case_dice_mean": 0.80},
        {**postprocess.RAW, "threshold": 0.3, "case_dice_mean": 0.8005},  # within tolerance: a tie
        {**postprocess.RAW, "threshold": 0.4, "largest_3d": True, "case_dice_mean": 0.8004},
    ]
    assert postprocess.choose(pd.DataFrame(rows)) == postprocess.RAW
    rows.append({**postprocess.RAW, "threshold": 0.4, "largest_3d": True, "case_dice_mean": 0.85})
    assert postprocess.choose(pd.DataFrame(rows)) == {**postprocess.RAW, "threshold": 0.4, "largest_3d": True}


def test_tuning_on_a_case_that_needs_a_lower_threshold(tmp_path):
    truth = np.zeros((2, 16, 16), np.uint8)
    truth[0, 4:8, 4:8] = 1
    probabilities = truth * 0.35 + 0.01  # an under-confident model
    slices = pd.DataFrame({"case_id": ["a", "a"]})
    table = postprocess.score_settings(slices, truth, probabilities, probabilities)
    chosen = postprocess.choose(table)
    assert chosen["threshold"] < 0.35
    predicted = postprocess.masks_from_probabilities(probabilities, slices["case_id"], chosen)
    _, summary = metrics.segmentation_report(slices, truth, probabilities, predicted=predicted)
    assert summary["case_dice_mean"] == 1.0
    postprocess.save(chosen, tmp_path)
    assert postprocess.load(tmp_path / "model.h5") == chosen
    assert postprocess.load(tmp_path / "missing" / "model.h5") == postprocess.RAW


def test_each_cases_dice_under_every_setting_round_trips_through_its_wide_table(tmp_path):
    truth = np.zeros((4, 16, 16), np.uint8)
    truth[0, 4:8, 4:8] = truth[2, 2:10, 2:10] = 1
    probabilities = truth * 0.35 + 0.01
    probabilities[1, 10:15, 10:15] = 0.9  # case a: a false alarm of 25 px, larger than its 16-px tumor
    slices = pd.DataFrame({"case_id": ["a", "a", "b", "b"]})
    summary, cases = postprocess.score_settings_and_cases(slices, truth, probabilities, probabilities)
    assert len(summary) == len(list(postprocess.candidates())) and len(cases) == 2 * len(summary)
    means = cases.groupby(list(postprocess.RAW), sort=False)["case_dice"].mean().to_numpy()
    np.testing.assert_allclose(means, summary["case_dice_mean"], atol=1e-12)
    wide = postprocess.wide_case_table(cases)
    assert list(wide["case_id"]) == ["a", "b"] and wide.shape[1] == 1 + len(summary)
    assert wide.loc[0, "t0.3_c0"] == pytest.approx(2 * 16 / (16 + 16 + 25), abs=1e-4)  # the false alarm counts
    assert wide.loc[0, "t0.3_c0_3d_tta"] == pytest.approx(0.0, abs=1e-4)  # the larger region is the false alarm
    wide.to_csv(tmp_path / "cases.csv", index=False)
    back = postprocess.long_case_table(tmp_path / "cases.csv")
    merged = back.merge(cases, on=[*postprocess.RAW, "case_id"], suffixes=("", "_exact"))
    assert len(merged) == len(cases)
    np.testing.assert_allclose(merged["case_dice"], merged["case_dice_exact"], atol=5e-5)


@pytest.mark.parametrize(
    "key",
    ["0.4_c150", "t0.4", "t0.4_c150_3d_big", "tx_c0", "t0.4_c1.5", "t0.40_c0", "t0.4_c0_tta_3d", "t0.4_c0_3d_3d",
     "t-1_c0", "tnan_c0", "t0.4_c-5"],
)  # fmt: skip
def test_a_setting_key_that_is_not_one_is_refused(key):
    with pytest.raises(ValueError, match="not a post-processing setting key"):
        postprocess.parse_setting_key(key)


def test_load_refuses_a_corrupt_settings_file(tmp_path):
    (tmp_path / postprocess.FILENAME).write_text(json.dumps({"treshold": 0.3}))
    with pytest.raises(ValueError, match="postprocess.json.*treshold"):
        postprocess.load(tmp_path / "model.h5")
    (tmp_path / postprocess.FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match="postprocess.json"):
        postprocess.load(tmp_path / "model.h5")
