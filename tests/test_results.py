"""`benchmarks/results.py`: a recipe's cross-validation pools every patient once, and the shipped model is
replaced only by the fixed fold of a recipe measured better over as many patients, refused before anything
is written. Built from the committed results (the headline's five folds, 88 real cases)."""

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402


@pytest.fixture
def committed(tmp_path, monkeypatch):
    """The committed results and shipped card in a scratch copy, so that nothing in the repository is touched;
    the headline's five fold rows also stand as the five rows of the candidate `unet-bf16`."""
    out, models = tmp_path / "results", tmp_path / "models"
    rows = {}
    for fold, name in zip(results.fold_rows("unet"), results.fold_rows("unet-bf16"), strict=True):
        row = json.loads((ROOT / "results" / f"{fold}.json").read_text())
        rows[fold], rows[name] = row, {**row, "name": name}
        for label in (fold, name):
            (out / label).mkdir(parents=True)
            shutil.copy(ROOT / "results" / fold / "test.csv", out / label / "test.csv")
            (out / f"{label}.json").write_text(json.dumps({**row, "name": label}))
    shutil.copytree(ROOT / "models" / "unet", models / "unet")
    # the shipped card as the headline recipe's fold 2 (whichever recipe ships today)
    headline = json.loads((ROOT / "results" / "unet-cross-validation.json").read_text())
    card = json.loads((models / "unet" / "card.json").read_text())
    card.update(run="unet-fold2", recipe_name="unet")
    card["cross_validation"] = {key: headline[key] for key in results.CARD_POOLED_KEYS}
    (models / "unet" / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(results, "RESULTS", out)
    monkeypatch.setattr(results, "MODELS", models)
    monkeypatch.setattr(results, "RUNS", tmp_path / "runs")
    return rows


def test_a_recipe_pools_its_five_folds_each_patient_once(committed):
    headline = results.cross_validation([committed[name] for name in results.fold_rows("unet")])
    assert headline["cases"] == 88 and headline["recipe"] == "unet"
    assert headline["case_dice_mean"] == pytest.approx(
        json.loads((ROOT / "results" / "unet-cross-validation.json").read_text())["case_dice_mean"], abs=1e-9
    )
    candidate_rows = [committed[name] for name in results.fold_rows("unet-bf16")]
    # a candidate is pooled only with all five folds: four would be a mean over another set of patients
    assert results.cross_validation(candidate_rows[:4], "unet-bf16") is None
    assert not (results.RESULTS / "unet-bf16-cross-validation.json").exists()
    pooled = results.cross_validation(candidate_rows, "unet-bf16")
    assert pooled["folds"] == list(results.fold_rows("unet-bf16")) and pooled["cases"] == 88
    assert pooled["case_dice_mean"] == pytest.approx(headline["case_dice_mean"], abs=1e-12)
    assert json.loads((results.RESULTS / "unet-bf16-cross-validation.json").read_text()) == pooled
    text = results.cross_validation_text(pooled)
    assert "candidate recipe `unet-bf16`" in text and "results/unet-bf16-cross-validation.csv" in text
    # a case tested by two folds is refused, not counted twice
    shutil.copy(results.RESULTS / "unet-bf16" / "test.csv", results.RESULTS / "unet-bf16-fold5" / "test.csv")
    with pytest.raises(ValueError, match="tested by two folds"):
        results.cross_validation(candidate_rows, "unet-bf16")


def _pooled(mean, cases=88):
    folds = list(results.fold_rows("unet-bf16"))
    return {"recipe": "unet-bf16", "folds": folds, "cases": cases, "case_dice_mean": mean}


@pytest.mark.parametrize(
    ("name", "pooled", "refusal"),
    [
        ("unet-tversky-fold2", None, "not a fold of a cross-validated recipe"),
        ("resnet50-unet", None, "not a fold of a cross-validated recipe"),
        ("unet-bf16-fold2", _pooled(0.770), "not better, not replaced"),  # the headline: 0.775
        ("unet-bf16-fold2", _pooled(0.900, cases=54), "not better, not replaced"),  # fewer patients
        ("unet-bf16-fold3", _pooled(0.900), "the shipped fold is patient-fold-2-of-5"),  # no picking the best fold
    ],
)
def test_shipping_refuses_before_anything_is_written(committed, name, pooled, refusal):
    if pooled is not None:
        (results.RESULTS / "unet-bf16-cross-validation.json").write_text(json.dumps(pooled))
    before = {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()}
    with pytest.raises(ValueError, match=refusal):
        results.ship(name, ROOT / "data")  # refused before the run folder or the data are read
    assert {path: path.read_bytes() for path in (results.MODELS / "unet").iterdir()} == before
    assert sorted(path.name for path in results.MODELS.iterdir()) == ["unet"]  # no staging folder left


def test_a_better_recipe_over_the_same_patients_may_replace_the_shipped_model(committed):
    (results.RESULTS / "unet-bf16-cross-validation.json").write_text(json.dumps(_pooled(0.800)))
    result, pooled, shipped = results.check_shippable("unet-bf16-fold2")
    assert result["split"] == results.SHIPPED_SPLIT and pooled["case_dice_mean"] == 0.800
    assert shipped["run"] == "unet-fold2"
    # the shipped run itself may always be shipped again (its card brought up to date)
    results.cross_validation([committed[name] for name in results.fold_rows("unet")])
    assert results.check_shippable("unet-fold2")[2]["run"] == "unet-fold2"
    assert results.recipe_of("unet-bf16-fold2") == "unet-bf16" and results.recipe_of("unet-fold4") == "unet"


def test_the_model_card_says_how_the_model_was_computed_and_what_it_replaced():
    card = json.loads((ROOT / "models" / "unet" / "card.json").read_text())
    text = results.model_card(card)
    assert card["sha256"] in text and "computed in" in text
    assert results.SHIPPED_SPLIT in text
    replacement = {
        **card,
        "precision": "mixed_bfloat16",
        "recipe_name": "unet-bf16",
        "replaced": {"run": "unet-fold2", "cross_validation": {"case_dice_mean": 0.775, "cases": 88}},
        "paired_with_headline": {
            "cases": 88, "mean_difference": 0.02, "mean_difference_ci95": [0.004, 0.04], "better": 50, "worse": 37,
            "wilcoxon_p": 0.03,
        },
    }  # fmt: skip
    text = results.model_card(replacement)
    assert "computed in mixed_bfloat16 (weights kept and exported in float32)" in text
    assert "unet-fold2, whose recipe scored 0.775 pooled over 88 patients" in text
    assert "difference +0.020 (95 % interval +0.004 to +0.040), 50 better / 37 worse" in text
