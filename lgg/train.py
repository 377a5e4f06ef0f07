"""Training with the standard callbacks, atomic export of models and results, run folders.

A run folder holds: `model.h5` and `model.keras` (best validation epoch), `best.weights.h5`,
`history.csv`, `split.csv`, `config.json` (configuration, seed, library versions), `curves.png`,
and after evaluation `test_cases.csv`, `test_summary.json` and plots. While training, `resume/`
holds the last completed epoch's state for `--resume`; it is removed when training ends.
"""

import dataclasses
import json
import os
import platform
import shutil
import time
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from lgg import data, guards, losses, metrics, models, plots
from lgg.config import MODEL_KINDS, PRECISIONS, RunConfig
from lgg.evaluate import evaluate_run, evaluate_snapshots, tune_postprocessing
from lgg.files import atomic_path, save_csv, save_json, save_model


# ----------------------------------------------------------------------------- run folders
def prepare_run_dir(run_dir, overwrite=False, resume=False, inputs=()):
    """Create `run_dir` and mark it as ours (`.lgg-run`), after `check_run_dir`; with `overwrite`
    an earlier run's files are deleted first."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, overwrite, resume, inputs)
    if overwrite and not resume and run_dir.is_dir():
        guards.empty_folder(run_dir)
    return guards.mark_folder(run_dir, guards.RUN_MARKER)


def check_run_dir(run_dir, overwrite=False, resume=False, inputs=()):
    """Refuse, writing nothing: a folder equal to, inside or holding one of `inputs`
    (the data); a non-empty folder, unless `overwrite` and it is a run folder of ours (marker, or
    a `config.json` written by `train`: its contents are deleted, including the `resume/` state
    of an interrupted run) or `resume` and it holds an unfinished run (kept, to continue it); and
    `resume` on a finished run (a `model.h5` and nothing to resume), which is left as it is.
    """
    run_dir = Path(run_dir)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume contradict each other: give one")
    guards.check_apart(run_dir, inputs)
    if run_dir.exists() and any(path.name != guards.LOCK_FILE for path in run_dir.iterdir()):
        ours = guards.is_ours(run_dir, guards.RUN_MARKER)
        if resume:
            if not ours:
                raise FileExistsError(f"{run_dir} is not a run folder of ours ({guards.RUN_MARKER}); nothing to resume")
            if (run_dir / "model.h5").is_file() and not (run_dir / "resume" / "state.json").is_file():
                evaluated = (run_dir / "test_summary.json").is_file()
                raise FileExistsError(
                    f"{run_dir} holds a finished run (model.h5, nothing to resume); it is left as it is. "
                    + (
                        "Pass --overwrite instead of --resume to train it again"
                        if evaluated
                        else f"Its evaluation did not finish: python -m lgg evaluate --model {run_dir / 'model.h5'} "
                        "--tune-postprocessing"
                    )
                )
        elif not overwrite:
            raise FileExistsError(
                f"run folder {run_dir} already holds files; pass --overwrite to replace them or "
                "--resume to continue that run"
            )
        elif not ours:
            raise FileExistsError(
                f"{run_dir} is not a run folder of ours (no {guards.RUN_MARKER} or config.json from train): "
                "--overwrite only replaces run folders; choose another --out"
            )


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what decides a CPU's speed here (issue 17)


def cpu():
    """The CPU's model name and whether it has the SIMD / matrix extensions that change training speed."""
    model_name, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model_name is None:
                model_name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux
        pass
    return {"cpu_model": model_name, "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}}


def environment():
    """Library versions and machine facts, written into every run's config."""
    import sklearn
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "cpu_count": os.cpu_count(),
        **cpu(),
    }


