"""One source for the settings (`lgg.config.RunConfig`): the CLI, config.json, the Makefile, the README and
the results table all agree with it, and it refuses nonsense with the setting named."""

import dataclasses
import json
import platform
import re
import shlex
import sys
from pathlib import Path

import pytest
import tensorflow as tf

from lgg import config, train
from lgg.__main__ import _parser
from lgg.config import HEADLINE, SHIPPED_RECIPE, RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402

PRECISION_LEFT = {"precision": None, "jit_compile": None}  # to the machine, as `train` without those options


def parse_train(words):
    args = _parser().parse_args(["train", *map(str, words)])
    base = RunConfig.from_file(args.config) if args.config else None
    return config.from_arguments(args, base)


def test_the_cli_defaults_are_the_runconfig_defaults():
    assert parse_train(["unet", "--out", "x"]) == RunConfig()
    assert parse_train(["classifier", "--out", "x"]) == RunConfig(kind="classifier")


def test_every_setting_has_an_option_and_every_option_reaches_the_config():
    changed = {
        "split": "patient-fold-2-of-5",
        "image_size": 96,
        "batch_size": 4,
        "epochs": 3,
        "seed": 7,
        "max_cases": 12,
        "base_filters": 8,
        "encoder_weights": "none",
        "backbone": "resnet50",
        "learning_rate": 0.01,
        "patience": 2,
        "tumor_fraction": 0.25,
        "max_minutes": 5,
        "schedule": "time-cosine",
        "snapshot_minutes": (1, 2),
        "precision": "mixed_bfloat16",
        "flair_only": 0.2,
        "augmentation": "strong",
        "dice_loss": "slice",
        "distribute": "mirrored",
        "tumor_sampling": "case",
        "ema": 0.999,
    }
    assert set(changed) | {"kind", "attention", "jit_compile"} == {f.name for f in dataclasses.fields(RunConfig)}

    def options(names):
        words = []
        for name in names:
            value = changed[name]
            words += [f"--{name.replace('_', '-')}", *(value if isinstance(value, tuple) else [value])]
        return words

    of_other_kinds = {"base_filters", "backbone"}  # the U-Net's and the classifier's only: refused elsewhere
    parsed = parse_train(
        ["resnet50-unet", "--out", "x", "--attention", "--no-jit", *options(set(changed) - of_other_kinds)]
    )
    expected = {name: value for name, value in changed.items() if name not in of_other_kinds}
    expected.update(encoder_weights=None, snapshot_minutes=(1.0, 2.0))
    assert parsed == RunConfig(kind="resnet50-unet", attention=True, jit_compile=False, **expected)
    assert parse_train(["unet", "--out", "x", *options(["base_filters"])]).base_filters == 8
    assert parse_train(["classifier", "--out", "x", *options(["backbone"])]).backbone == "resnet50"


def test_an_optional_choice_takes_none_and_refuses_what_is_not_a_choice(capsys):
    assert parse_train(["unet", "--out", "x", "--distribute", "none"]).distribute is None
    assert parse_train(["unet", "--out", "x", "--distribute", "multi-worker"]).distribute == "multi-worker"
    with pytest.raises(SystemExit):
        parse_train(["unet", "--out", "x", "--distribute", "horovod"])
    assert "invalid choice: 'horovod'" in capsys.readouterr().err


