"""`benchmarks/results.py`: a recipe's cross-validation pools every patient once, and the shipped model is
replaced only by the fixed fold of a recipe measured better on the same patients, refused before anything
is written. Built from the committed results (the headline's five folds, 88 real cases) in a scratch copy:
the headline's fold rows also stand as the rows of the candidate `unet-bf16`, shifted where a test needs a
better or worse candidate."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import data_without

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402

HEADLINE, CANDIDATE = results.fold_rows("unet"), results.fold_rows("unet-bf16")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """results/, models/ and runs/ in tmp_path: the committed headline rows and pooled figures, the candidate's
    rows as copies of them, the shipped card as the headline's fold 2 (whichever recipe ships today), and a
    run folder for the candidate's fold 2 holding the shipped files (the model a test may ship)."""
    out, models, runs = tmp_path / "results", tmp_path / "models", tmp_path / "runs"
    for fold, name in zip(HEADLINE, CANDIDATE, strict=True):
        row = json.loads((ROOT / "results" / f"{fold}.json").read_text())
        for label in (fold, name):
            (out / label).mkdir(parents=True)
            shutil.copy(ROOT / "results" / fold / "test.csv", out / label / "test.csv")
            (out / f"{label}.json").write_text(json.dumps({**row, "name": label}))
    monkeypatch.setattr(results, "RESULTS", out)
    monkeypatch.setattr(results, "MODELS", models)
    monkeypatch.setattr(results, "RUNS", runs)
    headline = results.cross_validation(rows(HEADLINE))
    shutil.copytree(ROOT / "models" / "unet", models / "unet")
    card = json.loads((models / "unet" / "card.json").read_text())
    card.update(run="unet-fold2", recipe_name="unet", precision="float32")
    card["cross_validation"] = {key: headline[key] for key in results.CARD_POOLED_KEYS}
    (models / "unet" / "card.json").write_text(json.dumps(card))
    run = runs / "results-unet-bf16-fold2"
    run.mkdir(parents=True)
    for file in ("model.h5", "postprocess.json", "split.csv"):
        shutil.copy(models / "unet" / file, run / file)
    (run / "config.json").write_text(json.dumps({"split": results.SHIPPED_SPLIT}))
    (run / "test_summary.json").write_text(json.dumps(rows(["unet-bf16-fold2"])[0]["test"]))
    return tmp_path


def rows(names):
    return [json.loads((results.RESULTS / f"{name}.json").read_text()) for name in names]


def candidate(shift, folds=CANDIDATE):
    """The candidate's rows with every case's Dice moved by `shift` (within [0, 1]), pooled again."""
    for name in folds:
        table = pd.read_csv(results.RESULTS / name / "test.csv")
        table["case_dice"] = (table.case_dice + shift).clip(0, 1)
        table.to_csv(results.RESULTS / name / "test.csv", index=False)
        row = rows([name])[0]
        row["test"]["case_dice_mean"] = float(table.case_dice.mean())
        (results.RESULTS / f"{name}.json").write_text(json.dumps(row))
    run = results.RUNS / "results-unet-bf16-fold2"
    (run / "test_summary.json").write_text(json.dumps(rows(["unet-bf16-fold2"])[0]["test"]))
    return results.cross_validation(rows(CANDIDATE), "unet-bf16")


def test_a_recipe_pools_its_five_folds_each_patient_once(scratch):
    headline = json.loads((results.RESULTS / "unet-cross-validation.json").read_text())
    assert headline["cases"] == 88 and headline["recipe"] == "unet"
    assert headline["case_dice_mean"] == pytest.approx(
        json.loads((ROOT / "results" / "unet-cross-validation.json").read_text())["case_dice_mean"], abs=1e-9
    )
    # a candidate is pooled only with all five folds: four would be a mean over another set of patients
    assert results.cross_validation(rows(CANDIDATE[:4]), "unet-bf16") is None
    assert not (results.RESULTS / "unet-bf16-cross-validation.json").exists()
    pooled = results.cross_validation(rows(CANDIDATE), "unet-bf16")
    assert pooled["folds"] == list(CANDIDATE) and pooled["cases"] == 88
    assert pooled["case_dice_mean"] == pytest.approx(headline["case_dice_mean"], abs=1e-12)
    assert json.loads((results.RESULTS / "unet-bf16-cross-validation.json").read_text()) == pooled
    text = results.cross_validation_text(pooled)
    assert "candidate recipe `unet-bf16`" in text and "results/unet-bf16-cross-validation.csv" in text
    # a case tested by two folds is refused, not counted twice
    shutil.copy(results.RESULTS / "unet-bf16" / "test.csv", results.RESULTS / "unet-bf16-fold5" / "test.csv")
    with pytest.raises(ValueError, match="tested by two folds"):
        results.cross_validation(rows(CANDIDATE), "unet-bf16")


