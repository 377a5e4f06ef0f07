"""Benchmark training and inference of the lgg models on this CPU; write one JSON and print a table.

    .venv/bin/python benchmarks/bench.py --data data --out results/benchmark.json
    .venv/bin/python benchmarks/bench.py --data data --out /tmp/bench-quick.json --quick   # smoke run

Measures, in this order:

1. machine facts (CPU model, cores, SIMD flags, library versions);
2. the float32 (and bfloat16) matrix-multiply peak of TensorFlow on this machine, in GFLOP/s;
3. per model (U-Net, ResNet50 U-Net, light classifier): training throughput through the real
   `lgg.data` pipeline, the same on one fixed in-memory batch, the input pipeline alone (slices/s
   and CPU seconds per slice), the analytic FLOPs per slice and the achieved fraction of the matmul
   peak, and the inference time for one whole case at native 256x256;
4. the original notebooks' input pipeline (`ImageDataGenerator.flow_from_dataframe` reading the
   .tif files from disk, augmenting with SciPy) on its own;
5. side by side, interleaved over several rounds so that the machine's slow spells hit all of them:
   the U-Net trained the original notebooks' way (that generator, float32, no XLA), ours with and
   without XLA in float32, and ours under the `mixed_bfloat16` policy (no XLA); the ratios with
   their spread over the rounds;
6. the real loop: `python -m lgg train unet` for a few epochs on the same cases, in float32 (as the
   rows of step 3) with the compiler `train` chooses on this machine, and its steady-state rate from
   `history.csv`;
7. peak memory while training the U-Net at 256x256 on all cases (in a fresh process, so that the
   models measured before do not count).

One definition of training throughput for every figure: the steady-state steps of a real
`model.fit` (`lgg.callbacks.StepTimer`, the interval between the ends of consecutive steps), with
the first steps of each fit (starting the pipeline, compiling) and its teardown after the last
step left out. (A whole `fit` of 12 steps, as timed before, also counted 0 to 10 s of teardown
after its last step, which put every setup near the same 18.6 slices/s on two different machines.)
Throughputs are slices per second (one slice = one 2-D image of the batch), given as the rate over
all timed steps and the 10th-90th percentile of the single steps' rates. Training FLOPs are
counted analytically (convolutions, transposed convolutions and dense layers; normalization,
pooling and activations are left out) and taken as 3x the forward FLOPs.
"""

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up notices out of the table

import keras  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402

from lgg import data, guards, inference, models, train  # noqa: E402
from lgg.callbacks import StepTimer  # noqa: E402
from lgg.files import check_own_json, save_json  # noqa: E402

# ----------------------------------------------------------------------------- settings
IMAGE_SIZE = 128
BATCH_SIZE = 16
CASES = 20
# Timed steady-state training steps per measurement: the ResNet50 U-Net is about 3x slower per step than the U-Net.
STEPS = {"unet": 16, "resnet50_unet": 4, "classifier_light": 16, "original_pipeline": 24, "side_by_side": 16}
# Section 3 times each model through the pipeline and on a fixed batch in turn, this many times: the pipeline's
# cost is the difference of the two, which single timings (10-40 % apart on a shared machine) cannot show.
PIPELINE_ROUNDS = 3
# The side-by-side comparison (section 5) repeats its timings this many times, interleaved, so that a slow spell
# of the machine hits every setup and shows in the spread of the ratios.
ROUNDS = 5
WARMUP_STEPS = 2  # the first fit on a model: traces and compiles the training step
SKIP_STEPS = StepTimer(1).skip  # steps left out after each fit's first one, as in `train`
REAL_LOOP_EPOCHS = 3  # section 6: the rate is the median of the epochs' steady-state rates
TUMOR_FRACTION = 0.5
SEED = 0

MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
INFERENCE_REPEATS = 3
INFERENCE_CASE_SLICES = (30, 40)  # pick a case with this many slices (else the one nearest the middle)
MEMORY_IMAGE_SIZE = data.NATIVE_SIZE
MEMORY_STEPS = 3

QUICK = {
    "steps": 2,
    "cases": 6,
    "image_size": 32,
    "matmul_repeats": 3,
    "inference_repeats": 1,
    "rounds": 2,
    "pipeline_rounds": 1,
    "memory_check": False,
    "real_loop_epochs": 2,
}

DEFAULT_OUT = "results/benchmark.json"
BUSY_SHARE = 0.1  # warn when other processes used more than this share of all cores during the benchmark
# The original notebooks' ImageDataGenerator settings (the same for images and masks).
ORIGINAL_AUGMENTATION = {
    "rotation_range": 0.2,
    "width_shift_range": 0.05,
    "height_shift_range": 0.05,
    "shear_range": 0.05,
    "zoom_range": 0.05,
    "horizontal_flip": True,
    "fill_mode": "nearest",
}
ORIGINAL_SEED = 1


FUSED_BATCHNORM = {"on": True}  # --stock-batchnorm: Keras' own layer instead, to measure what the fused one gives


