"""`make results`: train each model on the real data with a fixed configuration and seed, evaluate it
on the held-out cases of the patient split, and write `results/*.json`, the plots, and the README's
results table.

    python benchmarks/results.py                      # train all, then collect
    python benchmarks/results.py --models unet        # train one
    python benchmarks/results.py --models unet-fold3 --train-only   # one job of several (see README, Where to train)
    python benchmarks/results.py --collect-only       # rebuild results/ and the README table from runs/
                                                      # (rows without a run folder: from results/*.json)
    python benchmarks/results.py --ship unet-fold2    # that run's model -> models/unet/ with its model card
    python benchmarks/results.py --refresh-card       # the shipped card's pooled figures, after more folds
"""

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from lgg.config import HEADLINE, SHIPPED_RECIPE, RunConfig
from lgg.data import FOLD_PATTERN, describe_augmentation
from lgg.files import atomic_path, copy_file, file_sha256, save_csv, save_json
from lgg.train import monitor_for

ROOT = Path(__file__).resolve().parents[1]
RUNS, RESULTS, README = ROOT / "runs", ROOT / "results", ROOT / "README.md"
# name -> RunConfig (lgg.config: every setting not named is its default; every row in float32, as measured, except
# the bfloat16 rows, rather than the precision `train` would pick on the machine). `unet` is the baseline recipe
# (lgg.config.HEADLINE); `make train` runs the shipped model's (lgg.config.SHIPPED_RECIPE). Time limits: about
# nine hours of CPU for the fourteen table rows (7 x 60 + 5 x 15 + 20 + 20 min, plus evaluation); train one row at a
# time with --models.
CLASSIFIER = RunConfig(kind="classifier", backbone="light", max_minutes=15, precision="float32")
FOLDS = range(1, 6)  # the 5-fold cross-validation by patient; fold 1 of 5 is the patient split every row defaults to


def fold_split(k):
    """The split of fold `k` of `FOLDS`: fold 1 is the patient split every row defaults to."""
    return HEADLINE.split if k == 1 else f"patient-fold-{k}-of-{len(FOLDS)}"


def fold_number(split):
    """The inverse of `fold_split`: 2 for `patient-fold-2-of-5`, 1 for the patient split; any other split is
    not one of the five folds and is refused."""
    match = FOLD_PATTERN.fullmatch(split)
    if split == HEADLINE.split or (match and int(match.group(2)) == len(FOLDS)):
        return int(match.group(1)) if match else 1
    raise ValueError(f"{split!r} is not one of the {len(FOLDS)} folds by patient")


def fold_rows(recipe, folds=FOLDS):
    """The rows of a recipe's cross-validation by patient: `recipe` on fold 1 of 5, `recipe-foldK` on fold K."""
    return tuple(recipe + (f"-fold{k}" if k > 1 else "") for k in folds)


def recipe_folds(name, config, folds=FOLDS):
    """`fold_rows(name, folds)` -> `config` on each row's fold split."""
    return {row: replace(config, split=fold_split(k)) for row, k in zip(fold_rows(name, folds), folds, strict=True)}


BF16 = {"precision": "mixed_bfloat16", "jit_compile": False}  # how the bfloat16 rows compute: oneDNN, no XLA
# the recipe that ships (models/unet, `lgg.config.SHIPPED_RECIPE`) as it was measured: in bfloat16
SHIPPED = replace(SHIPPED_RECIPE, **BF16)
CONFIGS = {
    "unet": HEADLINE,
    "unet-seed1": replace(HEADLINE, seed=1),  # the same run with another seed: how much is luck
    "unet-slice-dice": replace(HEADLINE, dice_loss="slice"),
    "classifier": CLASSIFIER,
    "resnet50-unet": RunConfig(
        kind="resnet50-unet", tumor_fraction=0.5, max_minutes=20, encoder_weights="imagenet", precision="float32"
    ),
    "unet-leaky-slice-split": RunConfig(
        tumor_fraction=0.5, max_minutes=20, split="random-slice-leaky", precision="float32"
    ),
    # the other folds of the 5-fold cross-validation by patient (fold 1 of 5 is the `unet` row's split)
    **recipe_folds("unet", HEADLINE, FOLDS[1:]),
    # the classifier's other folds: its ROC AUC pooled over all 88 patients, each slice scored by a fold model that
    # never saw its patient
    **recipe_folds("classifier", CLASSIFIER, FOLDS[1:]),
    # the headline recipe again, the same seed, on another machine (its CPU is in its JSON): what the machine changes,
    # and the same-CPU partner of a candidate run there (`compare_candidate` pairs a candidate with it on that CPU)
    **recipe_folds("unet-again", HEADLINE),
    # a candidate recipe, compared with the headline case by case on the same folds: Tversky (misses weigh more)
    **recipe_folds("unet-tversky", replace(HEADLINE, dice_loss="tversky")),
    # a candidate recipe for CPUs with bfloat16 instructions (AVX-512 BF16, AMX): bfloat16 compute through oneDNN,
    # without XLA (whose CPU code has no bfloat16 kernels: on an AMX Xeon it ran float32 and bfloat16 at one speed)
    **recipe_folds("unet-bf16", replace(HEADLINE, **BF16)),
    # the bfloat16 recipe again on another machine, as `unet-again` is the headline's: what that CPU gives it in the
    # same 60 minutes, and the same-CPU partner there of the candidates paired with `unet-bf16`
    **recipe_folds("unet-bf16-again", replace(HEADLINE, **BF16)),
    # a candidate recipe: the U-Net with a ResNet50 encoder, computed as the bfloat16 candidate and for the same 60
    # minutes, so that it is paired with that recipe's folds. Randomly initialized on every machine (ImageNet weights
    # cannot be downloaded here; folds with and without them would not pool); users with the weights: `train
    # resnet50-unet --encoder-weights imagenet`
    **recipe_folds("resnet50-unet-bf16", replace(HEADLINE, kind="resnet50-unet", encoder_weights=None, **BF16)),
    # a candidate recipe for cases lacking sequences (benchmarks/misses.py: the one case at Dice 0 is FLAIR only):
    # a fifth of the training slices made FLAIR only, the dataset's own fill for a missing sequence
    **recipe_folds("unet-flair", replace(HEADLINE, flair_only=0.2)),
    # the same, computed as the bfloat16 candidate, so that it is paired with that recipe's folds (on a CPU with
    # bfloat16 instructions, where `train` computes a U-Net in bfloat16)
    **recipe_folds("unet-flair-bf16", replace(HEADLINE, flair_only=0.2, **BF16)),
    # a candidate recipe for the gap between training and test cases (raw per-case Dice 0.90 on its training cases
    # against 0.77 on its test cases for `unet-bf16-again`, fold 1): the strong
    # augmentation (wider affine ranges, a gamma per channel), in bfloat16 as the recipe it is paired with
    **recipe_folds("unet-aug-bf16", replace(HEADLINE, augmentation="strong", **BF16)),
    # the two that found the FLAIR-only case on fold 1 (each on the same CPU as its partner), together: paired with
    # the strong augmentation alone (the shipped recipe), so that the pair differs only in the FLAIR-only slices
    **recipe_folds("unet-aug-flair-bf16", SHIPPED),
    # the shipped recipe again on another machine, as `unet-again` is the headline's: on an AMX Xeon it runs about
    # 1.5 times the epochs of its Zen 4 folds in the 60 minutes, and it is the same-CPU partner of candidates run there
    **recipe_folds("unet-aug-flair-bf16-again", SHIPPED),
    # a candidate recipe for the small tumors (the smallest quarter of the 88 cases by tumor volume scores 0.74 in
    # the shipped recipe's cross-validation, the other three 0.83-0.88): the tumor half of each batch drawn a case
    # first, so that a case with 3 tumor slices is seen as often as one with 30; on top of the two above, paired
    # with them, so that the pair differs only in how the tumor slices are drawn
    **recipe_folds(
        "unet-aug-flair-case-bf16",
        replace(SHIPPED, tumor_sampling="case"),
    ),
    # the shipped recipe again with another seed (weights, shuffling, augmentation), on the same CPU type as its
    # seed-0 folds: how much of a pooled figure is luck, and the second member of a same-recipe ensemble per fold
    # (benchmarks/ensemble.py)
    **recipe_folds("unet-aug-flair-seed1-bf16", replace(SHIPPED, seed=1)),
    # the shipped recipe at 160x160 instead of 128x128 (1.56 times the pixels a step): for the small tumors (the
    # smallest quarter of the 88 scores 0.74; the true masks taken to 128 and back score 0.968, to 160 0.978), for
    # CPUs fast enough in bfloat16 (AMX) to give it about the epochs the shipped recipe had on a Zen 4 in 60 minutes
    **recipe_folds("unet-aug-flair-160-bf16", replace(SHIPPED, image_size=160)),
    # the shipped recipe with twice the filters at every level (32 at the first, 7.8 M parameters, Buda et al.'s
    # width): for the large tumors it under-segments (TCGA_DU_7018 0.34, 73,567 true pixels against 16,767 found);
    # on a CPU with AMX it trains at 40 slices/s at 128x128 against 92 for 16 filters (24 filters: 19, oneDNN's
    # bfloat16 kernels want channels in multiples of 32), so about 60 epochs in 60 minutes there
    **recipe_folds("unet-aug-flair-w32-bf16", replace(SHIPPED, base_filters=32)),
    # the shipped recipe with an elastic warp after the affine map (the strong augmentation's ranges otherwise): for
    # the gap between training and validation cases (batch Dice about 0.91 against 0.76 from the 45th epoch on in
    # fold 1's run: it does not under-fit, it generalizes), the augmentation the U-Net paper leaned on; the gamma
    # per channel and the FLAIR-only slices, the two augmentations so far, each gained on the shipped recipe's way
    **recipe_folds("unet-aug-flair-elastic-bf16", replace(SHIPPED, augmentation="elastic")),
    # the shipped recipe validating, keeping and exporting a moving average of its weights (Polyak averaging, Keras'
    # use_ema; momentum 0.999 a step: about the last 1,000 steps, 5 minutes of the Zen 4's 60): for the luck of the
    # best epoch (fold 1's best validation epoch has moved by 25 epochs between reruns of one recipe, and the test
    # figure with it); the average of the cosine's last epochs is a steadier model than any one of them (Keras averages
    # the trainable weights only, from the first step on: its first 15 minutes are behind the partner's)
    **recipe_folds("unet-aug-flair-ema-bf16", replace(SHIPPED, ema=0.999)),
    # the shipped recipe with twice its FLAIR-only slices (two fifths instead of one): the dose of the one change
    # that moved the pooled figure (+0.017 over the 88, and +0.014 on the 84 cases that have all three sequences, so
    # not only the four FLAIR-only cases: the masks outline the FLAIR abnormality, and a model made to read FLAIR
    # alone more often may lean on it more); on the folds where the shipped recipe is weakest first (4, then 3)
    **recipe_folds("unet-aug-flair40-bf16", replace(SHIPPED, flair_only=0.4)),
    # the shipped recipe with seven tenths of each batch drawn from tumor slices instead of half, aimed at what the
    # misses are (the extent of large masses and of small tumors: of the six cases under 0.6, five are predicted at
    # 0.23-0.72 of their true volume), a step toward brain-segmentation-pytorch's sampler (a patient, then a slice in
    # proportion to its tumor area plus a tenth of the patient's mean: over nine tenths of its draws tumor slices);
    # on the folds where the shipped recipe is weakest first (4, then 3)
    **recipe_folds("unet-aug-flair-tf70-bf16", replace(SHIPPED, tumor_fraction=0.7)),
    # the same in half the time: a 30-minute cosine (snapshots at 15 and 30). Over folds 1 and 3-5, seven tenths tumor
    # slices tied the shipped recipe at 60 minutes (0.832 against 0.832 on 71 patients) but was there by 30 (0.835,
    # the partner 0.805), its best epochs earlier on every fold; read at 30 minutes its learning rate was still at half
    # its peak, a schedule ending at 30 may do better. Paired with the 60-minute shipped recipe: the same Dice at half
    # the CPU is what a user on a laptop gains
    **recipe_folds(
        "unet-aug-flair-tf70-30min-bf16",
        replace(SHIPPED, tumor_fraction=0.7, max_minutes=30, snapshot_minutes=(15, 30)),
    ),
    # the dose of that change: nine tenths of each batch tumor slices in the same 30 minutes (brain-segmentation-
    # pytorch's sampler draws over nine tenths), paired with seven tenths, so that the pair differs only in the share;
    # seven tenths marked fewer tumor-free slices than a half did over the 88 (1.0 % against 1.4 % at 60 minutes),
    # not more. On the fold where the shipped recipe is weakest first (4; its 5 validation patients make the chosen
    # epoch a noisy pick: read the last weights beside it)
    **recipe_folds(
        "unet-aug-flair-tf90-30min-bf16",
        replace(SHIPPED, tumor_fraction=0.9, max_minutes=30, snapshot_minutes=(15, 30)),
    ),
    # the two changes that scored highest over the 88 at 60 minutes, together: 160x160 slices (0.844, its weights after
    # 60 minutes 0.850) and seven tenths of each batch tumor slices (0.843, 0.846), paired with 160x160 alone on the
    # CPU that ran all five of its folds (an AMX Xeon), so that the pair differs only in the tumor share. At 160x160
    # that Xeon gives 70-88 epochs in the hour, and seven tenths reached its level in fewer epochs (best epochs 26-71
    # against 48-78); on the folds where 160x160 was weakest first (4, then 3)
    **recipe_folds("unet-aug-flair-160-tf70-bf16", replace(SHIPPED, image_size=160, tumor_fraction=0.7)),
}


