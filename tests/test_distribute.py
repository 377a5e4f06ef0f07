"""Data-parallel training (`--distribute`): two workers on loopback and two replicas on two logical CPUs train
as one process would, the chief alone writes the run folder, a killed run resumes, and settings that cannot
work are refused before anything is written."""

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
from lgg.distribute import Distribution, empty_share
from lgg.train import train_run

# a tiny U-Net, two epochs of real slices; "slice" Dice, whose sum splits among replicas as the cross-entropy's does
# the reference in float32, as several replicas train by default (one process on a CPU with AVX-512 BF16: bfloat16)
# jit_compile pinned off as the distributed runs compute (`Distribution` refuses XLA with 2 replicas): left to
# `xla_by_default`, a CPU without AVX-512 would train the reference with XLA, rounding otherwise than they do
SETTINGS = dict(max_cases=10, image_size=32, base_filters=4, epochs=2, batch_size=8, dice_loss="slice",
                precision="float32", jit_compile=False)  # fmt: skip
FLAGS = ["--max-cases", "10", "--image-size", "32", "--base-filters", "4", "--epochs", "2", "--batch-size", "8",
         "--dice-loss", "slice"]  # fmt: skip
# `python -m lgg` with this CPU split into two logical devices, each a replica of --distribute mirrored
TWO_CPU_REPLICAS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
mirrored = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda: mirrored(["/cpu:0", "/cpu:1"])
from lgg.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("localhost", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


def environment(**extra):
    return {**os.environ, "PYTHONPATH": str(REPOSITORY), "CUDA_VISIBLE_DEVICES": "", **extra}


def train_command(out, *extra):
    return ["train", "unet", "--data", str(REPOSITORY / "data"), "--out", str(out), *FLAGS, *extra]


def start_workers(out, log_dir, *extra):
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        task = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        command = [sys.executable, "-m", "lgg", *train_command(out, "--distribute", "multi-worker", *extra)]
        with open(log_dir / f"worker{index}{''.join(extra)}.log", "w") as log:
            started = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment(TF_CONFIG=task))
        workers.append(started)
    return workers


def finish(workers, logs, timeout=600):
    try:
        for worker in workers:
            worker.wait(timeout=timeout)
    finally:
        for worker in workers:  # none left behind, whatever failed
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    for worker, log in zip(workers, logs):
        assert worker.returncode == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def single(real_data, tmp_path_factory):
    """The reference: the same settings in one process, uninterrupted."""
    return train_run(RunConfig(**SETTINGS), real_data.parent, tmp_path_factory.mktemp("single") / "run", verbose=0)


def assert_trains_as_one_process(run_dir, single, real_data):
    one, two = (pd.read_csv(folder / "history.csv") for folder in (single, run_dir))
    assert len(two) == len(one) == 2
    assert two["loss"].to_numpy() == pytest.approx(one["loss"].to_numpy(), rel=1e-4)  # the same loss, not N times it
    # the checkpoint is chosen on it: per-case Dice of the validation cases from the distributed predictions
    assert two["val_case_dice"].to_numpy() == pytest.approx(one["val_case_dice"].to_numpy(), abs=0.02)
    model = keras.models.load_model(run_dir / "model.h5", compile=False)
    single_model = keras.models.load_model(single / "model.h5", compile=False)
    assert not any(getattr(layer, "synchronized", False) for layer in model.layers)  # exported unsynchronized
    distributed = {variable.path: variable.numpy() for variable in model.weights}
    apart, scale = 0.0, 0.0
    for variable in single_model.weights:
        value = variable.numpy()
        if variable.path.endswith("moving_variance"):
            # one process normalizes with TensorFlow's fused kernel, whose moving variance is the unbiased one
            # (x n / (n - 1): up to 1.07 on the 2x2 bridge), the synchronized layer keeps the biased one
            np.testing.assert_allclose(distributed[variable.path], value, rtol=0.1, atol=1e-3, err_msg=variable.path)
        else:
            apart, scale = apart + np.sum((distributed[variable.path] - value) ** 2), scale + np.sum(value**2)
    # Adam moves a weight whose gradient is near zero by up to a learning rate per step, whatever the sign of that
    # gradient, so a few weights drift apart with the summation order (a BatchNorm beta by 9 % of its size): the
    # weights as a whole stay within 2 % (measured 0.5 %), and the two models compute the same probabilities
    assert np.sqrt(apart / scale) < 0.02
    slices = data.split_table(data.find_slices(real_data, max_cases=SETTINGS["max_cases"]))
    images, _ = data.load_arrays(slices[slices.split == "val"], SETTINGS["image_size"])
    np.testing.assert_allclose(model.predict(images, verbose=0), single_model.predict(images, verbose=0), atol=1e-2)


