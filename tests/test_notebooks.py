"""The three notebooks: committed clean and parametrized, and each runs top to bottom on real cases.

The slow tests execute every notebook with papermill on 6 restored Kaggle cases at 64x64 for 2 epochs,
exactly as a user would run it, with only the values of its `parameters` cell overridden.
"""

import ast
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lgg import data
from lgg.config import SHIPPED_RECIPE, RunConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402  (benchmarks/results.py: the results table's rows)

DATA_DIR = ROOT / "data"
NOTEBOOKS = {
    "U_Net": ROOT / "U_Net" / "U_Net.ipynb",
    "ResNet50_plus_UNet": ROOT / "ResNet50_plus_UNet" / "ResNet50_plus_UNet.ipynb",
    "Classification": ROOT / "Classification" / "Classification.ipynb",
}
COMMON_PARAMETERS = {"data_dir", "image_size", "batch_size", "epochs", "seed", "max_cases", "out_dir", "overwrite"}
REQUIRED_PARAMETERS = {
    "U_Net": COMMON_PARAMETERS,
    "ResNet50_plus_UNet": COMMON_PARAMETERS | {"encoder_weights"},
    "Classification": COMMON_PARAMETERS | {"encoder_weights", "backbone", "segmenter_path"},
}
KINDS = {"U_Net": "unet", "ResNet50_plus_UNet": "resnet50-unet", "Classification": "classifier"}
# the recipe each notebook's `parameters` cell holds, field for field: the shipped model's (in float32, as the
# notebooks build; the cross-validation measured it in bfloat16) and the results table's rows of the other two
RECIPES = {
    "U_Net": dataclasses.replace(SHIPPED_RECIPE, precision="float32"),
    "ResNet50_plus_UNet": results.CONFIGS["resnet50-unet"],
    "Classification": results.CONFIGS["classifier"],
}
MAX_CELL_LINES = 40  # a cell longer than a screen belongs in lgg/
SMALL_RUN = {"max_cases": 6, "image_size": 64, "epochs": 2, "batch_size": 8, "overwrite": True}
SEGMENTATION_METRICS = (
    "case_dice_mean",
    "case_dice_median",
    "tumor_slice_dice_mean",
    "tumor_free_false_positive_rate",
    "batch_dice_smooth1",
)
CLASSIFICATION_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")
COMMON_FILES = ("model.h5", "model.keras", "curves.png", "examples.png", "history.csv", "split.csv", "config.json")
SEGMENTATION_FILES = (
    "test_cases.csv",
    "test_case_dice.png",
    "test_overlays.png",
    "test_summary.json",
    "postprocess.json",
    "val_postprocessing.csv",
    "test_postprocessing.csv",
    "val_postprocessing_cases.csv",
    "test_postprocessing_cases.csv",
    "predict/cases.csv",
)
EXPECTED_FILES = {
    "U_Net": COMMON_FILES + SEGMENTATION_FILES,
    "ResNet50_plus_UNet": tuple(
        f for f in COMMON_FILES + SEGMENTATION_FILES if f not in ("examples.png", "predict/cases.csv")
    ),
    "Classification": COMMON_FILES
    + ("test_slices.csv", "test_roc_confusion.png", "test_summary.json", "test_comparison.csv"),
}


def code_cells(notebook):
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_parametrized(name):
    notebook = nbformat.read(NOTEBOOKS[name], as_version=4)
    nbformat.validate(notebook)
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    cells = code_cells(notebook)
    for index, cell in enumerate(cells):
        assert cell.outputs == [], f"{name}: code cell {index} stores outputs; strip them before committing"
        assert cell.execution_count is None, f"{name}: code cell {index} stores an execution count"
        lines = len(cell.source.splitlines())
        assert lines <= MAX_CELL_LINES, f"{name}: code cell {index} has {lines} lines (at most {MAX_CELL_LINES})"

    parameters = cells[0]
    assert "parameters" in parameters.metadata.get("tags", []), f"{name}: first code cell is not tagged `parameters`"
    for line in parameters.source.splitlines():
        # papermill's parameter parser (`--help-notebook`, unknown-parameter warnings) skips lines with two `=`
        assert line.count("=") <= 1, f"{name}: parameters line {line!r} has a second `=` (in its comment?)"
    defined = {}
    for statement in ast.parse(parameters.source).body:
        # papermill overrides the cell by appending assignments: it must hold plain `name = literal` lines only
        assert isinstance(statement, ast.Assign), f"{name}: parameters cell holds {ast.dump(statement)[:80]}"
        (target,) = statement.targets
        defined[target.id] = ast.literal_eval(statement.value)
    missing = REQUIRED_PARAMETERS[name] - defined.keys()
    assert not missing, f"{name}: parameters cell does not define {sorted(missing)}"
    assert defined["data_dir"] == "../data"
    assert defined["out_dir"] == f"../runs/{name}"
    assert defined["max_cases"] is None and defined["epochs"] is None
    assert defined["overwrite"] is False  # running it again (or the README's papermill line) keeps a finished run
    # one source for the settings: the defaults are a recipe of lgg.config or benchmarks/results.py, field for field
    assert RunConfig.from_values(defined, kind=KINDS[name]) == RECIPES[name]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_code_cells_read_every_setting_from_config(name):
    """After the setup cell builds `config`, a setting is read as `config.<field>`: a bare `epochs` or a
    literal `split="patient"` would train one thing while `config.json` records another. (The syntax
    tree, not the tokens: names inside f-strings count too, on every Python version.)"""

    fields = {setting.name for setting in dataclasses.fields(RunConfig)}
    cells = code_cells(nbformat.read(NOTEBOOKS[name], as_version=4))
    setup = next(index for index, cell in enumerate(cells) if "RunConfig.from_values" in cell.source)
    for index, cell in enumerate(cells[setup + 1 :], start=setup + 1):
        bare = sorted({node.id for node in ast.walk(ast.parse(cell.source)) if isinstance(node, ast.Name)} & fields)
        assert not bare, f"{name}: code cell {index} reads {bare}, not config.<field>"
        assert 'split="' not in cell.source, f"{name}: code cell {index} fixes the split"


def settings_passed(source, fields, function, from_config=True):
    """The settings (of `fields`) that the calls of `function` in `source` pass, by keyword or by place;
    `from_config`: each read from the config by keyword, never a literal or a name of its own."""
    places = list(inspect.signature(function).parameters)
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "attr", getattr(node.func, "id", None)) == function.__name__]  # fmt: skip
    assert calls, f"no {function.__name__} call"
    for call in calls if from_config else []:  # by keyword from the config (`config.<name>`, `c.<name>`)
        for keyword in call.keywords:
            if keyword.arg in fields:
                value = keyword.value
                assert isinstance(value, ast.Attribute) and value.attr == keyword.arg, ast.unparse(keyword)
    return [({places[i] for i in range(len(call.args))} | {k.arg for k in call.keywords}) & fields for call in calls]