def test_collecting_with_fewer_folds_removes_a_candidates_stale_pooled_file(scratch, monkeypatch):
    candidate(0.05)
    assert (results.RESULTS / "unet-bf16-cross-validation.json").exists()
    (results.RESULTS / "unet-bf16-fold4.json").unlink()  # one fold gone: its pooled figure no longer stands
    shutil.rmtree(results.RUNS)  # rows from the results files alone, as in a fresh clone
    monkeypatch.setattr(results, "write_readme", lambda found: None)
    monkeypatch.setattr(results, "two_stage", lambda data_dir, again: None)
    (results.RESULTS / "classifier-cross-validation.json").write_text("{}")  # the classifier's, from more folds
    for stale in ("unet-tversky-vs-unet", "resnet50-unet-bf16-vs-unet"):  # no pair now; paired otherwise now
        (results.RESULTS / f"{stale}.json").write_text("{}")
    results.main(["--collect-only", "--data", str(scratch / "no-data")])
    assert sorted(path.name for path in results.RESULTS.glob("*-vs-*.json")) == ["unet-bf16-vs-unet.json"]
    assert not (results.RESULTS / "classifier-cross-validation.json").exists()
    assert not (results.RESULTS / "unet-bf16-cross-validation.json").exists()
    assert not (results.RESULTS / "unet-bf16-cross-validation.csv").exists()
    assert (results.RESULTS / "unet-cross-validation.json").exists()


def test_the_glance_table_says_which_folds_each_mean_rests_on_and_pairs_on_the_same_patients(scratch):
    candidate(0.05)
    for name in CANDIDATE[3:]:  # the candidate has run folds 1-3 only
        (results.RESULTS / f"{name}.json").unlink()
    found = [json.loads(f.read_text()) for f in results.RESULTS.glob("*.json") if f.stem in results.CONFIGS]
    comparison = results.recipe_comparison(found, "unet-bf16")
    lines = {line.split(" | ")[0]: line for line in results.glance_table(found).splitlines() if line.startswith("| `")}
    assert set(lines) == {"| `unet`", "| `unet-bf16`"}  # recipes without a fold row have no line
    headline = pd.concat(pd.read_csv(results.RESULTS / name / "test.csv") for name in HEADLINE)
    ours = pd.concat(pd.read_csv(results.RESULTS / name / "test.csv") for name in CANDIDATE[:3])
    assert f"| 5 of 5 (1, 2, 3, 4, 5) | 88 | **{headline.case_dice.mean():.3f}** (" in lines["| `unet`"]
    assert lines["| `unet`"].endswith(" | 1 | — |")  # TCGA_FG_A60K
    assert f"| 3 of 5 (1, 2, 3) | {22 + 17 + 16} | {ours.case_dice.mean():.3f} (" in lines["| `unet-bf16`"]
    difference = comparison["paired"]["mean_difference"]
    headline_on_55 = pd.concat(pd.read_csv(results.RESULTS / name / "test.csv") for name in HEADLINE[:3]).case_dice
    assert f"| `unet`: {headline_on_55.mean():.3f} on the same 55; {difference:+.3f} (" in lines["| `unet-bf16`"]
    assert 0.03 < difference < 0.05 + 1e-9 and "**" not in lines["| `unet-bf16`"]
    with pytest.raises(ValueError, match="not one of the 5 folds"):
        results.fold_number("patient-fold-2-of-3")
    with pytest.raises(SystemExit, match="README.md needs one <!-- glance:start -->"):
        results._replace_between("a README of another shape", "glance", "table")


