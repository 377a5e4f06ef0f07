"""One source for every training setting: `RunConfig`.

Each setting is declared once, with its default, its allowed values and its help text. The command
line builds `train`'s options from it (`add_arguments`), `train_run` takes one, a run folder's
`config.json` holds one (`train --config RUN/config.json` trains the same run again), the results
table lists its rows as instances of it, and the notebooks' `parameters` cells are its fields.
A `RunConfig` checks itself when made: a nonsense value is refused with the setting named.

The defaults are plain (no time limit, learning rate halved on plateau, batches as they come; the
compiler and the precision chosen by the machine, `lgg.train.xla_by_default` and `precision_by_default`);
`HEADLINE` is the baseline recipe, the `unet` row of the README's results table (the recipes compared
there start from it): a U-Net at 128 px, half of each batch tumor slices, 60 minutes of training with
the learning rate on a cosine over those minutes, weights kept after 15/30/45/60, float32.
`SHIPPED_RECIPE` is the recipe of the shipped model, which `make train` and the U-Net notebook's
`parameters` cell use: the baseline with the strong augmentation and a fifth of the training slices
made FLAIR only, the precision left to the machine (bfloat16 without XLA where the CPU has AVX-512
BF16, as its cross-validation was measured).
"""

import argparse
import dataclasses
import json
import types
from dataclasses import dataclass, field
from pathlib import Path

from lgg import data, guards

MODEL_KINDS = ("unet", "resnet50-unet", "classifier")
BACKBONES = ("light", "resnet50")
SCHEDULES = ("plateau", "time-cosine")
PRECISIONS = ("float32", "mixed_bfloat16")
DICE_LOSSES = ("batch", "slice", "tversky")
DISTRIBUTE = ("mirrored", "multi-worker")  # lgg.distribute
ENCODER_WEIGHTS = ("imagenet", None)  # or the path of a weights file
MINUTES_MAX = 7 * 24 * 60  # a week
# settings only some kinds use: another kind refuses a value other than the default
USED_BY = {"base_filters": ("unet",), "dice_loss": ("unet", "resnet50-unet"), "backbone": ("classifier",)}


def has_resnet50_encoder(kind, backbone):
    """Whether a model of `kind` (and classifier `backbone`) has a ResNet50 encoder, the only part that takes
    `encoder_weights`."""
    return kind == "resnet50-unet" or (kind == "classifier" and backbone == "resnet50")


# what a run's config.json holds beside the settings: the record of that run
RECORD_KEYS = {"data_dir", "out_dir", "resume", "verbose", "overwrite", "environment", "split_counts", "notebook",
               "encoder_weights_used", "encoder_weights_requested", "freeze_encoder", "loss",
               "jit_compile_used", "precision_used", "replicas"}  # fmt: skip


def _count(maximum):
    return guards.positive, {"integer": True, "maximum": maximum}


