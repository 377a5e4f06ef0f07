"""The callbacks `lgg.train.fit` adds to Keras' own: a time limit and the training time in the logs,
the averaged weights in the model between epochs, an atomic best-weights checkpoint, per-case
validation Dice, a cosine learning rate over a time budget, weights kept after N minutes, a NaN
stop that says where, and a resume state that a kill cannot corrupt."""

import contextlib
import json
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from lgg import metrics
from lgg.files import atomic_path, save_csv, save_json


class ElapsedTime(keras.callbacks.Callback):
    """Adds `elapsed_s` (training time so far) to each epoch's logs and stops after `max_minutes`.

    `agree`: makes the workers of a multi-worker run agree on one elapsed time (`lgg.distribute`),
    so that they set the same learning rate and stop after the same epoch."""

    def __init__(self, max_minutes=None, already_elapsed_s=0.0, agree=None):
        super().__init__()
        self.max_minutes = max_minutes
        self.already_elapsed_s = already_elapsed_s
        self.agree = agree

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter() - self.already_elapsed_s

    def elapsed_s(self):
        elapsed = time.perf_counter() - self.start
        return self.agree(elapsed) if self.agree else elapsed

    def on_epoch_end(self, epoch, logs=None):
        elapsed = self.elapsed_s()
        if logs is not None:
            logs["elapsed_s"] = elapsed
        if self.max_minutes is not None and elapsed >= 60 * self.max_minutes:
            print(f"\nStopping: time limit of {self.max_minutes} minutes reached after epoch {epoch + 1}.")
            self.model.stop_training = True


class StepTimer(keras.callbacks.Callback):
    """Steady-state training throughput of the real `fit`: adds `train_slices_per_s` to each epoch's logs.

    It times the interval between the ends of consecutive training steps, so each interval holds one
    whole step of the loop (drawing the batch, the step, Keras' bookkeeping) and nothing else: the
    first step of an epoch (which starts the input pipeline, and in the first epoch compiles the
    step) and the validation after the last step are left out, as are `skip` more intervals at the
    start of each epoch (batches prefetched while the step compiled arrive without waiting). The one
    definition of training throughput used by `train` (history.csv) and `benchmarks/bench.py`.
    """

    def __init__(self, batch_size, skip=2):
        super().__init__()
        self.batch_size, self.skip = batch_size, skip
        self.ends = []

    def on_epoch_begin(self, epoch, logs=None):
        self.ends = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())

    def step_seconds(self):
        """Seconds of each steady-state step of the current (or last) epoch."""
        return np.diff(self.ends)[self.skip :]

    def slices_per_s(self):
        seconds = self.step_seconds()
        return self.batch_size * len(seconds) / seconds.sum() if len(seconds) else float("nan")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["train_slices_per_s"] = self.slices_per_s()


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Keras' `SwapEMAWeights(swap_on_epoch=True)`, for an optimizer with `use_ema`: from the end of each epoch
    to the start of the next the model holds the moving average of its weights, so the validation, the
    best-weights checkpoint, the snapshots and the resume state all see the average. Put it before them.

    The resume state (`ResumeCheckpoint`, after it) therefore holds the average as the model's weights and
    the trained weights as the optimizer's average; `resumed()` tells this callback so, and the next epoch
    starts by swapping them back.

    Keras averages the trainable weights only: batch normalization's moving statistics are those of the
    trained weights, and the average starts at the first step's weights, without a warm-up (after n steps
    they still weigh `momentum ** n`; `young_average` says when that is more than 1 %).
    """

    def __init__(self):
        super().__init__(swap_on_epoch=True)

    def resumed(self):
        self._ema_weights_in_model = True


def young_average(model):
    """A warning when the optimizer's moving average of the weights still holds more than 1 % of the first
    step's weights (Keras starts the average there: `momentum ** steps` of it remains), else None."""
    optimizer = model.optimizer
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    left = optimizer.ema_momentum**steps
    if left <= 0.01:
        return None
    return (
        f"Warning: after {steps} steps the averaged weights still hold {left:.0%} of the first step's weights "
        f"(--ema {optimizer.ema_momentum:g} averages about the last {1 / (1 - optimizer.ema_momentum):.0f} steps): "
        "train longer or choose a smaller momentum"
    )


