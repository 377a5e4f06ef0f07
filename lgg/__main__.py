"""Command line: `python -m lgg train|evaluate|predict|app|download|demo-data ...` (see `--help`)."""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's start-up INFO lines would bury a one-line refusal
# the command line only writes figures to files: without a display backend chosen, matplotlib takes the desktop's
# (macOS, Tk on Windows), and the web page draws in a worker thread, where a macOS window aborts the server
os.environ.setdefault("MPLBACKEND", "Agg")

from lgg import config, guards  # noqa: E402
from lgg.data import DatasetError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse that reports a refused setting in one line (`error: ...`, exit code 2), without the usage."""

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# number flags, checked at the door: (check, options) per flag name
_PROBABILITY = (guards.probability, {})
_MILLIMETRES = (guards.positive, {"maximum": 100.0})


def _flag(name, check_options):
    check, options = check_options
    return guards.argparse_type(check, name, **options)


def _parser():
    parser = _Parser(prog="python -m lgg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model; writes a run folder")
    config.add_arguments(train)  # one option per RunConfig setting, with its range and default
    train.add_argument(
        "--data", default=None, help="kaggle_3m folder or a folder containing it (default: data, or --config's)"
    )
    train.add_argument("--out", required=True, help="run folder to create")
    train.add_argument(
        "--config",
        default=None,
        help="a run's config.json: train with its settings (the options given here change them)",
    )
    train.add_argument("--overwrite", action="store_true", help="replace a finished or failed run folder of ours")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    evaluate = commands.add_parser("evaluate", help="score a model on a split of a data folder")
    evaluate.add_argument("--model", required=True, help="model.h5 or model.keras")
    evaluate.add_argument("--data", default="data")
    evaluate.add_argument("--split-file", default=None, help="split.csv of a run (default: the model's run folder)")
    evaluate.add_argument(
        "--split", default=None, choices=["train", "val", "test", "all"], help="which split to score (default: test)"
    )
    evaluate.add_argument(
        "--out",
        default=None,
        help="a new folder for the results (default: the model's run folder, for its own scoring only)",
    )
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
        "--threshold",
        type=_flag("--threshold", _PROBABILITY),
        default=None,
        help="score a plain threshold instead of the run's postprocess.json",
    )

    predict = commands.add_parser(
        "predict", help="segment .tif slices, case folders, a kaggle_3m tree or NIfTI volumes"
    )
    predict.add_argument(
        "inputs",
        nargs="*",
        help=".tif slices, case folders, dataset folders, or 4-D NIfTI files (.nii/.nii.gz; last axis: "
        "pre-contrast, FLAIR, post-contrast)",
    )
    for name, sequence in (("pre", "pre-contrast"), ("flair", "FLAIR"), ("post", "post-contrast")):
        predict.add_argument(
            f"--{name}", default=None, help=f"a 3-D NIfTI of the {sequence} sequence (all three, or --fill-from-flair)"
        )
    predict.add_argument(
        "--fill-from-flair",
        action="store_true",
        help="with --flair: fill a missing --pre / --post with the FLAIR, as the Kaggle set fills a sequence a "
        "case lacks (at a cost in Dice, measured for the shipped model: README, Your own scans)",
    )
    predict.add_argument("--model", default=None, help="model.h5 (default: the shipped models/unet/model.h5)")
    predict.add_argument("--out", required=True)
    predict.add_argument(
        "--threshold",
        type=_flag("--threshold", _PROBABILITY),
        default=None,
        help="plain threshold instead of the run's postprocess.json",
    )
    predict.add_argument("--classifier", default=None, help="two-stage: a classifier model gates each slice")
    predict.add_argument(
        "--gate-threshold",
        type=_flag("--gate-threshold", _PROBABILITY),
        default=None,
        help="default: the two_stage.json beside --model if chosen for this classifier (else refused), or 0.5",
    )
    predict.add_argument(
        "--pixel-spacing-mm",
        type=_flag("--pixel-spacing-mm", _MILLIMETRES),
        default=None,
        help="in-plane pixel size, for areas in mm²",
    )
    predict.add_argument(
        "--slice-thickness-mm",
        type=_flag("--slice-thickness-mm", _MILLIMETRES),
        default=None,
        help="with --pixel-spacing-mm: volume in ml",
    )
    predict.add_argument("--overwrite", action="store_true", help="replace the earlier predictions in --out")

    app = commands.add_parser("app", help="a web page on localhost to segment an uploaded scan (Gradio)")
    app.add_argument("--model", default=None, help="model.h5 (default: the shipped models/unet/model.h5)")
    app.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    app.add_argument(
        "--port", type=_flag("--port", (guards.positive, {"integer": True, "maximum": 65535})), default=7860
    )

    download = commands.add_parser("download", help="download the Kaggle dataset with kagglehub")
    download.add_argument("--dest", default="data")

    demo = commands.add_parser("demo-data", help="write a small SYNTHETIC set in the Kaggle layout")
    demo.add_argument("--dest", default="data/demo")
    demo.add_argument(
        "--cases", type=_flag("--cases", (guards.positive, {"integer": True, "maximum": 1000})), default=8
    )
    demo.add_argument(
        "--seed", type=_flag("--seed", (guards.non_negative, {"integer": True, "maximum": 2**32 - 1})), default=0
    )
    return parser


def _train_settings(parser, args):
    """`train`'s RunConfig and data folder: from `--config` (its data folder unless `--data` is given),
    or with `--resume` from the run's own config.json (options that would change it are refused),
    then the options given."""
    stored = Path(args.out) / "config.json"
    source = Path(args.config) if args.config else (stored if args.resume and stored.is_file() else None)
    given = {name: getattr(args, name) for name in ("kind", "backbone") if getattr(args, name, None) is not None}
    base = config.RunConfig.from_file(source, **given) if source else None  # read as the model given now
    if base is None and args.kind is None:
        parser.error("train needs a model kind (unet, resnet50-unet, classifier) or --config RUN/config.json")
    settings = config.from_arguments(args, base)
    if "encoder_weights" in vars(args) and not settings.resnet50_encoder:  # given: RunConfig alone would drop it
        parser.error(
            f"--encoder-weights sets a ResNet50 encoder's starting weights; a {settings.kind}"
            f"{' with the light backbone' * (settings.kind == 'classifier')} has none (leave it out)"
        )
    own_run = args.resume and stored.is_file()
    if own_run:  # against the run's own settings, whatever --config named
        own = config.RunConfig.from_file(stored)  # as it was stored: not read as the model given now
        changed = [name for name, value in vars(settings).items() if value != getattr(own, name)]
        if changed:
            flags = ", ".join("the model kind" if name == "kind" else f"--{name.replace('_', '-')}" for name in changed)
            parser.error(
                f"--resume continues {args.out} with its own settings ({stored}); the options or --config given "
                f"would change {flags}"
            )
        source = stored  # and its own data folder, unless --data names one (its split is checked then)
    recorded = json.loads(Path(source).read_text()).get("data_dir") if source else None
    if recorded is not None and not isinstance(recorded, str):
        parser.error(f"{source}: data_dir must be a folder name; received {recorded!r}")
    if recorded is not None and args.data is None and not Path(recorded).exists():
        parser.error(f"{source} records data_dir {recorded!r}, not there (read from {Path.cwd()}): pass --data")
    return settings, args.data or recorded or "data"


def _refuse_ignored_options(parser, args):
    """Options that would have no effect beside the others given: refused, never silently dropped."""
    if args.command == "evaluate" and args.classifier:
        given = [flag for flag, value in [("--split-file", args.split_file), ("--split", args.split),
                                          ("--threshold", args.threshold),
                                          ("--tune-postprocessing", args.tune_postprocessing)] if value]  # fmt: skip
        if given:
            parser.error(
                f"evaluate --classifier scores the segmenter run's own val/test split with its postprocess.json; "
                f"{', '.join(given)} would be ignored: score the segmenter alone with them, without --classifier"
            )
    if args.command == "evaluate" and args.split == "all":
        given = [flag for flag, value in [("--split-file", args.split_file),
                                          ("--tune-postprocessing", args.tune_postprocessing)] if value]  # fmt: skip
        if given:
            parser.error(
                f"--split all scores every slice of --data, with no split file and no validation cases; "
                f"{', '.join(given)} would be ignored or fail: leave it out, or score a split of the run"
            )
    if args.command == "evaluate" and args.threshold is not None and args.tune_postprocessing:
        parser.error("--threshold scores a plain threshold, --tune-postprocessing chooses one: give one of them")
    if args.command == "predict":
        if args.gate_threshold is not None and not args.classifier:
            parser.error("--gate-threshold gates by a classifier's probability: give --classifier too")
        if args.slice_thickness_mm is not None and args.pixel_spacing_mm is None:
            parser.error("--slice-thickness-mm gives volumes with --pixel-spacing-mm: give both (or neither)")


def main(argv=None):
    parser = _parser()
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    for arg in argv:  # argparse takes `--flag=--` as the flag given no value at all: `--snapshot-minutes=--` then
        flag, given, value = arg.partition("=")  # trained with the defaults and no epoch limit
        if flag.startswith("--") and given and value == "--":
            parser.error(f"argument {flag}: '--' is not a value")
    args = parser.parse_args(argv)
    if args.command == "predict" and not args.inputs and not (args.pre or args.flair or args.post):
        parser.error("predict needs inputs (.tif slices, folders, 4-D NIfTI files) or --pre, --flair and --post")
    _refuse_ignored_options(parser, args)
    try:
        if args.command == "train":
            settings, data_dir = _train_settings(parser, args)  # refused here, before TensorFlow is imported
            from lgg.train import train_run

            run_dir = train_run(settings, data_dir, args.out, overwrite=args.overwrite, resume=args.resume)
            if run_dir is not None:  # None: a worker of a multi-worker run other than the chief
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
                    args.split or "test",
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
                args.overwrite,
                sequences={"pre": args.pre, "flair": args.flair, "post": args.post},
                fill_from_flair=args.fill_from_flair,
            )
        elif args.command == "app":
            from lgg.app import serve

            serve(args.model, args.host, args.port)
        elif args.command == "download":
            from lgg.datasets import download_kaggle

            download_kaggle(args.dest)
        elif args.command == "demo-data":
            from lgg.datasets import write_demo_dataset

            root = write_demo_dataset(Path(args.dest), cases=args.cases, seed=args.seed)
            print(f"Wrote {args.cases} SYNTHETIC cases (not real MRI) to {root}")
    except (DatasetError, OSError, RuntimeError, ValueError) as error:  # OSError: also read-only or full disks
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