@pytest.mark.parametrize("name", [*NOTEBOOKS, "lgg.train"])
def test_every_data_setting_reaches_make_datasets(name):
    """Each setting `make_datasets` takes is passed from the config, in every notebook and in `train`: one left out
    would train with its default while config.json records the value asked for (tumor_sampling, flair_only...)."""
    from lgg import train

    if name in NOTEBOOKS:
        source = "\n".join(cell.source for cell in code_cells(nbformat.read(NOTEBOOKS[name], as_version=4)))
    else:
        source = inspect.getsource(train)  # train_run's call
    fields = {setting.name for setting in dataclasses.fields(RunConfig)}
    wanted = set(inspect.signature(train.make_datasets).parameters) & fields
    assert {"tumor_fraction", "tumor_sampling", "flair_only", "augmentation"} <= wanted
    for passed in settings_passed(source, fields, train.make_datasets):
        assert passed == wanted, f"{name}: make_datasets is not given {sorted(wanted - passed)}"


@pytest.mark.parametrize("name", [*NOTEBOOKS, "lgg.train"])
def test_every_optimizer_setting_reaches_compile_model(name):
    """Each setting `compile_model` takes (learning rate, compiler, overlap term, averaged weights) is passed from the
    config to the model that trains, in every notebook and in `train`, as far as the model's kind uses it: `ema`
    left out would train without the average while config.json records it."""
    from lgg import config, train

    fields = {setting.name for setting in dataclasses.fields(RunConfig)}
    wanted = set(inspect.signature(train.compile_model).parameters) & fields
    assert {"learning_rate", "jit_compile", "dice_loss", "ema"} <= wanted
    if name in NOTEBOOKS:
        source = "\n".join(cell.source for cell in code_cells(nbformat.read(NOTEBOOKS[name], as_version=4)))
        wanted -= {setting for setting, kinds in config.USED_BY.items() if KINDS[name] not in kinds}
        calls = settings_passed(source, fields, train.compile_model)
    else:  # train_run's first call compiles the model that trains (the second, the exported twin it evaluates);
        # its compiler is the one chosen for the machine or the resumed run, a name of its own
        calls = settings_passed(inspect.getsource(train._train_run), fields, train.compile_model, from_config=False)
        calls = calls[:1]
    for passed in calls:
        assert passed == wanted, f"{name}: compile_model is not given {sorted(wanted - passed)}"


