"""Refuse at the door: settings that make no sense, outputs that would land on inputs, folders that
are not ours to empty, and two processes writing into one folder.

Every check raises `ValueError` (a setting), `lgg.data.DatasetError` (a file or name) or
`FileExistsError` (a folder) with one line that names what was wrong; the CLI turns them into
`error: ...` and exit code 2 before anything is written.
"""

import contextlib
import errno
import json
import math
import numbers
import os
import re
import socket
import stat
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; msvcrt's byte-range lock, which Windows also drops when its holder dies
    fcntl = None
    import msvcrt

import numpy as np

# a file our run or predict folders get as soon as we create them: only such folders are ever emptied
RUN_MARKER = ".lgg-run"
PREDICT_MARKER = ".lgg-predict"
EVALUATE_MARKER = ".lgg-evaluate"
LOCK_FILE = ".lgg-lock"
# what train, evaluate, the notebooks and benchmarks/results.py write into a run folder: `--overwrite` removes these
# (or a link of that name, not what it points to) and keeps anything else (a user's notes or analysis), naming it
_SPLIT_FILES = (
    r"(train|val|test|all)_(cases\.csv|slices\.csv|summary\.json|postprocessing\.csv|postprocessing_steps\.csv|"
    r"postprocessing_cases\.csv|case_dice\.png|overlays\.png|roc_confusion\.png|comparison\.csv|errors\.png)"
)
_OWN_FILES = (
    r"model\.(h5|keras)|best\.weights\.h5|config\.json|history\.csv|split\.csv|curves\.png|examples\.png|"
    rf"postprocess\.json|dice_vs_minutes\.png|two_stage\.json|two_stage_(train|val|test|all)\.csv|{_SPLIT_FILES}"
)
RUN_FILES = re.compile(rf"({_OWN_FILES}|\.partial-({_OWN_FILES})|\.lgg-run)")  # whole names: RUN_FILES.fullmatch
# folders train writes (by name), and those of our other commands inside a run folder (by their marker)
RUN_FOLDERS = {"snapshots": None, "resume": None, "fit": EVALUATE_MARKER, "predict": PREDICT_MARKER}
# what is ours inside them, by name (predict's own folder: `lgg.predict.remove_earlier_predictions`): for each, the
# files, the folders, and the files in those folders; anything else in them stays (in `resume/`, which train removes
# whole when a run ends, it is refused)
_SNAPSHOT = r"after-\d+(\.\d+)?(e[+-]?\d+)?min"  # `f"after-{minutes:g}min"`
RUN_FOLDER_CONTENTS = {
    "snapshots": (
        re.compile(rf"(\.partial-)?({_SNAPSHOT}\.weights\.h5|snapshots\.csv|curve\.csv)"),
        re.compile(_SNAPSHOT),
        re.compile(rf"(\.partial-)?(postprocess\.json|{_SPLIT_FILES})"),  # `lgg.evaluate.evaluate_snapshots`
    ),
    "resume": (
        re.compile(r"(\.partial-)?state\.json"),
        re.compile(r"epoch-\d+"),
        re.compile(r"(\.partial-)?(model\.weights\.h5|optimizer\.npz)"),
    ),
    "fit": (RUN_FILES, None, None),
}
# case ids become file names and CSV cells: letters, digits, `_`, `-` and `.` (not leading), at most 100
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


# ----------------------------------------------------------------------------- settings
def _number(name, value, integer=False):
    kind = "an integer" if integer else "a number"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):  # numpy scalars pass
        raise ValueError(f"{name} must be {kind}; received {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; received {value!r}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name} must be {kind}; received {value!r}")
    return int(value) if integer else float(value)


def probability(name, value):
    """A threshold on probabilities: finite, strictly between 0 and 1."""
    value = _number(name, value)
    if not 0 < value < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1; received {value!r}")
    return value


def positive(name, value, integer=False, maximum=None):
    """A finite number > 0 (an integer with `integer`), at most `maximum` if given."""
    value = _number(name, value, integer)
    if value <= 0:
        raise ValueError(f"{name} must be greater than 0; received {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be at most {maximum}; received {value!r}")
    return value