def built_as_train_builds(kind, **settings):
    """A model as `train` builds it: with TensorFlow's fused batch normalization (`FusedBatchNormalization`)."""
    return lambda size, precision="float32": models.build_model(
        kind,
        size,
        precision=precision,
        fused_batchnorm=FUSED_BATCHNORM["on"] and keras.backend.backend() == "tensorflow",
        **settings,
    )


# how `lgg.models.exportable` rebuilds each model (float32, Keras' own layers): what `predict` loads
EXPORTED = {
    "unet": ("unet", {"base_filters": 16}),
    "resnet50_unet": ("resnet50-unet", {}),
    "classifier_light": ("classifier", {"backbone": "light"}),
}
MODELS = {
    "unet": ("U-Net (base 16)", "segmentation", built_as_train_builds("unet", base_filters=16)),
    "resnet50_unet": ("ResNet50 U-Net", "segmentation", built_as_train_builds("resnet50-unet")),
    "classifier_light": ("Classifier (light)", "classification", built_as_train_builds("classifier", backbone="light")),
}


# ----------------------------------------------------------------------------- helpers
def log(message):
    print(message, flush=True)


def rate(slices, seconds):
    return slices / seconds if seconds > 0 else float("nan")


def warm_up(model, dataset, steps=WARMUP_STEPS):
    """The first fit on a model (or on a dataset of another element shape): traces and compiles the step."""
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)  # the datasets shuffle
    gc.collect()


def timed_fit(model, dataset, steps, batch_size):
    """Steady-state training rate of one `model.fit` (`StepTimer`): `steps` timed steps after the fit's
    first step and `SKIP_STEPS` more; the fit's start and its teardown after the last step are left out."""
    timer = StepTimer(batch_size)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=1 + SKIP_STEPS + steps, epochs=1, verbose=0, shuffle=False, callbacks=[timer])
    wall = time.perf_counter() - start
    gc.collect()  # drop the finished fit's iterator (and its prefetch thread) before the next timing
    seconds = timer.step_seconds()
    return {
        "slices_per_s": timer.slices_per_s(),
        "step_rates": (batch_size / seconds).tolist(),
        "steps": len(seconds),
        "fit_wall_s": wall,  # with the first steps and the teardown: not a throughput
    }


def time_batches(batches, steps):
    """Wall and CPU seconds (all threads of this process) to draw `steps` batches from an input pipeline
    alone (the first, which starts its shuffle buffers and threads, is drawn outside the timing)."""
    next(batches)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(batches)
    return time.perf_counter() - start, time.process_time() - cpu_start


def compiled(key, size, jit_compile=None, precision="float32"):
    """A model built and compiled as `train` does (`jit_compile=None`: XLA as `train` decides on this machine)."""
    _, task, build = MODELS[key]
    return train.compile_model(build(size, precision), task, jit_compile=jit_compile)


def release(model):
    del model
    keras.backend.clear_session()
    gc.collect()


def training_targets(task, masks, slices):
    """Masks and tumor_fraction for segmentation; has_tumor labels and no oversampling for classification."""
    has_tumor = slices.has_tumor.to_numpy()
    if task == "classification":
        return slices.has_tumor.to_numpy(np.float32), None
    # Oversampling needs both kinds of slice; a tiny --cases selection may lack one.
    fraction = TUMOR_FRACTION if 0 < has_tumor.sum() < len(has_tumor) else None
    return masks, fraction


def training_dataset(task, images, masks, slices, batch_size):
    targets, fraction = training_targets(task, masks, slices)
    dataset, _ = data.training_dataset(
        images,
        targets,
        batch_size,
        seed=SEED,
        tumor_fraction=fraction,
        has_tumor=slices.has_tumor.to_numpy(),
    )
    return dataset


# ----------------------------------------------------------------------------- 1. machine
def spread(values):
    """Median, min and max of one setup's rates (or ratios) over the rounds of a side-by-side timing."""
    return {"median": float(np.median(values)), "min": float(min(values)), "max": float(max(values))}


def machine_facts():
    return {
        **train.cpu(),
        "cores": os.cpu_count(),
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "environment": train.environment(),
    }


class OtherLoad:
    """Share of all cores that processes other than this one (and its children) used since creation."""

    def __init__(self):
        self.start = self._readings()

    @staticmethod
    def _readings():
        system = psutil.cpu_times()
        own = psutil.Process().cpu_times()
        # Linux counts guest time inside user and nice already; steal (taken by the hypervisor) counts as busy.
        busy = sum(system) - system.idle - sum(getattr(system, name, 0.0) for name in ("iowait", "guest", "guest_nice"))
        return time.perf_counter(), busy, own.user + own.system + own.children_user + own.children_system

    def share(self):
        (wall0, busy0, own0), (wall1, busy1, own1) = self.start, self._readings()
        return max(0.0, (busy1 - busy0) - (own1 - own0)) / ((wall1 - wall0) * (os.cpu_count() or 1))


