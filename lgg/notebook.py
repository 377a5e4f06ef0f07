"""What the three notebooks share: opening the run folder, and the closing summary of the run."""

import contextlib
import json
from pathlib import Path

import keras

from lgg import data, guards, train

# the run folder's lock (`guards.folder_lock`), held from `start` until the kernel ends or `start` runs again: a
# second kernel, or `python -m lgg train`, writing into the same folder is refused, and none empties it under us
_RUN_FOLDER_LOCK = contextlib.ExitStack()


def start(config, data_dir, out_dir, overwrite):
    """Seed everything from `config.seed`, check the run folder (apart from the data; an earlier run's folder
    only with `overwrite`) and find the dataset (or say how to get it), all before anything is written; then
    take the run folder's lock and make (or, with `overwrite`, empty) the folder; returns it.
    The notebooks' code cells read every setting from `config`, so `config.json` records what ran."""
    if config.precision != "float32":  # refused before anything is written: the notebooks build in float32
        raise ValueError(
            f"the notebooks train in float32 (set precision = 'float32'); precision {config.precision!r} is an "
            f"option of `python -m lgg train {config.kind}`, which exports the float32 twin"
        )
    keras.utils.set_random_seed(config.seed)  # seeds Python, NumPy and the backend in one place
    guards.check_apart(out_dir, [data_dir], flag="out_dir")  # on the data: its own message, not "an earlier run"
    try:
        train.check_run_dir(out_dir, overwrite=overwrite, inputs=[data_dir])
    except FileExistsError:
        if overwrite:  # not a run folder of ours: the message says so
            raise
        raise FileExistsError(
            f"out_dir {out_dir} already holds files (an earlier run?), left as they are: set overwrite = True in the "
            "parameters cell to replace an earlier run of ours, or choose another out_dir"
        ) from None
    try:
        root = data.find_dataset_root(data_dir)
    except data.DatasetError:  # before the run folder is touched: an earlier run there stays as it is
        print(
            f"The dataset is missing (data_dir = {data_dir!r}, read from {Path.cwd()}). From the repository root run "
            "`python -m lgg download` (Kaggle account needed), or `python -m lgg demo-data --dest data/demo` for a "
            "SYNTHETIC set and set data_dir = '../data/demo'."
        )
        raise
    _RUN_FOLDER_LOCK.close()  # this kernel's earlier run folder, when the cell runs again
    _RUN_FOLDER_LOCK.enter_context(guards.folder_lock(out_dir))
    run_dir = train.prepare_run_dir(out_dir, overwrite=overwrite, inputs=[data_dir])
    print(f"Run folder: {Path(run_dir).resolve()}")
    print(f"Dataset: {root.resolve()}")
    return Path(run_dir)


def finish(run_dir, summary, keys, **facts):
    """Print the run's headline figures as one JSON line (`facts` first), then the files it wrote."""
    print(json.dumps(facts | {"run_dir": str(run_dir)} | {key: summary[key] for key in keys}))
    for path in sorted(Path(run_dir).iterdir()):
        print(f"{path.name:32s} {path.stat().st_size:>12,d} bytes")
