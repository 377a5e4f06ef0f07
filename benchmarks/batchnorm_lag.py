"""Early in training, does BatchNorm's moving average lag behind the network, and is that bfloat16's doing?

    python benchmarks/batchnorm_lag.py --data data --out results/batchnorm_lag.json

For float32 and for `mixed_bfloat16` (both without XLA), trains the U-Net of the results table
(128 px, batch 16, half of each batch tumor slices, Adam at 1e-3) for `--steps` steps on the first 20
cases, then on the next 10 cases compares:

- the Dice over all their slices (threshold 0.5) with BatchNorm's moving averages (inference, as
  an exported model predicts) and with each batch's own statistics (`training=True`);
- per BatchNorm layer, the moving mean and variance with the mean and variance of that layer's
  inputs over those slices, the network running in inference mode: how far the moving mean is off
  (in standard deviations) and the ratio of moving to true variance (1 = no lag).

Same seed, same data stream, same steps for both precisions. The U-Net is built with Keras' own
BatchNormalization, as the notebooks train it (`train` uses TensorFlow's fused kernel, whose moving
variance takes the unbiased batch variance: a difference of 0.1 % or less at 128 px).
"""

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from lgg import data, guards, models, train  # noqa: E402
from lgg.files import check_own_json, save_json  # noqa: E402

SIZE, BATCH, TRAIN_CASES, CHECK_CASES = 128, 16, 20, 10


def dice(probabilities, masks):
    predicted, true = probabilities > 0.5, masks > 0
    return float(2 * (predicted & true).sum() / max(predicted.sum() + true.sum(), 1))


def lag(precision, images, masks, slices, check_images, check_masks, steps, seed):
    keras.utils.set_random_seed(seed)
    dataset, _ = data.training_dataset(
        images, masks, BATCH, seed=seed, tumor_fraction=0.5, has_tumor=slices.has_tumor.to_numpy()
    )
    model = models.build_model("unet", SIZE, precision=precision)
    model = train.compile_model(model, "segmentation", jit_compile=False)
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    seconds = time.perf_counter() - start
    x = check_images.astype(np.float32)
    batches = range(0, len(x), 32)
    moving = np.concatenate([model(x[i : i + 32], training=False) for i in batches]).astype(np.float32)
    batch_stats = np.concatenate([model(x[i : i + 32], training=True) for i in batches]).astype(np.float32)
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    probe = keras.Model(model.input, [layer.input for layer in norms])
    inputs = [[np.asarray(a, np.float32) for a in probe(x[i : i + 32], training=False)] for i in batches]
    layers = []
    for layer, values in zip(norms, zip(*inputs)):
        values = np.concatenate(values)
        mean, variance = values.mean(axis=(0, 1, 2)), values.var(axis=(0, 1, 2))
        moving_mean, moving_variance = (np.asarray(v, np.float32) for v in (layer.moving_mean, layer.moving_variance))
        shift = np.abs(moving_mean - mean) / np.sqrt(variance + layer.epsilon)
        ratio = moving_variance / np.maximum(variance, 1e-12)
        layers.append(
            {
                "layer": layer.name,
                "mean_shift_in_std_median": float(np.median(shift)),
                "variance_ratio_median": float(np.median(ratio)),
                "variance_ratio_min": float(ratio.min()),
                "variance_ratio_max": float(ratio.max()),
            }
        )
    return {
        "precision": precision,
        "steps": steps,
        "training_s": seconds,
        "dice_moving_averages": dice(moving, check_masks),
        "dice_batch_statistics": dice(batch_stats, check_masks),
        "layers": layers,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--out", default="results/batchnorm_lag.json", help="JSON to write (default: %(default)s)")
    steps = guards.argparse_type(guards.positive, "--steps", integer=True, maximum=100_000)
    seed = guards.argparse_type(guards.non_negative, "--seed", integer=True, maximum=2**31 - 1)
    parser.add_argument("--steps", type=steps, default=200, help="training steps (default: %(default)s)")
    parser.add_argument("--seed", type=seed, default=0, help="default: %(default)s")
    args = parser.parse_args(argv)
    check_own_json(args.out, ("how", "runs", "train_cases"), "benchmarks/batchnorm_lag.py", [args.data])  # first
    slices = data.find_slices(args.data, max_cases=TRAIN_CASES + CHECK_CASES)
    cases = list(dict.fromkeys(slices.case_id))
    if len(cases) < TRAIN_CASES + CHECK_CASES:
        raise SystemExit(f"{args.data} holds {len(cases)} cases; this check needs {TRAIN_CASES + CHECK_CASES}")
    train_rows = slices[slices.case_id.isin(cases[:TRAIN_CASES])].reset_index(drop=True)
    check_rows = slices[slices.case_id.isin(cases[TRAIN_CASES:])].reset_index(drop=True)
    images, masks = data.load_arrays(train_rows, SIZE)
    check_images, check_masks = data.load_arrays(check_rows, SIZE)
    result = {
        "how": __doc__.split("\n\n", 2)[2].strip(),
        "train_cases": cases[:TRAIN_CASES],
        "check_cases": cases[TRAIN_CASES:],
        "runs": [
            lag(precision, images, masks, train_rows, check_images, check_masks, args.steps, args.seed)
            for precision in ("float32", "mixed_bfloat16")
        ],
        "environment": train.environment(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(result, args.out)
    for run in result["runs"]:
        decoder = [layer["variance_ratio_median"] for layer in run["layers"] if layer["layer"].startswith("dec")]
        print(
            f"{run['precision']}: {run['steps']} steps in {run['training_s']:.0f} s; Dice on {CHECK_CASES} other "
            f"cases {run['dice_moving_averages']:.3f} with moving averages, {run['dice_batch_statistics']:.3f} "
            f"with batch statistics; decoder BatchNorm moving / true variance, median per layer "
            f"{min(decoder):.2f} to {max(decoder):.2f}"
        )
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