# ----------------------------------------------------------------------------- 2. matmul peak
def measure_matmul(n=MATMUL_SIZE, repeats=MATMUL_REPEATS, dtype="float32"):
    """Best-of-`repeats` GFLOP/s of one `n x n` matmul (2 n^3 FLOPs), after a warm-up."""
    a = tf.cast(tf.random.stateless_normal((n, n), seed=(1, 2)), dtype)
    b = tf.cast(tf.random.stateless_normal((n, n), seed=(3, 4)), dtype)
    tf.linalg.matmul(a, b)[0, 0].numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tf.linalg.matmul(a, b)[0, 0].numpy()  # reading an element waits for the result
        times.append(time.perf_counter() - start)
    best = min(times)
    return {
        "n": n,
        "dtype": dtype,
        "best_s": best,
        "median_s": float(np.median(times)),
        "gflops": 2 * n**3 / best / 1e9,
    }


# ----------------------------------------------------------------------------- 3c. FLOPs
def _leaf_layers(model):
    seen = set()

    def walk(layer):
        for child in getattr(layer, "layers", []):
            if id(child) in seen:
                continue
            seen.add(id(child))
            yield from walk(child) if isinstance(child, keras.Model) else [child]

    yield from walk(model)


def count_flops(model):
    """Forward multiply-accumulates per slice of the conv, transposed-conv and dense layers.

    Conv2D / DepthwiseConv2D: out_h * out_w * kernel size (kh * kw * in/groups * out);
    Conv2DTranspose: in_h * in_w * kh * kw * in * out; Dense: positions * in * out.
    """
    macs, by_type = 0, {}
    for layer in _leaf_layers(model):
        if isinstance(layer, keras.layers.Conv2DTranspose):
            layer_macs = int(np.prod(layer.input.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            depthwise = int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.depthwise_kernel.shape))
            layer_macs = depthwise + int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.pointwise_kernel.shape))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            layer_macs = int(np.prod(layer.output.shape[1:3])) * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            layer_macs = int(np.prod(layer.input.shape[1:-1])) * int(np.prod(layer.kernel.shape))
        else:
            continue
        macs += layer_macs
        name = type(layer).__name__
        by_type[name] = by_type.get(name, 0) + layer_macs
    forward = 2 * macs
    return {
        "forward_gflop_per_slice": forward / 1e9,
        "training_gflop_per_slice": 3 * forward / 1e9,
        "forward_gflop_by_layer_type": {name: 2 * value / 1e9 for name, value in by_type.items()},
        "parameters": model.count_params(),
    }


# ----------------------------------------------------------------------------- 3a/3b. training
def measure_training(model, dataset, steps, batch_size, rounds=PIPELINE_ROUNDS):
    """Steady-state training rate through the input pipeline and on one fixed in-memory batch, timed in
    turn for `rounds` rounds, and the pipeline alone.

    `slices_per_s` is the median over the rounds through the pipeline; `step_rate_p10/p90` spread the
    single steps of all rounds. `pipeline_cost_share` is what the pipeline costs the training loop, the
    median over rounds of 1 - (rate through the pipeline / rate on a fixed batch): the loop waiting for
    a batch plus the cores the pipeline's threads take from the step (negative: within the noise).
    `pipeline_cores_at_training_rate` says how much of that can be the cores: the pipeline's CPU
    seconds per slice (measured alone) times the training rate.
    """
    start = time.perf_counter()
    warm_up(model, dataset.repeat())
    fixed = tf.data.Dataset.from_tensors(next(iter(dataset))).repeat()
    warm_up(model, fixed, 1)  # its static batch size retraces the step once
    result = {"batch_size": batch_size, "rounds": rounds, "warm_up_s": time.perf_counter() - start}
    through, on_fixed = [], []
    for _ in range(rounds):
        through.append(timed_fit(model, dataset.repeat(), steps, batch_size))
        on_fixed.append(timed_fit(model, fixed, steps, batch_size)["slices_per_s"])
    rates = [timing["slices_per_s"] for timing in through]
    step_rates = [rate for timing in through for rate in timing["step_rates"]]
    result.update(
        steps=steps,
        slices_per_s=float(np.median(rates)),
        rounds_slices_per_s=rates,
        step_rate_p10=float(np.percentile(step_rates, 10)),
        step_rate_p90=float(np.percentile(step_rates, 90)),
        fixed_batch_slices_per_s=float(np.median(on_fixed)),
        pipeline_cost_share=float(np.median([1 - a / b for a, b in zip(rates, on_fixed)])),
    )
    seconds, cpu_seconds = time_batches(iter(dataset.repeat()), steps)
    result["pipeline_only_slices_per_s"] = rate(steps * batch_size, seconds)
    result["pipeline_cpu_s_per_slice"] = cpu_seconds / (steps * batch_size)
    result["pipeline_cores_at_training_rate"] = result["pipeline_cpu_s_per_slice"] * result["slices_per_s"]
    return result