# the fold whose model ships, for every recipe: fixed when the first model shipped (the first fold run after fold 1),
# before its test figure existed, so that no recipe ships its luckiest fold; a replacement is tested on the same
# patients
SHIPPED_SPLIT = fold_split(2)
# candidate recipes: prefix -> what changes. Each fold row `<prefix>[-foldK]` is compared case by case with the
# headline's row of the same fold (`unet[-foldK]`; `PAIRED_WITH` names another recipe for some); they are not rows
# of the results table and not trained by default.
CANDIDATES = {
    "unet-tversky": "Tversky overlap term (misses weighted 0.7, false alarms 0.3) instead of the batch Dice",
    "unet-bf16": "mixed_bfloat16 computed by oneDNN without XLA instead of float32 (for CPUs with bfloat16 "
    "instructions)",
    "unet-flair": "a fifth of the training slices made FLAIR only (pre- and post-contrast replaced by FLAIR)",
    "resnet50-unet-bf16": "a ResNet50 encoder (randomly initialized) instead of the U-Net's own, both in "
    "mixed_bfloat16 without XLA for 60 minutes",
    "unet-flair-bf16": "a fifth of the training slices made FLAIR only, both in mixed_bfloat16 without XLA",
    "unet-aug-bf16": f"the strong augmentation ({describe_augmentation('strong')}) instead of the standard "
    f"({describe_augmentation('standard')}), both in mixed_bfloat16 without XLA",
    "unet-aug-flair-bf16": "a fifth of the training slices made FLAIR only, on top of the strong augmentation, both "
    "in mixed_bfloat16 without XLA",
    "unet-aug-flair-case-bf16": "the tumor half of each batch drawn a case first (every case equally often, then one "
    "of its tumor slices) instead of slice by slice, both with the strong augmentation and a fifth of the slices "
    "FLAIR only, in mixed_bfloat16 without XLA",
    "unet-aug-flair-seed1-bf16": "seed 1 instead of 0 (weights, shuffling, augmentation), the recipe otherwise the "
    "same (the strong augmentation, a fifth of the slices FLAIR only, mixed_bfloat16 without XLA)",
    "unet-aug-flair-160-bf16": "slices at 160x160 instead of 128x128, the recipe otherwise the same (the strong "
    "augmentation, a fifth of the slices FLAIR only, mixed_bfloat16 without XLA, 60 minutes)",
    "unet-aug-flair-w32-bf16": "32 filters at the first level instead of 16 (7.8 M parameters instead of 1.9 M), the "
    "recipe otherwise the same (the strong augmentation, a fifth of the slices FLAIR only, mixed_bfloat16 without "
    "XLA, 60 minutes)",
    "unet-aug-flair-elastic-bf16": describe_augmentation("elastic").removeprefix(describe_augmentation("strong") + ", ")
    + " after the strong augmentation's affine map, the recipe otherwise the same (a fifth of the slices FLAIR only, "
    "mixed_bfloat16 without XLA, 60 minutes)",
    "unet-aug-flair-ema-bf16": "a moving average of the weights (momentum 0.999 a step) validated, kept and exported "
    "instead of the trained weights, the recipe otherwise the same (the strong augmentation, a fifth of the "
    "slices FLAIR only, mixed_bfloat16 without XLA, 60 minutes)",
    "unet-aug-flair40-bf16": "two fifths of the training slices made FLAIR only instead of one fifth, the recipe "
    "otherwise the same (the strong augmentation, mixed_bfloat16 without XLA, 60 minutes)",
    "unet-aug-flair-tf70-bf16": "seven tenths of each batch drawn from tumor slices instead of half, the recipe "
    "otherwise the same (the strong augmentation, a fifth of the slices FLAIR only, mixed_bfloat16 without XLA, 60 "
    "minutes)",
    "unet-aug-flair-tf70-30min-bf16": "30 minutes instead of 60 (the cosine schedule over 30) and seven tenths of each "
    "batch drawn from tumor slices instead of half, the recipe otherwise the same (the strong augmentation, a fifth "
    "of the slices FLAIR only, mixed_bfloat16 without XLA)",
    "unet-aug-flair-tf90-30min-bf16": "nine tenths of each batch drawn from tumor slices instead of seven tenths, the "
    "recipe otherwise the same (30 minutes, the strong augmentation, a fifth of the slices FLAIR only, "
    "mixed_bfloat16 without XLA)",
    "unet-aug-flair-160-tf70-bf16": "seven tenths of each batch drawn from tumor slices instead of half, both at "
    "160x160 (the strong augmentation, a fifth of the slices FLAIR only, mixed_bfloat16 without XLA, 60 minutes)",
}
# the recipe a candidate is paired with, where it is not the headline: the one computed the same way, so that the
# pair differs only in what the candidate changes
PAIRED_WITH = {
    "resnet50-unet-bf16": "unet-bf16",
    "unet-flair-bf16": "unet-bf16",
    "unet-aug-bf16": "unet-bf16",
    "unet-aug-flair-bf16": "unet-aug-bf16",
    "unet-aug-flair-case-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-seed1-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-160-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-w32-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-elastic-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-ema-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair40-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-tf70-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-tf70-30min-bf16": "unet-aug-flair-bf16",
    "unet-aug-flair-tf90-30min-bf16": "unet-aug-flair-tf70-30min-bf16",
    "unet-aug-flair-160-tf70-bf16": "unet-aug-flair-160-bf16",
}

CANDIDATE_ROWS = {name for prefix in CANDIDATES for name in fold_rows(prefix)}
TABLE_ROWS = [name for name in CONFIGS if name not in CANDIDATE_ROWS]


def is_again(name):
    """A recipe run again on another machine (`unet-again`, `unet-bf16-again`, with their fold suffixes)."""
    return "-again" in name


DEFAULT_RUNS = [name for name in TABLE_ROWS if not is_again(name)]  # what `make results` trains
PLOTS = ("curves.png", "dice_vs_minutes.png", "test_case_dice.png", "test_overlays.png", "test_roc_confusion.png")


def partner(prefix):
    return PAIRED_WITH.get(prefix, "unet")


def comparison_file(prefix):
    return RESULTS / f"{prefix}-vs-{partner(prefix)}.json"


# what tells a run's row: (a key a config.json may lack is not compared, except those whose absence means their
# default: runs from before the setting existed trained that way)
RECIPE_KEYS = ("kind", "split", "precision", "dice_loss", "seed", "max_minutes", "encoder_weights", "flair_only",
               "augmentation", "tumor_sampling", "image_size", "tumor_fraction", "ema", "base_filters", "attention",
               "backbone", "learning_rate", "batch_size", "schedule")  # fmt: skip
ABSENT_MEANS = {"flair_only": 0.0, "augmentation": "standard", "tumor_sampling": "slice", "ema": None}


def recipe_mismatch(config, name):
    """How a run's `config.json` (a dict) differs from the row `name`'s recipe, as the end of a sentence, or None
    for a run of it. A row asking for ImageNet weights matches a run that had to start without them (`train`
    records what it used; the table says so)."""
    row = CONFIGS[name]
    for key in RECIPE_KEYS:
        if key == "encoder_weights" and (row.kind == "unet" or row.encoder_weights is not None):
            continue  # no encoder (`train` records None), or weights asked for that a machine may lack
        if key not in config and key not in ABSENT_MEANS:
            continue
        value = config.get(key, ABSENT_MEANS.get(key))
        if value != getattr(row, key):
            return f"has {key} {value!r}, the row {name} {getattr(row, key)!r}: not a run of this recipe"
    return None


def check_recipe(run_dir, name):
    """Refuse a run folder whose `config.json` is not of the row `name` (a recipe edited since, a folder copied
    back under another name): resumed, scored or collected, it would stand in the results as that row."""
    file = Path(run_dir) / "config.json"
    mismatch = recipe_mismatch(json.loads(file.read_text()), name) if file.is_file() else None
    if mismatch:
        raise SystemExit(f"{file} {mismatch} (nothing was changed; move the folder away, or --retrain)")


def train(name, data_dir, retrain=False):
    """Train the row `name` into `runs/results-<name>/`, picking up where a cut-off batch left it: a scored run
    is kept, an interrupted one continues (`--resume`), one whose model was exported but not scored is scored,
    and one stopped before its first epoch was saved starts again (less than an epoch lost). Only `retrain`
    trains a kept run again (hours of CPU each)."""
    from lgg.train import train_run

    run_dir = RUNS / f"results-{name}"
    interrupted = (run_dir / "resume" / "state.json").is_file()
    if not retrain:
        check_recipe(run_dir, name)
    if not retrain and not interrupted:
        if (run_dir / "test_summary.json").is_file():
            print(f"{name}: {run_dir} holds a finished run; kept (--retrain trains it again)")
            return
        if (run_dir / "model.h5").is_file():
            from lgg.evaluate import evaluate_model_file

            print(f"{name}: {run_dir} holds a trained model whose evaluation did not finish: scoring it")
            evaluate_model_file(run_dir / "model.h5", data_dir, tune=CONFIGS[name].kind != "classifier")
            return
    config = CONFIGS[name]
    if config.resnet50_encoder:
        from lgg.models import available_encoder_weights

        config = replace(config, encoder_weights=available_encoder_weights(config.encoder_weights))
    started = run_dir.is_dir() and any(run_dir.iterdir())  # not one epoch saved: train_run refuses a stranger's
    train_run(
        config,
        data_dir,
        run_dir,
        overwrite=retrain or (started and not interrupted),
        resume=interrupted and not retrain,
        verbose=2,
    )