def test_a_candidate_is_paired_with_the_recipe_it_is_computed_like(scratch):
    """The ResNet50 candidate differs from `unet-bf16` in its encoder only: the pairs are its folds and that
    recipe's, not the headline's."""
    candidate(-0.05)  # unet-bf16 now differs from the headline
    for fold in ("", "-fold2"):
        table = pd.read_csv(results.RESULTS / f"unet-bf16{fold}" / "test.csv")
        table["case_dice"] = (table.case_dice + 0.01).clip(0, 1)
        (results.RESULTS / f"resnet50-unet-bf16{fold}").mkdir()
        table.to_csv(results.RESULTS / f"resnet50-unet-bf16{fold}" / "test.csv", index=False)
        row = {**rows([f"unet-bf16{fold}"])[0], "name": f"resnet50-unet-bf16{fold}"}
        (results.RESULTS / f"resnet50-unet-bf16{fold}.json").write_text(json.dumps(row))
    found = [json.loads(f.read_text()) for f in results.RESULTS.glob("*.json") if f.stem in results.CONFIGS]
    comparison = results.recipe_comparison(found, "resnet50-unet-bf16")
    assert comparison["paired_with"] == "unet-bf16"
    assert [pair[:2] for pair in comparison["folds"]] == [
        ["resnet50-unet-bf16", "unet-bf16"],
        ["resnet50-unet-bf16-fold2", "unet-bf16-fold2"],
    ]
    assert comparison["paired"]["cases"] == 22 + 17
    assert comparison["paired"]["mean_difference"] == pytest.approx(0.01, abs=1e-9)
    # each fold's own pairing too, on its own patients
    assert [f["paired"]["cases"] for f in comparison["per_fold"]] == [22, 17]
    assert all(f["paired"]["mean_difference"] == pytest.approx(0.01, abs=1e-9) for f in comparison["per_fold"])
    assert (results.RESULTS / "resnet50-unet-bf16-vs-unet-bf16.json").exists()
    assert not (results.RESULTS / "resnet50-unet-bf16-vs-unet.json").exists()
    text = results.recipe_comparison_text(comparison)
    assert "paired with the `unet-bf16` recipe" in text and "resnet50-unet-bf16-vs-unet-bf16.json" in text


def test_a_pair_trained_at_rates_far_apart_says_so(scratch):
    """The same CPU model can train much slower (a busy host: 34 against 58 slices/s, 48 epochs against 76 in
    the same 60 minutes): each fold's line names the two rates where they differ by more than `SPEED_GAP`."""
    for fold, rate, partner_rate in (("", 34.1, 57.7), ("-fold2", 50.0, 55.0)):
        source = f"unet-bf16{fold}"
        (results.RESULTS / f"resnet50-unet-bf16{fold}").mkdir()
        shutil.copy(results.RESULTS / source / "test.csv", results.RESULTS / f"resnet50-unet-bf16{fold}" / "test.csv")
        for name, value in ((f"resnet50-unet-bf16{fold}", rate), (source, partner_rate)):
            row = {**rows([source])[0], "name": name, "train_slices_per_s": value}
            (results.RESULTS / f"{name}.json").write_text(json.dumps(row))
    found = [json.loads(f.read_text()) for f in results.RESULTS.glob("*.json") if f.stem in results.CONFIGS]
    comparison = results.recipe_comparison(found, "resnet50-unet-bf16")
    assert [f["candidate_slices_per_s"] for f in comparison["per_fold"]] == [34.1, 50.0]
    text = results.recipe_comparison_text(comparison)
    first, second = text.split("patient-fold-2-of-5:")
    assert "**training slices/s 34 vs 58**" in first  # 1.69x apart
    assert "training slices/s" not in second  # 1.1x: within SPEED_GAP, not named
    for unrecorded in (None, float("nan"), 0.0):  # a run without its rate: nothing named, nothing made up
        fold = {**comparison["per_fold"][0], "candidate_slices_per_s": unrecorded}
        assert "training slices/s" not in results.recipe_comparison_text({**comparison, "per_fold": [fold]})


