"""Compare the segmentation architectures on a GPU, where each can be trained far enough to compare.

On our 2-core CPU a ResNet50 U-Net gets 2 epochs in 20 minutes (3 slices/s), which compares
nothing. This script trains the U-Net, the ResNet50 U-Net and the ResNet50 U-Net with attention
gates (Oktay et al. 2018) under the same time budget each, on the same patient split and cases,
with Keras on the PyTorch backend (the GPU machine lent to this project has PyTorch, not
TensorFlow), and scores them exactly as `make results` does: per-case Dice at 256x256 on the test
cases, post-processing chosen on the validation cases. No ImageNet weights (offline): every
encoder starts from random weights.

    # here (reads the .tif files; needs the project's requirements):
    python benchmarks/gpu_architectures.py prepare --data data --out .gpu/arrays.npz
    # on the GPU machine (needs keras, namex, optree as wheels; see the closing note of issue 5):
    KERAS_BACKEND=torch python benchmarks/gpu_architectures.py run --arrays .gpu/arrays.npz --out OUT

Writes, into a new or empty folder OUT, `OUT/gpu_architectures.json` (one entry per model; until the last model
is done, the models so far in `OUT/.partial-gpu_architectures.json`) and `OUT/<model>_history.csv`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lgg.files import atomic_path, save_csv, save_json  # noqa: E402  (numpy only: also on the GPU machine)

SPLITS = ("train", "val", "test")
MODELS = ("unet", "resnet50-unet", "resnet50-attention-unet")


def prepare(data_dir, out, image_size=128):
    """Decode the patient split into one compressed `.npz`: images and masks at `image_size` for
    training, and the native 256x256 masks of the val/test cases for scoring."""
    from lgg import data

    slices = data.split_table(data.find_slices(data_dir))
    arrays = {"image_size": np.array(image_size)}
    for split in SPLITS:
        rows = slices[slices.split == split]
        images, masks = data.load_arrays(rows, image_size)
        arrays[f"{split}_images"], arrays[f"{split}_masks"] = images, masks
        arrays[f"{split}_case_ids"] = rows["case_id"].to_numpy().astype(str)
        arrays[f"{split}_has_tumor"] = rows["has_tumor"].to_numpy()
        if split != "train":
            native = np.stack([data.read_mask(path) for path in rows["mask_path"]])
            arrays[f"{split}_native_masks"] = np.packbits(native.astype(bool), axis=-1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as temporary:  # ends in .npz like `out`, so numpy adds nothing to the name
        np.savez_compressed(temporary, **arrays)
    print(f"wrote {out}: {Path(out).stat().st_size / 1e6:.1f} MB", {s: len(arrays[f"{s}_images"]) for s in SPLITS})


def is_arrays_file(path):
    """An `.npz` that `prepare` wrote (it may be written again), not another file."""
    try:
        with np.load(path) as found:
            return {"image_size", "train_images", "test_native_masks"} <= set(found.files)
    except (OSError, ValueError):
        return False


def _probabilities(model, images, native_size=256):
    """Plain and flip-TTA probabilities, resized to the native size as `lgg.inference` does."""
    from lgg.inference import resize_probabilities

    images = images.astype(np.float32)
    plain = model.predict(images, batch_size=64, verbose=0)[..., 0]
    mirrored = model.predict(images[:, :, ::-1], batch_size=64, verbose=0)[..., 0][:, :, ::-1]
    return resize_probabilities(plain, native_size), resize_probabilities((plain + mirrored) / 2, native_size)


def run_one(kind, arrays, out, minutes, batch_size=32, learning_rate=1e-3, tumor_fraction=0.5, seed=0):
    import keras
    import pandas as pd

    from lgg import callbacks, metrics, models, postprocess, train
    from lgg.batches import TrainingBatches

    keras.utils.set_random_seed(seed)
    size = int(arrays["image_size"])
    if kind == "unet":
        model = models.build_unet((size, size, 3), base_filters=16)
    else:
        model = models.build_resnet50_unet((size, size, 3), encoder_weights=None, attention="attention" in kind)
    model = train.compile_model(model, "segmentation", learning_rate, jit_compile=False)
    timer = callbacks.ElapsedTime(minutes)
    best = Path(out) / f".{kind}.weights.h5"
    val_cases = (arrays["val_images"], arrays["val_masks"], arrays["val_case_ids"])
    fit_callbacks = [
        timer,
        callbacks.CaseDiceValidation(*val_cases, batch_size=64),
        callbacks.TimeCosineSchedule(timer, learning_rate),
        callbacks.BestWeightsCheckpoint(best, "val_case_dice"),
    ]
    started = time.perf_counter()
    # the package's backend-neutral training batches: the same draws and augmentation as `python -m lgg train`
    # on any backend other than TensorFlow
    draws = {"seed": seed, "tumor_fraction": tumor_fraction, "has_tumor": arrays["train_has_tumor"]}
    batches = TrainingBatches(arrays["train_images"], arrays["train_masks"], batch_size, workers=8, **draws)
    history = model.fit(
        batches, epochs=10_000, steps_per_epoch=batches.steps, callbacks=fit_callbacks, shuffle=False, verbose=2
    )
    seconds = time.perf_counter() - started
    model.load_weights(best)
    best.unlink()
    history = pd.DataFrame(history.history).rename_axis("epoch").reset_index()
    save_csv(history, Path(out) / f"{kind}_history.csv")

    scored = {}
    for split in ("val", "test"):
        rows = pd.DataFrame({"case_id": arrays[f"{split}_case_ids"]})
        truth = np.unpackbits(arrays[f"{split}_native_masks"], axis=-1).astype(bool)
        scored[split] = (rows, truth, *_probabilities(model, arrays[f"{split}_images"]))
    chosen = postprocess.choose(postprocess.score_settings(*scored["val"]))
    steps = postprocess.ablation(*scored["test"], chosen)
    rows, truth, plain, tta = scored["test"]
    source = tta if chosen["hflip_tta"] else plain
    predicted = postprocess.masks_from_probabilities(source, rows["case_id"], chosen)
    per_case, summary = metrics.segmentation_report(rows, truth, source, predicted=predicted)
    _, raw = metrics.segmentation_report(rows, truth, plain, 0.5)
    trained_slices = int(history.shape[0]) * batches.steps * batch_size  # every batch full
    return {
        "model": kind,
        "parameters": int(model.count_params()),
        "encoder_weights": None,
        "epochs": int(history.shape[0]),
        "best_epoch": int(history["val_case_dice"].idxmax()) + 1,
        "training_seconds": round(seconds, 1),
        "training_slices_per_s": round(trained_slices / seconds, 1),
        "postprocessing": chosen,
        "test": {key: summary[key] for key in metrics.SEGMENTATION_SUMMARY_KEYS} | {"cases": summary["cases"]},
        "test_raw": {key: raw[key] for key in metrics.SEGMENTATION_SUMMARY_KEYS},
        "test_steps": steps.to_dict("records"),
        "test_per_case": per_case[["case_id", "case_dice"]].to_dict("records"),
    }


def run(arrays_path, out, minutes, models_to_run):
    import keras

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = dict(np.load(arrays_path))
    device = "cpu"
    if keras.backend.backend() == "torch":
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, {device}")
    results = {"device": device, "keras": keras.__version__, "backend": keras.backend.backend(),
               "minutes_per_model": minutes, "models": []}  # fmt: skip
    partial = out / ".partial-gpu_architectures.json"  # the models done so far, should the machine be taken back
    for kind in models_to_run:
        results["models"].append(run_one(kind, arrays, out, minutes))
        print(json.dumps({k: v for k, v in results["models"][-1].items() if not k.startswith("test_")}, indent=1))
        save_json(results, partial)
    partial.replace(out / "gpu_architectures.json")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare")
    prep.add_argument("--data", default="data")
    prep.add_argument("--out", default=".gpu/arrays.npz")
    go = commands.add_parser("run")
    go.add_argument("--arrays", default=".gpu/arrays.npz")
    go.add_argument("--out", required=True)
    from lgg import guards  # numpy only: also on the GPU machine

    minutes = guards.argparse_type(guards.positive, "--minutes", maximum=24 * 60)
    go.add_argument("--minutes", type=minutes, default=2.5, help="training time per model")
    go.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    args = parser.parse_args(argv)
    names = args.models.split(",") if args.command == "run" else []
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(MODELS)}")
    if len(set(names)) < len(names):
        parser.error(f"--models names a model twice ({args.models}): each is trained once")
    if (
        args.command == "run"
        and Path(args.out).exists()
        and (not Path(args.out).is_dir() or any(Path(args.out).iterdir()))
    ):
        parser.error(f"--out {args.out} exists and is not an empty folder: the comparison writes a new one")
    if args.command == "prepare" and not args.out.endswith(".npz"):
        parser.error(f"--out {args.out}: the arrays file ends in .npz (numpy would add it to the name)")
    if args.command == "prepare" and Path(args.out).exists() and not is_arrays_file(args.out):
        parser.error(f"--out {args.out} exists and is not an arrays file of this script: choose another")
    if args.command == "prepare":
        from lgg import guards

        try:
            guards.check_file_apart(args.out, [args.data])
        except FileExistsError as error:
            parser.error(str(error))
        prepare(args.data, args.out)
    else:
        run(args.arrays, args.out, args.minutes, args.models.split(","))


if __name__ == "__main__":
    main()
