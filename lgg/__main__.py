"""Command line: `python -m lgg train|evaluate|predict|download|demo-data ...` (see `--help`)."""

import argparse
import sys
from pathlib import Path

from lgg.data import DatasetError


def _encoder_weights(value):
    return None if value in (None, "none", "None") else value


def _parser():
    parser = argparse.ArgumentParser(prog="python -m lgg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model; writes a run folder")
    train.add_argument("kind", choices=["unet", "resnet50-unet", "classifier"])
    train.add_argument("--data", default="data", help="kaggle_3m folder or a folder containing it")
    train.add_argument("--out", required=True, help="run folder to create")
    train.add_argument("--epochs", type=int, default=100, help="upper bound; early stopping decides")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--image-size", type=int, default=128, help="side of the slices the model sees")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--max-cases", type=int, default=None)
    train.add_argument(
        "--encoder-weights",
        default="imagenet",
        type=_encoder_weights,
        help="ResNet50 models: imagenet, none, or a weights file",
    )
    train.add_argument("--base-filters", type=int, default=16, help="U-Net filters at the first level")
    train.add_argument("--attention", action="store_true", help="resnet50-unet: attention gates (Oktay 2018)")
    train.add_argument("--backbone", choices=["light", "resnet50"], default="light", help="classifier backbone")
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--patience", type=int, default=10)
    train.add_argument("--tumor-fraction", type=float, default=None, help="oversample tumor slices to this share")
    train.add_argument("--max-minutes", type=float, default=None, help="stop after this much training time")
    train.add_argument(
        "--split",
        default="patient",
        help="patient (default: hash of the patient id, about 70/10/20), patient-fold-K-of-N (fold K of an N-fold "
        "cross-validation by patient; fold 1 of 5 is the default split), or random-slice-leaky (the original "
        "notebooks' slice split: patients on both sides)",
    )
    train.add_argument(
        "--schedule",
        choices=["plateau", "time-cosine"],
        default="plateau",
        help="learning rate: halve on plateau, or cosine decay over --max-minutes",
    )
    train.add_argument(
        "--snapshot-minutes",
        type=float,
        nargs="*",
        default=(),
        help="keep the weights reached after these many minutes (e.g. 15 30 60)",
    )
    train.add_argument("--no-jit", dest="jit_compile", action="store_false", help="train without XLA")
    train.add_argument(
        "--dice-loss",
        choices=["batch", "slice"],
        default="batch",
        help="Dice term of the loss: over the whole batch (the original notebooks) or per slice, averaged",
    )
    train.add_argument(
        "--precision",
        choices=["float32", "mixed_bfloat16"],
        default="float32",
        help="mixed_bfloat16: compute in bfloat16, weights and the exported model in float32",
    )
    train.add_argument("--overwrite", action="store_true")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    evaluate = commands.add_parser("evaluate", help="score a model on a split of a data folder")
    evaluate.add_argument("--model", required=True, help="model.h5 or model.keras")
    evaluate.add_argument("--data", default="data")
    evaluate.add_argument("--split-file", default=None, help="split.csv of a run (default: the model's run folder)")
    evaluate.add_argument("--split", default="test", help="which split to score: train, val, test or all")
    evaluate.add_argument("--out", default=None, help="folder for the results (default: the model's folder)")
    evaluate.add_argument(
        "--tune-postprocessing",
        action="store_true",
        help="choose the post-processing again on the run's validation cases (rewrites postprocess.json)",
    )
    evaluate.add_argument(
        "--classifier",
        default=None,
        help="also score the two-stage pipeline: this classifier gates the segmenter slice by slice",
    )
    evaluate.add_argument(
        "--threshold", type=float, default=None, help="score a plain threshold instead of the run's postprocess.json"
    )

    predict = commands.add_parser("predict", help="segment .tif slices, case folders or a kaggle_3m tree")
    predict.add_argument("inputs", nargs="+", help=".tif slices, case folders or dataset folders")
    predict.add_argument("--model", required=True)
    predict.add_argument("--out", required=True)
    predict.add_argument(
        "--threshold", type=float, default=None, help="plain threshold instead of the run's postprocess.json"
    )
    predict.add_argument("--classifier", default=None, help="two-stage: a classifier model gates each slice")
    predict.add_argument("--gate-threshold", type=float, default=None, help="default: two_stage.json, else 0.5")
    predict.add_argument("--pixel-spacing-mm", type=float, default=None, help="in-plane pixel size, for areas in mm²")
    predict.add_argument("--slice-thickness-mm", type=float, default=None, help="with --pixel-spacing-mm: volume in ml")

    download = commands.add_parser("download", help="download the Kaggle dataset with kagglehub")
    download.add_argument("--dest", default="data")

    demo = commands.add_parser("demo-data", help="write a small SYNTHETIC set in the Kaggle layout")
    demo.add_argument("--dest", default="data/demo")
    demo.add_argument("--cases", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            from lgg.train import train_run

            options = {key: value for key, value in vars(args).items() if key not in ("command", "kind", "data", "out")}
            run_dir = train_run(args.kind, args.data, args.out, **options)
            print(f"Run folder: {run_dir} (model.h5, model.keras, history.csv, curves.png, test_summary.json)")
        elif args.command == "evaluate":
            from lgg.evaluate import evaluate_model_file

            if args.classifier:
                from lgg.evaluate import evaluate_two_stage

                evaluate_two_stage(args.model, args.classifier, args.data, args.out)
            else:
                evaluate_model_file(
                    args.model,
                    args.data,
                    args.split_file,
                    args.split,
                    args.out,
                    args.threshold,
                    args.tune_postprocessing,
                )
        elif args.command == "predict":
            from lgg.predict import predict_paths

            predict_paths(
                args.model,
                args.inputs,
                args.out,
                args.threshold,
                args.classifier,
                args.gate_threshold,
                args.pixel_spacing_mm,
                args.slice_thickness_mm,
            )
        elif args.command == "download":
            from lgg.datasets import download_kaggle

            download_kaggle(args.dest)
        elif args.command == "demo-data":
            from lgg.datasets import write_demo_dataset

            root = write_demo_dataset(Path(args.dest), cases=args.cases, seed=args.seed)
            print(f"Wrote {args.cases} SYNTHETIC cases (not real MRI) to {root}")
    except (DatasetError, FileExistsError, FileNotFoundError, RuntimeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