def collect(name, data_dir):
    """The row of `name` from its run folder (`runs/results-<name>/`), which also refreshes
    `results/`; without the run folder (a fresh clone), the committed `results/<name>.json`."""
    run_dir = RUNS / f"results-{name}"
    if not (run_dir / "test_summary.json").exists():
        committed = RESULTS / f"{name}.json"
        return json.loads(committed.read_text()) if committed.exists() else None
    check_recipe(run_dir, name)
    config = json.loads((run_dir / "config.json").read_text())
    history = pd.read_csv(run_dir / "history.csv")
    summary = json.loads((run_dir / "test_summary.json").read_text())
    # the score the checkpoint was chosen by (lgg.train.monitor_for): per-case validation Dice for segmenters
    task = "classification" if config["kind"] == "classifier" else "segmentation"
    monitor = monitor_for(task, case_validation="val_case_dice" in history)
    curve = run_dir / "snapshots" / "curve.csv"
    if (run_dir / "snapshots" / "snapshots.csv").exists() and not curve.exists():
        from lgg.evaluate import evaluate_snapshots

        evaluate_snapshots(run_dir, data_dir)
    result = {
        "name": name,
        "command": f"python benchmarks/results.py --models {name}",
        "model": config["kind"],
        "split": config["split"],
        "split_counts": config["split_counts"],
        "seed": config["seed"],
        "image_size": config["image_size"],
        # recorded since the machine chooses it (precision_used); runs before that name it, or predate bfloat16
        "precision": config.get("precision_used") or config.get("precision") or "float32",
        # XLA: recorded since it became the machine's choice; runs before that compiled with it (the default then)
        "jit_compile": config.get("jit_compile_used", config.get("jit_compile", True)),
        "dice_loss": config.get("dice_loss", "batch") if config["kind"] != "classifier" else None,
        "flair_only": config.get("flair_only", 0.0),
        "augmentation": config.get("augmentation", "standard"),
        "tumor_sampling": config.get("tumor_sampling", "slice"),  # runs before the setting drew slice by slice
        "tumor_fraction": config.get("tumor_fraction"),  # the tumor share of each batch (None: as the slices come)
        "encoder_weights": config.get("encoder_weights") if config["kind"] != "unet" else None,
        "backbone": config.get("backbone") if config["kind"] == "classifier" else None,
        "epochs_run": int(len(history)),
        "best_epoch": int(history[monitor].idxmax()) + 1,
        "training_minutes": round(float(history["elapsed_s"].iloc[-1]) / 60, 1),
        "train_slices_per_s": (
            float(history["train_slices_per_s"].median()) if "train_slices_per_s" in history else None
        ),
        "time_limit_minutes": config.get("max_minutes"),
        # the file scored here: what benchmarks/detection.py checks a fold's saved slice scores against
        "model_sha256": file_sha256(run_dir / "model.h5"),
        "environment": config["environment"],
        "test": summary,
    }
    if curve.exists():
        result["after_minutes"] = pd.read_csv(curve).to_dict("records")
    if config["kind"] != "classifier":
        result["uncertainty"] = uncertainty(run_dir, data_dir, summary)
    out = RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    if curve.exists():
        from lgg import plots

        plots.plot_time_curve(pd.read_csv(curve), save_path=run_dir / "dice_vs_minutes.png")
    copies = {"test_postprocessing.csv": "test_postprocessing.csv", "snapshots/curve.csv": "dice_vs_minutes.csv"}
    for source, target in copies.items():
        if (run_dir / source).exists():
            copy_file(run_dir / source, out / target)
    copy_case_tables(run_dir, out)
    for plot in PLOTS:
        if (run_dir / plot).exists():
            copy_file(run_dir / plot, out / plot)
    copy_file(
        run_dir / "test_cases.csv" if (run_dir / "test_cases.csv").exists() else run_dir / "test_slices.csv",
        out / "test.csv",
    )
    save_json(result, RESULTS / f"{name}.json")
    return result


def copy_case_tables(run_dir, out):
    """Into a row's `results/<name>/`, what a rule for choosing the post-processing setting, or the weights, can be
    tried on once the run folder is gone: each case's Dice under every setting on the validation cases that choose
    and on the test cases that do not (`<split>_postprocessing_cases.csv`), for the kept model and for the last
    snapshot (`after-<m>min_<split>_postprocessing_cases.csv`), and each snapshot's test cases post-processed as its
    own validation cases chose (`after_minutes_cases.csv`, with the minutes of `snapshots/curve.csv`). A table a run
    scored before they existed lacks is not copied; a snapshot of the curve without its test cases is refused,
    naming the file."""
    from lgg.evaluate import snapshot_folder

    run_dir, out = Path(run_dir), Path(out)
    copies = {run_dir / f"{split}_postprocessing_cases.csv": out / f"{split}_postprocessing_cases.csv"
              for split in ("val", "test")}  # fmt: skip
    curve_path = run_dir / "snapshots" / "curve.csv"
    minutes = list(pd.read_csv(curve_path)["minutes"]) if curve_path.exists() else []
    if minutes:
        last = snapshot_folder(run_dir, minutes[-1])
        for split in ("val", "test"):
            copies[last / f"{split}_postprocessing_cases.csv"] = out / f"{last.name}_{split}_postprocessing_cases.csv"
    for source, target in copies.items():
        if source.exists():
            copy_file(source, target)
    if not minutes:
        return
    tables = []
    for mark in minutes:
        path = snapshot_folder(run_dir, mark) / "test_cases.csv"
        if not path.is_file():
            raise SystemExit(f"{path} not found: {curve_path} lists the snapshot after {mark:g} minutes")
        tables.append(pd.read_csv(path)[["case_id", "case_dice"]].assign(minutes=mark))
    cases = pd.concat(tables)[["minutes", "case_id", "case_dice"]].sort_values(["minutes", "case_id"])
    save_csv(cases.round({"case_dice": 6}), out / "after_minutes_cases.csv")


def refuse_missing(slices, split_file, split_names, data_dir):
    """Refuse to score a run's `split_names` cases where `data_dir` lacks some of them (`lgg.evaluate.missing_cases`):
    a figure over the cases at hand would be kept, and quoted, as the run's."""
    from lgg import evaluate

    missing = evaluate.missing_cases(slices, split_file, split_names)
    if missing:
        raise SystemExit(
            f"{len(missing)} {'/'.join(split_names)} cases of {split_file} are not in {data_dir}: {missing[:4]} "
            "(give --data the dataset the run was split from)"
        )


def fitted(run_dir):
    """Whether `fit` has scored the run's training and validation cases (once, into `<run>/fit/`)."""
    return all((run_dir / "fit" / f"{split}_summary.json").exists() for split in ("train", "val"))


def check_data_for_collect(data_dir):
    """Before anything is collected: every case that collecting will score for the first time is in `data_dir`
    (the training and validation cases of a finished patient-split run not yet scored in its `fit/`, and the
    test cases of `results-unet` for the resolution ceiling), or SystemExit naming them (`refuse_missing`)."""
    from lgg import data

    needed = []  # (split file, its splits to be scored)
    for name in CONFIGS:
        run_dir = RUNS / f"results-{name}"
        if not (run_dir / "test_summary.json").is_file() or not (run_dir / "split.csv").is_file():
            continue
        if json.loads((run_dir / "config.json").read_text()).get("split") == "patient" and not fitted(run_dir):
            needed.append((run_dir / "split.csv", ["train", "val"]))
    if (RUNS / "results-unet" / "split.csv").is_file():
        needed.append((RUNS / "results-unet" / "split.csv", ["test"]))
    if not needed:  # collected from the results files alone (a fresh clone): no data read
        return
    try:
        present = data.find_slices(data_dir)
    except (data.DatasetError, FileNotFoundError) as error:
        raise SystemExit(f"{data_dir}: {error}") from None
    for split_file, split_names in needed:
        refuse_missing(present, split_file, split_names, data_dir)


def fit(run_dir, data_dir):
    """Raw (threshold 0.5) per-case Dice of a run's model on its training and validation cases,
    beside the test cases: how well it fits what it saw, and how the held-out sets differ.
    Scored once into `<run>/fit/`."""
    from lgg import evaluate, guards

    scores = {}
    if not fitted(run_dir):
        refuse_missing(evaluate.slices_with_split(data_dir, run_dir / "split.csv"), run_dir / "split.csv",
                       ["train", "val"], data_dir)  # fmt: skip
    guards.mark_folder(run_dir / "fit", guards.EVALUATE_MARKER)  # this script's own folder, also from before marks
    for split in ("train", "val"):
        summary_file = run_dir / "fit" / f"{split}_summary.json"
        if not summary_file.exists():
            evaluate.evaluate_model_file(
                run_dir / "model.h5", data_dir, split_name=split, out_dir=run_dir / "fit", threshold=0.5
            )
        summary = json.loads(summary_file.read_text())
        scores[split] = {key: summary[key] for key in ("cases", "case_dice_mean", "case_dice_median")}
    return scores


def uncertainty(run_dir, data_dir, summary):
    """How sure the test figure is: the 95 % bootstrap interval of the mean over the test cases,
    the fit on training and validation cases (patient split only), and, beside the `unet` row,
    the paired per-case difference on the same test cases."""
    from lgg import metrics

    per_case = pd.read_csv(run_dir / "test_cases.csv")
    result = {"case_dice_mean_ci95": list(metrics.mean_confidence_interval(per_case["case_dice"]))}
    config = json.loads((run_dir / "config.json").read_text())
    if config["split"] != "patient":
        return result
    result["raw_fit"] = {
        **fit(run_dir, data_dir),
        "test": {k: summary.get("raw", summary)[k] for k in ("case_dice_mean", "case_dice_median")},
    }
    baseline = RUNS / "results-unet" / "test_cases.csv"
    if run_dir != baseline.parent and baseline.exists():
        result["vs_unet"] = metrics.paired_comparison(per_case, pd.read_csv(baseline))
    return result


def _fold_tables(results, recipe, least):
    """`(folds, table)`: the fold rows of `recipe` that have results and their test tables (`results/<row>/test.csv`,
    one row per case or per slice) with `fold` and `split` columns; `([], None)` with fewer than `least` folds.
    A patient in the tables of two folds is refused, naming both files."""
    folds = [r for r in results if r["name"] in fold_rows(recipe)]
    if len(folds) < least:
        return [], None
    tables = [pd.read_csv(RESULTS / r["name"] / "test.csv").assign(fold=r["name"], split=r["split"]) for r in folds]
    table = pd.concat(tables, ignore_index=True)
    where = table.groupby("case_id")["fold"].unique()
    twice = where[where.map(len) > 1]
    if len(twice):
        files = " and ".join(f"results/{row}/test.csv" for row in twice.iloc[0])
        raise ValueError(f"{len(twice)} patients are tested by two folds, {twice.index[0]} by {files}")
    return folds, table


def cross_validation(results, recipe="unet"):
    """Pool the fold rows of `recipe` (`fold_rows`) that have results: every case scored once by the fold
    model that never saw it. Mean and median per-case Dice with its 95 % bootstrap interval, cases
    at Dice 0, tumor-slice Dice (weighted by each fold's tumor slices), false-positive rate on
    tumor-free slices (pooled counts), and the Dice after N minutes (each fold's snapshots,
    weighted by its cases) -> `results/<recipe>-cross-validation.json` and `.csv` (one row per case).
    The headline pools from two folds on; a candidate recipe only once all five have run (before
    that, its paired comparison says what it has)."""
    from lgg import metrics

    folds, cases = _fold_tables(results, recipe, least=2 if recipe == "unet" else 5)
    if not folds:
        return None
    tumor_slices = [r["test"]["tumor_slice_dice_mean"] * _test_counts(r)["tumor_slices"] for r in folds]
    tumor_free = cases["slices"] - cases["tumor_slices"]
    pooled = {
        "recipe": recipe,
        "folds": [r["name"] for r in folds],
        "splits": [r["split"] for r in folds],
        "cases": int(len(cases)),
        "split_patients": split_patients(folds[0]),
        "case_dice_mean": float(cases.case_dice.mean()),
        "case_dice_median": float(cases.case_dice.median()),
        "case_dice_mean_ci95": list(metrics.mean_confidence_interval(cases.case_dice)),
        "cases_at_dice_0": sorted(cases.case_id[cases.case_dice == 0]),
        "tumor_slice_dice_mean": float(sum(tumor_slices) / sum(_test_counts(r)["tumor_slices"] for r in folds)),
        "tumor_free_false_positive_rate": float(cases.false_positive_slices.sum() / tumor_free.sum()),
        "per_fold": [
            {
                "fold": r["name"],
                "split": r["split"],
                "cases": r["test"]["cases"],
                "case_dice_mean": r["test"]["case_dice_mean"],
                "epochs": r["epochs_run"],
                "training_minutes": r["training_minutes"],
                "cpu": r["environment"].get("cpu_model"),
                "precision": r.get("precision", "float32"),
            }
            for r in folds
        ],
    }
    if all(r.get("after_minutes") for r in folds):
        pooled["after_minutes"] = pooled_curve(folds)
    save_json(pooled, RESULTS / f"{recipe}-cross-validation.json")
    from lgg.files import save_csv

    save_csv(cases, RESULTS / f"{recipe}-cross-validation.csv")
    return pooled