class BestWeightsCheckpoint(keras.callbacks.Callback):
    """Save the weights of the best epoch so far (by `monitor`, higher is better), atomically."""

    def __init__(self, path, monitor):
        super().__init__()
        self.path, self.monitor, self.best = Path(path), monitor, -np.inf

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and np.isfinite(value) and value > self.best:
            self.best = float(value)
            with atomic_path(self.path) as temporary:
                self.model.save_weights(temporary)


class CaseDiceValidation(keras.callbacks.Callback):
    """Adds `val_case_dice` to each epoch's logs: mean per-case volume Dice (threshold 0.5) on the
    validation cases at the training resolution, the figure the results table reports.

    The smoothed batch Dice Keras logs (`val_dice_coefficient`) also counts faint probability on
    tumor-free slices and the batch composition; choosing the best epoch on per-case Dice selects
    for what is reported.
    """

    def __init__(self, images, masks, case_ids, batch_size=32):
        super().__init__()
        self.images, self.masks, self.case_ids = images.astype(np.float32), masks, np.asarray(case_ids)
        self.batch_size = batch_size

    def on_epoch_end(self, epoch, logs=None):
        probabilities = self.model.predict(self.images, batch_size=self.batch_size, verbose=0)
        cases = pd.DataFrame({"case_id": self.case_ids})
        _, summary = metrics.segmentation_report(cases, self.masks, probabilities)
        if logs is not None:
            logs["val_case_dice"] = summary["case_dice_mean"]


class TimeCosineSchedule(keras.callbacks.Callback):
    """Cosine learning-rate decay over a time budget: at the start of each epoch the rate is
    `initial * (floor + (1 - floor) * (1 + cos(pi * t)) / 2)`, `t` the share of `max_minutes`
    used so far. A run with a time limit then ends annealed, whatever the machine's speed."""

    def __init__(self, timer, initial_learning_rate, floor=0.01):
        super().__init__()
        self.timer, self.initial, self.floor = timer, initial_learning_rate, floor

    def on_epoch_begin(self, epoch, logs=None):
        used = min(1.0, self.timer.elapsed_s() / (60 * self.timer.max_minutes))
        self.rate = self.initial * (self.floor + (1 - self.floor) * (1 + np.cos(np.pi * used)) / 2)
        self.model.optimizer.learning_rate.assign(self.rate)

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = self.rate


class TimeSnapshots(keras.callbacks.Callback):
    """Save the weights at the first epoch end past each of `minutes` (e.g. 15, 30, 60) as
    `snapshots/after-<m>min.weights.h5`, and the epoch and minutes in `snapshots/snapshots.csv`,
    so a run reports what the model could do after a quarter, half and all of its time."""

    def __init__(self, directory, minutes):
        super().__init__()
        self.directory, self.minutes = Path(directory), sorted(minutes)

    def _table(self):
        path = self.directory / "snapshots.csv"
        if path.is_file():
            return pd.read_csv(path)
        return pd.DataFrame(columns=["minutes", "epoch", "elapsed_min", "file"])

    def on_epoch_end(self, epoch, logs=None):
        elapsed_min = (logs or {}).get("elapsed_s", 0) / 60
        table = self._table()
        for mark in self.minutes:
            if elapsed_min >= mark and mark not in set(table["minutes"]):
                self.directory.mkdir(parents=True, exist_ok=True)
                name = f"after-{mark:g}min.weights.h5"
                with atomic_path(self.directory / name) as temporary:
                    self.model.save_weights(temporary)
                row = {"minutes": mark, "epoch": epoch, "elapsed_min": round(elapsed_min, 2), "file": name}
                table = pd.concat([table, pd.DataFrame([row])], ignore_index=True)
                save_csv(table, self.directory / "snapshots.csv")