def test_a_candidate_is_paired_with_its_partner_run_again_on_its_own_cpu(scratch):
    """Where `unet-bf16` ran again on the candidate's CPU (`unet-bf16-again`), that run is the fold's partner;
    the other folds keep the partner recipe's own rows. A run again is a row of the table, not a fold of the
    recipe, and `make results` trains it only when named."""
    candidate(-0.05)
    zen5 = {"cpu_model": "AMD EPYC", "cpu_flags": {"avx512_bf16": True}, "cpu_id": "AuthenticAMD 26 2 1"}
    for name, source, shift, cpu in (
        ("resnet50-unet-bf16", "unet-bf16", 0.02, zen5),
        ("resnet50-unet-bf16-fold2", "unet-bf16-fold2", 0.01, zen5),
        ("unet-bf16-again", "unet-bf16", 0.0, zen5),
    ):
        table = pd.read_csv(results.RESULTS / source / "test.csv")
        table["case_dice"] = (table.case_dice + shift).clip(0, 1)
        (results.RESULTS / name).mkdir()
        table.to_csv(results.RESULTS / name / "test.csv", index=False)
        row = rows([source])[0]
        row.update(name=name, environment={**row["environment"], **cpu}, precision="mixed_bfloat16", jit_compile=False)
        (results.RESULTS / f"{name}.json").write_text(json.dumps(row))
    found = [json.loads(f.read_text()) for f in results.RESULTS.glob("*.json") if f.stem in results.CONFIGS]
    comparison = results.recipe_comparison(found, "resnet50-unet-bf16")
    assert [pair[:2] for pair in comparison["folds"]] == [
        ["resnet50-unet-bf16", "unet-bf16-again"],
        ["resnet50-unet-bf16-fold2", "unet-bf16-fold2"],
    ]
    assert comparison["per_fold"][0]["same_cpu"] is True and comparison["per_fold"][1]["same_cpu"] is not True
    # unet-bf16-again is not a fold of unet-bf16: the bfloat16 recipe's own comparison has its five folds only
    own = results.recipe_comparison(found, "unet-bf16")
    assert [pair[0] for pair in own["folds"]] == list(CANDIDATE)
    assert "unet-bf16-again" in results.TABLE_ROWS and "unet-bf16-again" not in results.DEFAULT_RUNS
    assert "unet-bf16" not in results.TABLE_ROWS and "unet-again-fold2" not in results.DEFAULT_RUNS
    label = results.readme_table([r for r in found if r["name"] == "unet-bf16-again"])
    assert "unet, mixed_bfloat16, again on AMD EPYC, no XLA" in label
    # the glance table names the runs the candidate was paired with and their mean on the same patients
    (line,) = [line for line in results.glance_table(found).splitlines() if line.startswith("| `resnet50-unet-bf16`")]
    partner = pd.concat(
        pd.read_csv(results.RESULTS / name / "test.csv") for name in ("unet-bf16-again", "unet-bf16-fold2")
    )
    assert (
        f"| `unet-bf16` (fold 1 run again on the candidate's CPU): {partner.case_dice.mean():.3f} on the same 39; "
        in line
    )
    assert "| 2 of 5 (1, 2) | 39 | " in line and "**" not in line  # two folds: not bold as the 88-patient means are


def test_a_stale_pooled_file_is_refused(scratch):
    candidate(0.05)
    row = rows(["unet-bf16-fold3"])[0]
    row["test"]["case_dice_mean"] += 0.01  # a fold scored again without collecting
    (results.RESULTS / "unet-bf16-fold3.json").write_text(json.dumps(row))
    with pytest.raises(ValueError, match="stale"):
        results.check_shippable("unet-bf16-fold2", scratch / "no-data")


@pytest.mark.parametrize(
    ("name", "shift", "refusal"),
    [
        ("unet-tversky-fold2", None, "unet-tversky has no cross-validation yet"),
        ("resnet50-unet", None, "not a fold row of a cross-validated recipe"),
        ("unet-bf16-fold2", 0.0, "not better, not replaced"),  # equal is not better
        ("unet-bf16-fold2", -0.01, "not better, not replaced"),
        ("unet-bf16-fold3", 0.05, "the shipped fold is patient-fold-2-of-5"),  # no picking the best fold
        ("unet-bf16-fold2", 0.05, "lacks the test cases"),  # no data to measure the file on
    ],
)
def test_shipping_refuses_before_anything_is_written(scratch, name, shift, refusal):
    if shift is not None:
        candidate(shift)
    before = {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()}
    (scratch / "no-data" / "TCGA_XX_0001_20000101").mkdir(parents=True)
    (scratch / "no-data" / "TCGA_XX_0001_20000101" / "TCGA_XX_0001_20000101_1_mask.tif").write_bytes(b"")
    with pytest.raises(ValueError, match=refusal):
        results.ship(name, scratch / "no-data")
    assert {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()} == before
    assert sorted(path.name for path in results.MODELS.iterdir() if path.name != ".lgg-lock") == [
        "unet"
    ]  # no staging folder left


def test_the_shipped_recipe_is_compared_as_it_stands_not_as_its_card_recorded(scratch, real_data):
    card_file = results.MODELS / "unet" / "card.json"
    card = json.loads(card_file.read_text())
    card["cross_validation"].update(case_dice_mean=0.70, cases=34)  # written when two folds had run
    card_file.write_text(json.dumps(card))
    candidate(-0.005)  # better than what the card recorded, worse than the headline now
    with pytest.raises(ValueError, match="not better"):
        results.check_shippable("unet-bf16-fold2", real_data)