def classifier_cross_validation(results):
    """Pool the classifier's fold rows that have results (from two on, as the headline): every slice scored by the
    fold model that never saw its patient. ROC AUC with its 95 % interval from resampling patients
    (`metrics.roc_auc_by_patient`), accuracy, sensitivity and specificity at 0.5 ->
    `results/classifier-cross-validation.json` and `.csv` (one row per slice); fewer than two folds: None."""
    from lgg import metrics
    from lgg.files import save_csv

    folds, slices = _fold_tables(results, "classifier", least=2)
    if not folds:
        return None
    report = metrics.classification_report(slices.has_tumor, slices.probability)
    interval = metrics.roc_auc_by_patient(slices.has_tumor, slices.probability, slices.case_id)
    pooled = {
        "recipe": "classifier",
        "folds": [r["name"] for r in folds],
        "splits": [r["split"] for r in folds],
        "cases": interval["patients"],
        "split_patients": split_patients(folds[0]),
        **report,
        "roc_auc_ci95": interval["roc_auc_ci95"],
        "per_fold": [
            {
                "fold": r["name"],
                "split": r["split"],
                "cases": _test_counts(r)["cases"],
                "slices": r["test"]["slices"],
                "roc_auc": r["test"]["roc_auc"],
                "epochs": r["epochs_run"],
                "training_minutes": r["training_minutes"],
                "cpu": r["environment"].get("cpu_model"),
            }
            for r in folds
        ],
    }
    save_json(pooled, RESULTS / "classifier-cross-validation.json")
    save_csv(slices, RESULTS / "classifier-cross-validation.csv")
    return pooled


def classifier_cross_validation_text(pooled):
    low, high = pooled["roc_auc_ci95"]
    folds = ", ".join(
        f"{f['split']} {f['roc_auc']:.3f} ({f['cases']} cases; {f['epochs']} epochs/{f['training_minutes']} min, "
        f"{f.get('cpu') or 'CPU not recorded'})"
        for f in pooled["per_fold"]
    )
    return (
        f"**Cross-validation by patient, the classifier** ({len(pooled['folds'])} of 5 folds run: {pooled['cases']} "
        f"of the {pooled['split_patients']} patients, {pooled['slices']} slices, each scored once by the fold model "
        "that never saw its patient; `results/classifier-cross-validation.json`, one row per slice in the `.csv`): "
        f"ROC AUC **{pooled['roc_auc']:.3f}** (95 % interval {low:.3f}–{high:.3f}, percentile bootstrap over "
        f"patients), accuracy {pooled['accuracy']:.3f}, sensitivity {pooled['sensitivity']:.3f}, specificity "
        f"{pooled['specificity']:.3f} at 0.5 (the pooled probabilities of the fold models). Per fold: {folds}."
    )


def slice_detection_text(found):
    """The line of `benchmarks/detection.py`'s `results/slice-detection-<recipe>.json`: the segmenter as a slice
    classifier."""
    s = found["segmenter"]
    low, high = s["roc_auc_ci95"]
    folds = ", ".join(f"{f['split']} {f['roc_auc']:.3f}" for f in found["per_fold"])
    text = (
        f"**The U-Net as a tumor / no-tumor classifier** (`python benchmarks/detection.py --recipe "
        f"{found['recipe']}`, `results/slice-detection-{found['recipe']}.json`): {found['how']}. Over the "
        f"cross-validation of `{found['recipe']}` ({s['patients']} patients, {s['slices']} slices): ROC AUC "
        f"**{s['roc_auc']:.3f}** (95 % interval {low:.3f}–{high:.3f}, percentile bootstrap over patients). Per "
        f"fold: {folds}."
    )
    if found.get("aggregates"):  # older files: the largest probability for every fold, not chosen
        names = ", ".join(f"`{name}` {what}" for name, what in found["aggregates"].items())
        chosen = "; ".join(
            f"{f['split']} `{f['aggregate']}` on {f['validation_slices']} slices of {f['validation_patients']} "
            "patients (" + ", ".join(f"{name} {auc:.3f}" for name, auc in f["validation_roc_auc"].items()) + ")"
            for f in found["per_fold"]
        )
        test = ", ".join(f"`{name}` {auc:.3f}" for name, auc in found["test_roc_auc_by_aggregate"].items())
        text += (
            f" The score of a slice ({names}) is chosen by each fold on its own validation cases: {chosen}. Each "
            f"aggregate alone on all the test slices, recorded, not used to choose: {test}."
        )
    versus = found.get("vs_classifier")
    if versus:
        low, high = versus["difference_ci95"]
        text += (
            f" Against the classifier on the same {versus['slices']} slices of {versus['patients']} patients "
            f"(its folds {', '.join(versus['classifier_folds'])}): {versus['roc_auc']:.3f} vs "
            f"{versus['baseline_roc_auc']:.3f}, difference {versus['difference']:+.3f} (95 % interval {low:+.3f} to "
            f"{high:+.3f}; the U-Net higher in {versus['resamples_better']:.0%} of the resamples)."
        )
    return text


def recipe_comparison(results, prefix):
    """A candidate recipe against the headline (or its `PAIRED_WITH` recipe), paired: for every fold both
    have run, each test case's Dice under the candidate minus under the other (the same patients, the
    same fold split); the mean difference with its 95 % bootstrap interval, cases better / worse,
    Wilcoxon p, both pooled means, the same paired figures for each fold alone, and both curves of the
    Dice after N minutes over those cases (its `headline_*` keys hold the partner's figures, `paired_with`
    names it).
    -> `results/<prefix>-vs-<partner>.json`, or None before any fold pair exists."""
    from lgg import metrics

    by_name = {r["name"]: r for r in results}
    pairs = []
    for name in fold_rows(prefix):
        if name in by_name:
            suffix = name[len(prefix) :]
            baseline, again = partner(prefix) + suffix, f"{partner(prefix)}-again{suffix}"
            if (
                again in by_name
                and _same_cpu(by_name[name], by_name[again])
                and not (baseline in by_name and _same_cpu(by_name[name], by_name[baseline]))
            ):
                baseline = again  # the partner recipe run on the candidate's CPU: the fair partner
            if baseline in by_name:
                pairs.append((by_name[name], by_name[baseline]))
    if not pairs:
        return None
    tests = [
        (pd.read_csv(RESULTS / c["name"] / "test.csv"), pd.read_csv(RESULTS / b["name"] / "test.csv")) for c, b in pairs
    ]
    candidate = pd.concat([ours for ours, _ in tests], ignore_index=True)
    headline = pd.concat([theirs for _, theirs in tests], ignore_index=True)
    comparison = {
        "candidate": prefix,
        "change": CANDIDATES[prefix],
        "paired_with": partner(prefix),
        "folds": [[c["name"], b["name"], c["split"]] for c, b in pairs],
        "candidate_case_dice_mean": float(candidate.case_dice.mean()),
        "headline_case_dice_mean": float(headline.case_dice.mean()),
        "paired": metrics.paired_comparison(candidate, headline),
        "per_fold": [
            {
                "split": c["split"],
                "cases": c["test"]["cases"],
                "candidate": c["test"]["case_dice_mean"],
                "headline": b["test"]["case_dice_mean"],
                "candidate_epochs": c["epochs_run"],
                "headline_epochs": b["epochs_run"],
                "candidate_cpu": c["environment"].get("cpu_model"),
                "headline_cpu": b["environment"].get("cpu_model"),
                "candidate_xla": c.get("jit_compile", True),
                "headline_xla": b.get("jit_compile", True),
                "candidate_precision": c.get("precision", "float32"),
                "headline_precision": b.get("precision", "float32"),
                "candidate_slices_per_s": c.get("train_slices_per_s"),
                "headline_slices_per_s": b.get("train_slices_per_s"),
                # a time-limited recipe's epochs depend on the CPU: a pair is fair only on the same kind
                "same_cpu": _same_cpu(c, b),
                "paired": metrics.paired_comparison(*test),
            }
            for (c, b), test in zip(pairs, tests)
        ],
    }
    for key, rows in (
        ("candidate_after_minutes", [c for c, _ in pairs]),
        ("headline_after_minutes", [b for _, b in pairs]),
    ):
        if all(r.get("after_minutes") for r in rows):
            comparison[key] = pooled_curve(rows)
    save_json(comparison, comparison_file(prefix))
    return comparison


def _same_cpu(candidate, headline):
    """True or False when both runs recorded their CPU (model name and flags, and family / model / stepping
    where both recorded them: "AMD EPYC" names several generations), None when one did not."""
    a, b = candidate["environment"], headline["environment"]
    if not (a.get("cpu_model") and b.get("cpu_model")):
        return None
    same_generation = a["cpu_id"] == b["cpu_id"] if a.get("cpu_id") and b.get("cpu_id") else True
    return a["cpu_model"] == b["cpu_model"] and a.get("cpu_flags") == b.get("cpu_flags") and same_generation


def _compute(fold):
    """How the pair computed, where it differs: the compiler, the precision and the machine's speed change the
    epochs a time limit allows."""

    def how(who):
        xla = "XLA" if fold.get(f"{who}_xla", True) else "no XLA"
        return f"{fold.get(f'{who}_precision', 'float32')}, {xla}"

    text = "" if how("candidate") == how("headline") else f"; {how('candidate')} vs {how('headline')}"
    return text + _speeds(fold)


SPEED_GAP = 1.2  # training rates further apart than this are named: the same CPU model can run much slower


def _speeds(fold):
    """`; **training slices/s 34 vs 58**` where the two runs' median training rates differ by more than
    `SPEED_GAP` (another model or image size, a busy host, a job beside it): in the same minutes the slower
    one trained fewer epochs."""
    a, b = fold.get("candidate_slices_per_s"), fold.get("headline_slices_per_s")
    if not all(isinstance(rate, (int, float)) and np.isfinite(rate) and rate > 0 for rate in (a, b)):
        return ""  # a run that did not record its rate
    if max(a, b) / min(a, b) <= SPEED_GAP:
        return ""
    return f"; **training slices/s {a:.0f} vs {b:.0f}**"


def recipe_comparison_text(comparison):
    p = comparison["paired"]
    low, high = p["mean_difference_ci95"]
    machine = {True: "same CPU", False: "**different CPUs**", None: "CPU of one run not recorded"}
    folds = ", ".join(
        f"{f['split']}: {f['candidate']:.3f} vs {f['headline']:.3f} ({f['cases']} cases; "
        f"{f['candidate_epochs']} vs {f['headline_epochs']} epochs; {machine[f.get('same_cpu')]}{_compute(f)})"
        for f in comparison["per_fold"]
    )
    other = comparison.get("paired_with", "unet")  # older files: the headline
    versus = "the baseline recipe `unet`" if other == "unet" else f"the `{other}` recipe"
    text = (
        f"**Candidate recipe `{comparison['candidate']}`** ({comparison['change']}), paired with {versus} "
        f"on the same {p['cases']} patients ({len(comparison['folds'])} of 5 folds; "
        f"`results/{comparison['candidate']}-vs-{other}.json`): mean per-case Dice "
        f"{comparison['candidate_case_dice_mean']:.3f} vs {comparison['headline_case_dice_mean']:.3f}, "
        f"difference {p['mean_difference']:+.3f} (95 % interval {low:+.3f} to {high:+.3f}), "
        f"{p['better']} cases better / {p['worse']} worse, Wilcoxon p {_p_value(p['wilcoxon_p'])}. Per fold: {folds}."
    )
    if comparison.get("candidate_after_minutes") and comparison.get("headline_after_minutes"):
        ours, theirs = ({p["minutes"]: p["case_dice_mean"] for p in comparison[f"{who}_after_minutes"]}
                        for who in ("candidate", "headline"))  # fmt: skip
        points = ", ".join(f"{ours[m]:.3f} vs {theirs[m]:.3f} after {m:g} min" for m in sorted(set(ours) & set(theirs)))
        text += f" After N minutes, candidate vs `{other}`: {points}."
    return text