def non_negative(name, value, integer=False, maximum=None):
    value = _number(name, value, integer)
    if value < 0 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be 0 or more{bound}; received {value!r}")
    return value


def argparse_type(check, name, **options):
    """An `argparse` `type=` that parses a number and applies `check`; its message names the flag."""
    import argparse

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number; received {text!r}") from None
        if options.get("integer") and math.isfinite(value) and value.is_integer():
            value = int(value)
        try:
            return check(name, value, **options)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{name} ")) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


# ----------------------------------------------------------------------------- names and paths
def check_case_id(case_id, path):
    """A case id that is safe as a file name and a CSV cell, or a `DatasetError` naming `path`."""
    from lgg.data import DatasetError

    if not CASE_ID.match(case_id) or ".." in case_id:
        shown = case_id if len(case_id) <= 60 else f"{case_id[:60]}... ({len(case_id)} characters)"
        raise DatasetError(
            f"{os.fsdecode(path)!r}: case id {shown!r} is not usable: letters, digits, '_', '-' and '.' only "
            "(starting with a letter or digit), at most 100 characters"
        )
    return case_id


def _inside(path, folder):
    return path == folder or folder in path.parents


def check_apart(out_dir, inputs, flag="--out"):
    """Refuse an output folder equal to, inside, or holding one of the input paths (a dataset,
    a case folder, a slice's folder): outputs must never land on inputs. A folder input counts
    with the dataset folders under it (`lgg.data.dataset_candidates`), and paths are compared both
    where they really are and as named: `data/kaggle_3m`, or a case folder in it, may be a link."""
    from lgg.data import dataset_candidates

    out, as_named = Path(out_dir).resolve(), Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{flag} {out_dir} is a file, not a folder")
    for item in map(Path, inputs):
        if not item.exists():
            continue  # a missing input is reported by whoever reads it
        shown = [item] if item.is_dir() else [item.resolve().parent]
        if item.is_dir():
            shown += [candidate for candidate in dataset_candidates(item)[1:] if candidate.is_dir()]
        for name in shown:
            for output, folder in ((out, name.resolve()), (as_named, Path(os.path.abspath(name)))):
                if _inside(output, folder) or _inside(folder, output):
                    relation = "is" if output == folder else "lies inside" if _inside(output, folder) else "holds"
                    raise FileExistsError(
                        f"{flag} {out_dir} {relation} the input folder {name}: choose an output folder apart from the "
                        "data"
                    )


def check_file_apart(out_file, inputs, flag="--out"):
    """Refuse an output file that would land inside one of the input folders (a dataset, a case folder; each
    with the dataset folders under it, compared where they really are and as named, as `check_apart`)."""
    from lgg.data import dataset_candidates

    out, as_named = Path(out_file).resolve(), Path(os.path.abspath(out_file))
    for item in map(Path, inputs):
        if not item.is_dir():
            continue  # a missing input is reported by whoever reads it
        for name in [item] + [candidate for candidate in dataset_candidates(item)[1:] if candidate.is_dir()]:
            for output, folder in ((out, name.resolve()), (as_named, Path(os.path.abspath(name)))):
                if _inside(output, folder):
                    raise FileExistsError(
                        f"{flag} {out_file} lies inside the input folder {name}: choose a file apart from the data"
                    )


def check_not_within(out_dir, paths, flag="--out"):
    """Refuse an output folder that holds one of `paths` (e.g. the model file): replacing the
    folder's contents would delete it. (An output folder inside a run folder is fine.)"""
    out = Path(out_dir).resolve()
    for path in map(Path, paths):
        if path.exists() and _inside(path.resolve(), out):
            raise FileExistsError(f"{flag} {out_dir} holds {path}, which the command reads: choose another folder")