def _setting(default, help, check=None, choices=None):
    """A field of `RunConfig`: `check` is `(guards function, options)` for numbers, `choices` a tuple."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


@dataclass(frozen=True)
class RunConfig:
    kind: str = _setting("unet", "the model", choices=MODEL_KINDS)
    split: str = _setting(
        "patient",
        "patient (hash of the patient id, about 70/10/20), patient-fold-K-of-N (fold K of an N-fold "
        "cross-validation by patient; fold 1 of 5 is the default split), or random-slice-leaky (the original "
        "notebooks' slice split: patients on both sides)",
    )
    # at most the slices' own 256: more only enlarges them, at four times the memory for each doubling
    image_size: int = _setting(128, "side of the slices the model sees (native: 256)", _count(data.NATIVE_SIZE))
    batch_size: int = _setting(16, "slices per training step", _count(4096))
    epochs: int | None = _setting(
        None,
        "upper bound; early stopping or the time limit decides (none: 100, or no bound when max_minutes is set)",
        _count(100_000),
    )
    seed: int = _setting(0, "seeds weights, shuffling and augmentation", (guards.non_negative, {"integer": True,
                         "maximum": 2**32 - 1}))  # fmt: skip
    max_cases: int | None = _setting(None, "use only the first N cases (None: all)", _count(100_000))
    base_filters: int = _setting(16, "U-Net filters at the first level, doubled at each level down", _count(512))
    encoder_weights: str | None = _setting("imagenet", "ResNet50 models: imagenet, none, or a weights file")
    attention: bool = _setting(False, "resnet50-unet: attention gates (Oktay 2018)")
    backbone: str = _setting("light", "classifier backbone", choices=BACKBONES)
    learning_rate: float = _setting(1e-3, "initial learning rate (Adam)", (guards.positive, {"maximum": 1}))
    ema: float | None = _setting(
        None,
        "average the weights as they train (Polyak averaging: an exponential moving average, Keras' use_ema) with "
        "this momentum per step, e.g. 0.999, and validate, keep and export the average (None: off)",
        (guards.probability, {}),
    )
    patience: int | None = _setting(
        None,
        "epochs without a better validation score before training stops (none: 10 with the plateau schedule; no "
        "early stopping with time-cosine, which runs to max_minutes and keeps the best validation epoch)",
        _count(100_000),
    )
    tumor_fraction: float | None = _setting(
        None, "oversample tumor slices to this share of each batch (None: as they come)", (guards.probability, {})
    )
    tumor_sampling: str = _setting(
        "slice",
        "how the tumor share of each batch is drawn (with tumor_fraction): slice (every tumor slice equally often), "
        "case (a case first, each equally often, then one of its tumor slices: few tumor slices as often as many) or "
        "area (a case first, then one of its tumor slices in proportion to its tumor area, after "
        "brain-segmentation-pytorch)",
        choices=data.TUMOR_SAMPLINGS,
    )
    flair_only: float = _setting(
        0.0,
        "share of training slices whose pre- and post-contrast channels are replaced by FLAIR, as the dataset "
        "fills the sequences a case lacks (0: none)",
        (guards.non_negative, {"maximum": 1}),
    )
    augmentation: str = _setting(
        "standard",
        "training augmentation (lgg.data.AUGMENTATIONS): "
        + "; ".join(f"{name} ({data.describe_augmentation(name)})" for name in data.AUGMENTATIONS),
        choices=tuple(data.AUGMENTATIONS),
    )
    max_minutes: float | None = _setting(
        None, "stop after this much training time (None: no limit)", (guards.positive, {"maximum": MINUTES_MAX})
    )
    schedule: str = _setting(
        "plateau", "learning rate: halve on plateau, or cosine decay over max_minutes", choices=SCHEDULES
    )
    snapshot_minutes: tuple = _setting(
        (),
        "keep the weights reached after these many minutes (0: after the first epoch)",
        (guards.non_negative, {"maximum": MINUTES_MAX}),
    )
    jit_compile: bool | None = _setting(
        None,
        "train with XLA (TensorFlow and JAX backends; on PyTorch the step runs eagerly); none: on unless the CPU "
        "has AVX-512, where oneDNN's own kernels train faster (make bench)",
    )
    precision: str | None = _setting(
        None,
        "mixed_bfloat16: compute in bfloat16, weights and export in float32; none: mixed_bfloat16 for a U-Net "
        "trained by TensorFlow in one replica on a CPU with AVX-512 BF16 (Intel with AMX, AMD Zen 4 and later), "
        "no GPU, without XLA, float32 elsewhere (lgg.train.precision_by_default)",
        choices=PRECISIONS,
    )
    dice_loss: str = _setting(
        "batch",
        "overlap term of the loss: Dice over the whole batch, Dice per slice averaged, or Tversky over the whole "
        "batch (misses weighted 0.7, false alarms 0.3)",
        choices=DICE_LOSSES,
    )
    distribute: str | None = _setting(
        None,
        "data-parallel training through tf.distribute: mirrored (this machine's GPUs) or multi-worker (every "
        "worker runs the same command with its own TF_CONFIG); batch_size stays the global batch (lgg.distribute)",
        choices=DISTRIBUTE,
    )

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.snapshot_minutes, (list, tuple)) and self.snapshot_minutes is not None:
            raise ValueError(f"snapshot_minutes must be a list of minutes; received {self.snapshot_minutes!r}")
        put("snapshot_minutes", tuple(self.snapshot_minutes or ()))
        if self.encoder_weights in ("none", "None"):
            put("encoder_weights", None)
        for setting in dataclasses.fields(self):
            name, value, meta = setting.name, getattr(self, setting.name), setting.metadata
            optional = isinstance(setting.type, types.UnionType) and type(None) in setting.type.__args__
            if value is None and optional:
                continue
            if setting.type in (bool, bool | None) and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false; received {value!r}")
            if meta["choices"] and (not isinstance(value, str) or value not in meta["choices"]):
                raise ValueError(f"{name} must be one of {meta['choices']}; received {value!r}")
            if meta["check"]:  # the checks return the value as int or float: 128.0 from a JSON file becomes 128
                check, options = meta["check"]
                checked = tuple(check(name, item, **options) for item in (value if setting.type is tuple else [value]))
                put(name, checked if setting.type is tuple else checked[0])
            elif str in getattr(setting.type, "__args__", (setting.type,)) and not isinstance(value, str):
                raise ValueError(f"{name} must be text; received {value!r}")
        if not self.resnet50_encoder:
            if self.encoder_weights not in ENCODER_WEIGHTS:  # a file named for an encoder this model does not have
                raise ValueError(
                    f"encoder_weights {self.encoder_weights!r}: weights for a ResNet50 encoder, which a "
                    f"{self.kind}{' with the light backbone' * (self.kind == 'classifier')} does not have"
                )
            put("encoder_weights", None)  # only ResNet50 encoders take weights: recorded as such
        if self.encoder_weights not in ENCODER_WEIGHTS and not Path(self.encoder_weights).is_file():
            raise ValueError(
                "encoder_weights must be imagenet, none, or an existing weights file; "
                f"received {self.encoder_weights!r}"
            )
        step = 16 if self.kind == "unet" else 32  # the size halves 4 (U-Net) or 5 (ResNet50) times
        if self.image_size % step:
            raise ValueError(f"image_size of a {self.kind} must be a multiple of {step}; received {self.image_size}")
        late = [mark for mark in self.snapshot_minutes if self.max_minutes is not None and mark > self.max_minutes]
        if late:
            raise ValueError(
                f"snapshot_minutes {late} lie past max_minutes {self.max_minutes:g}: the run stops before them"
            )
        data.check_tumor_sampling(self.tumor_sampling, self.tumor_fraction)
        if self.schedule == "time-cosine" and self.max_minutes is None:
            raise ValueError("schedule 'time-cosine' needs max_minutes (--max-minutes)")
        if self.attention and self.kind != "resnet50-unet":
            raise ValueError(f"attention gates are an option of resnet50-unet, not of {self.kind}")
        self._refuse_settings_of_other_kinds()
        data.check_split_name(self.split)

    def _refuse_settings_of_other_kinds(self):
        """A setting that another kind of model uses, given a value other than its default, would train this
        model as if it had not been given: refused, naming it."""
        defaults = {setting.name: setting.default for setting in dataclasses.fields(self)}
        for name, kinds in USED_BY.items():
            if self.kind not in kinds and getattr(self, name) != defaults[name]:
                raise ValueError(
                    f"{name} is a setting of {' and '.join(kinds)}, not of {self.kind}: {getattr(self, name)!r} "
                    f"would change nothing; leave it at {defaults[name]!r}"
                )

    @property
    def resnet50_encoder(self):
        """Whether the model has a ResNet50 encoder, the only part that takes `encoder_weights`."""
        return has_resnet50_encoder(self.kind, self.backbone)

    @property
    def task(self):
        return "classification" if self.kind == "classifier" else "segmentation"

    def to_dict(self):
        return {**dataclasses.asdict(self), "snapshot_minutes": list(self.snapshot_minutes)}

    @classmethod
    def from_values(cls, values, **fixed):
        """The fields found in a mapping, e.g. a notebook's `globals()` after its `parameters` cell."""
        names = {setting.name for setting in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names} | fixed)

    @classmethod
    def from_file(cls, path, **changes):
        """The settings of a run's `config.json` (other keys in it, such as versions, are the record of
        that run and are left out), with `changes` on top."""
        path = Path(path)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not a readable config.json ({error})") from None
        if not isinstance(stored, dict):
            raise ValueError(f"{path}: not a run configuration (a JSON object is expected)")
        names = {setting.name for setting in dataclasses.fields(cls)}
        unknown = sorted(set(stored) - names - RECORD_KEYS)
        if unknown:  # a misspelt setting would otherwise be dropped without a word, and the run trained without it
            raise ValueError(
                f"{path}: {', '.join(unknown)} {'is not a setting' if len(unknown) == 1 else 'are not settings'} "
                "of lgg.config.RunConfig (python -m lgg train --help lists them); correct or remove"
            )
        if "precision" not in stored:  # written before the setting existed: that run trained in float32
            stored = {**stored, "precision": "float32"}
        # settings the model (of the kind given now, or the stored one) does not use: written before they were
        # refused, or of another kind of model (`train classifier --config UNET/config.json`): read as defaults
        kind = changes.get("kind", stored.get("kind", "unet"))
        backbone = changes.get("backbone", stored.get("backbone"))
        if stored.get("freeze_encoder") and has_resnet50_encoder(kind, backbone):  # a notebook setting, not train's
            raise ValueError(
                f"{path}: that run kept its encoder fixed (freeze_encoder true, a notebook setting); train has no such "
                "setting and would train the whole model: run the notebook again to repeat it"
            )
        unused = {name for name, kinds in USED_BY.items() if kind not in kinds}
        if not has_resnet50_encoder(kind, backbone):
            unused.add("encoder_weights")
        stored = {key: value for key, value in stored.items() if key not in unused}
        try:
            return cls(**{key: value for key, value in stored.items() if key in names} | changes)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