def pooled_curve(folds):
    """The Dice after N minutes over the folds' cases together (each fold's snapshot figure weighted by its
    test cases), at the marks every fold reached."""
    curve = pd.concat(pd.DataFrame(r["after_minutes"]).assign(cases=r["test"]["cases"]) for r in folds)
    total = sum(r["test"]["cases"] for r in folds)
    return [
        {
            "minutes": float(minutes),
            "case_dice_mean": float((group.case_dice_mean * group.cases).sum() / group.cases.sum()),
            "cases": int(group.cases.sum()),
        }
        for minutes, group in curve.groupby("minutes")
        if group.cases.sum() == total
    ]


def _test_counts(result):
    return next(row for row in result["split_counts"] if row["split"] == "test")


def split_patients(result):
    """The patients of a run's split, its training, validation and test cases together: 88 on the shared cases,
    110 on the whole Kaggle set."""
    return sum(row["cases"] for row in result["split_counts"])


def cross_validation_text(pooled):
    low, high = pooled["case_dice_mean_ci95"]
    recipe = pooled.get("recipe", "unet")

    cpus = {f.get("cpu") for f in pooled["per_fold"]}  # older files did not record it
    where = f"; every fold on {next(iter(cpus))}" if len(cpus) == 1 and None not in cpus else ""

    def cpu(fold):  # the CPU of each fold, where they ran on more than one kind
        return f", {fold.get('cpu') or 'CPU not recorded'}" if len(cpus) > 1 else ""

    folds = ", ".join(
        f"{f['split']} {f['case_dice_mean']:.3f} ({f['cases']} cases; {f['epochs']} epochs/{f['training_minutes']} min"
        f"{cpu(f)})"
        for f in pooled["per_fold"]
    )
    zero = pooled["cases_at_dice_0"]
    missed = f"{len(zero)} case{'s' * (len(zero) != 1)} at Dice 0" + (f" ({', '.join(zero)})" if zero else "")
    title = (
        "the U-Net recipe of the first row"
        if recipe == "unet"
        else f"candidate recipe `{recipe}` ({CANDIDATES[recipe]})"
    )
    lines = [
        f"**Cross-validation by patient, {title}** ({len(pooled['folds'])} of 5 folds run: "
        f"{pooled['cases']} of the {pooled['split_patients']} patients, each scored once by the fold model that "
        "never saw it; "
        f"`results/{recipe}-cross-validation.json`, one row per case in `results/{recipe}-cross-validation.csv`"
        f"{where}): "
        f"mean per-case Dice **{pooled['case_dice_mean']:.3f}** (95 % interval {low:.3f}–{high:.3f}), median "
        f"{pooled['case_dice_median']:.3f}; {missed}; "
        f"tumor-slice Dice {pooled['tumor_slice_dice_mean']:.3f}; false-positive rate on tumor-free slices "
        f"{pooled['tumor_free_false_positive_rate']:.3f}. Per fold: {folds}.",
    ]
    if pooled.get("after_minutes"):
        points = ", ".join(f"{p['case_dice_mean']:.3f} after {p['minutes']:g} min" for p in pooled["after_minutes"])
        lines += ["", f"Pooled over the same cases, the weights kept after N minutes: {points}."]
    return "\n".join(lines)


def resolution_ceiling(data_dir, sizes=(128, 160, 192)):
    """What training at S x S alone costs: the true test masks resized to S x S and back to 256 x 256
    the way predictions are (area down, bilinear up, threshold 0.5), scored against themselves.
    -> `results/resolution_ceiling.json`."""
    import numpy as np

    from lgg import data, evaluate, metrics
    from lgg.inference import resize_probabilities

    slices = evaluate.slices_with_split(data_dir, RUNS / "results-unet" / "split.csv")
    refuse_missing(slices, RUNS / "results-unet" / "split.csv", ["test"], data_dir)
    rows = slices[slices["split"] == "test"]
    _, masks = data.load_arrays(rows, data.NATIVE_SIZE)
    ceiling = {"cases": int(rows["case_id"].nunique()), "sizes": {}}
    for size in sizes:
        small = np.stack([data.resize_mask(mask[..., 0], size) for mask in masks]).astype(np.float32)
        back = resize_probabilities(small, data.NATIVE_SIZE)
        per_case, summary = metrics.segmentation_report(rows, masks, back, 0.5)
        ceiling["sizes"][str(size)] = {
            "case_dice_mean": summary["case_dice_mean"],
            "case_dice_min": float(per_case["case_dice"].min()),
        }
    save_json(ceiling, RESULTS / "resolution_ceiling.json")
    return ceiling


def two_stage(data_dir, again=True):
    """The U-Net gated by the classifier (`lgg.evaluate.evaluate_two_stage`) -> `results/two_stage.json`."""
    segmenter, classifier = RUNS / "results-unet" / "model.h5", RUNS / "results-classifier" / "model.h5"
    out = RUNS / "two-stage"
    if not (segmenter.exists() and classifier.exists()):
        return
    if again or not (out / "two_stage.json").exists():
        from lgg import guards
        from lgg.evaluate import evaluate_two_stage

        guards.mark_folder(out, guards.EVALUATE_MARKER)  # this script's own folder, also from before marks
        evaluate_two_stage(segmenter, classifier, data_dir, out_dir=out)
    copy_file(out / "two_stage.json", RESULTS / "two_stage.json")


def _counts(result):
    test = next(row for row in result["split_counts"] if row["split"] == "test")
    return f"{test['cases']} cases, {test['slices']} slices"


def _postprocessing(test):
    from lgg import postprocess

    if "postprocessing" not in test:
        return "none (threshold 0.5; run predates post-processing)"
    return postprocess.describe(test["postprocessing"])


def _p_value(p):
    """Two decimals from 0.1 up, three below it, so that 0.054 never reads as 0.05."""
    return "< 0.001" if p < 0.001 else f"= {p:.2f}" if p >= 0.1 else f"= {p:.3f}"