# ----------------------------------------------------------------------------- callbacks
class ElapsedTime(keras.callbacks.Callback):
    """Adds `elapsed_s` (training time so far) to each epoch's logs and stops after `max_minutes`."""

    def __init__(self, max_minutes=None, already_elapsed_s=0.0):
        super().__init__()
        self.max_minutes = max_minutes
        self.already_elapsed_s = already_elapsed_s

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter() - self.already_elapsed_s

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self.start
        if logs is not None:
            logs["elapsed_s"] = elapsed
        if self.max_minutes is not None and elapsed >= 60 * self.max_minutes:
            print(f"\nStopping: time limit of {self.max_minutes} minutes reached after epoch {epoch + 1}.")
            self.model.stop_training = True


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
        used = min(1.0, (time.perf_counter() - self.timer.start) / (60 * self.timer.max_minutes))
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
        model.load_weights(folder / "model.weights.h5")
        model.optimizer.build(model.trainable_variables)
        with np.load(folder / "optimizer.npz") as saved:
            values = [saved[f"arr_{index}"] for index in range(len(saved.files))]
        if len(values) != len(model.optimizer.variables):
            raise ValueError(f"{folder}: optimizer state of another model ({len(values)} variables)")
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
        shutil.rmtree(self.directory, ignore_errors=True)  # finished: nothing to resume


# ----------------------------------------------------------------------------- compile and fit
def compile_model(
    model, task, learning_rate=1e-3, bce_weight=1.0, dice_weight=1.0, jit_compile=True, dice_loss="batch"
):
    """Adam with BCE + Dice and batch Dice / Jaccard (segmentation), or BCE with accuracy and AUC.

    `jit_compile=True` compiles the training step with XLA, which Keras leaves off on CPU-only
    machines by default; on our 2-core CPU it trains the U-Net about 1.1x faster (`make bench`).
    """
    optimizer = keras.optimizers.Adam(learning_rate)
    if task == "segmentation":
        model.compile(
            optimizer=optimizer,
            loss=losses.BCEDiceLoss(bce_weight=bce_weight, dice_weight=dice_weight, dice=dice_loss),
            metrics=losses.SEGMENTATION_METRICS,
            jit_compile=jit_compile,
        )
    elif task == "classification":
        model.compile(
            optimizer=optimizer,
            loss="binary_crossentropy",
            metrics=["accuracy", keras.metrics.AUC(name="auc")],
            jit_compile=jit_compile,
        )
    else:
        raise ValueError(f"task must be 'segmentation' or 'classification'; received {task!r}")
    return model


def monitor_for(task, case_validation=False):
    if task == "classification":
        return "val_auc"
    return "val_case_dice" if case_validation else "val_dice_coefficient"