def test_recipes_are_compared_on_the_same_patients(scratch, real_data):
    candidate(0.05)
    pooled = results.cross_validation(rows(HEADLINE[:4]))  # the headline over four folds only
    assert pooled["cases"] < 88
    with pytest.raises(ValueError, match="on the same patients"):
        results.check_shippable("unet-bf16-fold2", real_data)


def test_a_run_folder_other_than_the_scored_run_is_refused(scratch, real_data):
    candidate(0.05)
    summary = results.RUNS / "results-unet-bf16-fold2" / "test_summary.json"
    summary.write_text(json.dumps({**json.loads(summary.read_text()), "case_dice_mean": 0.5}))  # trained again
    with pytest.raises(ValueError, match="is not the run"):
        results.check_shippable("unet-bf16-fold2", real_data)


def test_a_failure_after_the_door_leaves_the_shipped_model_and_no_staging(scratch, real_data):
    candidate(0.05)
    (results.RUNS / "results-unet-bf16-fold2" / "model.h5").write_bytes(b"not a model")
    before = {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()}
    with pytest.raises(Exception):  # noqa: B017  (whatever h5py or Keras raise for a damaged file)
        results.ship("unet-bf16-fold2", real_data)
    assert {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()} == before
    assert sorted(path.name for path in results.MODELS.iterdir() if path.name != ".lgg-lock") == ["unet"]


def test_a_ship_cut_off_between_its_renames_is_undone_by_hand_not_by_the_next_ship(scratch, real_data):
    """A --ship killed after setting the shipped model aside and before putting the new one in place left no
    models/unet: the next --ship found no card, so shipped any recipe without the comparison, and deleted the
    set-aside model for good."""
    candidate(0.05)
    (results.MODELS / "unet").rename(results.MODELS / ".unet-retired")
    before = {path.name: path.read_bytes() for path in (results.MODELS / ".unet-retired").iterdir()}
    with pytest.raises(ValueError, match="interrupted --ship set aside"):
        results.ship("unet-bf16-fold2", real_data)
    assert sorted(path.name for path in results.MODELS.iterdir() if path.name != ".lgg-lock") == [".unet-retired"]
    assert {path.name: path.read_bytes() for path in (results.MODELS / ".unet-retired").iterdir()} == before


def test_a_model_file_over_the_size_limit_is_not_shipped(scratch, real_data, monkeypatch):
    candidate(0.05)
    monkeypatch.setattr(results, "MAX_MEGABYTES", 7)  # the shipped U-Net's weights are 7.8 MB
    before = {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()}
    with pytest.raises(ValueError, match=r"results-unet-bf16-fold2/model.h5 holds 7.8 MB of weights; .* under 7 MB"):
        results.check_shippable("unet-bf16-fold2", real_data)  # refused at the door, before anything is built
    monkeypatch.setattr(results, "weights_megabytes", lambda path: 6.0)  # the door passed: the saved file is checked
    with pytest.raises(ValueError, match=r"results-unet-bf16-fold2/model.h5 holds 8.0 MB of weights"):
        results.ship("unet-bf16-fold2", real_data)
    assert {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()} == before
    assert sorted(path.name for path in results.MODELS.iterdir() if path.name != ".lgg-lock") == ["unet"]


@pytest.mark.slow
def test_a_better_recipe_replaces_the_shipped_model_measured_on_its_test_patients(scratch, real_data):
    candidate(0.02)
    card = results.ship("unet-bf16-fold2", real_data)
    shipped = json.loads((results.MODELS / "unet" / "card.json").read_text())
    assert shipped == json.loads(json.dumps(card)) and shipped["run"] == "unet-bf16-fold2"
    assert shipped["recipe_name"] == "unet-bf16" and shipped["replaced"]["run"] == "unet-fold2"
    paired = shipped["replaced"]["paired"]
    assert paired["cases"] == 88 and paired["mean_difference"] > 0 and paired["same_cpu"] == 0
    # measured on the file: the model shipped today, copied into the run folder, so the figure its own card records
    expected = json.loads((ROOT / "models" / "unet" / "card.json").read_text())["test"]["case_dice_mean"]
    assert shipped["test"]["case_dice_mean"] == pytest.approx(expected, abs=2e-3)
    text = (results.MODELS / "unet" / "MODEL_CARD.md").read_text()
    assert "candidate recipe `unet-bf16`" in text and "unet-fold2 (recipe `unet`, float32)" in text
    assert sorted(path.name for path in results.MODELS.iterdir() if path.name != ".lgg-lock") == ["unet"]
    assert {path.name for path in (results.MODELS / "unet").iterdir()} == {
        "model.h5", "postprocess.json", "split.csv", "card.json", "MODEL_CARD.md"
    }  # fmt: skip
    # the headline's fold 2 may not come back: its recipe is now the worse one
    with pytest.raises(ValueError, match="not better"):
        results.check_shippable("unet-fold2", real_data)


