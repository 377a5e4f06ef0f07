"""`make results`: train each model on the real data with a fixed configuration and seed, evaluate it
on the held-out cases of the patient split, and write `results/*.json`, the plots, and the README's
results table.

    python benchmarks/results.py                      # train all, then collect
    python benchmarks/results.py --models unet        # train one
    python benchmarks/results.py --collect-only       # rebuild results/ and the README table from runs/
"""

import argparse
import json
import shutil
from pathlib import Path

import pandas as pd

from lgg.files import atomic_path, save_json

ROOT = Path(__file__).resolve().parents[1]
RUNS, RESULTS, README = ROOT / "runs", ROOT / "results", ROOT / "README.md"
COMMON = {"epochs": 100, "batch_size": 16, "image_size": 128, "seed": 0, "patience": 10}
# name -> (model kind, settings). Time limits keep the whole command within about two hours of CPU.
CONFIGS = {
    "unet": ("unet", {"tumor_fraction": 0.5, "max_minutes": 60}),
    "classifier": ("classifier", {"backbone": "light", "max_minutes": 15}),
    "resnet50-unet": ("resnet50-unet", {"tumor_fraction": 0.5, "max_minutes": 30, "encoder_weights": "imagenet"}),
    "unet-leaky-slice-split": ("unet", {"tumor_fraction": 0.5, "max_minutes": 20, "split": "random-slice-leaky"}),
}
PLOTS = ("curves.png", "test_case_dice.png", "test_overlays.png", "test_roc_confusion.png")


def train(name, data_dir):
    from lgg.train import train_run

    kind, settings = CONFIGS[name]
    settings = {**COMMON, **settings}
    if settings.get("encoder_weights") == "imagenet":
        from lgg.models import _resnet50_weights

        try:
            _resnet50_weights("imagenet")
        except RuntimeError as error:
            print(f"{error}\n-> training {name} with encoder_weights=None")
            settings["encoder_weights"] = None
    train_run(kind, data_dir, RUNS / f"results-{name}", overwrite=True, verbose=2, **settings)


def collect(name):
    run_dir = RUNS / f"results-{name}"
    if not (run_dir / "test_summary.json").exists():
        return None
    config = json.loads((run_dir / "config.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    summary = json.loads((run_dir / "test_summary.json").read_text())
    monitor = "val_dice_coefficient" if "val_dice_coefficient" in history else "val_auc"
    result = {
        "name": name,
        "command": f"python benchmarks/results.py --models {name}",
        "model": config["kind"],
        "split": config["split"],
        "split_counts": config["split_counts"],
        "image_size": config["image_size"],
        "encoder_weights": config.get("encoder_weights") if config["kind"] != "unet" else None,
        "backbone": config.get("backbone") if config["kind"] == "classifier" else None,
        "epochs_run": int(len(history)),
        "best_epoch": int(history[monitor].idxmax()) + 1,
        "training_minutes": round(float(history["elapsed_s"].iloc[-1]) / 60, 1),
        "time_limit_minutes": config.get("max_minutes"),
        "environment": config["environment"],
        "test": summary,
    }
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    for plot in PLOTS:
        if (run_dir / plot).exists():
            shutil.copy(run_dir / plot, out / plot)
    shutil.copy(
        run_dir / "test_cases.csv" if (run_dir / "test_cases.csv").exists() else run_dir / "test_slices.csv",
        out / "test.csv",
    )
    save_json(result, RESULTS / f"{name}.json")
    return result


def _counts(result):
    test = next(row for row in result["split_counts"] if row["split"] == "test")
    return f"{test['cases']} cases, {test['slices']} slices"


def readme_table(results):
    segmenters = [r for r in results if r["model"] != "classifier"]
    classifiers = [r for r in results if r["model"] == "classifier"]
    lines = [
        "Produced by `make results` (`benchmarks/results.py`) on the 88 shared cases, on a 2-core CPU "
        "(AMD EPYC, no GPU); numbers from `results/*.json`. Held-out **test** cases of the patient split "
        "unless marked leaky; Dice per case is over each case's whole volume at 256×256, threshold 0.5.",
        "",
        "| model | split (test) | image | epochs (best) | CPU min | Dice per case mean | median | "
        "tumor-slice Dice | FP rate, tumor-free slices | Jaccard per case | batch Dice smooth=1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in segmenters:
        t = r["test"]
        label = r["model"] + (" (ImageNet encoder)" if r["encoder_weights"] == "imagenet" else "")
        if r["model"] == "resnet50-unet" and r["encoder_weights"] is None:
            label += " (random init: no ImageNet weights offline)"
        split = "random slices, **leaky**" if r["split"] != "patient" else "patient"
        lines.append(
            f"| {label} | {split}: {_counts(r)} | {r['image_size']}² | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['training_minutes']} | {t['case_dice_mean']:.3f} | {t['case_dice_median']:.3f} | "
            f"{t['tumor_slice_dice_mean']:.3f} | {t['tumor_free_false_positive_rate']:.3f} | "
            f"{t['case_jaccard_mean']:.3f} | {t['batch_dice_smooth1']:.3f} |"
        )
    if classifiers:
        lines += [
            "",
            "| classifier | split (test) | image | epochs (best) | CPU min | accuracy | sensitivity | "
            "specificity | ROC AUC |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in classifiers:
            t = r["test"]
            lines.append(
                f"| {r['backbone']} CNN | {r['split']}: {_counts(r)} | {r['image_size']}² | {r['epochs_run']} "
                f"({r['best_epoch']}) | {r['training_minutes']} | {t['accuracy']:.3f} | {t['sensitivity']:.3f} | "
                f"{t['specificity']:.3f} | {t['roc_auc']:.3f} |"
            )
    return "\n".join(lines)


def write_readme(results):
    text = README.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    before, rest = text.split(start)
    _, after = rest.split(end)
    with atomic_path(README) as temporary:
        temporary.write_text(f"{before}{start}\n{readme_table(results)}\n{end}{after}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument("--models", default=",".join(CONFIGS), help=f"comma-separated, of {list(CONFIGS)}")
    parser.add_argument("--collect-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.collect_only:
        for name in args.models.split(","):
            train(name, args.data)
    results = [result for result in map(collect, CONFIGS) if result is not None]
    write_readme(results)
    print(readme_table(results))


if __name__ == "__main__":
    main()