def test_two_workers_on_loopback_train_as_one_process_resume_and_the_chief_alone_writes(real_data, single, tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "runs" / "distributed"
    logs.mkdir()
    state = out / "resume" / "state.json"
    before = set(Path(tempfile.gettempdir()).glob("lgg-worker*"))
    # two epochs, both workers killed once the first epoch's resume state is written, then resumed
    workers = start_workers(out, logs)
    deadline = time.monotonic() + 600
    try:
        while not state.is_file() and all(worker.poll() is None for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert state.is_file(), (logs / "worker0.log").read_text()[-3000:]
    interrupted_after = json.loads(state.read_text())["epoch"]
    for leftover in set(Path(tempfile.gettempdir()).glob("lgg-worker*")) - before:  # a killed worker cannot clean up
        shutil.rmtree(leftover)
    finish(start_workers(out, logs, "--resume"), [logs / f"worker{index}--resume.log" for index in range(2)])
    worker_log = (logs / "worker1--resume.log").read_text()
    assert f"Resuming after epoch {interrupted_after + 1}" in worker_log and "the chief writes" in worker_log

    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["distributed"]
    assert set(Path(tempfile.gettempdir()).glob("lgg-worker*")) == before  # the other worker's folder is gone
    config = json.loads((out / "config.json").read_text())
    assert (config["distribute"], config["replicas"], config["jit_compile_used"]) == ("multi-worker", 2, False)
    assert config["precision"] is None and config["precision_used"] == "float32"  # several replicas: float32
    assert (out / "test_summary.json").is_file()
    assert_trains_as_one_process(out, single, real_data)


def test_mirrored_on_two_logical_cpus_trains_as_one_process(real_data, single, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-c", TWO_CPU_REPLICAS, *train_command(out, "--distribute", "mirrored")]
    finished = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    # two replicas: XLA off (it fails under MirroredStrategy in Keras 3.15), BatchNorm synchronized
    assert (config["distribute"], config["replicas"], config["jit_compile_used"]) == ("mirrored", 2, False)
    assert config["precision"] is None and config["precision_used"] == "float32"  # several replicas: float32
    assert_trains_as_one_process(out, single, real_data)


def test_multi_worker_without_a_usable_cluster_is_refused_before_anything_is_written(real_data, tmp_path, monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs TF_CONFIG"):
        train_run(RunConfig(**SETTINGS, distribute="multi-worker"), real_data.parent, tmp_path / "run")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not a TensorFlow cluster description"):
        Distribution("multi-worker")
    evaluator = {"cluster": {"worker": ["a:1", "b:1"], "evaluator": ["c:1"]}, "task": {"type": "evaluator", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(evaluator))
    with pytest.raises(ValueError, match="chief and worker tasks only"):
        Distribution("multi-worker")
    for task, message in ((2, "task index 2 is not one of the 2 worker addresses"), (-1, "task index -1")):
        monkeypatch.setenv(
            "TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": task}})
        )
        with pytest.raises(ValueError, match=message):
            Distribution("multi-worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}))
    with pytest.raises(ValueError, match="must be a list of host:port"):
        Distribution("multi-worker")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="distribute must be one of"):
        RunConfig(distribute="horovod")


def test_the_chief_is_the_chief_task_where_the_cluster_has_one(monkeypatch):
    def task(kind, index, cluster):
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": {"type": kind, "index": index}}))
        return Distribution("multi-worker").is_chief

    workers = {"worker": ["a:1", "b:1"]}
    assert task("worker", 0, workers) and not task("worker", 1, workers)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert task("chief", 0, with_chief) and not task("worker", 0, with_chief)


def test_a_keras_the_fix_was_not_checked_with_is_refused(monkeypatch):
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    with pytest.raises(ValueError, match="keras-team/keras#20585"):
        distribute._check_patchable()


def test_the_global_batch_divides_among_the_replicas_and_xla_is_off_with_several(monkeypatch):
    monkeypatch.setattr(Distribution, "replicas", property(lambda self: 2))
    two = Distribution("mirrored")
    with pytest.raises(ValueError, match="global batch"):
        two.check(15, None)
    with pytest.raises(ValueError, match="XLA fails under tf.distribute"):
        two.check(16, True)
    assert two.check(16, None) is False and two.check(16, False) is False


def test_no_replica_gets_an_empty_share_of_a_validation_batch(monkeypatch):
    # tf.distribute's split of a short last batch, measured on 2-4 logical CPUs: 5 over 4 -> 2, 2, 1, 0;
    # 4 over 3 -> 2, 2, 0; 5 over 2 -> 3, 2
    assert empty_share(5, 4) and empty_share(4, 3) and not empty_share(5, 2) and empty_share(1, 2)
    assert not empty_share(0, 8) and not empty_share(8, 8) and empty_share(9, 8) and empty_share(7, 8)  # 2,2,2,2,1,0..
    for replicas in (2, 3, 4, 8):
        monkeypatch.setattr(Distribution, "replicas", property(lambda self, n=replicas: n))
        several = Distribution("mirrored")
        for count in range(1, 400):
            try:
                size = several.evaluation_batch_size(count, 16)
            except ValueError as error:  # only a handful of slices per replica (8 replicas: up to 49 slices)
                assert count < 50 and "cannot be shared" in str(error), (replicas, count)
                continue
            assert size % replicas == 0 and not empty_share(count % size, replicas), (replicas, count, size)
    monkeypatch.setattr(Distribution, "replicas", property(lambda self: 2))
    assert Distribution("mirrored").evaluation_batch_size(25, 8) == 10  # 8, 6, 4 and 2 leave 1; 10 leaves 5