def test_the_model_card_says_how_the_model_was_trained_and_what_it_replaced():
    card = json.loads((ROOT / "models" / "unet" / "card.json").read_text())
    float32 = {**card, "precision": "float32", "recipe_name": "unet"}
    float32.pop("replaced", None)
    text = results.model_card(float32)
    assert card["sha256"] in text and "trained in float32 |" in text and "bfloat16" not in text
    replacement = {
        **card,
        "precision": "mixed_bfloat16",
        "recipe_name": "unet-bf16",
        "replaced": {
            "run": "unet-fold2", "recipe": "unet", "precision": "float32",
            "cross_validation": {"case_dice_mean": 0.775, "cases": 88},
            "paired": {"cases": 88, "mean_difference": 0.02, "mean_difference_ci95": [0.004, 0.04], "better": 50,
                       "worse": 37, "wilcoxon_p": 0.03, "same_cpu": 0, "cpu_recorded_in_both": 0},
        },
    }  # fmt: skip
    text = results.model_card(replacement)
    assert "trained in mixed_bfloat16 (bfloat16 arithmetic, float32 weights); the exported model computes in" in text
    assert "candidate recipe `unet-bf16`" in text
    assert "unet-fold2 (recipe `unet`, float32), whose recipe scored 0.775 pooled over 88 patients" in text
    assert "difference +0.020 (95 % interval +0.004 to +0.040), 50 better / 37 worse" in text


def test_the_classifier_pools_its_folds_each_patient_once(tmp_path, monkeypatch):
    """From the committed fold-1 row (22 real patients): one fold alone is not pooled, and a stale pooled file goes;
    a second fold of other patients (the same slices under other names, so the pooled AUC is the fold's) is pooled;
    a patient in two folds is refused."""
    out = tmp_path / "results"
    monkeypatch.setattr(results, "RESULTS", out)
    row = json.loads((ROOT / "results" / "classifier.json").read_text())
    table = pd.read_csv(ROOT / "results" / "classifier" / "test.csv")
    for name, cases in (("classifier", table.case_id), ("classifier-fold2", "OTHER_" + table.case_id)):
        (out / name).mkdir(parents=True)
        table.assign(case_id=cases).to_csv(out / name / "test.csv", index=False)
    first = {**row, "name": "classifier"}
    second = {**row, "name": "classifier-fold2", "split": "patient-fold-2-of-5"}
    assert results.classifier_cross_validation([first]) is None
    assert not (out / "classifier-cross-validation.json").exists()
    pooled = results.classifier_cross_validation([first, second])
    assert (pooled["cases"], pooled["slices"]) == (44, 1640)
    assert pooled["roc_auc"] == pytest.approx(row["test"]["roc_auc"], abs=1e-12)
    assert pooled["roc_auc_ci95"][0] < pooled["roc_auc"] < pooled["roc_auc_ci95"][1]
    assert json.loads((out / "classifier-cross-validation.json").read_text()) == pooled
    assert len(pd.read_csv(out / "classifier-cross-validation.csv")) == 1640
    text = results.classifier_cross_validation_text(pooled)
    assert "2 of 5 folds run: 44 of the 88 patients" in text and f"{row['test']['roc_auc']:.3f}" in text
    table.to_csv(out / "classifier-fold2" / "test.csv", index=False)  # fold 2 tests fold 1's patients
    twice = "22 patients are tested by two folds, TCGA_.* by results/classifier/test.csv and results/classifier-fold2/"
    with pytest.raises(ValueError, match=twice):
        results.classifier_cross_validation([first, second])


def test_two_runs_on_cpus_of_the_same_name_but_another_generation_are_not_the_same_cpu():
    """An "AMD EPYC" with the same flags names Zen 4 and Zen 5 alike: where both runs recorded the family / model /
    stepping, a difference there makes the pair "different CPUs"; runs recorded before it compare as before."""
    flags = {"avx512f": True, "avx512_bf16": True, "amx_bf16": False}
    zen5 = {"cpu_model": "AMD EPYC", "cpu_flags": flags, "cpu_id": {"vendor_id": "AuthenticAMD", "cpu family": "26"}}
    zen4 = {**zen5, "cpu_id": {"vendor_id": "AuthenticAMD", "cpu family": "25"}}
    older = {key: value for key, value in zen5.items() if key != "cpu_id"}

    def run(environment):
        return {"environment": environment}

    assert results._same_cpu(run(zen5), run(dict(zen5))) is True
    assert results._same_cpu(run(zen5), run(zen4)) is False
    assert results._same_cpu(run(zen5), run(older)) is True
    assert results._same_cpu(run(zen5), run({**older, "cpu_flags": {**flags, "amx_bf16": True}})) is False
    assert results._same_cpu(run(zen5), run({"cpu_model": None})) is None