def fit(
    model,
    train_data,
    val_data,
    run_dir,
    epochs=100,
    steps_per_epoch=None,
    task="segmentation",
    patience=10,
    max_minutes=None,
    resume=False,
    verbose=1,
    val_cases=None,
    schedule="plateau",
    snapshot_minutes=(),
):
    """Fit with the standard callbacks and return the history as a DataFrame.

    Callbacks: best-weights checkpoint on the validation Dice (AUC for the classifier),
    EarlyStopping (patience `patience`, best weights restored), the learning-rate schedule,
    CSVLogger (`history.csv`), a NaN stop, an optional time limit, and `ResumeCheckpoint`, so an
    interrupted run continues from its last epoch with `resume=True`. On return the model holds
    the weights of its best validation epoch.

    Args:
        val_cases: optional `(images, masks, case_ids)` of the validation slices at the training
            size; the best epoch is then chosen on their mean per-case Dice (`val_case_dice`)
            instead of Keras' smoothed batch Dice.
        schedule: `"plateau"` halves the rate after `patience // 2` flat epochs;
            `"time-cosine"` (needs `max_minutes`) decays it along a cosine over the time budget.
        snapshot_minutes: e.g. `(15, 30, 60)`: keep the weights reached after so many minutes
            (`TimeSnapshots`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    monitor = monitor_for(task, val_cases is not None)
    best_path = run_dir / "best.weights.h5"
    history_path = run_dir / "history.csv"
    timer = ElapsedTime(max_minutes)
    csv_logger = keras.callbacks.CSVLogger(str(history_path), append=False)
    callbacks = [timer]
    if val_cases is not None:
        callbacks.append(CaseDiceValidation(*val_cases))
    if snapshot_minutes:
        callbacks.append(TimeSnapshots(run_dir / "snapshots", snapshot_minutes))
    if schedule == "time-cosine":
        if max_minutes is None:
            raise ValueError("schedule 'time-cosine' needs max_minutes")
        callbacks.append(TimeCosineSchedule(timer, learning_rate_of(model)))
    elif schedule == "plateau":
        wait = max(1, patience // 2)
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor, mode="max", factor=0.5, patience=wait, min_lr=1e-5))
    else:
        raise ValueError(f"schedule must be 'plateau' or 'time-cosine'; received {schedule!r}")
    callbacks += [
        BestWeightsCheckpoint(best_path, monitor),
        keras.callbacks.EarlyStopping(monitor, mode="max", patience=patience, restore_best_weights=True),
        csv_logger,
        StopOnNaN(),
    ]
    resume_checkpoint = ResumeCheckpoint(run_dir / "resume", callbacks)
    initial_epoch = 0
    state = resume_checkpoint.restore(model) if resume else None
    if state is not None:
        initial_epoch, timer.already_elapsed_s = state["epoch"] + 1, state["elapsed_s"]
        history = pd.read_csv(history_path)
        save_csv(history[history["epoch"] <= state["epoch"]], history_path)  # drop a row past the saved state
        print(f"Resuming after epoch {initial_epoch} ({state['elapsed_s'] / 60:.1f} min of training so far)")
        csv_logger.append = True  # continue history.csv
    elif resume:
        print(f"Nothing to resume in {run_dir}: training from the start")
    model.fit(
        train_data,
        validation_data=val_data,
        epochs=epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=steps_per_epoch,
        callbacks=[*callbacks, resume_checkpoint],
        shuffle=False,  # the tf.data pipeline shuffles
        verbose=verbose,
    )
    if best_path.exists():
        model.load_weights(best_path)
    return pd.read_csv(history_path)


def learning_rate_of(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def export_model(model, run_dir):
    """Write `model.h5` and `model.keras` atomically; return the `.h5` path."""
    run_dir = Path(run_dir)
    save_model(model, run_dir / "model.h5")
    save_model(model, run_dir / "model.keras")
    return run_dir / "model.h5"


# ----------------------------------------------------------------------------- whole runs


def build_model(
    kind, image_size, encoder_weights=None, base_filters=16, backbone="light", attention=False, precision="float32"
):
    """One of the three models; `precision="mixed_bfloat16"` computes in bfloat16 with float32
    weights and a float32 output layer (Keras mixed precision)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; received {precision!r}")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        return _build_model(kind, image_size, encoder_weights, base_filters, backbone, attention)
    finally:
        keras.mixed_precision.set_global_policy(previous)


def as_float32(model, kind, image_size, base_filters=16, backbone="light", attention=False):
    """The same model built in float32 with the trained weights (mixed precision keeps its
    weights in float32, so nothing is rounded): what is exported and evaluated, so a saved model
    behaves the same wherever it is loaded."""
    if model.dtype_policy.name == "float32":
        return model
    copy = build_model(kind, image_size, None, base_filters, backbone, attention)
    copy.set_weights(model.get_weights())
    return copy


def _build_model(kind, image_size, encoder_weights, base_filters, backbone, attention):
    input_shape = (image_size, image_size, 3)
    if attention and kind != "resnet50-unet":
        raise ValueError(f"attention gates are an option of resnet50-unet, not of {kind}")
    if kind == "unet":
        return models.build_unet(input_shape, base_filters=base_filters)
    if kind == "resnet50-unet":
        return models.build_resnet50_unet(input_shape, encoder_weights=encoder_weights, attention=attention)
    if kind == "classifier":
        return models.build_classifier(input_shape, backbone=backbone, encoder_weights=encoder_weights)
    raise ValueError(f"model kind must be one of {MODEL_KINDS}; received {kind!r}")


