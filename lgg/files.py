"""Atomic file writes: a crash or interrupt never leaves a half-written model or results file."""

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds.

    The temporary keeps the whole name as its ending (Keras and matplotlib choose the format by it). On failure
    the previous `path`, if any, is untouched and the temporary is removed. A file or link already at the
    temporary name (a killed write's) is removed first, so nothing is written through a link or a hard link.
    """
    path = Path(path)
    temporary = path.with_name(f".partial-{path.name}")
    if temporary.is_symlink() or temporary.is_file():  # a killed write's, or a link: written afresh, never through
        temporary.unlink()
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def copy_file(source, target):
    """Copy `source` to `target` atomically (a copy cut off never leaves half a file at `target`)."""
    import shutil

    with atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)


def check_own_json(path, keys, writer, inputs=()):
    """Refuse (SystemExit, naming it) a `path` to be written later that is a folder or below a file, inside one of
    the input folders `inputs` (`lgg.guards.check_file_apart`), or an existing file other than a JSON object holding
    `keys`, as `writer` writes: a results file may replace its own earlier version, never a README, a data file or
    another tool's results. Call it before measuring."""
    if inputs:
        from lgg import guards

        try:
            guards.check_file_apart(path, inputs)
        except FileExistsError as error:
            raise SystemExit(str(error)) from None
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"{path} is a folder: --out names the JSON file to write")
    below = next((folder for folder in path.absolute().parents if folder.exists()), None)
    if below is not None and not below.is_dir():
        raise SystemExit(f"{below} is a file: --out names a JSON file in a folder")
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            found = None
        if not (isinstance(found, dict) and set(keys) <= found.keys()):
            raise SystemExit(f"{path} exists and is not a file of {writer}: choose another --out")


def check_new_results(name, paths, written=False):
    """Refuse (SystemExit, naming it; nothing changed) a benchmark's `--name` that is not a plain name (letters,
    digits, `_ . + -`, not leading: it becomes part of file names), or any of the `paths` it names that exists:
    a named result is written once, never over another. Call it before measuring, and again with `written=True`
    just before writing, since another run of the script may have written them meanwhile."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
        raise SystemExit(f"--name may hold letters, digits and _ . + - only; received {name!r}")
    for path in paths:
        if Path(path).exists():
            if written:
                raise SystemExit(f"{path} appeared while this ran: nothing was written")
            raise SystemExit(f"{path} exists: choose another --name (nothing was changed)")


def _json_default(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def save_json(obj, path):
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")


def file_sha256(path):
    """The sha256 of a file's bytes, in hex: how a model file is named in cards and results."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_csv(frame, path):
    with atomic_path(path) as temporary:
        frame.to_csv(temporary, index=False)


def save_model(model, path):
    """Save a Keras model (`.h5` or `.keras`, by suffix) atomically."""
    with atomic_path(path) as temporary:
        model.save(temporary)


def save_figure(figure, path):
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
