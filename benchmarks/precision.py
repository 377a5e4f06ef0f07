"""Training slices/s of the two segmenters in float32 and under `mixed_bfloat16` on this CPU, side by side.

    .venv/bin/python benchmarks/precision.py --data data --out results/precision-<cpu>.json

What `lgg.train.precision_by_default` and `xla_by_default` rest on, measurable on any machine in a few
minutes: the U-Net (base 16) and the ResNet50 U-Net as `train` builds them (fused batch normalization),
trained on the real `lgg.data` pipeline at 128 px, batch 16, in float32 and in `mixed_bfloat16` without
XLA (XLA's CPU code has no bfloat16 kernels of its own), and the U-Net in float32 with XLA (the other
choice `train` has on a CPU). Every round times each setup once (`bench.timed_fit`: steady-state steps),
in reverse order every other round, so that a slow spell of the machine hits all of them; the ratios are
taken within each round and reported as median, min and max. The share of the CPU that other processes
used meanwhile is recorded, and above `bench.BUSY_SHARE` the file says the figures are not this CPU's.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

from lgg import data, train  # noqa: E402
from lgg.files import check_own_json, save_json  # noqa: E402

# (model, precision, XLA): timed steps per fit (the ResNet50 U-Net is about 4x slower per slice)
SETUPS = {
    ("unet", "float32", False): 16,
    ("unet", "mixed_bfloat16", False): 16,
    ("unet", "float32", True): 16,
    ("resnet50_unet", "float32", False): 4,
    ("resnet50_unet", "mixed_bfloat16", False): 4,
}
KINDS = {"unet": "unet", "resnet50_unet": "resnet50-unet"}  # our keys -> `train`'s model kinds


def name(setup):
    model, precision, xla = setup
    return f"{model} {precision}" + (" xla" if xla else "")


def measure(slices, size, batch_size, rounds):
    images, masks = data.load_arrays(slices, size)
    dataset = bench.training_dataset("segmentation", images, masks, slices, batch_size)
    models = {setup: bench.compiled(setup[0], size, jit_compile=setup[2], precision=setup[1]) for setup in SETUPS}
    for model in models.values():
        bench.warm_up(model, dataset.repeat())
    rates = {setup: [] for setup in SETUPS}
    for round_index in range(rounds):
        order = list(SETUPS) if round_index % 2 == 0 else list(reversed(SETUPS))
        for setup in order:
            fit = bench.timed_fit(models[setup], dataset.repeat(), SETUPS[setup], batch_size)
            rates[setup].append(fit["slices_per_s"])
        bench.log(f"  round {round_index + 1}/{rounds}: " + ", ".join(f"{name(s)} {rates[s][-1]:.1f}" for s in SETUPS))
    results = {}
    for model in KINDS:
        float32, bfloat16 = rates[model, "float32", False], rates[model, "mixed_bfloat16", False]
        results[model] = {
            "slices_per_s": {
                "float32": {**bench.spread(float32), "all": float32},
                "mixed_bfloat16": {**bench.spread(bfloat16), "all": bfloat16},
            },
            "mixed_bfloat16_over_float32": bench.spread([b / f for f, b in zip(float32, bfloat16)]),
        }
    xla = rates["unet", "float32", True]
    results["unet"]["slices_per_s"]["float32_xla"] = {**bench.spread(xla), "all": xla}
    results["unet"]["xla_over_no_xla"] = bench.spread([x / f for f, x in zip(rates["unet", "float32", False], xla)])
    results["unet"]["mixed_bfloat16_over_float32_xla"] = bench.spread(
        [b / x for x, b in zip(xla, rates["unet", "mixed_bfloat16", False])]
    )
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data", help="kaggle_3m or a folder holding it (default: data)")
    parser.add_argument("--out", required=True, help="JSON to write (written once, at the end)")
    parser.add_argument("--cases", type=int, default=12, help="cases to train on (default: 12)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    for setting in ("cases", "image_size", "batch_size", "rounds"):
        if getattr(args, setting) < 1:
            parser.error(f"--{setting.replace('_', '-')} must be at least 1, got {getattr(args, setting)}")
    if args.image_size % 32 or args.image_size > 256:  # the ResNet50 U-Net halves the size 5 times
        parser.error(f"--image-size must be a multiple of 32 up to 256 (the slices' size), got {args.image_size}")
    check_own_json(args.out, ("train_picks", "settings", "unet"), "benchmarks/precision.py", [args.data])
    try:
        slices = data.find_slices(args.data, max_cases=args.cases)
    except (data.DatasetError, FileNotFoundError) as error:
        raise SystemExit(f"{args.data}: {error}") from None
    started, other = time.perf_counter(), bench.OtherLoad()
    machine = bench.machine_facts()
    results = measure(slices, args.image_size, args.batch_size, args.rounds)
    busy = other.share()
    machine["other_processes_cpu_share"] = busy
    machine["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    jit_compile = train.resolve_jit_compile(None)
    results = {
        "machine": machine,
        "busy": busy > bench.BUSY_SHARE,
        "settings": {
            "cases": int(slices.case_id.nunique()),
            "slices": len(slices),
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "tumor_fraction": bench.TUMOR_FRACTION,
            "rounds": args.rounds,
            "steps_per_fit": {name(setup): steps for setup, steps in SETUPS.items()},
            "fused_batchnorm": bench.FUSED_BATCHNORM["on"],
            "timing": f"steady-state steps (lgg.callbacks.StepTimer), {bench.SKIP_STEPS} + 1 left out at the start "
            "of each fit; the order of the setups reversed every other round",
        },
        # what `train` itself chooses on this machine for each model, when neither is given
        "train_picks": {
            model: {"jit_compile": jit_compile, "precision": train.resolve_precision(None, jit_compile, kind)}
            for model, kind in KINDS.items()
        },
        **results,
        "total_s": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_json(results, args.out)
    for model in KINDS:
        row = results[model]
        bench.log(
            f"{model}: float32 {row['slices_per_s']['float32']['median']:.1f}, mixed_bfloat16 "
            f"{row['slices_per_s']['mixed_bfloat16']['median']:.1f} slices/s "
            f"(x{row['mixed_bfloat16_over_float32']['median']:.2f}), XLA off"
        )
    bench.log(f"unet float32 with XLA: {results['unet']['slices_per_s']['float32_xla']['median']:.1f} slices/s")
    if results["busy"]:
        bench.log(f"WARNING: other processes used {busy:.0%} of all cores meanwhile: these are not this CPU's figures")


if __name__ == "__main__":
    main()