def test_notebooks_refuse_a_precision_they_do_not_build(tmp_path):
    from lgg import notebook

    config = RunConfig(precision="mixed_bfloat16")
    with pytest.raises(ValueError, match="notebooks train in float32"):
        notebook.start(config, tmp_path / "data", tmp_path / "run", overwrite=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_notebook_without_its_data_leaves_the_earlier_run_and_holds_the_run_folder(tmp_path, real_data):
    """The notebooks emptied the earlier run in out_dir (overwrite = True, their default) and only then found the
    dataset missing; and they wrote into the run folder without its lock, so a `train` or a second kernel writing
    there was not refused."""
    from lgg import guards, notebook

    config = RunConfig(precision="float32")
    run = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    (run / "model.h5").write_text("an hour of training")
    with pytest.raises(data.DatasetError):
        notebook.start(config, tmp_path / "no-data", run, overwrite=True)
    assert (run / "model.h5").read_text() == "an hour of training"
    with pytest.raises(FileExistsError, match="set overwrite = True in the parameters cell"):
        notebook.start(config, real_data, run, overwrite=False)  # the notebooks' default: the run stays
    with pytest.raises(FileExistsError, match="lies inside the input folder"):  # not "an earlier run"
        notebook.start(config, real_data, real_data / "runs", overwrite=False)
    assert (run / "model.h5").read_text() == "an hour of training"
    assert notebook.start(config, real_data, run, overwrite=True) == run
    assert not (run / "model.h5").exists()  # overwrite: the earlier run's files go, now that the data is there
    held = f"in use by process {os.getpid()}"
    check = [sys.executable, "-c", "import sys; from lgg import guards; guards.folder_lock(sys.argv[1]).__enter__()"]
    taken = subprocess.run([*check, str(run)], capture_output=True, text=True)  # another process: refused
    assert taken.returncode != 0 and held in taken.stderr, taken.stderr
    with guards.folder_lock(run):  # the notebook's later cells (two-stage, predict) take it again: allowed
        pass
    other = tmp_path / "other"
    assert notebook.start(config, real_data, other, overwrite=False) == other  # the cell again: the first let go
    assert subprocess.run([*check, str(run)], capture_output=True).returncode == 0
    taken = subprocess.run([*check, str(other)], capture_output=True, text=True)
    assert taken.returncode != 0 and held in taken.stderr, taken.stderr
    notebook._RUN_FOLDER_LOCK.close()


def write_untrained_segmenter(path):
    """A tiny untrained U-Net `.h5` (in a subprocess, so TensorFlow stays out of the test process)."""
    script = (
        "import sys; from lgg import files, models, train; "
        "model = train.compile_model(models.build_unet((64, 64, 3), base_filters=4), 'segmentation'); "
        "files.save_model(model, sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT, check=True, capture_output=True)
    return path


def assert_unit_interval(summary, keys):
    for key in keys:
        value = summary[key]
        assert isinstance(value, float) and math.isfinite(value), f"{key} = {value!r} is not a finite number"
        assert 0.0 <= value <= 1.0, f"{key} = {value} outside [0, 1]"


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_on_real_cases(name, tmp_path, real_data):
    """Run the notebook on 6 real cases; `real_data` (conftest) fails the test if they are not restored."""
    import papermill

    run_dir = tmp_path / "run"
    here = NOTEBOOKS[name].parent  # the notebook's own folder, where its relative paths start (as "../data")
    parameters = {**SMALL_RUN, "data_dir": os.path.relpath(DATA_DIR, here), "out_dir": os.path.relpath(run_dir, here)}
    if name != "U_Net":
        parameters["encoder_weights"] = None
    else:
        parameters["snapshot_minutes"] = [0]  # a snapshot after the first epoch, scored by the snapshot cell
    if name == "Classification":
        parameters["backbone"] = "light"
        parameters["segmenter_path"] = str(write_untrained_segmenter(tmp_path / "segmenter.h5"))

    executed = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS[name]),
        str(executed),
        parameters=parameters,
        cwd=str(NOTEBOOKS[name].parent),
        kernel_name="python3",
        progress_bar=False,
    )  # raises PapermillExecutionError, naming the cell, if any cell fails

    outputs = [output for cell in code_cells(nbformat.read(executed, as_version=4)) for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    missing = [file for file in EXPECTED_FILES[name] if not (run_dir / file).is_file()]
    assert not missing, f"{name}: run folder lacks {missing}"

    history = (run_dir / "history.csv").read_text().splitlines()
    assert 2 <= len(history) <= 1 + SMALL_RUN["epochs"], "history.csv should hold a header and one row per epoch"
    assert "train_slices_per_s" in history[0].split(","), "the steady-state training rate of each epoch"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["image_size"] == SMALL_RUN["image_size"] and config["max_cases"] == SMALL_RUN["max_cases"]
    assert isinstance(config["jit_compile_used"], bool), "what XLA setting the machine chose is recorded"
    summary = json.loads((run_dir / "test_summary.json").read_text())
    if name == "Classification":
        assert 0 < summary["tumor_slices"] < summary["slices"], "6 cases hold tumor and tumor-free test slices"
        assert_unit_interval(summary, CLASSIFICATION_METRICS)
        comparison = (run_dir / "test_comparison.csv").read_text().splitlines()
        assert len(comparison) == 3, "classifier and segmenter rows expected in test_comparison.csv"
    else:
        assert_unit_interval(summary, SEGMENTATION_METRICS)
        assert summary["cases"] >= 1
    if name != "U_Net":
        assert config["encoder_weights_used"] is None, "config.json must record the encoder weights actually used"
    else:
        assert (run_dir / "snapshots" / "curve.csv").is_file()
    stored = RunConfig.from_file(run_dir / "config.json")  # what `train --config` reads to repeat this run
    # recorded whole: `train --config` runs from anywhere, where the notebook's "../data" named another folder
    assert config["data_dir"] == str(Path(DATA_DIR).resolve()) and config["out_dir"] == str(run_dir.resolve())
    assert stored.kind == KINDS[name]
    assert all(getattr(stored, key) == value for key, value in SMALL_RUN.items() if key != "overwrite")
