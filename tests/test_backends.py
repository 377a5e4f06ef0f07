"""One training path on every Keras backend: `python -m lgg train` on PyTorch, with TensorFlow made
unimportable (as on a GPU machine with PyTorch only), and its exported model used under TensorFlow."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# TensorFlow is not found, as where it is not installed: the path finder is wrapped so that it finds no
# `tensorflow` (a None in sys.modules would make Keras believe TensorFlow is loaded; a finder that raises
# would break PyTorch's own probing of optional modules)
NO_TENSORFLOW = """
import sys
from importlib.machinery import PathFinder
class WithoutTensorFlow(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split(".")[0] == "tensorflow" else PathFinder.find_spec(name, path, target)
sys.meta_path[:] = [WithoutTensorFlow if finder is PathFinder else finder for finder in sys.meta_path]
"""
TRAIN = NO_TENSORFLOW + "import runpy; runpy.run_module('lgg', run_name='__main__', alter_sys=True)"
PREDICT = (
    NO_TENSORFLOW
    + """
import keras, numpy as np
assert "tensorflow" not in sys.modules
model = keras.saving.load_model(sys.argv[1], compile=False)
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""
)


def run_torch(arguments, tmp_path):
    environment = {**os.environ, "KERAS_BACKEND": "torch", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_train_on_the_torch_backend_and_load_under_tensorflow(real_data, tmp_path):
    if subprocess.run([sys.executable, "-c", "import torch"], capture_output=True).returncode:
        pytest.fail("torch is not installed: pip install -r requirements-dev.txt (make setup-dev)")
    run_dir = tmp_path / "run"
    train = ["-c", TRAIN, "train", "unet", "--data", str(real_data.parent), "--out", str(run_dir)]
    train += ["--max-cases", "6", "--epochs", "2", "--image-size", "32", "--base-filters", "4", "--batch-size", "8"]
    train += ["--ema", "0.9"]  # the averaged weights swapped in and out through Keras' non-TensorFlow path
    run_torch(train, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["environment"]["keras_backend"] == "torch" and config["environment"]["torch"]
    assert config["precision_used"] == "float32"  # bfloat16 is chosen only for TensorFlow's oneDNN kernels
    assert config["ema"] == 0.9
    history = (run_dir / "history.csv").read_text().splitlines()
    assert len(history) == 3, "two epochs on the torch backend"
    assert json.loads((run_dir / "test_summary.json").read_text())["cases"] >= 1

    from lgg import data, evaluate

    slices = data.find_slices(real_data.parent, max_cases=6)
    images = data.load_arrays(slices.head(12), 32, with_masks=False).astype(np.float32)
    np.save(tmp_path / "images.npy", images)
    run_torch(["-c", PREDICT, str(run_dir / "model.keras"), str(tmp_path / "images.npy"), str(tmp_path / "torch.npy")],
              tmp_path)  # fmt: skip
    under_torch = np.load(tmp_path / "torch.npy")
    for name in ("model.h5", "model.keras"):  # this process runs Keras on TensorFlow
        under_tensorflow = evaluate.load_model(run_dir / name).predict(images, verbose=0)
        np.testing.assert_allclose(under_tensorflow, under_torch, atol=1e-4, err_msg=name)