# ----------------------------------------------------------------------------- 3d. inference
def pick_inference_case(slices):
    counts = slices.groupby("case_id").size()
    low, high = INFERENCE_CASE_SLICES
    in_range = counts[(counts >= low) & (counts <= high)]
    candidates = in_range if len(in_range) else counts
    return (candidates - (low + high) / 2).abs().idxmin()


def measure_inference(model, case_images, repeats=INFERENCE_REPEATS):
    """Median seconds of `predict_probabilities` on one whole case (uint8, native size), after a warm-up."""
    start = time.perf_counter()
    inference.predict_probabilities(model, case_images)  # traces the predict step
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        inference.predict_probabilities(model, case_images)
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {
        "seconds_per_case": median,
        "slices_per_s": rate(len(case_images), median),
        "repeats": repeats,
        "first_call_s": first,
    }


def benchmark_model(key, arrays, case_images, steps, batch_size, size, inference_repeats, rounds):
    label, task, _ = MODELS[key]
    images, masks, slices = arrays
    log(f"  {label}: building and compiling")
    model = compiled(key, size)
    result = {"label": label, "task": task, "image_size": size}
    result["flops"] = count_flops(model)
    dataset = training_dataset(task, images, masks, slices, batch_size)
    log(f"  {label}: training, {rounds} rounds of {steps} steady-state steps through the pipeline and on one batch")
    result["training"] = measure_training(model, dataset, steps, batch_size, rounds)
    log(f"  {label}: inference on one case of {len(case_images)} slices, with the model as it is exported")
    kind, settings = EXPORTED[key]
    result["inference"] = measure_inference(models.exportable(model, kind, size, **settings), case_images,
                                            inference_repeats)  # fmt: skip
    release(model)
    return result


def add_efficiency(result, peak_gflops):
    """Achieved training GFLOP/s (end to end and on a fixed batch) and its fraction of the matmul peak."""
    per_slice = result["flops"]["training_gflop_per_slice"]
    training = result["training"]
    for prefix in ("", "fixed_batch_"):
        slices_per_s = training[f"{prefix}slices_per_s"]
        achieved = per_slice * slices_per_s
        training[f"{prefix}achieved_gflops"] = achieved
        training[f"{prefix}fraction_of_matmul_peak"] = achieved / peak_gflops


# ----------------------------------------------------------------------------- 4. original pipeline
def image_data_generator_class():
    try:
        from keras.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, "keras.preprocessing.image.ImageDataGenerator"
    except ImportError:  # Keras 3 exposes it only under its legacy module
        from keras.src.legacy.preprocessing.image import ImageDataGenerator

        return ImageDataGenerator, "keras.src.legacy.preprocessing.image.ImageDataGenerator"


def check_tif_reading(slices):
    """How Keras' `load_img` (PIL) sees the first image and mask, as the original pipeline reads them."""
    from PIL import Image

    row = slices[slices.has_tumor].iloc[0] if slices.has_tumor.any() else slices.iloc[0]
    facts = {}
    for kind, path, mode in (("image", row.image_path, "rgb"), ("mask", row.mask_path, "grayscale")):
        with Image.open(path) as image:
            facts[f"{kind}_pil_mode"], facts[f"{kind}_size"] = image.mode, list(image.size)
        array = keras.utils.img_to_array(keras.utils.load_img(path, color_mode=mode))
        facts[f"{kind}_load_img_shape"], facts[f"{kind}_max"] = list(array.shape), float(array.max())
    return facts


def original_generator(slices, size, batch_size):
    """The notebooks' training generator: two `flow_from_dataframe` streams (same seed), masks binarized."""
    ImageDataGenerator, _ = image_data_generator_class()
    absolute = {column: slices[column].map(os.path.abspath) for column in ("image_path", "mask_path")}
    frame = slices.assign(**absolute)
    common = {"class_mode": None, "target_size": (size, size), "batch_size": batch_size, "seed": ORIGINAL_SEED}
    images = ImageDataGenerator(**ORIGINAL_AUGMENTATION).flow_from_dataframe(
        frame, x_col="image_path", color_mode="rgb", **common
    )
    masks = ImageDataGenerator(**ORIGINAL_AUGMENTATION).flow_from_dataframe(
        frame, x_col="mask_path", color_mode="grayscale", **common
    )
    for image, mask in zip(images, masks):
        # adjust_data: the originals also divided images by 255; our models rescale internally.
        yield image.astype(np.float32), (mask / 255 > 0.5).astype(np.float32)


def benchmark_original_generator(slices, steps, batch_size, size):
    """The original notebooks' input pipeline on its own: which ImageDataGenerator, the .tif check, slices/s."""
    _, source = image_data_generator_class()
    result = {"image_data_generator": source, "augmentation": ORIGINAL_AUGMENTATION, "steps": steps}
    result["tif_reading"] = check_tif_reading(slices)
    seconds, cpu_seconds = time_batches(original_generator(slices, size, batch_size), steps)
    result["pipeline_only_slices_per_s"] = rate(steps * batch_size, seconds)
    result["pipeline_cpu_s_per_slice"] = cpu_seconds / (steps * batch_size)
    return result