def mark_folder(folder, marker):
    """Create `folder` (if needed) and leave `marker` in it: a folder we made and may empty later."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / marker).touch()
    return folder


def is_ours(folder, marker):
    """True for a folder one of our commands made (its marker, or for runs from before markers
    existed a `config.json` written by `train` beside the `split.csv` and `history.csv` it wrote:
    a config.json copied into a folder of yours does not make it a run)."""
    folder = Path(folder)
    if (folder / marker).is_file() and not (folder / marker).is_symlink():  # a link is no marker of ours
        return True
    legacy_run = all((folder / name).is_file() for name in ("config.json", "split.csv", "history.csv"))
    if marker == RUN_MARKER and legacy_run:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and {"kind", "environment"} <= set(config)
    return False


def _plan_by_names(folder, files, folders=None, inner=None):
    """What to remove from `folder`: the files `files` names, and the folders `folders` names with the files `inner`
    names in them (such a folder goes once nothing else is left in it); a link of such a name, never followed.
    Returns (to remove, in order; to keep). Removes nothing; refuses a folder named like one of our files, or a
    file like one of our folders, where a new run would fail writing."""
    remove, kept = [], []
    for path in sorted(Path(folder).iterdir()):
        own_file = bool(files.fullmatch(path.name))
        own_folder = folders is not None and bool(folders.fullmatch(path.name))
        if path.is_symlink():
            (remove if own_file or own_folder else kept).append(path)
        elif (own_file and path.is_dir()) or (own_folder and not path.is_dir()):
            raise FileExistsError(
                f"{path} is a {'folder' if path.is_dir() else 'file'} where our commands write a "
                f"{'file' if own_file else 'folder'}; move it out of the run folder, or choose another --out"
            )
        elif own_file:
            remove.append(path)
        elif own_folder:
            inside_remove, inside_kept = _plan_by_names(path, inner)
            kept += inside_kept
            remove += inside_remove if inside_kept else [path]
        else:
            kept.append(path)
    return remove, kept


def _plan_run_subfolder(path):
    """(to remove, names kept relative to the run folder) for the run folder's subfolder `path` (`snapshots`,
    `resume` or evaluate's `fit`; ours: checked by the caller): what train and evaluate wrote there, and the folder
    itself when nothing else is left. Removes nothing; refuses a user's file in `resume/` (train removes that
    folder whole when the new run ends)."""
    remove, kept = _plan_by_names(path, *RUN_FOLDER_CONTENTS[path.name])
    kept = [entry for entry in kept if entry.name not in (RUN_FOLDERS[path.name], LOCK_FILE)]
    if kept and path.name == "resume":
        raise FileExistsError(
            f"{kept[0]} is not train's: a run removes its resume/ folder whole when it ends; move it out of the run "
            "folder"
        )
    return (remove if kept else [path]), [str(entry.relative_to(path.parent)) for entry in kept]


def _empty_predict_subfolder(path):
    """Remove what predict wrote in the run folder's `predict/` (ours: checked by the caller;
    `lgg.predict.remove_earlier_predictions`, which refuses before it removes anything), and the folder when
    nothing else is left. Case folders kept for a file of yours in them stay in predict's manifest, so that the
    next predict of those cases writes there again. Returns the names kept relative to the run folder, sorted."""
    from lgg.files import save_json
    from lgg.predict import remove_earlier_predictions

    kept = [name for name in remove_earlier_predictions(path, []) if name not in (PREDICT_MARKER, LOCK_FILE)]
    cases = sorted({name.split("/")[0] for name in kept if "/" in name})
    if cases:
        save_json({"planned": cases, "status": "emptied by --overwrite: files of yours kept"}, path / "predict.json")
    elif not kept:
        remove_paths([path])  # what is left: its marker (and a lock file no command holds now)
    return [f"{path.name}/{name}" for name in kept]


def empty_run_folder(folder):
    """Remove an earlier run's files from `folder` (ours: checked by the caller): the files `RUN_FILES` names, and in
    the subfolders `RUN_FOLDERS` names what our commands wrote there (`RUN_FOLDER_CONTENTS`; in `predict/`,
    `_empty_predict_subfolder`), a subfolder with nothing else left going whole; a link of such a name is removed,
    never what it points to; anything else stays (a user's file in `resume/` is refused: train removes that folder
    whole). Every refusal comes before anything is removed: a folder named like one of our files, or a file like
    one of our folders, where the run would fail writing. Returns the names kept, sorted (`subfolder/name` for
    what stays in a subfolder)."""
    remove, subfolders, kept = [], [], []
    for path in sorted(Path(folder).iterdir()):
        if path.name == LOCK_FILE:
            continue
        own_file, own_folder = RUN_FILES.fullmatch(path.name), path.name in RUN_FOLDERS
        if path.is_symlink() and (own_file or own_folder):
            remove.append(path)
        elif own_file or (own_folder and RUN_FOLDERS[path.name] is None):
            if path.is_dir() != bool(own_folder):
                raise FileExistsError(
                    f"{path} is a {'folder' if path.is_dir() else 'file'} where train writes a "
                    f"{'folder' if own_folder else 'file'}; move it out of the run folder, or choose another --out"
                )
            (subfolders if own_folder else remove).append(path)
        elif own_folder and path.is_dir() and is_ours(path, RUN_FOLDERS[path.name]):
            subfolders.append(path)
        else:
            kept.append(path.name)
    predict = [path for path in subfolders if path.name == "predict"]
    for path in subfolders:
        if path.name != "predict":
            planned, inside = _plan_run_subfolder(path)
            remove += planned
            kept += inside
    for path in predict:  # last of the refusals (predict's own, before it removes anything), then the removals
        kept += _empty_predict_subfolder(path)
    remove_paths(remove)
    return sorted(kept)


def clean_made_folder(folder):
    """`make clean` on a folder `make demo` made: what train or predict wrote there is removed (`empty_run_folder`,
    `predict.remove_earlier_predictions`: only their own files, never through a link), anything else stays, and
    the folder itself goes only when nothing else is left. A folder that neither command marked is left alone; one
    in use (its lock held by another process) is refused (`FileExistsError`). Returns the names kept, sorted (empty:
    the folder is gone)."""
    folder = Path(folder)
    if not folder.is_dir() or folder.is_symlink():
        return []
    marker = next((marker for marker in (RUN_MARKER, PREDICT_MARKER) if is_ours(folder, marker)), None)
    if marker is None:
        return sorted(path.name for path in folder.iterdir())
    with folder_lock(folder):  # held until only the lock file is left: a train starting meanwhile loses nothing
        if marker == RUN_MARKER:
            empty_run_folder(folder)
        else:
            from lgg.predict import remove_earlier_predictions

            remove_earlier_predictions(folder, [])
        kept = sorted(path.name for path in folder.iterdir() if path.name not in (marker, LOCK_FILE))
        if kept:
            mark_folder(folder, marker)  # still the folder of that command (emptying it removed its marker)
            return kept
        remove_paths([path for path in folder.iterdir() if path.name != LOCK_FILE])
    try:  # (the lock file goes once released: Windows removes no open file); a folder in use again stays
        (folder / LOCK_FILE).unlink(missing_ok=True)
        folder.rmdir()
    except OSError:
        return sorted(path.name for path in folder.iterdir())
    return []


def clean_command(folder):
    """What `make clean` runs on a folder `make demo` made: `clean_made_folder`, saying what it did. Returns 0, or 1
    when it refused the folder (in use: a train or predict writing there holds its lock; or its lock file is not
    ours): then nothing is removed."""
    path = Path(folder)
    if path.is_symlink() or (path.exists() and not path.is_dir()):  # not the folder make demo made: left alone
        print(f"kept {folder}: a {'link' if path.is_symlink() else 'file'}, not the folder make demo made")
        return 0
    try:
        kept = clean_made_folder(folder)
    except FileExistsError as error:  # the lock held by another process, or a lock file that is not ours
        print(f"kept {folder}: {error}")
        return 1
    kept = [name for name in kept if name != LOCK_FILE]
    if not path.exists():
        print(f"removed {folder}")
    elif kept:
        print(f"kept {folder}: it holds files make demo did not write: {kept}")
    else:  # empty, or only a lock file: neither train nor predict marked it, so it is not emptied as theirs
        print(f"kept {folder}: neither train nor predict marked it as theirs")
    return 0


def remove_paths(paths):
    """Remove each path in order: a folder with what it holds, a file or a link (never what a link points to)."""
    import shutil

    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# ----------------------------------------------------------------------------- one writer per folder
# Windows locks a byte range, and another process cannot read a locked byte: the lock is taken on one byte far
# past the holder's note (its pid and host, at the start of the file), so that the refusal can name the holder
WINDOWS_LOCK_OFFSET = 1 << 20


def _lock(descriptor):
    """Lock the open lock file for this process, or raise `BlockingIOError` if another process holds it."""
    if fcntl is not None:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    os.lseek(descriptor, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    except OSError as error:
        if error.errno not in (errno.EACCES, errno.EDEADLOCK):  # a drive without locks: say so, not "in use"
            raise
        raise BlockingIOError(errno.EACCES, "locked by another process") from error
    finally:
        os.lseek(descriptor, 0, os.SEEK_SET)  # the note is written at the start, never next to the locked byte


def _unlock(descriptor):
    """Release what `_lock` took (flock goes with the descriptor; Windows asks for an explicit unlock)."""
    if fcntl is None:
        os.lseek(descriptor, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        with contextlib.suppress(OSError):
            msvcrt.locking(descriptor, msvcrt.LK_UNLCK, 1)


_HELD_LOCKS = {}  # (pid, lock file) -> how many `folder_lock` blocks of this process hold it now


@contextlib.contextmanager
def folder_lock(folder):
    """Hold an exclusive lock on `folder/.lgg-lock` while writing into `folder` (`flock`; on Windows a
    byte-range lock); a second writer is refused, naming the process that holds it. The system drops
    the lock when its holder dies, so a killed run never blocks the next one; the file itself stays
    (every check ignores it). Within the process that holds it, taking it again is allowed (a notebook holds its
    run folder's lock from its first cell, and its later cells call functions that take it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    held = (os.getpid(), lock.resolve())
    if held in _HELD_LOCKS:
        _HELD_LOCKS[held] += 1
        try:
            yield folder
        finally:
            _HELD_LOCKS[held] -= 1
        return
    while True:
        try:  # never through a link (it would truncate and write its target, wherever that is)
            if lock.is_symlink():  # what O_NOFOLLOW refuses, checked first where it does not exist (Windows)
                raise OSError(errno.ELOOP, "a link")
            flags = os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            descriptor = os.open(lock, flags, 0o644)
        except OSError as error:
            if lock.is_symlink() or error.errno == errno.ELOOP:
                raise FileExistsError(
                    f"{lock} is a link, not our lock file: remove it, or choose another folder"
                ) from None
            raise
        if not stat.S_ISREG(os.fstat(descriptor).st_mode) or os.fstat(descriptor).st_nlink > 1:
            os.close(descriptor)  # a hard link shares its content with a file elsewhere; a FIFO, a device: not ours
            raise FileExistsError(f"{lock} is not our lock file (another kind of file, or a hard link): remove it")
        try:
            _lock(descriptor)
        except BlockingIOError:
            os.close(descriptor)
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            raise FileExistsError(
                f"{folder} is in use by process {holder.get('pid', '?')} on {holder.get('host', '?')} "
                f"(lock {lock}); wait for it to finish"
            ) from None
        except OSError as error:  # a file system that locks no file (some network shares): said, with the folder
            os.close(descriptor)
            raise OSError(
                error.errno,
                f"{folder}: its file system cannot lock {lock.name} ({error.strerror}), which keeps two commands from "
                "writing into one folder at once; choose a folder on a local disk",
            ) from None
        try:  # (Windows cannot replace an open file, nor is its file id always the same through both calls)
            same = fcntl is None or os.stat(lock).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        _unlock(descriptor)
        os.close(descriptor)  # the file was replaced between open and lock: take the new one
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        _HELD_LOCKS[held] = 1
        yield folder
    finally:
        _HELD_LOCKS.pop(held, None)
        _unlock(descriptor)
        os.close(descriptor)  # releases the lock


def check_output_folder(folder, marker, overwrite, command):
    """Refuse, writing nothing, a non-empty `folder` (a lock file aside) unless it is ours
    (`marker`) and `overwrite` is given."""
    folder = Path(folder)
    if folder.is_dir() and any(path.name != LOCK_FILE for path in folder.iterdir()):
        if not is_ours(folder, marker):
            raise FileExistsError(f"--out {folder} already holds files that {command} did not write; choose another")
        if not overwrite:
            raise FileExistsError(
                f"{folder} holds the results of an earlier {command}; pass --overwrite to replace them"
            )
