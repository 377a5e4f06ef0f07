"""What bounds `python -m lgg train unet` on a GPU (Keras on PyTorch): the NumPy batches, the eager step, or neither.

For three settings (128² batch 16, 256² batch 32, 256² batch 64; bfloat16, the strong augmentation, half the
batch tumor slices) on the training cases of the first 16 cases' patient split, it times apart:
`lgg.batches.TrainingBatches` drawing batches on one thread, the training step alone
(`train_on_batch` on one batch already drawn), and `fit` over the batches with 2 (the default) and 8
worker threads, each for about `SECONDS` (steady state: the first steps of each epoch left out).

    # on the GPU machine, prepared as benchmarks/gpu_train_speed.sh says:
    python3 .gpu/lgg/restore.py /tmp/lgg --cases 16
    KERAS_BACKEND=torch python3 benchmarks/gpu_train_bound.py /tmp/lgg OUT 3

Writes `OUT/gpu_train_bound.json` after each setting.

    KERAS_BACKEND=torch python3 benchmarks/gpu_train_bound.py /tmp/lgg OUT 3 --compiled

times the step compiled instead (Keras' `jit_compile=True`, which on PyTorch is `torch.compile`; `lgg.train` keeps
PyTorch eager): the first step, compiling included, and `train_on_batch` after it, at 128² batch 16 and 256²
batch 32 -> `OUT/gpu_compiled.json`.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SETTINGS = [(128, 16), (256, 32), (256, 64)]

from lgg.files import save_json  # noqa: E402  (NumPy only: on the GPU machine too)


def main(root, out, seconds=3.0):
    if (Path(out) / "gpu_train_bound.json").exists():  # never written over: a new OUT for a new measurement
        raise SystemExit(f"{Path(out) / 'gpu_train_bound.json'} exists: choose a new OUT")
    import keras  # loaded once OUT is known to be free: seconds a refusal need not wait
    import numpy as np
    import torch

    from lgg import batches, data, models, train

    class StepEnds(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    slices = data.split_table(data.find_slices(root, max_cases=16))
    rows = slices[slices.split == "train"]
    draws = {"tumor_fraction": 0.5, "has_tumor": rows["has_tumor"].to_numpy(), "augmentation": "strong"}
    results = []
    for size, batch_size in SETTINGS:
        images, masks = data.load_arrays(rows, size)
        stream = batches.TrainingBatches(images, masks, batch_size, **draws)
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            stream[count]
            count += 1
        pipeline = count * batch_size / (time.perf_counter() - start)
        model = models.build_model("unet", size, precision="mixed_bfloat16")
        model = train.compile_model(model, "segmentation", jit_compile=False)
        images_batch, masks_batch = stream[0]
        for _ in range(5):
            model.train_on_batch(images_batch, masks_batch)
        sync()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.train_on_batch(images_batch, masks_batch)
            count += 1
        sync()
        step = count * batch_size / (time.perf_counter() - start)
        row = {"image_size": size, "batch_size": batch_size, "pipeline_one_thread_slices_per_s": round(pipeline, 1),
               "train_on_batch_slices_per_s": round(step, 1)}  # fmt: skip
        for workers in (2, 8):
            ends = StepEnds()
            steps = max(20, int(seconds * step / batch_size))
            model.fit(batches.TrainingBatches(images, masks, batch_size, workers=workers, **draws),
                      steps_per_epoch=steps, epochs=2, verbose=0, callbacks=[ends])  # fmt: skip
            gaps = np.diff(ends.ends)[2:]
            row[f"fit_workers_{workers}_slices_per_s"] = round(float(batch_size * len(gaps) / gaps.sum()), 1)
        print(row, flush=True)
        results.append(row)
        Path(out).mkdir(parents=True, exist_ok=True)
        summary = {"backend": keras.backend.backend(), "cpu_cores": os.cpu_count(), "seconds": seconds, "rows": results}
        save_json(summary, Path(out) / "gpu_train_bound.json")


def compiled(root, out, seconds=3.0):
    """The training step through `torch.compile` (Keras' `jit_compile=True`): compile time and slices/s."""
    if (Path(out) / "gpu_compiled.json").exists():
        raise SystemExit(f"{Path(out) / 'gpu_compiled.json'} exists: choose a new OUT")
    import torch

    from lgg import batches, data, models, train

    slices = data.split_table(data.find_slices(root, max_cases=16))
    rows = slices[slices.split == "train"]
    draws = {"tumor_fraction": 0.5, "has_tumor": rows["has_tumor"].to_numpy(), "augmentation": "strong"}
    train.resolve_jit_compile = lambda setting: True  # lgg keeps PyTorch eager; here: torch.compile
    found = []
    for size, batch_size in SETTINGS[:2]:
        images, masks = data.load_arrays(rows, size)
        stream = batches.TrainingBatches(images, masks, batch_size, **draws)
        model = train.compile_model(models.build_model("unet", size, precision="mixed_bfloat16"), "segmentation")
        images_batch, masks_batch = stream[0]
        start = time.perf_counter()
        model.train_on_batch(images_batch, masks_batch)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        for _ in range(3):
            model.train_on_batch(images_batch, masks_batch)
        torch.cuda.synchronize()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            model.train_on_batch(images_batch, masks_batch)
            count += 1
        torch.cuda.synchronize()
        rate = count * batch_size / (time.perf_counter() - start)
        row = {"image_size": size, "batch_size": batch_size, "first_step_s": round(first, 1),
               "compiled_train_on_batch_slices_per_s": round(rate, 1)}  # fmt: skip
        print(row, flush=True)
        found.append(row)
        Path(out).mkdir(parents=True, exist_ok=True)
        save_json({"torch": torch.__version__, "rows": found}, Path(out) / "gpu_compiled.json")


def seconds_type(text):
    """A positive, finite number of seconds (0 timed no step and would record 0 slices/s)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds; received {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds; received {text!r}")
    return value


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="the restored cases (kaggle_3m or a folder holding it)")
    parser.add_argument("out", help="a folder for the JSON (a new one for a new measurement)")
    parser.add_argument("seconds", nargs="?", type=seconds_type, default=3.0, help="per timing (default: 3)")
    parser.add_argument("--compiled", action="store_true", help="time the step through torch.compile instead")
    return parser.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "torch")  # here, not on import: a test imports this module
    args = parse_args()
    (compiled if args.compiled else main)(args.root, args.out, args.seconds)