# ----------------------------------------------------------------------------- 5. side by side
def side_by_side(arrays, steps, batch_size, size, rounds):
    """The U-Net's steady-state training rate in four setups, timed in turn, round after round.

    Setups: the original notebooks' (`ImageDataGenerator` reading the .tif files, Keras' own
    BatchNormalization, float32, no XLA), ours (`lgg.data.training_dataset`, the U-Net as `train`
    builds it: TensorFlow's fused batch normalization) in float32 with XLA and without, and ours under
    `mixed_bfloat16` without XLA (XLA's CPU code has no bfloat16 kernels of its own). Each round
    times every setup once, so a slow spell of the machine hits all of them; the ratios are taken
    within each round and reported as median, min and max over the rounds. `ours` is the float32
    setup `train` picks on this machine (`lgg.train.xla_by_default`), `train_picks` the setup it
    picks when the precision too is left to it (`lgg.train.precision_by_default`: bfloat16 with AVX-512 BF16).
    """
    images, masks, slices = arrays
    dataset = training_dataset("segmentation", images, masks, slices, batch_size)
    setups = {
        "original": (  # the original notebooks' U-Net had Keras' own BatchNormalization
            train.compile_model(models.build_model("unet", size), "segmentation", jit_compile=False),
            # a fresh generator per fit: a finished fit's prefetch thread must not share one with the next
            lambda: original_generator(slices, size, batch_size),
        ),
        "xla": (compiled("unet", size, jit_compile=True), lambda: dataset.repeat()),
        "no_xla": (compiled("unet", size, jit_compile=False), lambda: dataset.repeat()),
        "mixed_bfloat16": (
            compiled("unet", size, jit_compile=False, precision="mixed_bfloat16"),
            lambda: dataset.repeat(),
        ),
    }
    for model, batches in setups.values():
        warm_up(model, batches())
    rates = {name: [] for name in setups}
    for round_index in range(rounds):
        for name, (model, batches) in setups.items():
            rates[name].append(timed_fit(model, batches(), steps, batch_size)["slices_per_s"])
        log(f"  round {round_index + 1}/{rounds}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()))
    ours = "xla" if train.resolve_jit_compile(None) else "no_xla"
    picks = "mixed_bfloat16" if train.resolve_precision(None, ours == "xla") == "mixed_bfloat16" else ours

    def ratio(numerator, denominator):
        return spread([a / b for a, b in zip(rates[numerator], rates[denominator])])

    for model, _ in setups.values():
        release(model)
    return {
        "rounds": rounds,
        "steps": steps,
        "batch_size": batch_size,
        "ours": ours,
        "slices_per_s": {name: {**spread(values), "all": values} for name, values in rates.items()},
        "ours_over_original": ratio(ours, "original"),
        "train_picks": picks,
        "train_picks_over_original": ratio(picks, "original"),
        "mixed_bfloat16_over_original": ratio("mixed_bfloat16", "original"),
        "xla_over_no_xla": ratio("xla", "no_xla"),
        "mixed_bfloat16_over_float32_no_xla": ratio("mixed_bfloat16", "no_xla"),
    }


# ----------------------------------------------------------------------------- 6. the real loop
def real_loop(data_dir, cases, size, batch_size, epochs):
    """`python -m lgg train unet` on the first `cases` cases for `epochs` epochs with the headline's
    sampling (tumor fraction 0.5), in float32 as the table's rows, and the compiler `train` picks on this
    machine; its steady-state training rate per epoch from `history.csv` (`StepTimer`), and their median."""
    import pandas as pd

    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        command = [sys.executable, "-m", "lgg", "train", "unet", "--data", str(data_dir), "--out", str(out)]
        command += ["--max-cases", str(cases), "--image-size", str(size), "--batch-size", str(batch_size)]
        command += ["--epochs", str(epochs), "--tumor-fraction", str(TUMOR_FRACTION), "--patience", str(epochs)]
        command += ["--precision", "float32"]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        history = pd.read_csv(out / "history.csv")
        config = json.loads((out / "config.json").read_text())
    rates = history.train_slices_per_s.dropna()
    return {
        "command": "python " + " ".join(command[1:]).replace(str(out), "RUN"),
        "epochs": len(history),
        "jit_compile_used": config.get("jit_compile_used"),
        "precision": config["precision_used"],
        "train_slices_per_s_by_epoch": history.train_slices_per_s.tolist(),
        "slices_per_s": float(rates.median()) if len(rates) else float("nan"),
        "wall_s": time.perf_counter() - start,
    }


# ----------------------------------------------------------------------------- 7. memory
def memory_worker(data_dir, batch_size, steps, out_path):
    """Runs in a fresh process: load all cases at 256x256, train the U-Net a few steps, record memory."""
    process = psutil.Process()

    def rss_mb():
        return process.memory_info().rss / 2**20

    result = {"image_size": MEMORY_IMAGE_SIZE, "batch_size": batch_size, "steps": steps, "rss_at_start_mb": rss_mb()}
    start = time.perf_counter()
    slices = data.find_slices(data_dir)
    images, masks = data.load_arrays(slices, MEMORY_IMAGE_SIZE)
    result.update(
        cases=int(slices.case_id.nunique()),
        slices=len(slices),
        arrays_mb=(images.nbytes + masks.nbytes) / 2**20,
        load_s=time.perf_counter() - start,
        rss_after_load_mb=rss_mb(),
    )
    log(f"  loaded {len(slices)} slices at {MEMORY_IMAGE_SIZE}x{MEMORY_IMAGE_SIZE} in {result['load_s']:.1f} s")
    model = compiled("unet", MEMORY_IMAGE_SIZE)
    result["jit_compile"] = train.resolve_jit_compile(None)
    dataset = training_dataset("segmentation", images, masks, slices, batch_size)
    start = time.perf_counter()
    warm_up(model, dataset.repeat(), steps)
    result["fit_s"] = time.perf_counter() - start
    result["rss_after_training_mb"] = rss_mb()
    result["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    try:  # the peak of this process's own address space
        status = Path("/proc/self/status").read_text().splitlines()
        result["vm_hwm_mb"] = int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        pass
    save_json(result, out_path)


def benchmark_memory(data_dir, batch_size, steps=MEMORY_STEPS):
    """Run `memory_worker` in a fresh process, so its peak memory is that of this training alone.

    Not a direct child: Linux carries the peak resident memory of the process that execs into the new
    program's `ru_maxrss`, so a child started from this process (gigabytes by now) would report this
    process's peak. A shell forks the worker from its own small process instead (`cmd; exit $?`
    makes it fork rather than exec)."""
    with tempfile.TemporaryDirectory() as folder:
        out_path = Path(folder) / "memory.json"
        command = [sys.executable, __file__, "--memory-worker", str(out_path), "--data", str(data_dir)]
        command += ["--batch-size", str(batch_size), "--steps", str(steps)]
        command += [] if FUSED_BATCHNORM["on"] else ["--stock-batchnorm"]
        subprocess.run(["/bin/sh", "-c", '"$@"; exit $?', "sh", *command], check=True)
        return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------- report
def print_table(results):
    machine = results["machine"]
    env = machine["environment"]
    flags = ", ".join(f"{flag}={'yes' if present else 'no'}" for flag, present in machine["cpu_flags"].items())
    log("\n" + "=" * 100)
    log(f"CPU: {machine['cpu_model']}, {machine['cores']} cores ({flags})")
    log(f"TensorFlow {env['tensorflow']}, Keras {env['keras']}, NumPy {env['numpy']}, Python {env['python']}")
    settings = results["settings"]
    log(
        f"Settings: image {settings['image_size']}x{settings['image_size']}, batch {settings['batch_size']}, "
        f"{settings['cases']} cases ({settings['slices']} slices), steps {settings['steps']}"
        + (" [QUICK]" if settings["quick"] else "")
    )
    for matmul in results.get("matmul", {}).values():
        log(f"Matmul peak ({matmul['dtype']}, {matmul['n']}x{matmul['n']}): {matmul['gflops']:.1f} GFLOP/s")

    if results.get("models"):
        log("")
        header = (
            f"{'model':<20}{'params':>9}{'train GF':>9}{'sl/s (p10-p90)':>18}{'fixed sl/s':>11}"
            f"{'pipe sl/s':>10}{'pipe cost':>10}{'pipe cores':>11}{'GFLOP/s':>9}{'%peak':>7}{'infer s/case':>13}"
        )
        log(header)
        log("-" * len(header))
        for result in results["models"].values():
            flops, training, infer = result["flops"], result["training"], result["inference"]
            spread = f"{training['slices_per_s']:.1f} ({training['step_rate_p10']:.0f}-{training['step_rate_p90']:.0f})"
            log(
                f"{result['label']:<20}{flops['parameters'] / 1e6:>8.2f}M{flops['training_gflop_per_slice']:>9.2f}"
                f"{spread:>18}{training['fixed_batch_slices_per_s']:>11.1f}"
                f"{training['pipeline_only_slices_per_s']:>10.0f}{training['pipeline_cost_share']:>10.0%}"
                f"{training['pipeline_cores_at_training_rate']:>11.2f}{training['achieved_gflops']:>9.1f}"
                f"{training['fraction_of_matmul_peak']:>7.0%}{infer['seconds_per_case']:>13.2f}"
            )
        case = results["inference_case"]
        log(
            f"(sl/s: steady-state training steps through lgg.data.training_dataset, XLA "
            f"{'on' if results['settings']['jit_compile'] else 'off'} as `train` picks here; fixed: one in-memory "
            f"batch; pipe: input pipeline alone;\n pipe cost: 1 - sl/s / fixed; pipe cores: the pipeline's CPU "
            f"at the training rate; GFLOP/s and %peak from sl/s; inference: {case['case_id']}, "
            f"{case['slices']} slices at 256x256)"
        )

    original, both = results.get("original_pipeline"), results.get("side_by_side")
    if original:
        log(
            f"\nOriginal notebooks' pipeline ({original['image_data_generator']}.flow_from_dataframe): "
            f"generator alone {original['pipeline_only_slices_per_s']:.1f} slices/s"
        )
    if both:
        rates = both["slices_per_s"]
        log(
            f"Side by side, U-Net training slices/s, median (min-max) of {both['rounds']} interleaved rounds of "
            f"{both['steps']} steady-state steps (ours = {both['ours']}; `train` picks {both['train_picks']}):\n  "
            + ", ".join(f"{name} {r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})" for name, r in rates.items())
        )
        for key in ("ours_over_original", "train_picks_over_original", "mixed_bfloat16_over_original",
                    "xla_over_no_xla", "mixed_bfloat16_over_float32_no_xla"):  # fmt: skip
            r = both[key]
            log(f"  {key}: {r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})")
    agreement = results.get("agreement")
    if agreement:
        log(
            "U-Net, ours, three timings of the same code: "
            + ", ".join(f"{name} {value:.1f}" for name, value in agreement["slices_per_s"].items())
            + f" slices/s; largest / smallest {agreement['largest_over_smallest']:.2f}"
        )
    memory = results.get("memory")
    if memory:
        log(
            f"Memory, U-Net training at {memory['image_size']}x{memory['image_size']} on all {memory['cases']} cases "
            f"({memory['slices']} slices, arrays {memory['arrays_mb']:.0f} MB): "
            f"peak RSS {memory['ru_maxrss_mb']:.0f} MB "
            f"(ru_maxrss; VmHWM {memory.get('vm_hwm_mb', float('nan')):.0f} MB), "
            f"RSS after training {memory['rss_after_training_mb']:.0f} MB"
        )
    log(f"Total benchmark time: {results['total_s'] / 60:.1f} min")
    busy = machine["other_processes_cpu_share"]
    if busy > BUSY_SHARE:
        log(f"WARNING: other processes used {busy:.0%} of all cores meanwhile; these timings are low and noisy.")
    log("=" * 100)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON to write (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")

    def count(flag, maximum=100_000):  # a whole number > 0, refused at the door with the flag named
        return guards.argparse_type(guards.positive, flag, integer=True, maximum=maximum)

    def image_size(text):  # every model halves it 5 times (the ResNet50 U-Net)
        size = count("--image-size", data.NATIVE_SIZE)(text)  # more only enlarges the 256x256 slices
        if size % 32:
            raise argparse.ArgumentTypeError(f"must be a multiple of 32; received {size}")
        return size

    parser.add_argument(
        "--steps", type=count("--steps"), help=f"timed training steps for every model (default: {STEPS})"
    )
    parser.add_argument("--image-size", type=image_size, help=f"training image size (default: {IMAGE_SIZE})")
    parser.add_argument(
        "--batch-size", type=count("--batch-size", 4096), default=BATCH_SIZE, help="default: %(default)s"
    )
    parser.add_argument("--cases", type=count("--cases"), help=f"cases to train on (default: {CASES})")
    parser.add_argument(
        "--rounds", type=count("--rounds"), help=f"interleaved rounds of the side-by-side timing (default: {ROUNDS})"
    )
    parser.add_argument(
        "--memory-check",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure peak memory at 256x256 on all cases (default: on, off with --quick)",
    )
    parser.add_argument(
        "--stock-batchnorm",
        action="store_true",
        help="build our models with Keras' own BatchNormalization (train uses TensorFlow's fused kernel)",
    )
    parser.add_argument("--memory-worker", metavar="JSON", help=argparse.SUPPRESS)  # internal: the subprocess
    return parser.parse_args(argv)


def check_replaces_like(out, quick, fused_batchnorm):
    """An existing benchmark is replaced only by one of its kind: a full run not by a --quick smoke run, and a
    run with TensorFlow's fused batch normalization not by one with Keras' own, nor the reverse (the README
    reads `results/benchmark.json` as the fused one, `benchmark-stock-batchnorm.json` as the stock one)."""
    if not Path(out).is_file():
        return
    settings = json.loads(Path(out).read_text()).get("settings", {})
    if quick and settings.get("quick") is False:
        raise SystemExit(f"{out} holds a full benchmark; a --quick smoke run does not replace it: give another --out")
    if settings.get("fused_batchnorm", True) != fused_batchnorm:
        raise SystemExit(
            f"{out} holds a benchmark with {'fused' if settings.get('fused_batchnorm', True) else 'stock'} batch "
            f"normalization; this one would be {'fused' if fused_batchnorm else 'stock'}: give another --out "
            "(results/benchmark-stock-batchnorm.json for --stock-batchnorm)"
        )


def main(argv=None):
    args = parse_args(argv)
    FUSED_BATCHNORM["on"] = not args.stock_batchnorm
    committed = (Path(__file__).resolve().parent.parent / DEFAULT_OUT).resolve()
    if args.quick and Path(args.out).resolve() in (committed, Path(DEFAULT_OUT).resolve()):
        raise SystemExit(f"--quick is a smoke run: give --out (the default, {DEFAULT_OUT}, is what the README shows)")
    if args.memory_worker:
        memory_worker(args.data, args.batch_size, args.steps or MEMORY_STEPS, args.memory_worker)
        return
    check_own_json(args.out, ("machine", "settings", "side_by_side"), "benchmarks/bench.py", [args.data])  # first
    check_replaces_like(args.out, quick=args.quick, fused_batchnorm=not args.stock_batchnorm)
    quick = QUICK if args.quick else {}
    size = args.image_size or quick.get("image_size", IMAGE_SIZE)
    cases = args.cases or quick.get("cases", CASES)
    steps = {key: args.steps or quick.get("steps", default) for key, default in STEPS.items()}
    memory_check = args.memory_check if args.memory_check is not None else quick.get("memory_check", True)
    rounds = args.rounds or quick.get("rounds", ROUNDS)
    batch_size = args.batch_size
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started, other_load = time.perf_counter(), OtherLoad()

    def save():  # once, at the end: a benchmark that fails half way leaves the previous file as it was
        results["total_s"] = time.perf_counter() - started
        results["machine"]["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
        results["machine"]["other_processes_cpu_share"] = other_load.share()
        save_json(results, out)

    log("1. Machine")
    results = {"machine": machine_facts()}
    log("2. Matmul peak")
    repeats = quick.get("matmul_repeats", MATMUL_REPEATS)
    results["matmul"] = {dtype: measure_matmul(MATMUL_SIZE, repeats, dtype) for dtype in ("float32", "bfloat16")}
    peak = results["matmul"]["float32"]["gflops"]

    log(f"3. Models: loading up to {cases} cases at {size}x{size}")
    slices = data.find_slices(args.data, max_cases=cases)
    images, masks = data.load_arrays(slices, size)
    log(f"  {slices.case_id.nunique()} cases, {len(slices)} slices ({int(slices.has_tumor.sum())} with tumor)")
    case_id = pick_inference_case(slices)
    case_images = data.load_arrays(slices[slices.case_id == case_id], data.NATIVE_SIZE, with_masks=False)
    results["settings"] = {
        "quick": args.quick,
        "image_size": size,
        "batch_size": batch_size,
        "cases": int(slices.case_id.nunique()),
        "slices": len(slices),
        "tumor_slices": int(slices.has_tumor.sum()),
        "steps": steps,
        "warmup_steps": WARMUP_STEPS,
        "side_by_side_rounds": rounds,
        "tumor_fraction": TUMOR_FRACTION,
        "memory_check": memory_check,
        "jit_compile": train.resolve_jit_compile(None),
        "fused_batchnorm": FUSED_BATCHNORM["on"],
        "timing": f"steady-state steps (lgg.callbacks.StepTimer), {SKIP_STEPS} + 1 left out at the start of each fit",
    }
    results["inference_case"] = {"case_id": case_id, "slices": len(case_images), "image_size": data.NATIVE_SIZE}
    results["models"] = {}
    inference_repeats = quick.get("inference_repeats", INFERENCE_REPEATS)
    arrays = (images, masks, slices)
    for key in MODELS:
        pipeline_rounds = quick.get("pipeline_rounds", PIPELINE_ROUNDS)
        result = benchmark_model(key, arrays, case_images, steps[key], batch_size, size, inference_repeats,
                                 pipeline_rounds)  # fmt: skip
        add_efficiency(result, peak)
        results["models"][key] = result

    log("4. Original notebooks' input pipeline (ImageDataGenerator) alone")
    results["original_pipeline"] = benchmark_original_generator(slices, steps["original_pipeline"], batch_size, size)

    log(f"5. Side by side, {rounds} interleaved rounds: original, ours with XLA, without, in mixed_bfloat16")
    results["side_by_side"] = side_by_side(arrays, steps["side_by_side"], batch_size, size, rounds)

    epochs = quick.get("real_loop_epochs", REAL_LOOP_EPOCHS)
    log(f"6. The real loop: python -m lgg train unet, {epochs} epochs on the same {cases} cases")
    results["real_loop"] = real_loop(args.data, cases, size, batch_size, epochs)
    both = results["side_by_side"]
    timings = {
        "single timing": results["models"]["unet"]["training"]["slices_per_s"],
        "side-by-side median": both["slices_per_s"][both["ours"]]["median"],
        "real loop": results["real_loop"]["slices_per_s"],
    }
    spread = max(timings.values()) / min(timings.values())
    results["agreement"] = {"slices_per_s": timings, "largest_over_smallest": spread}

    if memory_check:
        log(f"7. Memory: U-Net at {MEMORY_IMAGE_SIZE}x{MEMORY_IMAGE_SIZE} on all cases (a fresh process)")
        del arrays, images, masks  # free this process's copies before the subprocess loads all cases
        gc.collect()
        results["memory"] = benchmark_memory(args.data, batch_size)
    save()
    print_table(results)
    log(f"Wrote {out}")


if __name__ == "__main__":
    main()