def check_split_counts(slices):
    """Refuse a split that leaves a part without cases (e.g. too few cases for a patient split):
    training would have nothing to learn from or nothing to choose or report on."""
    counts = slices.groupby("split")["case_id"].nunique()
    empty = [name for name in data.SPLITS if counts.get(name, 0) == 0]
    if empty:
        found = ", ".join(f"{name} {counts.get(name, 0)}" for name in data.SPLITS)
        raise ValueError(
            f"the split leaves no {' and no '.join(empty)} cases ({found} cases of {slices['case_id'].nunique()}); "
            "use more cases (--max-cases), at least about 10 for a patient split"
        )


def check_finite(model, run_dir):
    """Refuse to export a model whose weights are not all finite (a diverged run)."""
    bad = [weight.path for weight in model.weights if not np.isfinite(keras.ops.convert_to_numpy(weight)).all()]
    if bad:
        raise RuntimeError(
            f"training diverged: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); nothing was exported "
            f"from {run_dir}. Try a lower --learning-rate"
        )


def split_table(slices, split_name="patient", seed=0, val_fraction=0.1, test_fraction=0.2):
    """`slices` with a `split` column: by patient (default), one cross-validation fold by patient
    (`"patient-fold-K-of-N"`, `lgg.data.patient_fold`), or the original leaky slice split."""
    RunConfig(split=split_name)  # refuses a name it does not know, before anything is written
    slices = slices.copy()
    if split_name == "patient":
        assignment = data.split_by_patient(slices["case_id"], val_fraction, test_fraction)
        slices["split"] = slices["case_id"].map(assignment)
    elif split_name.startswith("patient-fold-"):
        slices["split"] = slices["case_id"].map(data.patient_fold(slices["case_id"], split_name, val_fraction))
    else:
        slices["split"] = data.random_slice_split(slices, random_state=seed)
    return slices


def split_counts(slices):
    """Cases, slices and tumor slices per split."""
    return slices.groupby("split").agg(
        cases=("case_id", "nunique"), slices=("case_id", "size"), tumor_slices=("has_tumor", "sum")
    )


def prepare_split(data_dir, run_dir, max_cases=None, split="patient", seed=0):
    """Find the slices, split them, write `split.csv` into the run folder, print the counts."""
    slices = split_table(data.find_slices(data_dir, max_cases=max_cases), split, seed)
    check_split_counts(slices)
    write_split(slices, run_dir)
    return slices


def write_split(slices, run_dir):
    """`split.csv` (one row per slice: case, slice, split, tumor) into the run folder; print the counts."""
    save_csv(slices[["case_id", "slice_index", "split", "has_tumor", "tumor_area_px"]], Path(run_dir) / "split.csv")
    print(split_counts(slices).to_string())


def write_config(run_dir, config, slices=None):
    """Write `config.json`: the run's settings, library versions, and the split's counts."""
    config = {**config, "environment": environment()}
    if slices is not None:
        config["split_counts"] = split_counts(slices).reset_index().to_dict("records")
    save_json(config, Path(run_dir) / "config.json")


