"""Data-parallel training (`--distribute`): two workers on this machine train as one process would, the
chief alone writes the run folder, and settings that cannot work are refused before anything is written."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import REPOSITORY

from lgg import data, distribute
from lgg.config import RunConfig
from lgg.distribute import Distribution
from lgg.train import train_run

# a tiny U-Net, two epochs of real slices; "slice" Dice, whose sum splits among replicas as the cross-entropy's does
SETTINGS = dict(max_cases=10, image_size=32, base_filters=4, epochs=2, batch_size=8, dice_loss="slice")
FLAGS = ["--max-cases", "10", "--image-size", "32", "--base-filters", "4", "--epochs", "2", "--batch-size", "8",
         "--dice-loss", "slice"]  # fmt: skip


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("localhost", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def weights_by_path(path):
    model = keras.models.load_model(path, compile=False)
    return model, {variable.path: variable.numpy() for variable in model.weights}


def start_workers(out, log_dir, *extra):
    ports = free_ports(2)
    cluster = {"worker": [f"localhost:{port}" for port in ports]}
    workers = []
    for index in range(2):
        task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "CUDA_VISIBLE_DEVICES": ""}
        environment["TF_CONFIG"] = json.dumps(task)
        command = [sys.executable, "-m", "lgg", "train", "unet", "--data", str(REPOSITORY / "data")]
        command += ["--out", str(out), "--distribute", "multi-worker", *FLAGS, *extra]
        log = open(log_dir / f"worker{index}{''.join(extra)}.log", "w")
        workers.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment))
        log.close()
    return workers


def test_two_workers_on_loopback_train_as_one_process_resume_and_the_chief_alone_writes(real_data, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "runs" / "distributed"
    state = out / "resume"
    logs.mkdir()
    before = set(Path(tempfile.gettempdir()).glob("lgg-worker*"))
    # two epochs, both workers killed once the first epoch's resume state is written, then resumed
    workers = start_workers(out, logs)
    while not (state / "state.json").is_file() and all(worker.poll() is None for worker in workers):
        time.sleep(0.1)
    for worker in workers:
        worker.kill()
        worker.wait()
    assert (state / "state.json").is_file(), (logs / "worker0.log").read_text()[-3000:]
    interrupted_after = json.loads((state / "state.json").read_text())["epoch"]
    for leftover in set(Path(tempfile.gettempdir()).glob("lgg-worker*")) - before:  # a killed worker cannot clean up
        shutil.rmtree(leftover)
    workers = start_workers(out, logs, "--resume")
    for worker in workers:
        worker.wait(timeout=600)
    for index, worker in enumerate(workers):
        assert worker.returncode == 0, (logs / f"worker{index}--resume.log").read_text()[-3000:]
    assert f"Resuming after epoch {interrupted_after + 1}" in (logs / "worker1--resume.log").read_text()
    # the same run in one process, uninterrupted
    train_run(RunConfig(**SETTINGS), real_data.parent, tmp_path / "runs" / "single", verbose=0)

    assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["distributed", "single"]
    assert set(Path(tempfile.gettempdir()).glob("lgg-worker*")) == before  # the other worker's folder is gone
    config = json.loads((out / "config.json").read_text())
    assert config["distribute"] == "multi-worker" and (out / "test_summary.json").is_file()

    one, two = (pd.read_csv(tmp_path / "runs" / name / "history.csv") for name in ("single", "distributed"))
    assert len(two) == len(one) == 2
    assert two["loss"].to_numpy() == pytest.approx(one["loss"].to_numpy(), rel=1e-4)  # the same loss, not N times it
    model, distributed = weights_by_path(out / "model.h5")
    _, single = weights_by_path(tmp_path / "runs" / "single" / "model.h5")
    assert not any(getattr(layer, "synchronized", False) for layer in model.layers)  # exported unsynchronized
    apart, scale = 0.0, 0.0
    for path, value in single.items():
        if path.endswith("moving_variance"):
            # one process normalizes with TensorFlow's fused kernel, whose moving variance is the unbiased one
            # (x n / (n - 1): up to 1.07 on the 2x2 bridge), the synchronized layer keeps the biased one
            np.testing.assert_allclose(distributed[path], value, rtol=0.1, atol=1e-3, err_msg=path)
        else:
            apart, scale = apart + np.sum((distributed[path] - value) ** 2), scale + np.sum(value**2)
    # Adam moves a weight whose gradient is near zero by up to a learning rate per step, whatever the sign of that
    # gradient, so a few weights drift apart with the summation order (a BatchNorm beta by 9 % of its size): the
    # weights as a whole stay within 2 % (measured 0.5 %), and the two models compute the same probabilities
    assert np.sqrt(apart / scale) < 0.02
    slices = data.split_table(data.find_slices(real_data, max_cases=SETTINGS["max_cases"]))
    images, _ = data.load_arrays(slices[slices.split == "val"], SETTINGS["image_size"])
    single_model = keras.models.load_model(tmp_path / "runs" / "single" / "model.h5", compile=False)
    np.testing.assert_allclose(model.predict(images, verbose=0), single_model.predict(images, verbose=0), atol=1e-2)


def test_mirrored_trains_exports_and_records_on_this_machine(real_data, tmp_path):
    run_dir = train_run(RunConfig(**SETTINGS, distribute="mirrored"), real_data.parent, tmp_path / "run", verbose=0)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["distribute"] == "mirrored"
    model = keras.models.load_model(run_dir / "model.h5", compile=False)
    assert not any(getattr(layer, "synchronized", False) for layer in model.layers)
    images = np.zeros((2, 32, 32, 3), np.float32)
    assert model.predict(images, verbose=0).shape == (2, 32, 32, 1)


def test_multi_worker_without_a_cluster_is_refused_before_anything_is_written(real_data, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        train_run(RunConfig(**SETTINGS, distribute="multi-worker"), real_data.parent, tmp_path / "run")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not a TensorFlow cluster description"):
        Distribution("multi-worker")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="distribute must be one of"):
        RunConfig(distribute="horovod")


def test_a_keras_the_fix_was_not_checked_with_is_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(ValueError, match="keras-team/keras#20585"):
        distribute._check_patchable()


def test_the_global_batch_and_the_validation_batches_divide_among_the_replicas(monkeypatch):
    monkeypatch.setattr(Distribution, "replicas", property(lambda self: 2))
    two = Distribution()
    two.name = "mirrored"
    with pytest.raises(ValueError, match="global batch"):
        two.check_batch(15)
    two.check_batch(16)
    # 25 slices: batches of 8, 6, 4 or 2 leave one slice (one replica's share empty); 10 leaves 5
    assert two.evaluation_batch_size(25, 8) == 10
    assert two.evaluation_batch_size(17, 16) == 14  # 16 leaves 1, 14 leaves 3
    assert two.evaluation_batch_size(294, 16) == 16  # leaves 6
    for count in range(2, 300):
        size = two.evaluation_batch_size(count, 16)
        assert size % 2 == 0 and (count % size == 0 or count % size >= 2), count
    with pytest.raises(ValueError, match="cannot be shared"):
        two.evaluation_batch_size(1, 16)