def test_a_runs_config_json_is_trained_again_with_train_config(tmp_path):
    run = dataclasses.replace(HEADLINE, split="patient-fold-3-of-5", seed=2)
    stored = {**run.to_dict(), "data_dir": "data", "out_dir": "runs/x", "environment": {"keras": "3"}}
    (tmp_path / "config.json").write_text(json.dumps(stored))
    assert parse_train(["--config", tmp_path / "config.json", "--out", "y"]) == run
    assert parse_train(["--config", tmp_path / "config.json", "--out", "y", "--seed", "5"]) == dataclasses.replace(
        run, seed=5
    )
    (tmp_path / "bad.json").write_text(json.dumps({**stored, "image_size": 100}))
    with pytest.raises(ValueError, match=r"bad.json: image_size of a unet must be a multiple of 16"):
        RunConfig.from_file(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json: not a readable config.json"):
        RunConfig.from_file(tmp_path / "broken.json")


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"kind": "vgg"}, "kind must be one of"),
        ({"image_size": 100}, "multiple of 16"),
        ({"kind": "resnet50-unet", "image_size": 48}, "multiple of 32"),
        ({"tumor_fraction": 1.0}, "tumor_fraction"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"epochs": 2.5}, "epochs"),
        ({"seed": -1}, "seed"),
        ({"snapshot_minutes": (15, -1)}, "snapshot_minutes"),
        ({"schedule": "time-cosine"}, "needs max_minutes"),
        ({"attention": True}, "attention gates"),
        ({"jit_compile": "no"}, "jit_compile must be true or false"),
        ({"split": "patient-fold-6-of-5"}, "fold"),
        ({"precision": "float16"}, "precision must be one of"),
        ({"flair_only": 1.5}, "flair_only must be 0 or more and at most 1"),
        ({"flair_only": -0.1}, "flair_only must be 0 or more"),
        ({"augmentation": "heavy"}, "augmentation must be one of .*strong.*received .heavy."),
        ({"kind": "resnet50-unet", "encoder_weights": "/nowhere/resnet50.h5"}, "an existing weights file"),
        # a setting another kind uses: once recorded and trained as if not given
        ({"kind": "classifier", "base_filters": 32}, "base_filters is a setting of unet, not of classifier"),
        ({"kind": "resnet50-unet", "base_filters": 8}, "base_filters is a setting of unet, not of resnet50-unet"),
        ({"kind": "classifier", "dice_loss": "tversky"}, "dice_loss is a setting of unet and resnet50-unet"),
        ({"kind": "unet", "backbone": "resnet50"}, "backbone is a setting of classifier, not of unet"),
        ({"kind": "unet", "encoder_weights": "/nowhere/resnet50.h5"}, "which a unet does not have"),
        ({"kind": "classifier", "encoder_weights": "w.h5"}, "a classifier with the light backbone does not have"),
    ],
)
def test_nonsense_is_refused_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**settings)


def joined_lines(text):
    """Lines with shell continuations (`\\` at the end) joined."""
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def test_the_training_commands_of_the_makefile_and_readme_are_the_configs_they_name():
    makefile = joined_lines((ROOT / "Makefile").read_text())
    command = makefile[makefile.index("train: setup") + 1].replace("$(PYTHON)", "python")
    words = shlex.split(command.replace("$(DATA)", "data").replace("$(RUNS)", "runs"))
    assert parse_train(words[words.index("train") + 1 :]) == SHIPPED_RECIPE
    readme = [line for line in joined_lines((ROOT / "README.md").read_text()) if "lgg train unet" in line]
    thirty = dataclasses.replace(results.CONFIGS["unet-aug-flair-tf70-30min-bf16"], **PRECISION_LEFT)
    for out, recipe in (("runs/unet", SHIPPED_RECIPE), ("runs/unet-baseline", HEADLINE), ("runs/unet-30min", thirty)):
        shown = [line for line in readme if f"--out {out} " in line]
        assert len(shown) == 1, f"the README shows the training command of {out} once"
        words = shlex.split(shown[0].split("#")[0])
        assert parse_train(words[words.index("train") + 1 :]) == recipe
    # the shipped recipe is what its cross-validation row trained, less the precision the row names
    assert dataclasses.replace(results.CONFIGS["unet-aug-flair-bf16"], **PRECISION_LEFT) == SHIPPED_RECIPE


def test_values_from_a_file_are_converted_or_refused_never_passed_through(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "unet", "image_size": 128.0, "epochs": 3.0, "learning_rate": 1}))
    loaded = RunConfig.from_file(path)
    assert (loaded.image_size, loaded.epochs, loaded.learning_rate) == (128, 3, 1.0)
    assert type(loaded.image_size) is int and type(loaded.learning_rate) is float
    assert loaded.precision == "float32"  # a file from before the setting: that run trained in float32
    path.write_text(json.dumps({"kind": "unet", "precision": None}))
    assert RunConfig.from_file(path).precision is None  # left to the machine, as that run was
    for bad, message in [
        ({"split": 5}, "split must be text"),
        ({"snapshot_minutes": 15}, "snapshot_minutes must be a list"),
        ({"kind": None}, "kind must be one of"),
        ({"image_size": "128"}, "image_size must be an integer"),
        ({"jit_compile": "true"}, "jit_compile must be true or false"),
        ({"schedule": ["plateau"]}, "schedule must be one of"),
        ({"image_sise": 256}, "image_sise is not a setting"),  # misspelt: it once trained at 128 with a note
        ({"kind": "resnet50-unet", "freeze_encoder": True}, "freeze_encoder true, a notebook setting"),
    ]:
        path.write_text(json.dumps({"kind": "unet", **bad}))
        with pytest.raises(ValueError, match=message):
            RunConfig.from_file(path)
    path.write_text(json.dumps({"kind": "resnet50-unet", "freeze_encoder": True}))
    assert RunConfig.from_file(path, kind="unet").kind == "unet"  # no encoder to keep fixed: read as before
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="a JSON object is expected"):
        RunConfig.from_file(path)