def make_datasets(slices, task, image_size=128, batch_size=16, seed=0, tumor_fraction=None, start_epoch=0):
    """Decode the train and val slices into memory and wrap them in `tf.data` pipelines.

    Returns `(train_data, steps_per_epoch, val_data)`; training data is an endless stream of
    shuffled, augmented epochs from `start_epoch` on (pass `steps_per_epoch` to `fit`) and, with
    `tumor_fraction`, oversamples tumor slices.
    """
    train_rows, val_rows = slices[slices.split == "train"], slices[slices.split == "val"]
    started = time.perf_counter()
    train_images, train_masks = data.load_arrays(train_rows, image_size)
    val_images, val_masks = data.load_arrays(val_rows, image_size)
    print(
        f"Decoded {len(train_rows) + len(val_rows)} slices at {image_size}x{image_size} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    if task == "segmentation":
        train_targets, val_targets = train_masks, val_masks
    else:
        train_targets = train_rows["has_tumor"].to_numpy(np.float32)
        val_targets = val_rows["has_tumor"].to_numpy(np.float32)
    train_data, steps = data.make_dataset(
        train_images,
        train_targets,
        batch_size,
        training=True,
        seed=seed,
        tumor_fraction=tumor_fraction,
        has_tumor=train_rows["has_tumor"].to_numpy(),
        start_epoch=start_epoch,
    )
    val_data, _ = data.make_dataset(val_images, val_targets, batch_size)
    return train_data, steps, val_data


def validation_cases(slices, image_size):
    """`(images, masks, case_ids)` of the validation slices at `image_size`, for `CaseDiceValidation`."""
    rows = slices[slices.split == "val"]
    images, masks = data.load_arrays(rows, image_size)
    return images, masks, rows["case_id"].to_numpy()


def train_run(config, data_dir, out_dir, overwrite=False, resume=False, verbose=1, **settings):
    """Train one model end to end: data, split, fit, export, curves, post-processing chosen on
    the validation cases (segmenters), test evaluation.

    `config` is a `RunConfig` (or a model kind, with `settings` as its other fields). Returns the
    run folder. This is what `python -m lgg train` runs; the notebooks call the same steps one by one.
    """
    if isinstance(config, str):
        config = RunConfig(kind=config, **settings)
    elif settings:
        config = dataclasses.replace(config, **settings)
    if config.encoder_weights not in (None, "imagenet"):  # a weights file: never inside the folder --overwrite empties
        guards.check_not_within(out_dir, [config.encoder_weights])
    inputs = [data_dir]
    check_run_dir(out_dir, overwrite, resume, inputs)
    slices = split_table(data.find_slices(data_dir, max_cases=config.max_cases), config.split, config.seed)
    check_split_counts(slices)  # before any file is written
    with guards.folder_lock(out_dir):  # held before anything in the folder is removed
        prepare_run_dir(out_dir, overwrite, resume, inputs)
        run = {"data_dir": str(data_dir), "out_dir": str(out_dir), "resume": resume, "verbose": verbose}
        return _train_run(config, slices, run)


def _train_run(config, slices, run):
    """`train_run` once its settings, data and run folder are checked (the folder is locked)."""
    c, run_dir, resume = config, Path(run["out_dir"]), run["resume"]
    kind, seed, image_size, precision = c.kind, c.seed, c.image_size, c.precision
    keras.utils.set_random_seed(seed)
    task = c.task
    write_split(slices, run_dir)
    write_config(run_dir, {**c.to_dict(), **run}, slices)

    start_epoch = ResumeCheckpoint.next_epoch(run_dir / "resume") if resume else 0  # the data stream resumes too
    train_data, steps, val_data = make_datasets(slices, task, image_size, c.batch_size, seed, c.tumor_fraction,
                                                start_epoch)  # fmt: skip
    model = build_model(kind, image_size, c.encoder_weights, c.base_filters, c.backbone, c.attention, precision)
    model = compile_model(model, task, c.learning_rate, jit_compile=c.jit_compile, dice_loss=c.dice_loss)
    val_cases = validation_cases(slices, image_size) if task == "segmentation" else None
    history = fit(
        model, train_data, val_data, run_dir, c.epochs, steps, task, c.patience, c.max_minutes, resume,
        run["verbose"], val_cases=val_cases, schedule=c.schedule, snapshot_minutes=c.snapshot_minutes,
    )  # fmt: skip
    check_finite(model, run_dir)
    if precision != "float32":  # export and evaluate the float32 twin, compiled like the trained model
        model = as_float32(model, kind, image_size, c.base_filters, c.backbone, c.attention)
        model = compile_model(model, task, c.learning_rate, jit_compile=c.jit_compile, dice_loss=c.dice_loss)
    export_model(model, run_dir)
    plots.plot_history(history, task, save_path=run_dir / "curves.png")
    settings = tune_postprocessing(model, slices, run_dir) if task == "segmentation" else None
    evaluate_run(model, slices, run_dir, split_name="test", postprocessing=settings)
    if task == "segmentation" and (run_dir / "snapshots" / "snapshots.csv").is_file():  # a mark was reached
        print(evaluate_snapshots(run_dir, run["data_dir"]).to_string(index=False))
    plt.close("all")
    return run_dir