def test_training_a_row_keeps_a_finished_run_and_continues_an_interrupted_one(monkeypatch, tmp_path, capsys):
    """`make results` / `--models NAME` once replaced every finished run folder (an hour of CPU each) without
    being asked: now a scored run is kept, an interrupted one resumes, an exported but unscored one is scored,
    one stopped before its first saved epoch starts again, and only --retrain trains a kept run again."""
    import lgg.evaluate
    import lgg.train

    calls = []
    monkeypatch.setattr(lgg.train, "train_run", lambda config, data, out, **kw: calls.append((out, kw)))
    monkeypatch.setattr(lgg.evaluate, "evaluate_model_file", lambda model, data, **kw: calls.append((model, kw)))
    monkeypatch.setattr(results, "RUNS", tmp_path)
    run_dir = tmp_path / "results-unet-fold3"
    run_dir.mkdir()
    (run_dir / "test_summary.json").write_text("{}")
    results.train("unet-fold3", "data")
    assert calls == [] and "kept" in capsys.readouterr().out
    results.train("unet-fold3", "data", retrain=True)
    assert calls.pop() == (run_dir, {"overwrite": True, "resume": False, "verbose": 2})
    (run_dir / "resume").mkdir()
    (run_dir / "resume" / "state.json").write_text("{}")
    results.train("unet-fold3", "data")
    assert calls.pop() == (run_dir, {"overwrite": False, "resume": True, "verbose": 2})
    (run_dir / "resume" / "state.json").unlink()
    (run_dir / "test_summary.json").unlink()
    (run_dir / "model.h5").write_text("weights")
    results.train("unet-fold3", "data")  # exported, not scored: scored, not trained again
    assert calls.pop() == (run_dir / "model.h5", {"tune": True}) and calls == []
    (run_dir / "model.h5").unlink()
    results.train("unet-fold3", "data")  # config.json, no epoch saved: starts again over its own folder
    assert calls.pop() == (run_dir, {"overwrite": True, "resume": False, "verbose": 2})
    results.train("unet-fold4", "data")  # no folder yet: trains
    assert calls.pop() == (tmp_path / "results-unet-fold4", {"overwrite": False, "resume": False, "verbose": 2})
    with pytest.raises(SystemExit):
        results.main(["--collect-only", "--retrain"])
    monkeypatch.setattr(results, "MODELS", tmp_path / "models")  # --ship takes models/.lgg-lock: not the checkout's
    with pytest.raises(SystemExit, match="error: bogus is not a fold row of a cross-validated recipe"):
        results.main(["--ship", "bogus"])  # a refusal in words, not a traceback
    monkeypatch.setattr(results, "ship", lambda *args: calls.append(("ship", args)))
    monkeypatch.setattr(results, "refresh_card", lambda: calls.append(("refresh_card",)))
    for given in (["--ship", "unet-aug-flair-bf16-fold2", "--models", "unet"], ["--refresh-card", "--collect-only"],
                  ["--ship", "unet-aug-flair-bf16-fold2", "--refresh-card"]):  # fmt: skip
        with pytest.raises(SystemExit):  # the second would be dropped without a word
            results.main(given)
    with pytest.raises(SystemExit):  # an empty list (`--models "$NAMES"`) is not the nine-hour default
        results.main(["--models", ""])
    for given in (["--models", "unet,unet", "--retrain"], ["--collect-only", "--models", "unet"]):
        with pytest.raises(SystemExit):  # the second run would replace the first; --models would be ignored
            results.main(given)
    assert not calls
    results.main(["--refresh-card"])
    assert calls == [("refresh_card",)]


