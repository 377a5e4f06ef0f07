"""What the three notebooks share: opening the run folder, and the closing summary of the run."""

import json
from pathlib import Path

import keras

from lgg import data, train


def start(config, data_dir, out_dir, overwrite):
    """Seed everything from `config.seed`, make (or, with `overwrite`, empty) the run folder, which must
    lie apart from the data, and find the dataset (or say how to get it); returns the run folder.
    The notebooks' code cells read every setting from `config`, so `config.json` records what ran."""
    if config.precision != "float32":  # refused before anything is written: the notebooks build in float32
        raise ValueError(
            f"the notebooks train in float32 (set precision = 'float32'); precision {config.precision!r} is an "
            f"option of `python -m lgg train {config.kind}`, which exports the float32 twin"
        )
    keras.utils.set_random_seed(config.seed)  # seeds Python, NumPy and the backend in one place
    run_dir = train.prepare_run_dir(out_dir, overwrite=overwrite, inputs=[data_dir])
    print(f"Run folder: {Path(run_dir).resolve()}")
    try:
        print(f"Dataset: {data.find_dataset_root(data_dir).resolve()}")
    except data.DatasetError:
        print(
            "The dataset is missing. From the repository root run `python -m lgg download` (Kaggle account needed), "
            "or `python -m lgg demo-data --dest data/demo` for a SYNTHETIC set and set data_dir = '../data/demo'."
        )
        raise
    return Path(run_dir)


def finish(run_dir, summary, keys, **facts):
    """Print the run's headline figures as one JSON line (`facts` first), then the files it wrote."""
    print(json.dumps(facts | {"run_dir": str(run_dir)} | {key: summary[key] for key in keys}))
    for path in sorted(Path(run_dir).iterdir()):
        print(f"{path.name:32s} {path.stat().st_size:>12,d} bytes")