class StopOnNaN(keras.callbacks.TerminateOnNaN):
    """`TerminateOnNaN` that says in which epoch and batch the loss diverged."""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(loss):
            print(
                f"\nStopping: the loss became {loss} in epoch {self.epoch + 1}, batch {batch + 1}; "
                "the best weights so far are kept."
            )
            self.model.stop_training = True


class ResumeCheckpoint(keras.callbacks.Callback):
    """After each epoch, keep what continuing the run needs: weights, optimizer state (moments,
    step count, learning rate), the epoch, the training time so far, and the counters of the
    early-stopping, plateau and best-weights callbacks.

    Each epoch's state goes into a new folder `resume/epoch-<n>/`; only then is
    `resume/state.json` switched to it (atomically), so a kill at any moment leaves one complete
    state. (Keras' `BackupAndRestore` writes its checkpoint in place, and a kill while it writes
    leaves a file that cannot be read.)
    """

    COUNTERS = {
        "EarlyStopping": ("wait", "best", "stopped_epoch"),
        "ReduceLROnPlateau": ("wait", "best", "cooldown_counter"),
        "BestWeightsCheckpoint": ("best",),
    }

    def __init__(self, directory, callbacks):
        super().__init__()
        self.directory, self.callbacks, self.restored = Path(directory), callbacks, None

    def _counters(self):
        return {
            type(callback).__name__: {name: float(getattr(callback, name)) for name in names}
            for callback in self.callbacks
            if (names := self.COUNTERS.get(type(callback).__name__))
        }

    def on_epoch_end(self, epoch, logs=None):
        folder = self.directory / f"epoch-{epoch}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        self.model.save_weights(folder / "model.weights.h5")
        np.savez(folder / "optimizer.npz", *[variable.numpy() for variable in self.model.optimizer.variables])
        state = {
            "epoch": epoch,
            "elapsed_s": (logs or {}).get("elapsed_s", 0.0),
            "folder": folder.name,
            "callbacks": self._counters(),
        }
        save_json(state, self.directory / "state.json")
        for old in self.directory.glob("epoch-*"):
            if old != folder:
                shutil.rmtree(old)

    @staticmethod
    def next_epoch(directory):
        """The epoch a resumed run starts at: one past the last saved state in `directory`, or 0."""
        state_path = Path(directory) / "state.json"
        return json.loads(state_path.read_text())["epoch"] + 1 if state_path.exists() else 0

    def restore(self, model):
        """Load the last complete state into `model` (compiled); return it, or None if there is none."""
        state_path = self.directory / "state.json"
        if not state_path.exists():
            return None
        state = json.loads(state_path.read_text())
        folder = self.directory / state["folder"]
        strategy = getattr(model, "_distribute_strategy", None)  # a model built under tf.distribute (lgg.distribute)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            model.load_weights(folder / "model.weights.h5")
            model.optimizer.build(model.trainable_variables)
            with np.load(folder / "optimizer.npz") as saved:
                values = [saved[f"arr_{index}"] for index in range(len(saved.files))]
            if len(values) != len(model.optimizer.variables):
                raise ValueError(
                    f"{folder}: optimizer state of another model or another --ema setting ({len(values)} variables)"
                )
            for variable, value in zip(model.optimizer.variables, values):
                variable.assign(value)
        self.restored = state
        return state

    def on_train_begin(self, logs=None):
        # runs after the other callbacks' on_train_begin, which reset their counters
        for callback in self.callbacks:
            for name, value in (self.restored or {}).get("callbacks", {}).get(type(callback).__name__, {}).items():
                setattr(callback, name, int(value) if name != "best" else value)

    def on_train_end(self, logs=None):
        # The state outlives `fit`: `lgg.train.export_model` removes it once the model is written, so that a run
        # whose export failed (a full disk) resumes instead of training again; `fit_done` tells the resumed run
        # that training itself had ended (no further epoch: a time limit or early stop is checked after one)
        state_path = self.directory / "state.json"
        if state_path.is_file():
            save_json({**json.loads(state_path.read_text()), "fit_done": True}, state_path)