def test_encoder_weights_are_recorded_only_where_an_encoder_takes_them():
    assert RunConfig(kind="unet").encoder_weights is None
    assert RunConfig(kind="classifier", backbone="light").encoder_weights is None
    assert RunConfig(kind="classifier", backbone="resnet50").encoder_weights == "imagenet"
    assert RunConfig(kind="resnet50-unet", encoder_weights="none").encoder_weights is None


def test_a_config_json_from_before_settings_of_other_kinds_were_refused_still_loads(tmp_path):
    """A classifier run's config.json may hold `base_filters` 32 (accepted then, unused): `--resume` and `--config`
    read it, with the setting at its default, which is what that run trained with."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"kind": "classifier", "base_filters": 32, "dice_loss": "slice", "precision": None}))
    assert RunConfig.from_file(path) == RunConfig(kind="classifier")
    with pytest.raises(ValueError, match="base_filters is a setting of unet"):
        RunConfig.from_file(path, base_filters=32)  # given now: refused


def test_another_kind_of_model_trained_from_a_runs_config_takes_its_settings_that_apply(tmp_path, capsys):
    """`train classifier --config UNET/config.json`: the U-Net's base_filters and a ResNet50 run's encoder weights
    file were refused as if given; a run resumed as another kind is still refused."""
    from lgg.__main__ import _train_settings

    weights = tmp_path / "w.h5"
    weights.write_bytes(b"weights")
    unet, r50 = tmp_path / "unet", tmp_path / "r50"
    runs = {unet: {"kind": "unet", "base_filters": 32}, r50: {"kind": "resnet50-unet", "encoder_weights": str(weights)}}
    for folder, stored in runs.items():
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**stored, "max_minutes": 9, "precision": None}))
    for words, expected in [
        (["classifier", "--config", unet / "config.json"], RunConfig(kind="classifier", max_minutes=9)),
        (["unet", "--config", r50 / "config.json"], RunConfig(kind="unet", max_minutes=9)),
    ]:
        parser = _parser()
        assert _train_settings(parser, parser.parse_args(["train", *map(str, words), "--out", "x"]))[0] == expected
    parser = _parser()
    with pytest.raises(SystemExit):
        _train_settings(parser, parser.parse_args(["train", "classifier", "--resume", "--out", str(unet)]))
    assert "would change the model kind" in capsys.readouterr().err


def test_encoder_weights_given_for_a_model_without_a_resnet50_encoder_are_refused(capsys):
    from lgg.__main__ import _train_settings

    for words, kind in [(["unet"], "a unet"), (["classifier"], "a classifier with the light backbone")]:
        parser = _parser()
        args = parser.parse_args(["train", *words, "--out", "x", "--encoder-weights", "imagenet"])
        with pytest.raises(SystemExit):
            _train_settings(parser, args)
        assert f"--encoder-weights sets a ResNet50 encoder's starting weights; {kind} has none" in (
            capsys.readouterr().err
        )
    parser = _parser()
    args = parser.parse_args(
        ["train", "classifier", "--backbone", "resnet50", "--out", "x", "--encoder-weights", "none"]
    )
    assert _train_settings(parser, args)[0].encoder_weights is None


def test_resume_keeps_the_runs_own_settings_and_config_brings_its_data_folder(tmp_path):
    from lgg.__main__ import _train_settings

    run = tmp_path / "run"
    run.mkdir()
    stored = dataclasses.replace(HEADLINE, max_cases=12)
    elsewhere = str(tmp_path / "elsewhere" / "data")  # there: a recorded folder that is not is refused
    Path(elsewhere).mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({**stored.to_dict(), "data_dir": elsewhere}))
    parser = _parser()
    settings, data_dir = _train_settings(parser, parser.parse_args(["train", "--out", str(run), "--resume"]))
    assert settings == stored and data_dir == elsewhere
    with pytest.raises(SystemExit):  # a changed setting would make the resumed run another run
        _train_settings(parser, parser.parse_args(["train", "unet", "--out", str(run), "--resume", "--epochs", "3"]))
    other = tmp_path / "other.json"  # --config cannot carry changed settings past --resume either
    other.write_text(json.dumps({**dataclasses.replace(stored, split="patient-fold-3-of-5").to_dict()}))
    with pytest.raises(SystemExit):
        _train_settings(parser, parser.parse_args(["train", "--config", str(other), "--out", str(run), "--resume"]))
    args = parser.parse_args(["train", "--config", str(run / "config.json"), "--out", str(tmp_path / "new")])
    assert _train_settings(parser, args) == (stored, elsewhere)
    args = parser.parse_args(["train", "--config", str(run / "config.json"), "--out", "x", "--data", "mine"])
    assert _train_settings(parser, args)[1] == "mine"


def test_xla_is_chosen_by_the_machine_unless_told():
    assert RunConfig().jit_compile is None  # decided when training starts, recorded as jit_compile_used
    assert RunConfig().precision is None  # the same: precision_used
    assert parse_train(["unet", "--out", "x", "--jit-compile"]).jit_compile is True
    assert parse_train(["unet", "--out", "x", "--no-jit-compile"]).jit_compile is False
    assert train.resolve_jit_compile(True) and not train.resolve_jit_compile(False)  # told: as told


def test_precision_is_bfloat16_by_default_only_on_cpus_with_bfloat16_instructions(monkeypatch):
    """mixed_bfloat16 by default only for one TensorFlow process on a CPU with bfloat16 instructions
    (AVX-512 BF16, with or without AMX), no GPU, XLA off; an explicit precision is kept as given."""
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # no GPU
    assert parse_train(["unet", "--out", "x", "--precision", "none"]).precision is None
    for bf16, amx, expected in [
        (True, True, "mixed_bfloat16"),
        (True, False, "mixed_bfloat16"),
        (False, False, "float32"),
    ]:
        flags = dict.fromkeys(train.CPU_FLAGS, True) | {"avx512_bf16": bf16, "amx_bf16": amx}
        monkeypatch.setattr(train, "cpu", lambda flags=flags: {"cpu_model": "a CPU", "cpu_flags": flags})
        assert train.precision_by_default(jit_compile=False) == expected
        assert train.precision_by_default(jit_compile=True) == "float32"  # XLA's CPU code: no bfloat16 kernels
        assert train.precision_by_default(jit_compile=False, replicas=2) == "float32"  # not measured
        assert train.resolve_precision(None, False) == expected
        assert train.resolve_precision("float32", False) == "float32"
        assert train.resolve_precision("mixed_bfloat16", True) == "mixed_bfloat16"
        assert train.precision_by_default(jit_compile=False, kind="classifier") == "float32"  # measured: U-Net only
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["a GPU"] if kind == "GPU" else [])
    assert train.precision_by_default(jit_compile=False) == "float32"


def test_a_resumed_run_keeps_the_compiler_and_precision_it_started_with(monkeypatch):
    flags = dict.fromkeys(train.CPU_FLAGS, True)  # this "machine" has AVX-512 (BF16, AMX): bfloat16, no XLA
    monkeypatch.setattr(train, "cpu", lambda: {"cpu_model": "a CPU", "cpu_flags": flags})
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert train.compiler_and_precision(None, None, "unet") == (False, "mixed_bfloat16")  # a new run
    started_elsewhere = {"jit_compile": None, "jit_compile_used": True, "precision": None, "precision_used": "float32"}
    assert train.compiler_and_precision(None, None, "unet", stored=started_elsewhere) == (True, "float32")
    told = {"jit_compile": False, "precision": "mixed_bfloat16"}  # a run from before precision_used was recorded
    assert train.compiler_and_precision(False, "mixed_bfloat16", "unet", stored=told) == (False, "mixed_bfloat16")
    older = {"jit_compile": False}  # from before --precision existed: float32, not this machine's choice
    assert train.compiler_and_precision(False, None, "unet", stored=older) == (False, "float32")


@pytest.mark.parametrize(("avx512f", "xla"), [(True, False), (False, True)])
def test_xla_is_off_by_default_on_cpus_with_avx512(monkeypatch, avx512f, xla):
    flags = {flag: avx512f for flag in train.CPU_FLAGS}
    monkeypatch.setattr(train, "cpu", lambda: {"cpu_model": "test", "cpu_flags": flags})
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])  # no GPU
    assert train.xla_by_default() is xla
    assert train.resolve_jit_compile(None) is xla


def test_every_run_records_which_generation_of_cpu_it_ran_on():
    """The model name alone ("AMD EPYC") does not say the generation: the environment written into every run
    also carries the vendor and family from /proc/cpuinfo, where the machine has one (CI's does)."""
    machine = train.environment()
    assert set(machine["cpu_flags"]) == set(train.CPU_FLAGS)
    identity = machine["cpu_id"]
    assert set(identity) <= {"vendor_id", "cpu family", "model", "stepping"}
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":  # ARM's cpuinfo names other fields
        assert identity["vendor_id"] and identity["cpu family"].isdigit()
    elif not Path("/proc/cpuinfo").exists():
        assert identity == {}
