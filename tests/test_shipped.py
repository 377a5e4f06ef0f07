"""The shipped model (`models/unet/`): the file its card describes, the `.h5` contract, and the test
figure its card reports, measured again on its own test patients."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lgg import evaluate, predict

FOLDER = Path(__file__).resolve().parents[1] / "models" / "unet"


@pytest.fixture(scope="module")
def card():
    return json.loads((FOLDER / "card.json").read_text())


def test_the_file_is_the_one_the_card_describes(card):
    model = FOLDER / "model.h5"
    assert predict.SHIPPED_MODEL == model and model.is_file()
    assert hashlib.sha256(model.read_bytes()).hexdigest() == card["sha256"]
    assert model.stat().st_size < 50e6
    assert card["sha256"] in (FOLDER / "MODEL_CARD.md").read_text()
    assert {"postprocess.json", "split.csv"} <= {path.name for path in FOLDER.iterdir()}


def test_it_keeps_the_h5_contract_in_a_process_without_the_package(card, tmp_path):
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        model = keras.models.load_model({str(FOLDER / "model.h5")!r}, compile=False)
        size = model.input_shape[1]
        x = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype("float32")
        y = model.predict(x, verbose=0)
        assert model.input_shape == (None, size, size, 3) and y.shape == (2, size, size, 1), y.shape
        assert 0 <= y.min() and y.max() <= 1
        assert not any(name == "lgg" or name.startswith("lgg.") for name in sys.modules)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)


@pytest.mark.slow
def test_it_scores_what_its_card_says_on_its_own_test_patients(card, real_data, tmp_path):
    summary = evaluate.evaluate_model_file(FOLDER / "model.h5", real_data, out_dir=tmp_path)
    # the same model on the same cases; only the CPU's rounding differs
    assert summary["cases"] == card["test"]["cases"]
    assert summary["case_dice_mean"] == pytest.approx(card["test"]["case_dice_mean"], abs=2e-3)


@pytest.mark.slow
def test_predict_uses_it_when_no_model_is_given(real_data, tmp_path):
    split = pd.read_csv(FOLDER / "split.csv")
    case_id = split[split.split == "test"].case_id.iloc[0]
    result = subprocess.run(
        [sys.executable, "-m", "lgg", "predict", "--out", tmp_path / "out", real_data / case_id],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "shipped" in result.stdout
    predicted = sorted((tmp_path / "out" / case_id).glob("*_pred.tif"))
    assert len(predicted) == len(list((real_data / case_id).glob("*_mask.tif")))
    assert np.isfinite(pd.read_csv(tmp_path / "out" / "cases.csv").mean_probability_in_mask).all()
