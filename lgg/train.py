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

from lgg import data, guards, losses, models, plots
from lgg.callbacks import (
    AveragedWeights,
    BestWeightsCheckpoint,
    CaseDiceValidation,
    ElapsedTime,
    ResumeCheckpoint,
    StepTimer,
    StopOnNaN,
    TimeCosineSchedule,
    TimeSnapshots,
    young_average,
)
from lgg.config import RunConfig
from lgg.distribute import Distribution, synchronize_batchnorm
from lgg.evaluate import evaluate_run, evaluate_snapshots, tune_postprocessing
from lgg.files import save_csv, save_json, save_model


# ----------------------------------------------------------------------------- run folders
def prepare_run_dir(run_dir, overwrite=False, resume=False, inputs=()):
    """Create `run_dir` and mark it as ours (`.lgg-run`), after `check_run_dir`; with `overwrite`
    an earlier run's files are deleted first (what our commands write there: anything else is kept)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir, overwrite, resume, inputs)
    if overwrite and not resume and run_dir.is_dir():
        kept = guards.empty_run_folder(run_dir)
        if kept:
            print(f"--overwrite: kept {', '.join(kept)} in {run_dir} (not written by train; move them if unwanted)")
    return guards.mark_folder(run_dir, guards.RUN_MARKER)


def _recorded_kind(run_dir):
    """The model kind a run folder's config.json records (None where it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


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
                tune = "" if _recorded_kind(run_dir) == "classifier" else " --tune-postprocessing"
                raise FileExistsError(
                    f"{run_dir} holds a finished run (model.h5, nothing to resume); it is left as it is. "
                    + (
                        "Pass --overwrite instead of --resume to train it again"
                        if evaluated
                        else f"Its evaluation did not finish: python -m lgg evaluate --model {run_dir / 'model.h5'}"
                        + tune
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
    """The CPU's model name, its vendor / family / model / stepping (the name alone, "AMD EPYC", does not say
    the generation), and whether it has the SIMD / matrix extensions that change training speed."""
    model_name, flags, identity = None, set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "model name" and model_name is None:
                model_name = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key in ("vendor_id", "cpu family", "model", "stepping") and key not in identity:
                identity[key] = value
    except OSError:  # not Linux
        pass
    return {"cpu_model": model_name, "cpu_id": identity, "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS}}


def environment():
    """Library versions and machine facts, written into every run's config."""
    import importlib.metadata

    import sklearn

    def version(*distributions):  # the first installed; None where none is (TensorFlow on a PyTorch machine)
        for distribution in distributions:
            try:
                return importlib.metadata.version(distribution)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        "keras_backend": keras.backend.backend(),
        "tensorflow": version("tensorflow", "tensorflow-cpu", "tensorflow-macos", "tf-nightly"),
        "torch": version("torch"),
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.uname().machine,
        "cpu_count": os.cpu_count(),
        **cpu(),
    }


# ----------------------------------------------------------------------------- compile and fit
def xla_by_default():
    """Whether training compiles its step with XLA when not told: yes, unless TensorFlow runs on a CPU
    with AVX-512 and no GPU is visible.

    Measured side by side with `make bench` (U-Net at 128 px, batch 16): on a 2-core Intel Xeon
    with AVX-512 and AMX, XLA trained at 0.52x the speed of TensorFlow's oneDNN kernels, which use
    the wide vector and matrix units that XLA's CPU code does not; on a 2-core AMD EPYC with AVX2
    only, the benchmark's earlier timing of whole `fit` calls gave XLA 1.99x. Other CPUs: not
    measured (`--jit-compile` / `--no-jit-compile` decide there).
    """
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if not tf.config.list_physical_devices("GPU") and cpu()["cpu_flags"]["avx512f"]:
            return False
    return True


def precision_by_default(jit_compile, kind="unet", replicas=1):
    """The precision training computes in when not told: mixed_bfloat16 where TensorFlow trains a
    U-Net on one replica (one process, or a single-device `--distribute mirrored`) on a CPU with
    bfloat16 instructions (AVX-512 BF16, which every CPU with AMX also has: oneDNN computes bfloat16
    there), no GPU visible and XLA off (XLA's CPU code has no bfloat16 kernels of its own); float32
    elsewhere.

    Measured for the U-Net (README, Speed; results/EXPERIMENTS.md): on a 2-core Intel Xeon with AMX 1.9x the
    training slices per second, and on the two folds trained both ways on that CPU (39 test patients)
    the same test Dice after the same 60 minutes (+0.017, -0.001), reached sooner; on a 2-core AMD EPYC
    (Zen 5) with AVX-512 BF16 and no AMX 1.6x (`benchmarks/precision.py`, `results/precision-amd-epyc.json`).
    On a 2-core AMD EPYC (Zen 4) every fold of the shipped recipe trained in bfloat16, 58-60 slices/s
    (float32 not timed there). Not measured: Intel CPUs with AVX-512 BF16 but no AMX.
    Not measured, so float32 (`--precision mixed_bfloat16` chooses there): the classifier and the
    ResNet50 U-Net, GPUs, several replicas.
    """
    if jit_compile or kind != "unet" or replicas > 1 or keras.backend.backend() != "tensorflow":
        return "float32"
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or not cpu()["cpu_flags"].get("avx512_bf16"):
        return "float32"
    return "mixed_bfloat16"


def resolve_precision(precision, jit_compile, kind="unet", replicas=1):
    """`precision` as training will use it: None means `precision_by_default` (given the resolved compiler)."""
    return precision_by_default(jit_compile, kind, replicas) if precision is None else precision


def compiler_and_precision(jit_setting, precision, kind, replicas=1, stored=None):
    """`(jit_compile, precision)` a run trains with: as told, else as the machine chooses; a resumed run
    (`stored`: its config.json) keeps those it started with, wherever it resumes (a run from before
    `precision_used` was recorded: its `precision`, or float32 if it predates that setting)."""
    jit_compile = resolve_jit_compile(jit_setting)
    if stored is not None:
        jit_compile = stored.get("jit_compile_used", jit_compile)
        precision = stored.get("precision_used") or stored.get("precision") or "float32"
    return jit_compile, resolve_precision(precision, jit_compile, kind, replicas)


def resolve_jit_compile(jit_compile):
    """`jit_compile` as Keras will use it: None means `xla_by_default()`; XLA only on TensorFlow and JAX."""
    if jit_compile is None:
        jit_compile = xla_by_default()
    return bool(jit_compile) and keras.backend.backend() in ("tensorflow", "jax")


def compile_model(
    model, task, learning_rate=1e-3, bce_weight=1.0, dice_weight=1.0, jit_compile=None, dice_loss="batch", ema=None
):
    """Adam with BCE + Dice and batch Dice / Jaccard (segmentation), or BCE with accuracy and AUC.

    `ema`: the momentum of a moving average of the weights that Adam keeps (Keras' `use_ema`); `fit`
    then validates, keeps and returns the average (`lgg.callbacks.AveragedWeights`). None: no average.

    `jit_compile=True` compiles the training step with XLA, which Keras leaves off on CPU-only
    machines by default; `None` decides by the machine (`xla_by_default`). XLA is TensorFlow's and
    JAX's: on the PyTorch backend the step runs eagerly (Keras would otherwise hand it to
    `torch.compile`, which needs a C++ compiler and minutes to compile).
    """
    jit_compile = resolve_jit_compile(jit_compile)
    if ema is not None:
        ema = guards.probability("ema", ema)
    optimizer = keras.optimizers.Adam(learning_rate, use_ema=ema is not None, ema_momentum=ema or 0.99)
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
    epochs=None,
    steps_per_epoch=None,
    task="segmentation",
    patience=None,
    max_minutes=None,
    resume=False,
    verbose=1,
    val_cases=None,
    schedule="plateau",
    snapshot_minutes=(),
    batch_size=None,
    agree=None,
    validation_batch_size=32,
):
    """Fit with the standard callbacks and return the history as a DataFrame.

    Callbacks: best-weights checkpoint on the validation Dice (AUC for the classifier),
    the averaged weights swapped in at each epoch's end when the optimizer keeps them (`compile_model(ema=)`),
    EarlyStopping (see `early_stopping_patience`; best weights restored), the learning-rate schedule,
    CSVLogger (`history.csv`), a NaN stop, an optional time limit, and `ResumeCheckpoint`, so an
    interrupted run continues from its last epoch with `resume=True`. On return the model holds
    the weights of its best validation epoch.

    Args:
        val_cases: optional `(images, masks, case_ids)` of the validation slices at the training
            size; the best epoch is then chosen on their mean per-case Dice (`val_case_dice`)
            instead of Keras' smoothed batch Dice.
        schedule: `"plateau"` halves the rate after `patience // 2` flat epochs;
            `"time-cosine"` (needs `max_minutes`) decays it along a cosine over the time budget.
        epochs: upper bound; None: 100, or no bound with `max_minutes` (the time limit ends it).
        patience: epochs without a better validation score before training stops; None: 10 with
            the plateau schedule, none with time-cosine (whose end is the time budget).
        snapshot_minutes: e.g. `(15, 30, 60)`: keep the weights reached after so many minutes
            (`TimeSnapshots`).
        batch_size: when given, each epoch's steady-state training rate is logged as
            `train_slices_per_s` (`StepTimer`).
        validation_batch_size: the batch size of `val_cases`' predictions.
        agree: how the workers of a multi-worker run agree on the elapsed time
            (`lgg.distribute.Distribution.agree`).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    monitor = monitor_for(task, val_cases is not None)
    best_path = run_dir / "best.weights.h5"
    history_path = run_dir / "history.csv"
    timer = ElapsedTime(max_minutes, agree=agree)
    csv_logger = keras.callbacks.CSVLogger(str(history_path), append=False)
    averaged = AveragedWeights() if getattr(model.optimizer, "use_ema", False) else None
    callbacks = [timer] + ([averaged] if averaged else []) + ([StepTimer(batch_size)] if batch_size else [])
    if val_cases is not None:
        callbacks.append(CaseDiceValidation(*val_cases, batch_size=validation_batch_size))
    if snapshot_minutes:
        callbacks.append(TimeSnapshots(run_dir / "snapshots", snapshot_minutes))
    if schedule == "time-cosine":
        if max_minutes is None:
            raise ValueError("schedule 'time-cosine' needs max_minutes")
        callbacks.append(TimeCosineSchedule(timer, learning_rate_of(model)))
    elif schedule == "plateau":
        wait = max(1, early_stopping_patience(schedule, patience) // 2)
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor, mode="max", factor=0.5, patience=wait, min_lr=1e-5))
    else:
        raise ValueError(f"schedule must be 'plateau' or 'time-cosine'; received {schedule!r}")
    callbacks.append(BestWeightsCheckpoint(best_path, monitor))
    patience = early_stopping_patience(schedule, patience)
    if patience is not None:
        stopping = keras.callbacks.EarlyStopping(monitor, mode="max", patience=patience, restore_best_weights=True)
        callbacks.append(stopping)
    callbacks += [csv_logger, StopOnNaN()]
    if epochs is None:  # a time budget is not cut short by an epoch count (bfloat16 ran 100 epochs in 47 minutes)
        epochs = 100 if max_minutes is None else 100_000
    resume_checkpoint = ResumeCheckpoint(run_dir / "resume", callbacks)
    initial_epoch = 0
    state = resume_checkpoint.restore(model) if resume else None
    if state is not None:
        initial_epoch, timer.already_elapsed_s = state["epoch"] + 1, state["elapsed_s"]
        if averaged:  # saved at an epoch's end: the average in the model, the trained weights in the optimizer
            averaged.resumed()
        history = pd.read_csv(history_path)
        history = history[history["epoch"] <= state["epoch"]]  # drop a row past the saved state
        if batch_size and "train_slices_per_s" not in history:  # begun before StepTimer: add its column, so the
            history = history.assign(train_slices_per_s=np.nan)  # rows CSVLogger appends match the header
            history = history[["epoch", *sorted(column for column in history.columns if column != "epoch")]]
        save_csv(history, history_path)
        print(f"Resuming after epoch {initial_epoch} ({state['elapsed_s'] / 60:.1f} min of training so far)")
        csv_logger.append = True  # continue history.csv
    elif resume:
        print(f"Nothing to resume in {run_dir}: training from the start")
    chiefs = agree(initial_epoch) if agree is not None else initial_epoch  # every worker of a multi-worker run
    if chiefs != initial_epoch:
        raise RuntimeError(
            f"this worker would resume at epoch {initial_epoch + 1}, the chief at {int(chiefs) + 1}: "
            "--resume needs the chief's run folder on a file system every worker sees"
        )
    if state is not None and state.get("fit_done"):  # training had ended; its export had not
        print("Training had ended before the export stopped: exporting its best epoch, no further epoch")
    else:
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=[*callbacks, resume_checkpoint],
            shuffle=False,  # the pipeline shuffles
            verbose=verbose,
        )
    if best_path.exists():  # with `ema`, also what brings the average back after a time limit or an early stop
        model.load_weights(best_path)  # (Keras' fit ends by writing the optimizer's slot, the trained weights there)
    if averaged and (warning := young_average(model)):
        print(warning)
    return pd.read_csv(history_path)


def early_stopping_patience(schedule, patience):
    """The patience of EarlyStopping, or None for none. Not given: 10 epochs with the plateau
    schedule; no early stopping with time-cosine, which ends at its time budget (its learning rate
    down to 1 % there) and keeps the best validation epoch anyway. A patience counted in epochs
    under a time budget stops a fast run early, in the high-learning-rate part of the cosine: the
    bfloat16 U-Net (2-3x the epochs per minute) stopped at 38.6 of its 60 minutes."""
    if patience is not None:
        return patience
    return 10 if schedule == "plateau" else None


def learning_rate_of(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def export_model(model, run_dir):
    """Write `model.h5` and `model.keras` atomically, then remove the run's resume state (exported: nothing
    left to resume); return the `.h5` path. What `train` and the notebooks call after `fit`."""
    run_dir = Path(run_dir)
    save_model(model, run_dir / "model.h5")
    save_model(model, run_dir / "model.keras")
    shutil.rmtree(run_dir / "resume", ignore_errors=True)
    return run_dir / "model.h5"


# ----------------------------------------------------------------------------- whole runs
def check_finite(model, run_dir):
    """Refuse to export a model whose weights are not all finite (a diverged run)."""
    bad = [weight.path for weight in model.weights if not np.isfinite(keras.ops.convert_to_numpy(weight)).all()]
    if bad:
        raise RuntimeError(
            f"training diverged: {len(bad)} weight tensors hold NaN or inf (first: {bad[0]}); nothing was exported "
            f"from {run_dir}. Try a lower --learning-rate"
        )


def prepare_split(data_dir, run_dir, max_cases=None, split="patient", seed=0):
    """Find the slices, split them, write `split.csv` into the run folder, print the counts."""
    slices = data.split_table(data.find_slices(data_dir, max_cases=max_cases), split, seed)
    data.check_split_counts(slices)
    write_split(slices, run_dir)
    return slices


def check_same_split(slices, split_file):
    """Refuse to resume a run whose data now splits differently from its own `split.csv` (another data
    folder, cases added or removed): the model has trained on its split, and a new one could put those
    cases among the test cases."""
    if not split_file.is_file():
        return
    stored = data.read_split(split_file)
    if not {"case_id", "slice_index", "split"} <= set(stored.columns):
        raise data.DatasetError(f"{split_file} lacks case_id, slice_index or split: not the run's own split file")
    key = ["case_id", "slice_index", "split"]
    ours = set(stored[key].astype(str).itertuples(index=False))
    now = set(slices[key].astype(str).itertuples(index=False))
    if ours != now:
        moved = sorted({row[0] for row in ours ^ now})
        named = ", ".join(moved[:5]) + (f" and {len(moved) - 5} more" if len(moved) > 5 else "")
        raise data.DatasetError(
            f"the data no longer splits as {split_file} does ({len(moved)} cases differ: {named}); resume with "
            "the data folder the run started on"
        )


def write_split(slices, run_dir):
    """`split.csv` (one row per slice: case, slice, split, tumor) into the run folder; print the counts."""
    save_csv(slices[["case_id", "slice_index", "split", "has_tumor", "tumor_area_px"]], Path(run_dir) / "split.csv")
    print(data.split_counts(slices).to_string())


def write_config(run_dir, config, slices=None):
    """Write `config.json`: the run's settings, library versions, and the split's counts (and, when
    `jit_compile` is left to the machine, what it chose: `jit_compile_used`; `precision_used` likewise)."""
    config = {**config, "environment": environment()}
    if "jit_compile" in config and "jit_compile_used" not in config:
        config["jit_compile_used"] = resolve_jit_compile(config["jit_compile"])
    if config.get("precision") and "precision_used" not in config:  # the notebooks: float32, as told
        config["precision_used"] = config["precision"]
    if slices is not None:
        config["split_counts"] = data.split_counts(slices).reset_index().to_dict("records")
    save_json(config, Path(run_dir) / "config.json")


def make_datasets(
    slices,
    task,
    image_size=128,
    batch_size=16,
    seed=0,
    tumor_fraction=None,
    start_epoch=0,
    pipeline="auto",
    val_batch_size=None,
    flair_only=0.0,
    augmentation="standard",
    tumor_sampling="slice",
):
    """Decode the train and val slices into memory and wrap them in batch pipelines.

    Returns `(train_data, steps_per_epoch, val_data)`; training data is an endless stream of
    shuffled, augmented epochs from `start_epoch` on (pass `steps_per_epoch` to `fit`) and, with
    `tumor_fraction`, oversamples tumor slices. `pipeline`: `"tf.data"` (`lgg.data`), `"numpy"`
    (`lgg.batches`, a `keras.utils.PyDataset`: any Keras backend, no TensorFlow needed) or `"auto"`,
    `tf.data` when TensorFlow is the Keras backend and NumPy otherwise. `val_batch_size`: the
    validation batches' size (None: `batch_size`). `flair_only`: the share of training slices made
    FLAIR only (`lgg.data.fill_with_flair`). `augmentation`: a name of `lgg.data.AUGMENTATIONS` (or a dict of ranges,
    `lgg.data.augmentation_ranges`). `tumor_sampling`: with `tumor_fraction`, `"slice"` (every tumor slice equally
    often), `"case"` (a case first, then one of its tumor slices; `lgg.data.tumor_pools`) or `"area"` (a case first,
    then one of its tumor slices in proportion to its tumor area at `image_size`).
    """
    val_batch_size = val_batch_size or batch_size
    if pipeline == "auto":
        pipeline = "tf.data" if keras.backend.backend() == "tensorflow" else "numpy"
    if pipeline not in ("tf.data", "numpy"):
        raise ValueError(f"pipeline must be 'auto', 'tf.data' or 'numpy'; received {pipeline!r}")
    data.check_tumor_sampling(tumor_sampling, tumor_fraction)  # before minutes of decoding
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
    tumor_cases = train_rows["case_id"].to_numpy() if tumor_sampling in ("case", "area") else None
    tumor_areas = train_masks.reshape(len(train_masks), -1).sum(1, dtype=np.int64) if tumor_sampling == "area" else None
    draws = {"seed": seed, "tumor_fraction": tumor_fraction, "has_tumor": train_rows["has_tumor"].to_numpy(),
             "flair_only": flair_only, "augmentation": augmentation, "tumor_cases": tumor_cases,
             "tumor_areas": tumor_areas}  # fmt: skip
    if pipeline == "numpy":
        from lgg import batches

        train_data = batches.TrainingBatches(train_images, train_targets, batch_size, start_epoch=start_epoch, **draws)
        return train_data, train_data.steps, batches.EvaluationBatches(val_images, val_targets, val_batch_size)
    train_data, steps = data.training_dataset(train_images, train_targets, batch_size, start_epoch=start_epoch, **draws)
    return train_data, steps, data.evaluation_dataset(val_images, val_targets, val_batch_size)


def validation_cases(slices, image_size):
    """`(images, masks, case_ids)` of the validation slices at `image_size`, for `CaseDiceValidation`."""
    rows = slices[slices.split == "val"]
    images, masks = data.load_arrays(rows, image_size)
    return images, masks, rows["case_id"].to_numpy()


def train_run(config, data_dir, out_dir, overwrite=False, resume=False, verbose=1, **settings):
    """Train one model end to end: data, split, fit, export, curves, post-processing chosen on
    the validation cases (segmenters), test evaluation.

    `config` is a `RunConfig` (or a model kind, with `settings` as its other fields). Returns the
    run folder (None on the workers of a multi-worker run other than the chief). This is what
    `python -m lgg train` runs; the notebooks call the same steps one by one.
    """
    if isinstance(config, str):
        config = RunConfig(kind=config, **settings)
    elif settings:
        config = dataclasses.replace(config, **settings)
    if config.encoder_weights not in (None, "imagenet"):  # a weights file: never inside the folder --overwrite empties
        guards.check_not_within(out_dir, [config.encoder_weights])
    distribution = Distribution(config.distribute)  # reads TF_CONFIG; the strategy is made after the checks
    inputs = [data_dir]
    run = {"data_dir": str(data_dir), "out_dir": str(out_dir), "resume": resume, "verbose": verbose}
    if distribution.is_chief:  # another worker of a multi-worker run writes nothing there: the chief alone does
        check_run_dir(out_dir, overwrite, resume, inputs)
    slices = data.split_table(data.find_slices(data_dir, max_cases=config.max_cases), config.split, config.seed)
    data.check_split_counts(slices)  # before any file is written
    data.check_batch_size(config.batch_size, int((slices.split == "train").sum()))  # and before --overwrite empties
    if resume and distribution.is_chief:
        check_same_split(slices, Path(out_dir) / "split.csv")
    distribution.start()  # a multi-worker run waits here for every worker
    # what the replicas need, refused here (before any file is written): the compiler, the validation batches
    jit_setting = distribution.check(config.batch_size, config.jit_compile)
    val_count = int((slices.split == "val").sum())
    val_batch_sizes = tuple(distribution.evaluation_batch_size(val_count, size) for size in (config.batch_size, 32))
    prepared = (distribution, jit_setting, val_batch_sizes)
    if not distribution.is_chief:
        with distribution.run_folder(out_dir, resume) as own:
            _train_run(config, slices, {**run, "out_dir": str(own)}, *prepared)
        print(f"Worker {distribution.task[1]} done; the chief writes the run folder {out_dir}")
        return None
    with guards.folder_lock(out_dir):  # held before anything in the folder is removed
        prepare_run_dir(out_dir, overwrite, resume, inputs)
        return _train_run(config, slices, run, *prepared)


def _train_run(config, slices, run, distribution, jit_setting, val_batch_sizes):
    """`train_run` once its settings, data and run folder are checked (the folder is locked), on
    `distribution`'s started strategy: a worker other than the chief returns after training, the
    chief exports and evaluates a copy outside the strategy. `val_batch_sizes`: of the validation
    batches and of the per-case validation predictions (`Distribution.evaluation_batch_size`)."""
    c, run_dir, resume = config, Path(run["out_dir"]), run["resume"]
    kind, seed, image_size, precision = c.kind, c.seed, c.image_size, c.precision
    keras.utils.set_random_seed(seed)
    task = c.task
    write_split(slices, run_dir)
    config_file = run_dir / "config.json"
    stored = None
    if (
        resume and config_file.is_file() and distribution.replicas == 1
    ):  # (several replicas: no XLA, float32 unless told)
        stored = json.loads(config_file.read_text())
    jit_compile, precision = compiler_and_precision(jit_setting, precision, kind, distribution.replicas, stored)
    record = {"jit_compile_used": jit_compile, "precision_used": precision, "replicas": distribution.replicas}
    how = "as the run started" if stored else "chosen for this machine" if c.precision is None else "as told"
    print(f"Training in {precision}, XLA {'on' if jit_compile else 'off'} ({how}; --precision, --jit-compile choose)")
    write_config(run_dir, {**c.to_dict(), **run, **record}, slices)

    start_epoch = ResumeCheckpoint.next_epoch(run_dir / "resume") if resume else 0  # the data stream resumes too
    train_data, steps, val_data = make_datasets(slices, task, image_size, c.batch_size, seed, c.tumor_fraction,
                                                start_epoch, val_batch_size=val_batch_sizes[0],
                                                flair_only=c.flair_only, augmentation=c.augmentation,
                                                tumor_sampling=c.tumor_sampling)  # fmt: skip
    fused = keras.backend.backend() == "tensorflow"  # TensorFlow's fused batch normalization (models.py)
    with distribution.scope():
        model = models.build_model(kind, image_size, c.encoder_weights, c.base_filters, c.backbone, c.attention,
                                   precision, fused_batchnorm=fused)  # fmt: skip
        if distribution.replicas > 1:
            synchronize_batchnorm(model)
        model = compile_model(model, task, c.learning_rate, jit_compile=jit_compile, dice_loss=c.dice_loss, ema=c.ema)
    val_cases = validation_cases(slices, image_size) if task == "segmentation" else None
    with distribution.training():
        history = fit(
            model, train_data, val_data, run_dir, c.epochs, steps, task, c.patience, c.max_minutes, resume,
            run["verbose"], val_cases=val_cases, schedule=c.schedule, snapshot_minutes=c.snapshot_minutes,
            batch_size=c.batch_size, agree=distribution.agree,
            validation_batch_size=val_batch_sizes[1],
        )  # fmt: skip
    if not distribution.is_chief:
        return None
    check_finite(model, run_dir)
    exported = models.exportable(model, kind, image_size, c.base_filters, c.backbone, c.attention)
    if exported is not model:  # export and evaluate the float32, stock-layer twin, compiled like the trained model
        model = compile_model(exported, task, c.learning_rate, jit_compile=jit_compile, dice_loss=c.dice_loss)
    export_model(model, run_dir)
    plots.plot_history(history, task, save_path=run_dir / "curves.png")
    settings = tune_postprocessing(model, slices, run_dir) if task == "segmentation" else None
    evaluate_run(model, slices, run_dir, split_name="test", postprocessing=settings)
    if task == "segmentation" and (run_dir / "snapshots" / "snapshots.csv").is_file():  # a mark was reached
        print(evaluate_snapshots(run_dir, run["data_dir"]).to_string(index=False))
    plt.close("all")
    return run_dir