def readme_table(results):
    results = [r for r in results if r["name"] in TABLE_ROWS]  # candidate recipes: in their comparison below
    segmenters = [r for r in results if r["model"] != "classifier"]
    classifiers = [r for r in results if r["model"] == "classifier"]
    patients = sorted({split_patients(r) for r in results if r["split"] == HEADLINE.split})  # one, unless mixed data
    lines = [
        f"Produced by `make results` (`benchmarks/results.py`) on {' / '.join(map(str, patients))} of the Kaggle "
        "set's 110 cases, on 2-core CPUs "
        "(AMD EPYC or Intel Xeon: a run's JSON names its CPU from the bfloat16 runs on, `results/EXPERIMENTS.md` "
        "the earlier ones'), no GPU; numbers from "
        "`results/*.json`. Held-out **test** cases of the patient split "
        "unless marked leaky; Dice per case is over each case's whole volume at 256×256, after the "
        "post-processing chosen on the validation cases (raw = threshold 0.5, nothing else).",
        "",
        "| model | split (test) | image | epochs (best) | CPU min | Dice per case mean | median | raw mean | "
        "tumor-slice Dice | FP rate, tumor-free slices | Jaccard per case | batch Dice smooth=1 | post-processing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in segmenters:
        t = r["test"]
        label = r["model"] + (" (ImageNet encoder)" if r["encoder_weights"] == "imagenet" else "")
        if r["model"] == "resnet50-unet" and r["encoder_weights"] is None:
            label += " (random init: no ImageNet weights offline)"
        if r.get("precision", "float32") != "float32":
            label += f", {r['precision']}"
        if r.get("dice_loss") not in (None, "batch"):
            label += f", {r['dice_loss']} Dice loss"
        if r.get("seed", 0) != 0:
            label += f", seed {r['seed']}"
        if is_again(r["name"]):
            label += f", again on {r['environment'].get('cpu_model') or 'another CPU'}"
        if r.get("jit_compile", True) is False:
            label += ", no XLA"
        split = "random slices, **leaky**" if r["split"] == "random-slice-leaky" else r["split"]
        raw = t.get("raw", t)["case_dice_mean"]
        lines.append(
            f"| {label} | {split}: {_counts(r)} | {r['image_size']}² | {r['epochs_run']} ({r['best_epoch']}) | "
            f"{r['training_minutes']} | {t['case_dice_mean']:.3f} | {t['case_dice_median']:.3f} | {raw:.3f} | "
            f"{t['tumor_slice_dice_mean']:.3f} | {t['tumor_free_false_positive_rate']:.3f} | "
            f"{t['case_jaccard_mean']:.3f} | {t['batch_dice_smooth1']:.3f} | {_postprocessing(t)} |"
        )
    sure = [r for r in segmenters if r.get("uncertainty", {}).get("raw_fit")]
    if sure:
        lines += [
            "",
            "How sure these figures are (patient split). The interval is a 95 % bootstrap interval of the mean "
            "over the test cases (BCa, `lgg.metrics.mean_confidence_interval`): another draw of patients could "
            "move the mean that much. The fit columns are the raw per-case Dice (threshold 0.5) on the cases "
            "each model trained on and on the validation cases. The last column compares each row with the "
            "unet row on the same test cases (`lgg.metrics.paired_comparison`).",
            "",
            "| model | test mean (95 % CI) | raw train | raw val | raw test | vs unet: mean difference (95 % CI), "
            "cases better / worse, Wilcoxon p |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in sure:
            u, f = r["uncertainty"], r["uncertainty"]["raw_fit"]
            low, high = u["case_dice_mean_ci95"]
            versus = "—"
            if "vs_unet" in u:
                v = u["vs_unet"]
                versus = (
                    f"{v['mean_difference']:+.3f} ({v['mean_difference_ci95'][0]:+.3f} to "
                    f"{v['mean_difference_ci95'][1]:+.3f}), {v['better']} / {v['worse']}, p {_p_value(v['wilcoxon_p'])}"
                )
            lines.append(
                f"| {r['name']} | {r['test']['case_dice_mean']:.3f} ({low:.3f}–{high:.3f}) | "
                + " | ".join(f"{f[split]['case_dice_mean']:.3f} ({f[split]['cases']})" for split in ("train", "val"))
                + f" | {f['test']['case_dice_mean']:.3f} ({r['test']['cases']}) | {versus} |"
            )
    pooled_file = RESULTS / "unet-cross-validation.json"
    if pooled_file.exists():
        lines += ["", cross_validation_text(json.loads(pooled_file.read_text()))]
    for prefix in CANDIDATES:
        if (RESULTS / f"{prefix}-cross-validation.json").exists():
            lines += ["", cross_validation_text(json.loads((RESULTS / f"{prefix}-cross-validation.json").read_text()))]
        if comparison_file(prefix).exists():
            lines += ["", recipe_comparison_text(json.loads(comparison_file(prefix).read_text()))]
    ceiling_file = RESULTS / "resolution_ceiling.json"
    if ceiling_file.exists():
        ceiling = json.loads(ceiling_file.read_text())
        sizes = ", ".join(
            f"{size}²: {c['case_dice_mean']:.3f} (lowest case {c['case_dice_min']:.3f})"
            for size, c in ceiling["sizes"].items()
        )
        lines += [
            "",
            f"What the training resolution alone costs (`results/resolution_ceiling.json`): the true masks of the "
            f"{ceiling['cases']} test cases, resized down and back to 256² as predictions are, score a mean per-case "
            f"Dice of {sizes}.",
        ]
    for r in segmenters:
        if r.get("after_minutes"):
            points = ", ".join(
                f"{p['case_dice_mean']:.3f} after {p['elapsed_min']:.0f} min (epoch {p['epoch']})"
                for p in r["after_minutes"]
            )
            lines += [
                "",
                f"{r['name']}, mean per-case test Dice of the weights kept after N minutes: {points} "
                f"(`results/{r['name']}/dice_vs_minutes.png`; post-processing chosen on validation for each).",
            ]
    if classifiers:
        lines += [
            "",
            "| classifier | split (test) | image | epochs (best) | CPU min | accuracy | sensitivity | "
            "specificity | ROC AUC |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in classifiers:
            t = r["test"]
            cpu = r["environment"].get("cpu_model")
            label = f"{r['backbone']} CNN" + (f", on {cpu}" if cpu else "")
            lines.append(
                f"| {label} | {r['split']}: {_counts(r)} | {r['image_size']}² | {r['epochs_run']} "
                f"({r['best_epoch']}) | {r['training_minutes']} | {t['accuracy']:.3f} | {t['sensitivity']:.3f} | "
                f"{t['specificity']:.3f} | {t['roc_auc']:.3f} |"
            )
    if (RESULTS / "classifier-cross-validation.json").exists():
        pooled = json.loads((RESULTS / "classifier-cross-validation.json").read_text())
        lines += ["", classifier_cross_validation_text(pooled)]
    for path in sorted(RESULTS.glob("slice-detection-*.json")):  # benchmarks/detection.py, one per recipe
        lines += ["", slice_detection_text(json.loads(path.read_text()))]
    return "\n".join(lines)


def glance_table(results):
    """One line per segmentation recipe with test results (the headline and the candidates): its folds run so
    far, the mean per-case Dice over their patients (each scored by the fold model that never saw it; with all
    five, the figures of `<recipe>-cross-validation.json`), and, from its `-vs-` file, the runs it is paired
    with on the same patients (its partner recipe's, or that recipe run again on the candidate's CPU), their mean
    and the paired difference. A mean over some of the folds is not comparable with one over all five; the
    paired column is."""
    from lgg import metrics

    rows = []
    for recipe in ("unet", *CANDIDATES):
        folds, cases = _fold_tables(results, recipe, least=1)
        if not folds:
            continue
        pooled_file = RESULTS / f"{recipe}-cross-validation.json"
        if len(folds) == len(FOLDS) and pooled_file.exists():  # the pooled file's own figures
            pooled = json.loads(pooled_file.read_text())
            mean, median, (low, high) = (
                pooled["case_dice_mean"],
                pooled["case_dice_median"],
                pooled["case_dice_mean_ci95"],
            )
        else:
            mean, median = cases.case_dice.mean(), cases.case_dice.median()
            low, high = metrics.mean_confidence_interval(cases.case_dice)
        paired = "—"
        if recipe in CANDIDATES and comparison_file(recipe).exists():
            comparison = json.loads(comparison_file(recipe).read_text())
            c = comparison["paired"]
            (low_d, high_d), p = c["mean_difference_ci95"], _p_value(c["wilcoxon_p"])
            again = [fold_number(split) for _, baseline, split in comparison["folds"] if is_again(baseline)]
            which = f"fold{'s' * (len(again) > 1)} {', '.join(map(str, again))}"
            runs = f" ({which} run again on the candidate's CPU)" if again else ""
            paired = (
                f"`{partner(recipe)}`{runs}: {comparison['headline_case_dice_mean']:.3f} on the same {c['cases']}; "
                f"{c['mean_difference']:+.3f} ({low_d:+.3f} to {high_d:+.3f}), {c['better']} / {c['worse']}, p {p}"
            )
        complete, numbers = len(folds) == len(FOLDS), sorted(fold_number(r["split"]) for r in folds)
        rows.append(
            f"| `{recipe}` | {len(folds)} of {len(FOLDS)} ({', '.join(map(str, numbers))}) | "
            f"{len(cases)} | {f'**{mean:.3f}**' if complete else f'{mean:.3f}'} ({low:.3f}–{high:.3f}) | "
            f"{median:.3f} | {int((cases.case_dice == 0).sum())} | {paired} |"
        )
    spread = max(
        (
            (np.ptp([r["test"]["case_dice_mean"] for r in results if r["name"] in fold_rows(recipe)]), recipe)
            for recipe in ("unet", *CANDIDATES)
            if sum(r["name"] in fold_rows(recipe) for r in results) == len(FOLDS)
        ),
        default=None,
    )
    differ = f" (one recipe's fold means differ by up to {spread[0]:.2f}: `{spread[1]}`)" if spread else ""
    return "\n".join(
        [
            "Each recipe on the patients its fold models never saw (5 folds by patient; fold 1 is the patient split "
            "of the table below): mean and median per-case Dice over the patients of the folds run so far (in "
            "bold: all five folds, every patient), the cases at Dice 0, and the runs it is paired with on the same "
            "patients, their mean and the paired difference (`lgg.metrics.paired_comparison`). A mean over 1-4 folds "
            f"is not comparable with one over all 5{differ}; the paired column is. Each recipe's change and its "
            "folds' CPUs: its lines under the table.",
            "",
            "| recipe | folds run | patients | mean per-case Dice (95 % CI) | median | cases at Dice 0 | paired with: "
            "its mean on the same patients; difference (95 % CI), better / worse, Wilcoxon p |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            *rows,
        ]
    )


def gpu_table(gpu):
    """The architecture comparison of `benchmarks/gpu_architectures.py` (`results/gpu/gpu_architectures.json`)."""
    lines = [
        f"Produced by `benchmarks/gpu_architectures.py` on one {gpu['device']} (Keras {gpu['keras']}, "
        f"{gpu['backend']} backend), {gpu['minutes_per_model']} minutes of training per model, random "
        "initialization for all (no ImageNet weights offline), 128², batch 32, the same patient split and "
        "test cases as above; numbers from `results/gpu/gpu_architectures.json`. One seed each.",
        "",
        "| model | parameters | epochs (best) | slices/s | Dice per case mean | median | raw mean | "
        "tumor-slice Dice | FP rate, tumor-free slices | post-processing |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    from lgg import postprocess

    for m in gpu["models"]:
        t = m["test"]
        lines.append(
            f"| {m['model']} | {m['parameters'] / 1e6:.2f} M | {m['epochs']} ({m['best_epoch']}) | "
            f"{m['training_slices_per_s']:.0f} | {t['case_dice_mean']:.3f} | {t['case_dice_median']:.3f} | "
            f"{m['test_raw']['case_dice_mean']:.3f} | {t['tumor_slice_dice_mean']:.3f} | "
            f"{t['tumor_free_false_positive_rate']:.3f} | {postprocess.describe(m['postprocessing'])} |"
        )
    return "\n".join(lines)


def two_stage_table(two_stage):
    alone, gated = two_stage["segmenter_alone"], two_stage["two_stage"]
    return "\n".join(
        [
            f"Two-stage pipeline (`python -m lgg evaluate --model runs/results-unet/model.h5 --classifier "
            f"runs/results-classifier/model.h5`, `results/two_stage.json`): the light classifier gates the U-Net, "
            f"gate threshold {two_stage['gate_threshold']} chosen on the validation cases; "
            f"{two_stage['test_cases']} test cases.",
            "",
            "| pipeline | Dice per case mean | median | tumor-slice Dice | FP rate, tumor-free slices |",
            "| --- | --- | --- | --- | --- |",
            *(
                f"| {name} | {s['case_dice_mean']:.3f} | {s['case_dice_median']:.3f} | "
                f"{s['tumor_slice_dice_mean']:.3f} | {s['tumor_free_false_positive_rate']:.3f} |"
                for name, s in (("U-Net alone", alone), ("classifier, then U-Net", gated))
            ),
        ]
    )


def ours_line(both, machine):
    """The side-by-side's headline: ours as `train` picks on the benchmark's machine against the original.
    (Files from before `train` chose the precision lack `train_picks`: the rule of `precision_by_default`,
    which without XLA and GPU is the CPU's AVX-512 BF16, says what it picks there.)"""

    def times(key):
        r = both[key]
        return f"{r['median']:.2f}x (rounds: {r['min']:.2f}–{r['max']:.2f})"

    xla = "on" if both["ours"] == "xla" else "off"
    picks = both.get("train_picks")
    if picks is None:
        picks = (
            "mixed_bfloat16" if both["ours"] == "no_xla" and machine["cpu_flags"].get("avx512_bf16") else both["ours"]
        )
    if picks == "mixed_bfloat16":
        return (
            f"**Ours as `train` picks here (`mixed_bfloat16`, XLA off: this CPU has AVX-512 BF16) "
            f"{times('mixed_bfloat16_over_original')} the original; in float32 {times('ours_over_original')}.**"
        )
    return (
        f"**Ours (float32, XLA {xla} as `train` picks here) {times('ours_over_original')} the original; in "
        f"`mixed_bfloat16` {times('mixed_bfloat16_over_original')}.**"
    )


def benchmark_table(bench):
    """The README's speed section, from `results/benchmark.json` (written by `make bench`); None for a
    smoke run (`--quick`), a run with Keras' own batch normalization (`--stock-batchnorm`: `train` uses the fused
    kernel), or a file of the benchmark before it timed steady-state steps."""
    machine, settings = bench["machine"], bench["settings"]
    if settings.get("quick") or settings.get("fused_batchnorm") is False or "timing" not in settings:
        return None
    peak = bench["matmul"]["float32"]["gflops"]
    flags = ", ".join(flag for flag, present in machine["cpu_flags"].items() if present) or "none of those checked"
    xla = "on" if settings["jit_compile"] else "off"
    lines = [
        f"Produced by `make bench` (`benchmarks/bench.py`) on {machine['cpu_model']}, {machine['cores']} cores, "
        f"CPU flags: {flags}; training at {settings['image_size']}², batch {settings['batch_size']}, "
        f"{settings['cases']} real cases; measured matrix-multiply peak {peak:.0f} GFLOP/s in float32, "
        f"{bench['matmul']['bfloat16']['gflops']:.0f} in bfloat16. Numbers from `results/benchmark.json`. Every "
        "training rate is the steady-state steps of a real `fit` (`lgg.callbacks.StepTimer`; the first steps "
        "and the teardown of each fit left out), of the models as `train` builds them (TensorFlow's fused batch "
        "normalization, `lgg.models.FusedBatchNormalization`).",
        "",
        f"| model | parameters | training GFLOP / slice | training slices/s, float32, XLA {xla} (10th-90th "
        "percentile of steps) | cost of the input pipeline | achieved GFLOP/s (share of float32 matmul peak) | "
        "predicting one case at 256², the exported model (slices) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    case = bench["inference_case"]
    for model in bench["models"].values():
        training, flops = model["training"], model["flops"]
        lines.append(
            f"| {model['label']} | {flops['parameters'] / 1e6:.2f} M | {flops['training_gflop_per_slice']:.2f} | "
            f"{training['slices_per_s']:.1f} ({training['step_rate_p10']:.1f}–{training['step_rate_p90']:.1f}) | "
            f"{100 * training['pipeline_cost_share']:.0f} % | "
            f"{training['achieved_gflops']:.1f} ({100 * training['fraction_of_matmul_peak']:.0f} %) | "
            f"{model['inference']['seconds_per_case']:.2f} s ({case['slices']}) |"
        )
    both = bench.get("side_by_side")
    if both:
        rates = both["slices_per_s"]

        def median_range(r, unit="x"):
            return f"{r['median']:.2f}{unit} (rounds: {r['min']:.2f}–{r['max']:.2f})"

        lines += [
            "",
            f"Side by side, the same U-Net timed in turn for {both['rounds']} rounds of {both['steps']} steady-state "
            "steps (medians; ratios taken within each round, so a slow spell of the machine hits every setup): the "
            "original notebooks' setup (`ImageDataGenerator.flow_from_dataframe` reading the .tif files every "
            f"epoch, float32, no XLA) {rates['original']['median']:.1f} slices/s; ours in float32 with XLA "
            f"{rates['xla']['median']:.1f}, without {rates['no_xla']['median']:.1f} (XLA "
            f"{median_range(both['xla_over_no_xla'])}); ours in `mixed_bfloat16` without XLA "
            f"{rates['mixed_bfloat16']['median']:.1f} ({median_range(both['mixed_bfloat16_over_float32_no_xla'])} "
            f"float32 without XLA). {ours_line(both, machine)} The original generator alone gives "
            f"{bench['original_pipeline']['pipeline_only_slices_per_s']:.0f} slices/s, ours "
            f"{bench['models']['unet']['training']['pipeline_only_slices_per_s']:.0f}.",
        ]
    agreement = bench.get("agreement")
    if agreement:
        real = bench["real_loop"]
        lines += [
            "",
            "The same code timed three ways: "
            + ", ".join(f"{name} {value:.1f}" for name, value in agreement["slices_per_s"].items())
            + f" slices/s (the real loop: `python {real['command'].removeprefix('python ')}`, the median of its "
            f"{real['epochs']} epochs' rates in its `history.csv`); largest / smallest "
            f"{agreement['largest_over_smallest']:.2f}.",
        ]
    memory = bench.get("memory")
    if memory:
        lines += [
            "",
            f"Peak resident memory training the U-Net at {memory['image_size']}² with all {memory['cases']} cases "
            f"({memory['slices']} slices) in memory, in a fresh process: {memory['ru_maxrss_mb'] / 1024:.2f} GB by "
            f"`ru_maxrss`" + (f", {memory['vm_hwm_mb'] / 1024:.2f} GB by `VmHWM`." if "vm_hwm_mb" in memory else "."),
        ]
    return "\n".join(lines)


def _replace_between(text, name, body):
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise SystemExit(f"README.md needs one {start} ... {end} pair, in that order, for what it would write there")
    before, rest = text.split(start)
    _, after = rest.split(end)
    return f"{before}{start}\n{body}\n{end}{after}"


def write_readme(results):
    text = _replace_between(README.read_text(), "results", readme_table(results))
    text = _replace_between(text, "glance", glance_table(results))
    if (RESULTS / "gpu" / "gpu_architectures.json").exists():
        text = _replace_between(
            text, "gpu", gpu_table(json.loads((RESULTS / "gpu" / "gpu_architectures.json").read_text()))
        )
    if (RESULTS / "two_stage.json").exists():
        text = _replace_between(
            text, "two-stage", two_stage_table(json.loads((RESULTS / "two_stage.json").read_text()))
        )
    if (RESULTS / "benchmark.json").exists():
        table = benchmark_table(json.loads((RESULTS / "benchmark.json").read_text()))
        if table is None:
            print("results/benchmark.json is a smoke run or an older format: the README's speed section is kept")
        else:
            text = _replace_between(text, "benchmark", table)
    with atomic_path(README) as temporary:
        temporary.write_text(text)


MODELS = ROOT / "models"
MAX_MEGABYTES = 50  # each shipped file, so that the history stays small
DATASET_TERMS = (
    "Kaggle [LGG MRI Segmentation](https://www.kaggle.com/datasets/mateuszbuda/lgg-mri-segmentation) (Buda, "
    "Saha, Mazurowski 2019), images from TCGA-LGG in The Cancer Imaging Archive: the dataset's own terms (Kaggle "
    "page, TCIA data usage policy) apply to these weights' use; the code that trained them is MIT-licensed. "
    "Cite: Buda M, Saha A, Mazurowski MA. Association of genomic subtypes of lower-grade gliomas with shape "
    "features automatically extracted by a deep learning algorithm. Computers in Biology and Medicine 109 (2019)."
)


def recipe_of(name):
    """The recipe whose cross-validation `name` is a fold row of (`unet-bf16-fold2` -> `unet-bf16`), or None."""
    return next((recipe for recipe in ("unet", *CANDIDATES) if name in fold_rows(recipe)), None)


def pooled_of(recipe):
    """A recipe's pooled cross-validation as it stands in `results/` (the JSON, and its per-case table), or
    None before there is one. Refused when stale: every fold it pooled must still score what it recorded."""
    file = RESULTS / f"{recipe}-cross-validation.json"
    if not file.exists():
        return None
    pooled = json.loads(file.read_text())
    for fold in pooled["per_fold"]:
        row = RESULTS / f"{fold['fold']}.json"
        if not row.exists() or json.loads(row.read_text())["test"]["case_dice_mean"] != fold["case_dice_mean"]:
            raise ValueError(f"{file} is stale ({fold['fold']} changed since): run --collect-only first")
    return pooled, pd.read_csv(file.with_suffix(".csv"))


def check_shippable(name, data_dir, target="unet"):
    """Refuse, before anything is written, a run that may not go into `models/<target>/`: it must be the fixed
    fold (`SHIPPED_SPLIT`) of a recipe whose cross-validation is pooled and current, its run folder must be the
    run that was scored, and the data must hold its test cases. A model of another recipe is replaced only when
    this recipe's pooled mean per-case Dice is higher on the same patients than the shipped recipe's pooled
    figure as it stands now (not as its card last recorded it).
    -> (the run's result, its recipe's pooled cross-validation, the shipped card or None, the paired
    comparison with the shipped recipe or None)."""
    from lgg import metrics
    from lgg.data import find_dataset_root

    recipe = recipe_of(name)
    if recipe is None:
        raise ValueError(f"{name} is not a fold row of a cross-validated recipe: {list(fold_rows('unet'))} or a "
                         f"candidate's ({', '.join(CANDIDATES)}, with -fold2 ... -fold5)")  # fmt: skip
    found = pooled_of(recipe)
    if found is None:
        raise ValueError(
            f"{recipe} has no cross-validation yet (results/{recipe}-cross-validation.json is written by "
            "--collect-only once its folds have run: all five for a candidate)"
        )
    pooled, cases = found
    if name not in pooled["folds"]:
        raise ValueError(f"{name} is not among the folds pooled for {recipe}; run --collect-only first")
    result = json.loads((RESULTS / f"{name}.json").read_text())
    if result["split"] != SHIPPED_SPLIT:
        raise ValueError(
            f"{name} was tested on {result['split']}; the shipped fold is {SHIPPED_SPLIT} for every recipe "
            f"(fixed when the first model shipped, before any fold-2 figure existed): ship {fold_rows(recipe)[1]}"
        )
    card_file = MODELS / target / "card.json"
    shipped = json.loads(card_file.read_text()) if card_file.exists() else None
    against = None
    if shipped and shipped["run"] != name:
        theirs = pooled_of(recipe_of(shipped["run"]) or "")
        if theirs is None or shipped["run"] not in theirs[0]["folds"]:
            raise ValueError(f"the shipped {shipped['run']} has no current pooled cross-validation to compare with")
        if set(theirs[1].case_id) != set(cases.case_id):
            raise ValueError(
                f"{recipe} is pooled over {len(cases)} patients, the shipped recipe over {len(theirs[1])}: they "
                "must be compared on the same patients (run the missing folds)"
            )
        against = metrics.paired_comparison(cases, theirs[1])
        if against["mean_difference"] <= 0:
            raise ValueError(
                f"models/{target} holds {shipped['run']}, whose recipe scores {theirs[0]['case_dice_mean']:.3f} "
                f"pooled over {len(cases)} patients; {name}'s recipe scores {pooled['case_dice_mean']:.3f} on the "
                "same patients: not better, not replaced"
            )
        same, recorded = _same_cpus(pooled, theirs[0])
        against.update(
            run=shipped["run"], recipe=recipe_of(shipped["run"]), same_cpu=same, cpu_recorded_in_both=recorded
        )
    run_dir = RUNS / f"results-{name}"
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise ValueError(f"{run_dir} lacks {missing}: ship a run trained here (or copied into runs/)")
    megabytes = weights_megabytes(run_dir / "model.h5")
    if megabytes > MAX_MEGABYTES:
        raise ValueError(too_large(run_dir / "model.h5", megabytes))
    summary = json.loads((run_dir / "test_summary.json").read_text())
    trained_on = json.loads((run_dir / "config.json").read_text()).get("split")
    if trained_on != SHIPPED_SPLIT or summary["case_dice_mean"] != result["test"]["case_dice_mean"]:
        raise ValueError(
            f"{run_dir} is not the run results/{name}.json scored (split {trained_on}, test Dice "
            f"{summary['case_dice_mean']:.4f} vs {result['test']['case_dice_mean']:.4f}): run --collect-only, or "
            "bring back the run that was scored"
        )
    root = find_dataset_root(data_dir)
    split = pd.read_csv(run_dir / "split.csv")
    absent = sorted(case for case in set(split.case_id[split.split == "test"]) if not (root / case).is_dir())
    if absent:
        raise ValueError(f"{root} lacks the test cases of {name} ({len(absent)}: {absent[:3]}...): cannot measure it")
    return result, pooled, shipped, against


RUN_FILES = ("model.h5", "postprocess.json", "split.csv", "config.json", "test_summary.json")


def weights_megabytes(path):
    """The megabytes of a Keras `.h5` file's model weights (its optimizer state left out, as shipped)."""
    import h5py

    total = []
    try:
        with h5py.File(path, "r") as file:
            root = file["model_weights"] if "model_weights" in file else file
            root.visititems(lambda _, item: total.append(item.nbytes) if isinstance(item, h5py.Dataset) else None)
    except OSError as error:
        raise ValueError(f"{path} is not a readable Keras .h5 file ({error})") from None
    return sum(total) / 1e6


def too_large(path, megabytes):
    return (
        f"{path} holds {megabytes:.1f} MB of weights; a shipped file stays under {MAX_MEGABYTES} MB so that the "
        "repository's history stays small (a U-Net with fewer filters, --base-filters; the ResNet50 U-Net, 52 MB "
        "in float32, has no smaller setting here): not shipped"
    )


def _same_cpus(ours, theirs):
    """Of the folds of two pooled cross-validations: how many recorded their CPU in both, and how many of
    those ran on the same one -> (same, recorded in both)."""
    cpus = {f["split"]: f.get("cpu") for f in theirs["per_fold"]}
    both = [f for f in ours["per_fold"] if f.get("cpu") and cpus.get(f["split"])]
    return sum(1 for f in both if f["cpu"] == cpus[f["split"]]), len(both)


def ship(name, data_dir, target="unet"):
    """Copy the model of the run `name` into `models/<target>/` (`model.h5` without optimizer state,
    `postprocess.json`, `split.csv`) with `MODEL_CARD.md` and `card.json`. A shipped model is
    replaced only by a run whose recipe scores a higher pooled cross-validated mean per-case Dice
    on the same patients (`check_shippable`); shipping the shipped run again brings its card up to date.
    One at a time (`models/.lgg-lock`): a second `--ship` would clear the first's staging folder as a leftover."""
    from lgg import guards

    with guards.folder_lock(MODELS):
        return _ship(name, data_dir, target)


def _ship(name, data_dir, target):
    import tempfile

    import keras

    from lgg import evaluate

    retired = MODELS / f".{target}-retired"
    if retired.is_dir() and not (MODELS / target).exists():  # cut off between the two renames below
        raise ValueError(
            f"{retired} holds the shipped model that an interrupted --ship set aside, and models/{target} is missing: "
            f"move it back first (mv {retired} {MODELS / target}); nothing was changed"
        )
    result, pooled, shipped, against = check_shippable(name, data_dir, target)
    run_dir, folder = RUNS / f"results-{name}", MODELS / target
    again = shipped is not None and shipped["run"] == name
    # everything is built in a new folder and swapped in at the end: a failure leaves the shipped model as it was
    staging = MODELS / f".{target}-partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model = keras.models.load_model(run_dir / "model.h5", compile=False)
        if again:  # the same model, its card brought up to date: the shipped files, no new blob
            for file in ("model.h5", "postprocess.json", "split.csv"):
                shutil.copy(folder / file, staging / file)
        else:
            model.save(staging / "model.h5", include_optimizer=False)
            megabytes = (staging / "model.h5").stat().st_size / 1e6
            if megabytes > MAX_MEGABYTES:  # the file itself, as it would be committed
                raise ValueError(too_large(run_dir / "model.h5", megabytes))
            for file in ("postprocess.json", "split.csv"):
                shutil.copy(run_dir / file, staging / file)
        probe = np.random.default_rng(0).uniform(0, 255, (4, *model.input_shape[1:])).astype("float32")
        evaluate.check_reloaded(model, [staging / "model.h5"], probe)
        # the test figure of the shipped file itself, as a user would measure it (tests/test_shipped.py repeats it)
        with tempfile.TemporaryDirectory() as scratch:  # its tables and plots are not shipped
            measured = evaluate.evaluate_model_file(staging / "model.h5", data_dir, out_dir=scratch)
        facts = {
            "sha256": file_sha256(staging / "model.h5"),
            "megabytes": round((staging / "model.h5").stat().st_size / 1e6, 2),
            "parameters": int(model.count_params()),
            "input": list(model.input_shape),
        }
        card = card_for(name, target, result, pooled, shipped, against, facts, measured)
        save_json(card, staging / "card.json")
        (staging / "MODEL_CARD.md").write_text(model_card(card))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(retired, ignore_errors=True)  # a finished swap's leftover: models/<target> is in place
        folder.rename(retired)
        staging.rename(folder)
        shutil.rmtree(retired)
    else:
        staging.rename(folder)
    print(f"Shipped {name} as models/{target}/model.h5 ({card['megabytes']} MB, sha256 {card['sha256']})")
    return card


CARD_POOLED_KEYS = ("folds", "cases", "case_dice_mean", "case_dice_median", "case_dice_mean_ci95", "cases_at_dice_0")


def card_for(name, target, result, pooled, shipped, against, facts, measured):
    """The card of a shipped model (`card.json`): the file's facts, the run's recipe and split, the test figure
    measured on the file, its recipe's pooled cross-validation, and what it replaced (with the paired comparison
    of the two recipes on the same patients)."""
    card = {
        "run": name,
        "file": f"models/{target}/model.h5",
        **facts,
        "split": result["split"],
        "split_counts": result["split_counts"],
        "recipe": result["command"],
        "recipe_name": recipe_of(name),
        "precision": result.get("precision", "float32"),
        "image_size": result["image_size"],
        "epochs_run": result["epochs_run"],
        "best_epoch": result["best_epoch"],
        "training_minutes": result["training_minutes"],
        "environment": result["environment"],
        "test": {k: measured[k] for k in ("cases", "case_dice_mean", "case_dice_median", "postprocessing")},
        "cross_validation": {key: pooled[key] for key in CARD_POOLED_KEYS},
    }
    if against is not None:
        card["replaced"] = {
            "run": shipped["run"],
            "recipe": against["recipe"],
            "precision": shipped.get("precision", "float32"),
            "cross_validation": shipped["cross_validation"],
            "paired": {k: v for k, v in against.items() if k not in ("run", "recipe")},
        }
    elif shipped and "replaced" in shipped:
        card["replaced"] = shipped["replaced"]
    return card


def refresh_card(target="unet"):
    """Bring the shipped model's card up to date with the pooled cross-validation of its recipe (more
    folds run since it shipped). The model file and its measured test figure are left as they are. Under
    `models/.lgg-lock`, as `ship`: a card read before a ship's swap would be written into the new model's folder."""
    from lgg import guards

    with guards.folder_lock(MODELS):
        return _refresh_card(target)


def _refresh_card(target):
    folder = MODELS / target
    card = json.loads((folder / "card.json").read_text())
    recipe = recipe_of(card["run"])
    found = pooled_of(recipe) if recipe else None
    if found is None or card["run"] not in found[0]["folds"]:
        raise ValueError(f"no current cross-validation of {card['run']}'s recipe pools it: nothing to refresh from")
    pooled = found[0]
    if pooled["cases"] < card["cross_validation"]["cases"]:
        raise ValueError(
            f"{recipe}'s cross-validation now pools {pooled['cases']} patients, the card "
            f"{card['cross_validation']['cases']}: run the missing folds first"
        )
    card["cross_validation"] = {key: pooled[key] for key in CARD_POOLED_KEYS}
    card["recipe_name"] = recipe
    card.setdefault("precision", json.loads((RESULTS / f"{card['run']}.json").read_text()).get("precision", "float32"))
    with atomic_path(folder / "MODEL_CARD.md") as temporary:
        temporary.write_text(model_card(card))
    save_json(card, folder / "card.json")
    print(f"models/{target}/MODEL_CARD.md: its recipe's pooled figure is now over {pooled['cases']} patients")


def _recipe_row(card):
    recipe, precision = card.get("recipe_name", "unet"), card.get("precision", "float32")
    text = f"`{card['recipe']}`" + (f" (candidate recipe `{recipe}`: {CANDIDATES[recipe]})" if recipe in CANDIDATES
                                    else "")  # fmt: skip
    text += f": {card['epochs_run']} epochs (best {card['best_epoch']}) in {card['training_minutes']} min"
    if precision == "float32":
        return text + ", trained in float32"
    return text + f", trained in {precision} (bfloat16 arithmetic, float32 weights); the exported model computes in " \
        "float32, as measured here"  # fmt: skip


def model_card(card):
    from lgg import postprocess

    test, cv, env = card["test"], card["cross_validation"], card["environment"]
    counts = {row["split"]: row for row in card["split_counts"]}
    low, high = cv["case_dice_mean_ci95"]
    size = card["image_size"]
    rows = {
        "file": f"`{card['file']}`, {card['megabytes']} MB, sha256 `{card['sha256']}` (saved again without the "
        f"optimizer state: the run's own `model.h5`, whose sha256 `results/{card['run']}.json` records, differs)",
        "architecture": f"U-Net (Ronneberger 2015), {card['parameters'] / 1e6:.2f} M parameters",
        "contract": f"raw slices, float32 in [0, 255], shape (N, {size}, {size}, 3), channels pre-contrast, FLAIR, "
        f"post-contrast (preprocessing inside the model) -> (N, {size}, {size}, 1) tumor probabilities; loads with "
        "`keras.models.load_model(path, compile=False)` without this package; `lgg` resizes 256² slices to "
        f"{size}² and the probabilities back",
        "post-processing": "`postprocess.json` beside it, chosen on the validation cases: "
        + postprocess.describe(test["postprocessing"]),
        "data": f"{split_patients(card)} of the Kaggle set's 110 cases, split `{card['split']}` (`split.csv` beside "
        f"it): trained on {counts['train']['cases']} patients ({counts['train']['slices']} slices), best epoch "
        f"chosen on {counts['val']['cases']} validation patients, tested on {counts['test']['cases']} patients "
        f"({counts['test']['slices']} slices) it never saw",
        "recipe": _recipe_row(card),
        "machine": f"{env.get('cpu_model') or env.get('processor')} ({env.get('machine')}), {env.get('cpu_count')} "
        f"cores, no GPU; TensorFlow {env.get('tensorflow')}, Keras {env.get('keras')}",
        "this model, its own test patients": f"mean per-case Dice {test['case_dice_mean']:.3f}, median "
        f"{test['case_dice_median']:.3f} ({test['cases']} cases)",
        "its recipe, cross-validated": f"mean per-case Dice {cv['case_dice_mean']:.3f} (95 % interval "
        f"{low:.3f}–{high:.3f}), median {cv['case_dice_median']:.3f}, over {cv['cases']} patients, each scored by "
        f"the fold model that never saw it (folds {', '.join(cv['folds'])}); {len(cv['cases_at_dice_0'])} at Dice 0",
    }
    if card.get("replaced"):
        before = card["replaced"]
        text = (
            f"{before['run']} (recipe `{before.get('recipe', 'unet')}`, {before.get('precision', 'float32')}), whose "
            f"recipe scored {before['cross_validation']['case_dice_mean']:.3f} pooled over "
            f"{before['cross_validation']['cases']} patients when this model replaced it"
        )
        if "paired" in before:
            p = before["paired"]
            low, high = p["mean_difference_ci95"]
            text += (
                f"; this recipe against that one, paired on the same {p['cases']} patients: difference "
                f"{p['mean_difference']:+.3f} (95 % interval {low:+.3f} to {high:+.3f}), {p['better']} better / "
                f"{p['worse']} worse, Wilcoxon p {_p_value(p['wilcoxon_p'])}; the two ran on the same CPU in "
                f"{p['same_cpu']} of the {p.get('cpu_recorded_in_both', p['same_cpu'])} folds whose CPU both "
                f"recorded, of {len(cv['folds'])} (trained for a fixed time, a faster CPU runs more epochs)"
            )
        rows["replaced"] = text
    rows["license and citation"] = DATASET_TERMS
    table = "\n".join(f"| {key} | {value} |" for key, value in rows.items())
    return f"""# Model card: U-Net for LGG FLAIR abnormality segmentation

Written by `python benchmarks/results.py --ship {card["run"]}` (the same facts as JSON: `card.json`).

| | |
| --- | --- |
{table}

Per-case Dice is over each case's whole volume at 256×256 (`lgg.metrics`), measured on this file
(`python -m lgg evaluate`, post-processing from `postprocess.json`). The field's figure for this
dataset is 0.82 mean per-case Dice (Buda et al. 2019, 22-fold cross-validation on 110 patients).
Which fold's model ships is fixed for every recipe: {SHIPPED_SPLIT}, fixed when the first model
shipped, before any fold-2 figure existed (the first fold run after fold 1), so no recipe ships its
luckiest fold and a replacement is tested on the same patients. Not a medical device: for research
and teaching.

Use it: `python -m lgg predict --out OUT data/kaggle_3m/<case>` (the shipped model is the default), or
`keras.models.load_model("{card["file"]}", compile=False)`. Score it on its own test patients:
`python -m lgg evaluate --model {card["file"]} --data data --out runs/shipped-eval`.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data"))
    parser.add_argument(
        "--models",
        default=None,
        help=f"comma-separated, of {list(CONFIGS)} (default: the table's rows; candidate recipes and "
        "rows run again on another machine (-again) only when named)",
    )
    parser.add_argument("--collect-only", action="store_true")
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="train the --models and stop: what parallel jobs run (one per fold), before one --collect-only",
    )
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train the --models again even where runs/results-<name>/ holds a finished or interrupted run "
        "(without it, finished runs are kept and interrupted ones continue)",
    )
    parser.add_argument("--ship", default=None, help="copy this run's model into models/unet/ with its model card")
    parser.add_argument(
        "--refresh-card", action="store_true", help="update the shipped model's card with the pooled figures"
    )
    args = parser.parse_args(argv)
    if args.ship or args.refresh_card:  # each does one thing and returns: the others would be dropped silently
        flags = [("--ship", args.ship), ("--refresh-card", args.refresh_card), ("--models", args.models is not None),
                 ("--collect-only", args.collect_only), ("--train-only", args.train_only),
                 ("--retrain", args.retrain)]  # fmt: skip
        given = [flag for flag, value in flags if value]
        if len(given) > 1:
            parser.error(f"{given[0]} does that alone; {', '.join(given[1:])} would be ignored: give them separately")
    if args.ship or args.refresh_card:
        try:  # their refusals name what is wrong and change nothing: a message, not a traceback
            if args.ship:
                ship(args.ship, args.data)
            else:
                refresh_card()
        except (ValueError, OSError) as error:
            raise SystemExit(f"error: {error}") from None
        return
    if args.collect_only and args.train_only:
        parser.error("--collect-only and --train-only contradict each other: give one")
    if args.collect_only and args.retrain:
        parser.error("--retrain trains, --collect-only does not: give one")
    if args.collect_only and args.models is not None:
        parser.error("--collect-only collects every row that has a run folder: --models would be ignored")
    names = list(DEFAULT_RUNS) if args.models is None else args.models.split(",")
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {list(CONFIGS)}")
    if len(set(names)) < len(names):  # with --retrain the second would train over the first (an hour each)
        parser.error(f"--models names a row twice ({args.models}): each is trained once")
    if not args.train_only:
        check_data_for_collect(args.data)  # at the door: collecting would refuse after rewriting earlier rows
    if not args.collect_only:
        for name in names:
            train(name, args.data, args.retrain)
        if args.train_only:
            return
    results = [result for result in (collect(name, args.data) for name in CONFIGS) if result is not None]
    if (RUNS / "results-unet" / "split.csv").exists():
        resolution_ceiling(args.data)
    two_stage(args.data, again=not args.collect_only)
    cross_validation(results)
    for recipe, pooled in [("classifier", classifier_cross_validation(results))] + [
        (prefix, cross_validation(results, prefix)) for prefix in CANDIDATES
    ]:
        if pooled is None:  # too few folds now: a pooled file of its own, from more folds, is stale
            for suffix in (".json", ".csv"):
                (RESULTS / f"{recipe}-cross-validation{suffix}").unlink(missing_ok=True)
    for prefix in CANDIDATES:
        current = comparison_file(prefix) if recipe_comparison(results, prefix) else None
        for file in RESULTS.glob(f"{prefix}-vs-*.json"):  # no pair now, or paired with another recipe before
            if file != current:
                file.unlink()
    write_readme(results)
    print(readme_table(results))


if __name__ == "__main__":
    main()