def test_a_run_folder_of_another_recipe_is_neither_resumed_scored_nor_collected(monkeypatch, tmp_path):
    """A folder under a row's name holding a run of other settings (the recipe edited since, a folder copied
    back under another row's name) was resumed with the row's settings, scored, or collected as that row."""
    import lgg.evaluate
    import lgg.train

    calls = []
    monkeypatch.setattr(lgg.train, "train_run", lambda config, data, out, **kw: calls.append((out, kw)))
    monkeypatch.setattr(lgg.evaluate, "evaluate_model_file", lambda model, data, **kw: calls.append((model, kw)))
    monkeypatch.setattr(results, "RUNS", tmp_path)
    name = "unet-aug-flair-bf16-fold2"
    run_dir = tmp_path / f"results-{name}"
    (run_dir / "resume").mkdir(parents=True)
    settings = dataclasses.asdict(results.CONFIGS[name])
    (run_dir / "config.json").write_text(json.dumps(settings | {"seed": 1}))
    for leave in ("resume/state.json", "model.h5", "test_summary.json"):  # resumed, scored, kept
        (run_dir / leave).write_text("{}")
        with pytest.raises(SystemExit, match=f"has seed 1, the row {name} 0: not a run of this recipe"):
            results.train(name, "data")
        if leave == "resume/state.json":
            (run_dir / leave).unlink()
    with pytest.raises(SystemExit, match="has seed 1"):
        results.collect(name, "data")
    assert calls == []
    results.train(name, "data", retrain=True)  # asked for: trained again over it
    assert calls.pop() == (run_dir, {"overwrite": True, "resume": False, "verbose": 2})
    (run_dir / "config.json").write_text(json.dumps(settings | {"augmentation": "standard"}))
    with pytest.raises(SystemExit, match="has augmentation 'standard'"):
        results.collect(name, "data")
    for other in ({"ema": 0.999}, {"tumor_fraction": 0.7}, {"base_filters": 32}):  # rows that differ in these only
        (run_dir / "config.json").write_text(json.dumps(settings | other))
        with pytest.raises(SystemExit, match=f"has {next(iter(other))} "):
            results.collect(name, "data")
    assert results.recipe_mismatch({k: v for k, v in settings.items() if k != "ema"}, name) is None  # before ema
    for row, config in results.CONFIGS.items():  # every row's own settings are a run of it
        assert results.recipe_mismatch(json.loads(json.dumps(dataclasses.asdict(config))), row) is None, row
    (run_dir / "config.json").write_text(json.dumps(settings))
    (run_dir / "test_summary.json").unlink()
    results.train(name, "data")  # its own recipe: the exported model is scored
    assert calls.pop() == (run_dir / "model.h5", {"tune": True})


def test_a_p_value_near_the_usual_lines_keeps_the_digit_that_tells_which_side():
    assert [results._p_value(p) for p in (0.0004, 0.005, 0.0543, 0.094, 0.1, 0.237)] == [
        "< 0.001",
        "= 0.005",
        "= 0.054",
        "= 0.094",
        "= 0.10",
        "= 0.24",
    ]


def test_a_runs_fit_is_not_scored_on_part_of_its_cases(real_data, tmp_path, monkeypatch):
    """`fit` (the training and validation Dice that `collect` records once in `<run>/fit/`) and the resolution
    ceiling scored the cases `--data` held and said nothing of the rest: the partial figure was kept as the run's."""
    run = tmp_path / "results-unet-aug-flair-bf16-fold2"
    run.mkdir()
    shutil.copy(ROOT / "models" / "unet" / "split.csv", run / "split.csv")
    split = pd.read_csv(run / "split.csv")
    left_out = sorted(set(split.query("split == 'train'").case_id))[0]
    part = data_without(real_data, tmp_path / "part", left_out)
    with pytest.raises(SystemExit, match=f"1 train/val cases of {run / 'split.csv'} are not in {part}: \\['{left_out}"):
        results.fit(run, part)
    assert not (run / "fit").exists()
    # and at the door of --collect-only, before any row is collected: a fold-1 row's finished run not yet fitted
    monkeypatch.setattr(results, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(results, "RESULTS", tmp_path / "results")
    row = tmp_path / "runs" / "results-unet-aug-flair-bf16"
    row.mkdir(parents=True)
    shutil.copy(run / "split.csv", row / "split.csv")
    (row / "config.json").write_text(json.dumps({"split": "patient"}))
    (row / "test_summary.json").write_text("{}")
    with pytest.raises(SystemExit, match=f"1 train/val cases of {row / 'split.csv'} are not in {part}"):
        results.main(["--collect-only", "--data", str(part)])
    assert not (tmp_path / "results").exists() and sorted(p.name for p in row.iterdir()) == [
        "config.json", "split.csv", "test_summary.json"
    ]  # fmt: skip