# the recipe of the README's headline row (the `unet` row of benchmarks/results.py)
# in float32 on every machine, as its cross-validation was measured (`train` alone picks bfloat16 on CPUs with AMX)
HEADLINE = RunConfig(
    tumor_fraction=0.5, max_minutes=60, schedule="time-cosine", snapshot_minutes=(15, 30, 45, 60), precision="float32"
)
# the recipe of the shipped model (`unet-aug-flair-bf16` in benchmarks/results.py, which names its bfloat16 setup;
# here the machine chooses, which on a CPU with AVX-512 BF16 is that same setup, and float32 elsewhere)
SHIPPED_RECIPE = dataclasses.replace(HEADLINE, augmentation="strong", flair_only=0.2, precision=None)


def _argparse_type(setting):
    check, options = setting.metadata["check"]
    return guards.argparse_type(check, f"--{setting.name.replace('_', '-')}", **options)


def add_arguments(parser):
    """`train`'s options, one per `RunConfig` field, with its default, type, choices and help; the
    defaults are left out of the parsed namespace when not given (`argparse.SUPPRESS`), so that
    `--config FILE` can supply them."""
    for setting in dataclasses.fields(RunConfig):
        meta, flag = setting.metadata, f"--{setting.name.replace('_', '-')}"
        help = meta["help"].replace("%", "%%")  # argparse formats help with %: a literal one doubled
        options = {"default": argparse.SUPPRESS, "help": f"{help} (default: {_shown(setting.default)})"}
        if setting.name == "kind":
            # optional with --config; None (not SUPPRESS: argparse would check that against the choices)
            parser.add_argument("kind", choices=MODEL_KINDS, nargs="?", default=None, help=help)
            continue
        if setting.type in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        optional = isinstance(setting.type, types.UnionType) and type(None) in setting.type.__args__
        if meta["choices"]:
            options["choices"] = (*meta["choices"], None) if optional else meta["choices"]
            if optional:
                options["type"] = _optional(str)
                options["metavar"] = "{" + ",".join(meta["choices"]) + ",none}"
        elif meta["check"]:
            options["type"] = _optional(_argparse_type(setting)) if optional else _argparse_type(setting)
        if setting.type is tuple:
            options["nargs"] = "*"
        parser.add_argument(flag, **options)
    parser.add_argument("--no-jit", dest="jit_compile", action="store_false", default=argparse.SUPPRESS,
                        help="the same as --no-jit-compile")  # fmt: skip


def _optional(convert):
    """`none` for a setting whose value may be None (no limit, all cases, ...)."""

    def parse(text):
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _shown(value):
    if isinstance(value, tuple):
        return " ".join(map(str, value)) or "none"
    return "none" if value is None else value


def from_arguments(namespace, base=None):
    """A `RunConfig` from parsed `train` options: `base` (e.g. a `config.json`), then what was given."""
    names = {setting.name for setting in dataclasses.fields(RunConfig)}
    given = {key: value for key, value in vars(namespace).items() if key in names}
    if given.get("kind") is None:
        given.pop("kind", None)
    if base is None:
        return RunConfig(**given)
    return dataclasses.replace(base, **given)
