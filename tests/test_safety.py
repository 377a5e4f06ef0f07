"""Never destroy data, never answer a bad setting: outputs apart from inputs, folders that are not ours
left alone, settings refused at the door (exit 2, one line, nothing written), inputs identified, not
guessed. The commands run in this process (`lgg.__main__.main`), so each check costs milliseconds."""

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import write_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lgg import data, files, guards, models, postprocess
from lgg.__main__ import main


def run(capsys, *args):
    """`python -m lgg ARGS` in this process: (exit code, stdout, stderr)."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as stop:
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def checksums(folder):
    return {
        path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def refused(code, err, *words):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, err


@pytest.fixture
def dataset(real_data, tmp_path):
    """Two real cases copied into `tmp_path/data/kaggle_3m`."""
    root = tmp_path / "data" / "kaggle_3m"
    for case_dir in sorted(path for path in real_data.iterdir() if path.is_dir())[:2]:
        shutil.copytree(case_dir, root / case_dir.name)
    return root


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.h5"
    files.save_model(models.build_unet((32, 32, 3), base_filters=2, depth=1), path)
    return path


# ----------------------------------------------------------------------------- outputs never land on inputs
@pytest.mark.parametrize("where", ["dataset", "case", "inside case", "data parent"])
def test_predict_never_writes_into_its_inputs(capsys, dataset, segmenter, where):
    case = sorted(dataset.iterdir())[0]
    out = {"dataset": dataset, "case": case, "inside case": case / "pred", "data parent": dataset.parent}[where]
    before = checksums(dataset)
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, case)
    refused(code, err, "input folder")
    assert checksums(dataset) == before and not (case / "pred").exists()


def test_predictions_never_take_the_dataset_names(capsys, dataset, segmenter, tmp_path):
    case = sorted(dataset.iterdir())[0]
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "out", case)
    assert code == 0, err
    written = {path.name for path in (tmp_path / "out" / case.name).iterdir()}
    assert not any(name.endswith("_mask.tif") for name in written)
    assert len([name for name in written if name.endswith("_pred.tif")]) == len(list(case.glob("*_mask.tif")))
    manifest = json.loads((tmp_path / "out" / "predict.json").read_text())
    assert manifest["status"] == "complete" and manifest["cases"] == [case.name]


def test_evaluate_split_all_refuses_the_options_it_would_ignore(capsys, tmp_path):
    """`--split all` scores every slice: a --split-file (even one not there) was dropped without a word, and
    --tune-postprocessing failed late for want of validation cases."""
    for extra, flag in [(["--split-file", tmp_path / "nowhere.csv"], "--split-file"),
                        (["--tune-postprocessing"], "--tune-postprocessing")]:  # fmt: skip
        code, _, err = run(capsys, "evaluate", "--model", tmp_path / "model.h5", "--split", "all", *extra,
                           "--out", tmp_path / "out")  # fmt: skip
        refused(code, err, f"{flag} would be ignored or fail")
    assert not (tmp_path / "out").exists()


def test_a_config_whose_data_folder_is_not_there_is_refused_naming_the_config(capsys, tmp_path):
    """A notebook recorded data_dir "../data", relative to its own folder: `train --config` from the repository
    root read it from there and said only "data folder not found: ../data", a path the user never typed."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"kind": "unet", "data_dir": str(tmp_path / "nowhere")}))
    code, _, err = run(capsys, "train", "--config", config, "--out", tmp_path / "run")
    refused(code, err, f"{config} records data_dir", "not there")
    assert "pass --data" in err and not (tmp_path / "run").exists()


def test_train_overwrite_never_empties_the_data_or_a_folder_that_is_not_a_run(capsys, dataset, tmp_path):
    before = checksums(dataset)
    for out in (dataset, dataset.parent, dataset / sorted(os.listdir(dataset))[0]):
        code, _, err = run(capsys, "train", "unet", "--data", dataset, "--out", out, "--overwrite")
        refused(code, err, "input folder")
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "chapter1.tex").write_text("years of work")
    code, _, err = run(capsys, "train", "unet", "--data", dataset, "--out", users, "--overwrite")
    refused(code, err, "not a run folder")
    # a run's config.json copied in (to train with it) does not make the folder a run to empty
    (users / "config.json").write_text(json.dumps({"kind": "unet", "environment": {}}))
    code, _, err = run(capsys, "train", "--config", users / "config.json", "--data", dataset, "--out", users,
                       "--overwrite")  # fmt: skip
    refused(code, err, "not a run folder")
    assert checksums(dataset) == before and (users / "chapter1.tex").read_text() == "years of work"
    legacy = tmp_path / "old-run"  # a run from before the marker: train's config.json, split.csv, history.csv
    legacy.mkdir()
    for name, text in [("config.json", '{"kind": "unet", "environment": {}}'), ("split.csv", ""), ("history.csv", "")]:
        (legacy / name).write_text(text)
    assert guards.is_ours(legacy, guards.RUN_MARKER) and not guards.is_ours(users, guards.RUN_MARKER)


def test_no_output_lands_in_a_dataset_reached_through_a_link(capsys, dataset, segmenter, tmp_path):
    """`data/kaggle_3m` as a link to the dataset (as `restore.py` or a shared drive leaves it): `train` and
    `evaluate` once took `--out data/kaggle_3m/run`, wrote their results there, and every later read of the
    dataset failed on a case folder holding no slices."""
    data_dir = tmp_path / "linked"
    data_dir.mkdir()
    (data_dir / "kaggle_3m").symlink_to(dataset, target_is_directory=True)
    run_dir = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    shutil.copy(segmenter, run_dir / "model.h5")
    pd.DataFrame({"case_id": sorted(os.listdir(dataset)), "split": ["test", "val"]}).to_csv(run_dir / "split.csv")
    before = checksums(dataset)
    case = sorted(os.listdir(dataset))[0]
    linked_case = tmp_path / "linked-case"
    linked_case.mkdir()
    (linked_case / "kaggle_3m").mkdir()
    (linked_case / "kaggle_3m" / case).symlink_to(dataset / case, target_is_directory=True)
    for command in (
        ["train", "unet", "--data", data_dir, "--out", data_dir / "kaggle_3m" / "run"],
        ["train", "unet", "--data", linked_case, "--out", linked_case / "kaggle_3m" / case / "run"],
        ["evaluate", "--model", run_dir / "model.h5", "--data", data_dir, "--out", data_dir / "kaggle_3m" / "scores"],
        ["train", "unet", "--data", data_dir, "--out", dataset / "run"],  # the dataset where it really is
    ):
        code, _, err = run(capsys, *command)
        refused(code, err, "input folder", "kaggle_3m")
    assert checksums(dataset) == before and sorted(os.listdir(dataset)) == sorted(os.listdir(data_dir / "kaggle_3m"))
    assert not any(path.name in ("run", "scores") for path in dataset.iterdir())
    assert not (dataset / case / "run").exists()


def test_resume_on_a_finished_run_changes_nothing(capsys, real_data, tmp_path):
    run_dir = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    (run_dir / "model.h5").write_bytes(b"a finished model")
    before = checksums(run_dir)
    code, _, err = run(capsys, "train", "unet", "--data", real_data, "--out", run_dir, "--resume", "--max-cases", 12)
    refused(code, err, "finished run")
    assert checksums(run_dir) == before


def test_demo_data_is_never_mixed_into_real_data(capsys, dataset):
    before = checksums(dataset)
    for dest in (dataset.parent, dataset, sorted(dataset.iterdir())[0]):
        code, _, err = run(capsys, "demo-data", "--dest", dest, "--cases", 1)
        refused(code, err, "holds a dataset")
    assert checksums(dataset) == before


# ----------------------------------------------------------------------------- settings at the door
# flag -> (command prefix, values it must refuse besides nan, inf, -inf, text and negatives)
# a data folder that is not there: a value let through fails on it at once, never trains on the real data
TRAIN = ("train", "unet", "--data", "no-such-data", "--out")
PREDICT = ("predict", "x.tif", "--model", "m.h5", "--out")
NUMERIC_FLAGS = {
    "--epochs": (TRAIN, [0, 1.5, 1e9]),
    "--batch-size": (TRAIN, [0, 2.5, 1e6]),
    "--image-size": (TRAIN, [0, 512, 1e5]),  # over 256, the slices' own side: enlarged, 4x the memory a doubling
    "--seed": (TRAIN, [0.5, 1e20]),
    "--max-cases": (TRAIN, [0, 1e9]),
    "--base-filters": (TRAIN, [0, 1e4]),
    "--learning-rate": (TRAIN, [0, 2, 1e300]),
    "--patience": (TRAIN, [0]),
    "--tumor-fraction": (TRAIN, [0, 1, 1.5]),
    "--max-minutes": (TRAIN, [0, 1e300]),
    "--snapshot-minutes": (TRAIN, [1e300]),
    "--threshold": (PREDICT, [0, 1, 2, 1e300]),
    "--gate-threshold": (PREDICT, [0, 1, 1.01]),
    "--pixel-spacing-mm": (PREDICT, [0, 1e300]),
    "--slice-thickness-mm": (PREDICT, [0, 1e300]),
}
ALWAYS_BAD = ["nan", "inf", "-inf", "-1", "-1e-9", "abc", "", "1e400", "0x10", "1,5"]


def _not_a_number(text):
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data_=st.data())
def test_every_numeric_flag_refuses_nonsense_in_one_line_writing_nothing(capsys, tmp_path, data_):
    flag = data_.draw(st.sampled_from(sorted(NUMERIC_FLAGS)))
    prefix, extra = NUMERIC_FLAGS[flag]
    value = data_.draw(
        st.sampled_from(ALWAYS_BAD + [repr(v) for v in extra]) | st.text(max_size=8).filter(_not_a_number)
    )
    out = tmp_path / "out"
    code, _, err = run(capsys, *prefix, out, f"{flag}={value}")  # `=`: argparse would take `-inf` for a flag
    refused(code, err, flag)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--snapshot-minutes", "--epochs", "--threshold"])
def test_a_flag_given_the_end_of_options_as_its_value_is_refused(capsys, tmp_path, flag):
    """`--snapshot-minutes=--`, drawn by the test above: argparse read it as the flag given no value, and `train`
    ran with the defaults and no epoch limit (the test suite waited for it)."""
    prefix = NUMERIC_FLAGS[flag][0]
    code, _, err = run(capsys, *prefix, tmp_path / "out", f"{flag}=--")
    refused(code, err, flag, "'--' is not a value")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, words",
    [
        ({"threshold": 7}, "threshold"),
        ({"threshold": "0.5"}, "threshold"),
        ({"threshold": None}, "threshold"),
        ({"largest_3d": "no"}, "largest_3d must be true or false"),
        ({"hflip_tta": 1}, "hflip_tta must be true or false"),
        ({"min_component_px": -5}, "min_component_px"),
        ({"min_component_px": 2.5}, "min_component_px"),
        ({"thresold": 0.5}, "unknown keys"),
        ([0.5], "expected an object"),
    ],
)
def test_a_postprocess_file_is_parsed_by_its_schema(capsys, dataset, segmenter, tmp_path, content, words):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(segmenter, model_dir / "model.h5")
    (model_dir / "postprocess.json").write_text(json.dumps(content))
    code, _, err = run(capsys, "predict", "--model", model_dir / "model.h5", "--out", tmp_path / "o", dataset)
    refused(code, err, "postprocess.json", words)
    assert not (tmp_path / "o").exists()


def test_valid_postprocess_settings_pass_the_schema():
    assert postprocess.check(dict(postprocess.RAW)) == postprocess.RAW
    for settings_ in postprocess.candidates():
        assert postprocess.check(settings_) == settings_


def test_a_split_without_training_validation_or_test_cases_is_refused_at_once(capsys, dataset, tmp_path):
    one_case = tmp_path / "one"
    shutil.copytree(sorted(dataset.iterdir())[0], one_case / "kaggle_3m" / sorted(os.listdir(dataset))[0])
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "unet", "--data", one_case, "--out", out, "--epochs", 1)
    refused(code, err, "the split leaves no")
    assert not out.exists()


def test_diverged_weights_are_never_exported(tmp_path):
    from lgg import train

    model = models.build_unet((32, 32, 3), base_filters=2, depth=1)
    train.check_finite(model, tmp_path)  # a healthy model passes
    weights = model.get_weights()
    weights[0][...] = np.nan
    model.set_weights(weights)
    with pytest.raises(RuntimeError, match="training diverged"):
        train.check_finite(model, tmp_path)


# ----------------------------------------------------------------------------- consistent output folders
def test_a_second_predict_replaces_the_first_only_when_told_and_leaves_nothing_stale(
    capsys, dataset, segmenter, tmp_path
):
    first, second = sorted(dataset.iterdir())
    out = tmp_path / "out"
    assert run(capsys, "predict", "--model", segmenter, "--out", out, first)[0] == 0
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, second)
    refused(code, err, "--overwrite")
    assert run(capsys, "predict", "--model", segmenter, "--out", out, second, "--overwrite")[0] == 0
    assert not (out / first.name).exists()  # the earlier case's masks and overlays are gone
    assert pd.read_csv(out / "cases.csv").case_id.tolist() == [second.name]


def test_predict_overwrite_removes_only_what_predict_wrote(capsys, dataset, segmenter, tmp_path):
    """`predict --overwrite` once emptied the whole folder: a file of yours beside the predictions, or inside a
    case folder, went with them, and a link named like a case folder was followed. Now it removes the files its
    manifest says it wrote, unlinks a link of such a name, and refuses before removing anything a folder of yours
    where the new predictions would go."""
    first, second = sorted(dataset.iterdir())
    out = tmp_path / "out"
    assert run(capsys, "predict", "--model", segmenter, "--out", out, first)[0] == 0
    assert json.loads((out / "predict.json").read_text())["planned"] == [first.name]
    (out / "notes.txt").write_text("mine")
    (out / first.name / "reading.txt").write_text("mine too")
    (out / first.name / f".partial-{first.name}_1_pred.tif").write_text("a killed write")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("kept")
    (out / second.name).mkdir()  # a folder of yours, named like the case predicted next
    before = checksums(out)
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, second, "--overwrite")
    refused(code, err, str(out / second.name), "not written by predict")
    assert checksums(out) == before  # refused before anything was removed
    (out / second.name).rmdir()
    (out / second.name).symlink_to(theirs)  # a link: predict must not write through it
    refused(*run(capsys, "predict", "--model", segmenter, "--out", out, second, "--overwrite")[::2], "in the way")
    (out / second.name).unlink()

    code, printed, err = run(capsys, "predict", "--model", segmenter, "--out", out, second, "--overwrite")
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in (out / first.name).iterdir()) == ["reading.txt"]  # ours gone, yours kept
    assert f"{first.name}/reading.txt" in printed and "notes.txt" in printed
    assert pd.read_csv(out / "cases.csv").case_id.tolist() == [second.name]
    # the folder of the first case now holds only your file: yours, so predicting that case again is refused
    refused(*run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")[::2], "in the way")
    # an earlier case folder that is now a link is unlinked, never emptied or written through
    (out / second.name).rename(tmp_path / "moved")
    (out / second.name).symlink_to(theirs)
    assert run(capsys, "predict", "--model", segmenter, "--out", out, second, "--overwrite")[0] == 0
    assert sorted(path.name for path in theirs.iterdir()) == ["keep.txt"]
    assert not (out / second.name).is_symlink() and (out / second.name / f"{second.name}_montage.png").is_file()


def test_predict_overwrite_never_writes_through_or_removes_what_is_not_its_own(capsys, dataset, segmenter, tmp_path):
    """The hostile tester's cases: a link named like a temporary predict writes through (`.partial-predict.json`)
    or like the lock file had its target overwritten; a folder named like one of predict's files inside a case
    folder failed the run after the earlier predictions were gone; a slice number predict never writes (`_010`)
    passed for one of its files; a link named like its file was followed."""
    first = sorted(dataset.iterdir())[0]
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("precious")
    assert run(capsys, "predict", "--model", segmenter, "--out", out, first)[0] == 0
    case = out / first.name
    (out / ".partial-predict.json").symlink_to(victim)
    (out / ".partial-cases.csv").write_text("a killed write")
    (case / f"{first.name}_010_pred.tif").write_text("yours: predict writes _10")
    (case / f"{first.name}_1_overlay.png").unlink(missing_ok=True)
    (case / f"{first.name}_1_overlay.png").symlink_to(tmp_path)  # a link named like ours: unlinked, not followed
    folder_like_ours = case / f"{first.name}_montage.png"
    folder_like_ours.unlink(missing_ok=True)
    folder_like_ours.mkdir()
    before = checksums(out)
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")
    refused(code, err, str(folder_like_ours), "a folder where predict writes a file")
    assert checksums(out) == before and (out / "cases.csv").is_file()  # nothing removed
    folder_like_ours.rmdir()
    assert run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")[0] == 0
    assert victim.read_text() == "precious" and not (out / ".partial-predict.json").exists()
    assert not (out / ".partial-cases.csv").exists()
    assert (case / f"{first.name}_010_pred.tif").read_text() == "yours: predict writes _10"
    assert not (case / f"{first.name}_1_overlay.png").is_symlink() and tmp_path.is_dir()
    # the lock: a link (dangling or not) or a hard link is refused, its target untouched
    (out / guards.LOCK_FILE).unlink()
    (out / guards.LOCK_FILE).symlink_to(victim)
    refused(*run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")[::2], "is a link")
    (out / guards.LOCK_FILE).unlink()
    (out / guards.LOCK_FILE).symlink_to(tmp_path / "nowhere")
    refused(*run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")[::2], "is a link")
    assert not (tmp_path / "nowhere").exists()
    (out / guards.LOCK_FILE).unlink()
    os.link(victim, out / guards.LOCK_FILE)
    refused(*run(capsys, "predict", "--model", segmenter, "--out", out, first, "--overwrite")[::2], "hard link")
    assert victim.read_text() == "precious"
    # a marker that is a link makes no folder ours
    (out / guards.LOCK_FILE).unlink()
    (out / guards.PREDICT_MARKER).unlink()
    (out / guards.PREDICT_MARKER).symlink_to(victim)
    assert not guards.is_ours(out, guards.PREDICT_MARKER)


@contextlib.contextmanager
def lock_held_elsewhere(folder):
    """Another process holding `folder`'s lock until the block ends (then killed: the kernel drops its lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from lgg import guards; import time\nwith guards.folder_lock({str(folder)!r}):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_a_folder_that_another_process_writes_is_refused(capsys, dataset, segmenter, tmp_path):
    out = tmp_path / "out"
    with lock_held_elsewhere(out) as holder:
        with pytest.raises(FileExistsError, match=f"in use by process {holder.pid}"):
            with guards.folder_lock(out):
                pass
        code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, sorted(dataset.iterdir())[0])
        refused(code, err, "in use by process")
    with guards.folder_lock(out):
        assert json.loads((out / guards.LOCK_FILE).read_text())["pid"] == os.getpid()
    with guards.folder_lock(out):  # released on leaving
        pass


class FakeMsvcrt:
    """Windows' byte-range lock as `msvcrt.locking` behaves: a range locked through one descriptor is refused
    to every other (as to another process); unlocking releases it."""

    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        self.held, self.calls = {}, []

    def locking(self, descriptor, mode, length):
        where = (os.fstat(descriptor).st_ino, os.lseek(descriptor, 0, os.SEEK_CUR), length)
        self.calls.append((mode, where[1]))
        if mode == self.LK_NBLCK:
            if self.held.get(where, descriptor) != descriptor:
                raise PermissionError(13, "Permission denied")
            self.held[where] = descriptor
        elif self.held.pop(where, None) != descriptor:
            raise PermissionError(13, "Permission denied")


def test_a_file_system_that_cannot_lock_is_named_with_the_folder(tmp_path, monkeypatch):
    """On a share without locks every command stopped with a bare `[Errno 37] No locks available`."""

    def no_locks(descriptor):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(guards, "_lock", no_locks)
    with pytest.raises(OSError, match=f"{tmp_path / 'run'}: its file system cannot lock .lgg-lock") as error:
        with guards.folder_lock(tmp_path / "run"):
            pass
    assert error.value.errno == errno.ENOLCK and "local disk" in str(error.value)


def test_the_folder_lock_works_where_there_is_no_flock(tmp_path, monkeypatch):
    """Windows has neither `fcntl` nor `O_NOFOLLOW` (importing `fcntl` stopped every command there): the lock
    is msvcrt's, on a byte far past the holder's note, so that a second writer can read whom to wait for."""
    script = "import sys, types; sys.modules['fcntl'] = None; sys.modules['msvcrt'] = types.ModuleType('msvcrt')\n" \
        "import lgg.guards; assert lgg.guards.fcntl is None"  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)  # no fcntl: imports
    fake = FakeMsvcrt()
    monkeypatch.setattr(guards, "fcntl", None)
    monkeypatch.setattr(guards, "msvcrt", fake, raising=False)
    monkeypatch.delattr(os, "O_NOFOLLOW")
    out = tmp_path / "out"
    with guards.folder_lock(out):
        lock = out / guards.LOCK_FILE
        assert json.loads(lock.read_text())["pid"] == os.getpid()  # the note at the start, readable
        assert lock.stat().st_size < 1000  # not written next to the locked byte, a megabyte in
        with monkeypatch.context() as elsewhere:  # a second writer: what another process holds (this one may
            elsewhere.setattr(guards, "_HELD_LOCKS", {})  # take its own lock again)
            with pytest.raises(FileExistsError, match=f"in use by process {os.getpid()} on "):
                with guards.folder_lock(out):
                    pass
    assert {offset for _, offset in fake.calls} == {guards.WINDOWS_LOCK_OFFSET} and not fake.held
    with guards.folder_lock(out):  # released on leaving
        assert len(fake.held) == 1
    (out / guards.LOCK_FILE).unlink()
    (out / guards.LOCK_FILE).symlink_to(tmp_path / "victim")  # without O_NOFOLLOW, checked before opening
    with pytest.raises(FileExistsError, match="is a link, not our lock file"):
        with guards.folder_lock(out):
            pass
    assert not (tmp_path / "victim").exists()


def test_a_killed_predict_is_visibly_partial(capsys, dataset, segmenter, tmp_path, monkeypatch):
    from lgg import predict

    calls = []
    original = predict._predict_case

    def dies_on_the_second_case(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(predict, "_predict_case", dies_on_the_second_case)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        predict.predict_paths(segmenter, [dataset], out)
    manifest = json.loads((out / "predict.json").read_text())
    assert manifest["status"] == "running" and len(manifest["cases"]) == 1  # KeyboardInterrupt: as a kill leaves it
    assert len(pd.read_csv(out / "cases.csv")) == 1  # the table holds the case that was done
    with guards.folder_lock(out):  # and the lock was released
        pass


# ----------------------------------------------------------------------------- inputs identified, not guessed
def test_the_same_case_twice_is_refused_naming_both(capsys, dataset, segmenter, tmp_path):
    case = sorted(dataset.iterdir())[0]
    copy = tmp_path / "elsewhere" / case.name
    shutil.copytree(case, copy)
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", case, copy)
    refused(code, err, f"case {case.name} found twice", str(case), str(copy))


def test_two_files_for_one_slice_number_are_refused(capsys, tmp_path):
    case_dir = write_case(tmp_path / "kaggle_3m")
    shutil.copy(case_dir / f"{case_dir.name}_2.tif", case_dir / f"{case_dir.name}_02.tif")
    with pytest.raises(data.DatasetError, match="two files for slice 2"):
        data.find_slices(tmp_path)


def test_gaps_in_slice_numbers_are_reported_and_never_joined(capsys, tmp_path):
    case_dir = write_case(tmp_path / "kaggle_3m", slices=5, tumor_slices=(2,))
    for name in (f"{case_dir.name}_3.tif", f"{case_dir.name}_3_mask.tif"):
        (case_dir / name).unlink()
    data.find_slices(tmp_path)
    assert "slice 3 missing" in capsys.readouterr().out
    # two blobs on slices 2 and 4, with slice 3 missing: never one 3-D region
    volume = np.zeros((4, 8, 8), bool)
    volume[1, 2:4, 2:4] = True  # slice 2: 4 px
    volume[2, 2:5, 2:5] = True  # slice 4: 9 px
    kept = postprocess.largest_component_3d(volume, [1, 2, 4, 5])
    assert kept[2].sum() == 9 and kept[1].sum() == 0
    assert postprocess.largest_component_3d(volume)[1].sum() == 4  # adjacent slices would have joined them


def test_evaluate_names_missing_cases_and_keeps_the_run_summary(capsys, dataset, segmenter, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(segmenter, run_dir / "model.h5")
    cases = sorted(os.listdir(dataset))
    split = [{"case_id": cases[0], "split": "test"}, {"case_id": "TCGA_ZZ_9999_20000101", "split": "test"}]
    pd.DataFrame(split).to_csv(run_dir / "split.csv", index=False)
    (run_dir / "test_summary.json").write_text('{"case_dice_mean": 0.8}')
    code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--threshold", 0.5)
    refused(code, err, "TCGA_ZZ_9999_20000101", "--out")
    assert json.loads((run_dir / "test_summary.json").read_text()) == {"case_dice_mean": 0.8}
    code, out, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--threshold", 0.5,
                         "--out", tmp_path / "elsewhere")  # fmt: skip
    assert code == 0 and "TCGA_ZZ_9999_20000101" in out, err


def test_a_split_file_without_case_ids_is_refused(capsys, dataset, segmenter, tmp_path):
    (tmp_path / "split.csv").write_text("patient,fold\nA,1\n")
    code, _, err = run(capsys, "evaluate", "--model", segmenter, "--data", dataset, "--split-file",
                       tmp_path / "split.csv", "--out", tmp_path / "o")  # fmt: skip
    refused(code, err, "case_id")


def test_a_split_file_scoring_the_models_own_training_cases_is_refused(capsys, dataset, segmenter, tmp_path):
    """`evaluate --split-file` of another run (another fold) scored the model's own training cases as its
    test cases, and reported them as held out."""
    first, second = sorted(os.listdir(dataset))
    run_dir = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    shutil.copy(segmenter, run_dir / "model.h5")
    other = tmp_path / "other-split.csv"
    for own, theirs, flags, words in [
        (["train", "val"], ["test", "val"], [], ["1 of the cases", "'test' were train or val cases", first]),
        (["train", "val"], ["val", "test"], [], ["'test' were train or val cases", second]),
        (["train", "val"], ["val", "test"], ["--split", "val"], ["'val' were train cases", first]),
        (["test", "train"], ["test", "val"], ["--tune-postprocessing"], ["'val' were train cases", second]),
        (["test", "train"], ["test", "train"], [], None),  # its test case is the run's own: scored
    ]:
        pd.DataFrame({"case_id": [first, second], "split": own}).to_csv(run_dir / "split.csv", index=False)
        pd.DataFrame({"case_id": [first, second], "split": theirs}).to_csv(other, index=False)
        code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--split-file",
                           other, "--out", tmp_path / "scores", *flags)  # fmt: skip
        if words is None:
            assert code in (0, None), err
        else:
            refused(code, err, *words)
            assert not (tmp_path / "scores").exists()


def test_evaluate_split_all_says_how_many_cases_the_model_saw(capsys, dataset, segmenter, tmp_path):
    """`--split all` scored the run's own training cases beside the others and said nothing, in the output or in
    `all_summary.json`: a figure that flatters the model, read as any other."""
    first, second = sorted(os.listdir(dataset))
    run_dir = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    shutil.copy(segmenter, run_dir / "model.h5")
    for own, seen in [(["train", "test"], 1), (["val", "train"], 2), (["test", "test"], 0)]:
        pd.DataFrame({"case_id": [first, second], "split": own}).to_csv(run_dir / "split.csv", index=False)
        out = tmp_path / f"scores-{seen}"
        code, printed, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--split",
                                 "all", "--threshold", "0.5", "--out", out)  # fmt: skip
        assert code in (0, None), err
        assert json.loads((out / "all_summary.json").read_text())["cases_seen_in_training"] == seen
        assert (f"{seen} of the 2 cases scored were training or validation cases" in printed) is (seen > 0)
    (run_dir / "split.csv").unlink()  # a model trained elsewhere: not known, not 0
    code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--split", "all",
                       "--threshold", "0.5", "--out", tmp_path / "scores-unknown")  # fmt: skip
    assert code in (0, None), err
    assert json.loads((tmp_path / "scores-unknown" / "all_summary.json").read_text())["cases_seen_in_training"] is None


@pytest.mark.parametrize(
    "case_id, words",
    [
        ("..", "case id"),
        ("=HYPERLINK(1)", "case id"),
        ("A" * 240, "240 characters"),
        (os.fsdecode(b"CASE_\xff"), "case id"),
    ],
)
def test_case_ids_unusable_as_file_names_are_refused(capsys, segmenter, tmp_path, case_id, words):
    source = write_case(tmp_path / "src", "TCGA_XX_0001_20000101", slices=1) / "TCGA_XX_0001_20000101_1.tif"
    case_dir = tmp_path / "in" / (case_id if case_id != ".." else "case")
    case_dir.mkdir(parents=True)
    slice_file = case_dir / f"{case_id}_1.tif"  # `.._1.tif` would write outside --out
    shutil.copy(source, slice_file)
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", slice_file)
    refused(code, err, words)
    if case_id != "..":
        code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", case_dir)
        refused(code, err, words)
    assert not (tmp_path / "o").exists()


def test_a_fifo_named_like_a_slice_is_refused_not_read(capsys, segmenter, tmp_path):
    case_dir = write_case(tmp_path / "in", slices=1)
    os.mkfifo(case_dir / f"{case_dir.name}_2.tif")
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", case_dir)
    refused(code, err, "not a regular file")
    fifo = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", case_dir / f"{case_dir.name}_2.tif")
    refused(fifo[0], fifo[2], "not a regular file")


def test_a_tree_without_masks_is_predicted(capsys, segmenter, tmp_path):
    case_dir = write_case(tmp_path / "scans" / "kaggle_3m", slices=2)
    for mask in case_dir.glob("*_mask.tif"):
        mask.unlink()
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", tmp_path / "scans")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "o" / "cases.csv").slices.tolist() == [2]


def test_predict_passes_over_no_case_folder_and_no_page(capsys, segmenter, tmp_path):
    """The hostile tester's cases: `predict` on a dataset folder skipped, unsaid, a case folder without slices (one
    of PNGs, or of masks alone) that `train` refuses; a two-page .tif was read as its first page; a case named like
    predict's own `cases.csv` made a folder of that name and failed with an OS error."""
    root = tmp_path / "scans" / "kaggle_3m"
    write_case(root, slices=2)
    (root / "CASE_B").mkdir()
    (root / "CASE_B" / "CASE_B_1.png").write_bytes(b"not a slice")
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", root.parent)
    refused(code, err, "CASE_B", "holds no slices")
    shutil.rmtree(root / "CASE_B")
    lone = write_case(root, "CASE_C", slices=2)
    (lone / "CASE_C_1.tif").unlink()  # its mask stays, without the slice it outlines
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", root.parent)
    refused(code, err, "CASE_C_1_mask.tif", "missing")
    shutil.rmtree(lone)
    image = tifffile.imread(root / "TCGA_XX_0001_20000101" / "TCGA_XX_0001_20000101_1.tif")
    stack = tmp_path / "stack" / "STACK_1.tif"
    stack.parent.mkdir()
    tifffile.imwrite(stack, np.stack([image, image]), photometric="rgb")
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", stack)
    refused(code, err, str(stack), "2 pages")
    named = tmp_path / "named" / "cases.csv_1.tif"
    named.parent.mkdir()
    tifffile.imwrite(named, image, photometric="rgb")
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", tmp_path / "o", named)
    refused(code, err, "'cases.csv'", "rename")
    assert not (tmp_path / "o").exists()


def test_predict_overwrite_checks_every_mask_before_removing_the_earlier_predictions(capsys, segmenter, tmp_path):
    """A mask of the wrong shape beside a slice was found only while predicting, after `--overwrite` had removed
    the earlier predictions: the folder was left with a failed manifest and nothing else."""
    first = write_case(tmp_path / "in", slices=1)
    out = tmp_path / "out"
    assert run(capsys, "predict", "--model", segmenter, "--out", out, first)[0] == 0
    before = checksums(out)
    second = write_case(tmp_path / "in", "TCGA_XX_0002_20000101", slices=1)
    tifffile.imwrite(second / "TCGA_XX_0002_20000101_1_mask.tif", np.zeros((128, 128), np.uint8))
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", out, "--overwrite", second)
    refused(code, err, "TCGA_XX_0002_20000101_1_mask.tif", "(128, 128)")
    assert checksums(out) == before


def test_an_out_that_is_a_file_is_refused(capsys, dataset, segmenter, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, _, err = run(capsys, "predict", "--model", segmenter, "--out", target, sorted(dataset.iterdir())[0])
    refused(code, err, "is a file")
    assert target.read_text() == "mine"


def test_an_out_that_holds_the_model_is_refused(capsys, dataset, segmenter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    model = out / "model.h5"
    shutil.copy(segmenter, model)
    code, _, err = run(capsys, "predict", "--model", model, "--out", out, "--overwrite", sorted(dataset.iterdir())[0])
    refused(code, err, "which the command reads")
    assert model.is_file()


def test_evaluate_writes_only_where_it_may(capsys, dataset, segmenter, tmp_path):
    """`evaluate` once wrote into the model's folder by default, whatever it was (the shipped models/unet),
    replaced a run's own test scores with a score at another threshold or on another split, and wrote into
    any --out. Now: the default is the model's run folder, made by train, for the run's own scoring only;
    --out is a new folder (or one evaluate wrote), never another run's, a user's, or inside the data."""
    cases = sorted(os.listdir(dataset))
    split = pd.DataFrame([{"case_id": cases[0], "split": "test"}, {"case_id": cases[1], "split": "val"}])
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    shutil.copy(segmenter, shipped / "model.h5")
    split.to_csv(shipped / "split.csv", index=False)
    code, _, err = run(capsys, "evaluate", "--model", shipped / "model.h5", "--data", dataset, "--threshold", 0.5)
    refused(code, err, "not a run folder", "--out")
    assert sorted(path.name for path in shipped.iterdir()) == ["model.h5", "split.csv"]

    run_dir = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    shutil.copy(segmenter, run_dir / "model.h5")
    split.to_csv(run_dir / "split.csv", index=False)
    (run_dir / "test_summary.json").write_text('{"case_dice_mean": 0.8}')
    before = checksums(run_dir)
    for flag, extra in [
        ("--threshold", ["--threshold", 0.3]),
        ("--split-file", ["--split-file", shipped / "split.csv"]),
        ("--threshold", ["--out", run_dir, "--threshold", 0.3]),  # the run folder named as --out: the same
    ]:
        code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, *extra)
        refused(code, err, flag, "--out")
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "test_summary.json").write_text("years of work")
    other_run = guards.mark_folder(tmp_path / "other-run", guards.RUN_MARKER)
    (other_run / "test_summary.json").write_text('{"case_dice_mean": 0.7}')
    for out, words in [(users, "did not write"), (other_run, "another run"), (dataset / "scores", "input folder")]:
        code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--out", out)
        refused(code, err, words)
    assert checksums(run_dir) == before and (users / "test_summary.json").read_text() == "years of work"
    assert json.loads((other_run / "test_summary.json").read_text()) == {"case_dice_mean": 0.7}
    assert not (dataset / "scores").exists()
    for _ in range(2):  # a new folder, then the same folder again: evaluate's own
        code, _, err = run(capsys, "evaluate", "--model", run_dir / "model.h5", "--data", dataset, "--threshold",
                           0.3, "--out", tmp_path / "scores")  # fmt: skip
        assert code == 0, err
    scores = tmp_path / "scores"
    assert (scores / guards.EVALUATE_MARKER).is_file() and (scores / "test_summary.json").is_file()
    before = checksums(scores)  # another model's scores into them: they would sit there as if of one model
    code, _, err = run(capsys, "evaluate", "--model", shipped / "model.h5", "--data", dataset, "--split-file",
                       run_dir / "split.csv", "--out", scores)  # fmt: skip
    refused(code, err, "holds the scores of", str((run_dir / "model.h5").resolve()))
    assert checksums(scores) == before


def test_a_run_resumes_only_on_data_that_splits_as_it_did(tmp_path):
    """`train --resume --data OTHER` rewrote the run's split.csv from the other data: cases the model trained
    on could become test cases. Resuming is refused unless the data splits exactly as the run's split.csv."""
    from lgg import train

    slices = pd.DataFrame(
        {"case_id": ["A", "A", "B", "C"], "slice_index": [1, 2, 1, 1], "split": ["train", "train", "val", "test"]}
    )
    split_file = tmp_path / "split.csv"
    slices.assign(has_tumor=False, tumor_area_px=0).to_csv(split_file, index=False)
    train.check_same_split(slices, split_file)  # the same data: resumes
    train.check_same_split(slices, tmp_path / "absent.csv")  # nothing written yet: nothing to compare
    moved = slices.assign(split=["train", "train", "test", "val"])  # B and C changed sides
    with pytest.raises(data.DatasetError, match="2 cases differ: B, C"):
        train.check_same_split(moved, split_file)
    with pytest.raises(data.DatasetError, match="1 cases differ: D"):
        train.check_same_split(pd.concat([slices, slices.iloc[[3]].assign(case_id="D")]), split_file)


def test_predict_takes_a_gate_threshold_chosen_for_this_very_classifier_only(tmp_path):
    """`two_stage.json` beside a segmenter held the threshold chosen for one classifier; `predict --classifier`
    with another (or the same path retrained) used it without a word."""
    from lgg import predict
    from lgg.files import file_sha256

    run, chosen_for, other = tmp_path / "run", tmp_path / "a.h5", tmp_path / "b.h5"
    run.mkdir()
    chosen_for.write_bytes(b"classifier A")
    other.write_bytes(b"classifier B")
    model, record = run / "model.h5", run / "two_stage.json"
    assert predict._gate_threshold(model, other, None) == 0.5  # none chosen: the default
    record.write_text(json.dumps({"classifier": str(chosen_for), "classifier_sha256": file_sha256(chosen_for),
                                  "gate_threshold": 0.3}))  # fmt: skip
    assert predict._gate_threshold(model, chosen_for, None) == 0.3
    assert predict._gate_threshold(model, other, 0.7) == 0.7  # given: that one
    with pytest.raises(ValueError, match=r"chosen for another classifier .*a\.h5.*pass --gate-threshold"):
        predict._gate_threshold(model, other, None)
    record.write_text(json.dumps({"classifier": str(chosen_for), "gate_threshold": 0.3}))  # written before the sha
    with pytest.raises(ValueError, match="written before it recorded which classifier"):
        predict._gate_threshold(model, chosen_for, None)


def test_a_split_by_slice_is_read_by_slice_and_case_ids_keep_their_spelling(dataset, tmp_path):
    """`evaluate` refused the split.csv of a `--split random-slice-leaky` run (each case on both sides, by
    slice), so `train --snapshot-minutes` failed after the whole run; and it read case ids `001` and `NA` as
    the number 1 and a missing value, so such a dataset's run matched none of its cases."""
    from lgg import evaluate

    slices = data.find_slices(dataset)
    table = slices[["case_id", "slice_index"]].assign(split=np.where(slices.slice_index % 2, "test", "train"))
    split_file = tmp_path / "run" / "split.csv"
    split_file.parent.mkdir()
    table.to_csv(split_file, index=False)
    read = evaluate.slices_with_split(dataset, split_file)
    assert list(read.split) == list(np.where(read.slice_index % 2, "test", "train")) and read.case_id.nunique() == 2
    table.drop(columns="slice_index").to_csv(split_file, index=False)
    with pytest.raises(ValueError, match="two splits without a slice_index column"):
        evaluate.slices_with_split(dataset, split_file)
    split_file.write_text("case_id,slice_index,split\n001,1,train\nNA,1,train\n1,1,test\n")
    assert list(data.read_split(split_file).case_id) == ["001", "NA", "1"]
    assert evaluate.cases_trained_on(split_file.parent / "model.h5", ["001", "NA", "1", "01"]) == ["001", "NA"]


def test_predict_on_a_folder_of_slices_named_unlike_it_names_a_file(dataset, tmp_path):
    """A few slices of a case copied into a folder of another name was read as a dataset root: "no case
    folders found", naming no file."""
    from lgg import predict

    case = sorted(dataset.iterdir())[0]
    mine = tmp_path / "mine"
    mine.mkdir()
    for path in sorted(case.glob(f"{case.name}_1*.tif")):
        shutil.copy(path, mine)
    with pytest.raises(data.DatasetError, match=rf"{case.name}_1\d*(_mask)?\.tif: expected files named mine_<n>\.tif"):
        predict._gather([mine])
    assert sorted(predict._gather([case])) == [case.name]  # a case folder as it should be
    assert sorted(predict._gather([dataset])) == sorted(path.name for path in dataset.iterdir())  # a dataset


def test_the_two_stage_scores_may_go_into_either_models_run_folder(tmp_path):
    """The Classification notebook writes `two_stage.json` into its classifier's run folder: a run folder of a
    model being scored is its own; a third run's folder is not."""
    from lgg.evaluate import output_folder

    segmenter, classifier, third = (guards.mark_folder(tmp_path / name, guards.RUN_MARKER) for name in "abc")
    for folder in (segmenter, classifier, third):
        (folder / "model.h5").write_bytes(b"weights")
    models = [segmenter / "model.h5", classifier / "model.h5"]
    assert output_folder(None, models, tmp_path / "data") == segmenter
    assert output_folder(classifier, models, tmp_path / "data") == classifier
    with pytest.raises(FileExistsError, match="another run's folder"):
        output_folder(third, models, tmp_path / "data")


@pytest.mark.slow
def test_a_run_whose_export_failed_resumes_instead_of_training_again(capsys, monkeypatch, real_data, tmp_path):
    """The resume state was removed when `fit` ended, before the model was exported: a full disk at export
    left a run that `--resume` trained again from the start. It now stays until the model is written."""
    from lgg import train

    out = tmp_path / "run"
    command = ["train", "unet", "--data", real_data, "--out", out, "--epochs", 2, "--image-size", 32,
               "--max-cases", 4, "--batch-size", 8, "--base-filters", 4]  # fmt: skip

    def full_disk(model, run_dir):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(train, "export_model", full_disk)
        code, _, err = run(capsys, *command)
    assert code == 2 and "No space left on device" in err
    state = json.loads((out / "resume" / "state.json").read_text())
    assert state["epoch"] == 1 and state["fit_done"] and not (out / "model.h5").exists()
    code, printed, err = run(capsys, *command, "--resume")
    assert code in (0, None), err
    assert "Nothing to resume" not in printed and "Resuming after epoch 2" in printed
    assert "no further epoch" in printed  # a time limit would have trained one more: fit_done skips training
    assert (out / "model.h5").is_file() and not (out / "resume").exists()
    assert pd.read_csv(out / "history.csv")["epoch"].tolist() == [0, 1]


def make(tmp_path, target):
    """`make -s TARGET` in a copy of the Makefile, the package importable by this interpreter."""
    command = ["make", "-s", target, f"PYTHON={sys.executable}"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env)


def test_make_clean_removes_only_what_make_made(tmp_path):
    """`make clean` removed runs/demo-unet whenever `train` had marked it: every run does, so a run of yours
    trained into that folder (or notes beside the demo's files) went with it. Now only folders `make demo`
    recorded as its own, and in them only what train / predict wrote; the environment only with its stamp."""
    shutil.copy(Path(__file__).resolve().parent.parent / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "mine").write_text("a hand-made environment")
    runs = tmp_path / "runs"
    yours = guards.mark_folder(runs / "demo-unet", guards.RUN_MARKER)  # a run of yours: train marks every run
    (yours / "model.h5").write_text("your hour of training")
    (runs / "demo-predict").mkdir()
    (runs / "demo-predict" / "notes.txt").write_text("years of work")
    done = make(tmp_path, "clean")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ".venv" / "mine").is_file() and (runs / "demo-predict" / "notes.txt").is_file()
    assert (yours / "model.h5").read_text() == "your hour of training" and "kept runs/demo-unet" in done.stdout
    # make demo refuses a folder of that name it did not make, before reading or writing anything
    for name in ("requirements.txt", "pyproject.toml", ".venv/.lgg-installed"):
        (tmp_path / name).touch()
    refused = make(tmp_path, "demo")
    assert refused.returncode != 0 and "make demo did not make it" in refused.stdout
    assert not (tmp_path / "data").exists() and (yours / "model.h5").is_file()
    # folders make demo recorded: what train and predict wrote goes, your notes stay (and the folder with them)
    shutil.rmtree(runs)
    run = guards.mark_folder(runs / "demo-unet", guards.RUN_MARKER)
    for name in ("model.h5", "history.csv", "config.json"):
        (run / name).write_text("the demo's")
    (run / "notes.txt").write_text("yours")
    predicted = guards.mark_folder(runs / "demo-predict", guards.PREDICT_MARKER)
    (predicted / "predict.json").write_text(json.dumps({"planned": ["CASE_A"], "status": "complete"}))
    (predicted / "cases.csv").write_text("case_id\nCASE_A\n")
    for name in ("CASE_A_1_pred.tif", "CASE_A_1_overlay.png", "CASE_A_montage.png"):
        guards.mark_folder(predicted / "CASE_A", name)
    for name in ("demo-unet", "demo-predict"):
        (runs / f".made-by-demo-{name}").touch()
    done = make(tmp_path, "clean")
    assert done.returncode == 0, done.stderr
    assert sorted(path.name for path in run.iterdir()) == [guards.LOCK_FILE, guards.RUN_MARKER, "notes.txt"]
    assert "kept runs/demo-unet" in done.stdout and (runs / ".made-by-demo-demo-unet").is_file()
    assert not predicted.exists() and not (runs / ".made-by-demo-demo-predict").exists()
    assert not (tmp_path / ".venv").exists()  # stamped by make setup (above)


@pytest.mark.parametrize("name, marker", [("demo-unet", guards.RUN_MARKER), ("demo-predict", guards.PREDICT_MARKER)])
def test_make_clean_leaves_a_demo_folder_in_use_whole(tmp_path, name, marker):
    """A demo folder whose lock another process holds (a train or predict writing there): `make clean` stopped with
    a traceback; now it says so, removes nothing, and keeps the environment that process may be running from."""
    shutil.copy(Path(__file__).resolve().parent.parent / "Makefile", tmp_path / "Makefile")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".lgg-installed").touch()
    run = guards.mark_folder(tmp_path / "runs" / name, marker)
    (run / "model.h5").write_text("the demo's, being written")
    (tmp_path / "runs" / f".made-by-demo-{name}").touch()
    with lock_held_elsewhere(run) as holder:
        done = make(tmp_path, "clean")
    assert done.returncode != 0 and f"in use by process {holder.pid}" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and (run / "model.h5").is_file() and (tmp_path / ".venv").is_dir()
    assert (tmp_path / "runs" / f".made-by-demo-{name}").is_file()


def test_make_clean_and_demo_say_what_they_did_with_a_link_or_a_refusal(tmp_path):
    """A recorded demo folder replaced by a link to a folder of yours: `make clean` left it (right) but said
    "removed"; and a `make demo` refused for its second folder had already recorded the first as its own."""
    shutil.copy(Path(__file__).resolve().parent.parent / "Makefile", tmp_path / "Makefile")
    yours = tmp_path / "thesis"
    yours.mkdir()
    (yours / "chapter1.tex").write_text("years of work")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "demo-unet").symlink_to(yours, target_is_directory=True)
    (runs / ".made-by-demo-demo-unet").touch()
    done = make(tmp_path, "clean")
    assert done.returncode == 0, done.stderr
    assert "kept runs/demo-unet: a link" in done.stdout and "removed runs/demo-unet" not in done.stdout
    assert (yours / "chapter1.tex").read_text() == "years of work" and (runs / "demo-unet").is_symlink()
    for name in ("requirements.txt", "pyproject.toml", ".venv/.lgg-installed"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    refused = make(tmp_path, "demo")  # recorded, but a link now: train --overwrite would empty it through the link
    assert refused.returncode != 0 and "make demo did not make it" in refused.stdout
    assert (yours / "chapter1.tex").read_text() == "years of work"
    (runs / "demo-unet").unlink()
    (runs / "demo-unet").mkdir()  # recorded, empty and unmarked (a demo cut off before train wrote): kept, said so
    done = make(tmp_path, "clean")
    assert "kept runs/demo-unet: neither train nor predict" in done.stdout and (runs / "demo-unet").is_dir()
    shutil.rmtree(runs)
    runs.mkdir()
    (runs / "demo-unet").mkdir()  # not recorded: make demo refuses it, and records nothing
    (tmp_path / ".venv").mkdir()  # make clean removed the environment it stamped
    (tmp_path / ".venv" / ".lgg-installed").touch()
    refused = make(tmp_path, "demo")
    assert refused.returncode != 0 and "make demo did not make it" in refused.stdout
    assert not list(runs.glob(".made-by-demo-*"))


def test_a_second_demo_set_replaces_the_first_whole(capsys, tmp_path):
    """`demo-data --cases 3` then `--cases 1` left the two extra cases of the first set beside the new one."""
    for cases in (3, 1):
        code, _, err = run(capsys, "demo-data", "--dest", tmp_path, "--cases", cases, "--seed", cases)
        assert code in (0, None), err
    cases = sorted(path.name for path in (tmp_path / "kaggle_3m").iterdir() if path.is_dir())
    assert cases == ["SYNTH_DEMO_0000_20000101"] and len(list((tmp_path / "kaggle_3m").rglob("*_mask.tif"))) == 20
    assert [path.name for path in tmp_path.iterdir()] == ["kaggle_3m"]  # no staging folder left


def test_download_never_claims_a_link_it_did_not_make(monkeypatch, tmp_path):
    """`download` with data/kaggle_3m already there (another set) printed "linked as" and linked nothing."""
    import types

    from lgg import datasets

    downloaded = tmp_path / "cache" / "kaggle_3m"
    write_case(downloaded, slices=1)
    monkeypatch.setitem(sys.modules, "kagglehub", types.SimpleNamespace(dataset_download=lambda name: downloaded))
    other = tmp_path / "data" / "kaggle_3m"
    write_case(other, case_id="TCGA_YY_0002_20000101", slices=1)
    with pytest.raises(FileExistsError, match="is not that folder"):
        datasets.download_kaggle(tmp_path / "data")
    assert (other / "TCGA_YY_0002_20000101").is_dir() and not other.is_symlink()
    link = datasets.download_kaggle(tmp_path / "fresh")
    assert link.is_symlink() and link.resolve() == downloaded.resolve()
    assert datasets.download_kaggle(tmp_path / "fresh") == link  # again: already there, nothing changed


@pytest.mark.parametrize(
    "args, words",
    [
        (["evaluate", "--model", "s.h5", "--classifier", "c.h5", "--threshold", 0.3], "--threshold would be ignored"),
        (["evaluate", "--model", "s.h5", "--classifier", "c.h5", "--split", "val"], "--split would be ignored"),
        (["evaluate", "--model", "s.h5", "--classifier", "c.h5", "--split-file", "x.csv"], "--split-file"),
        (["evaluate", "--model", "s.h5", "--classifier", "c.h5", "--tune-postprocessing"], "--tune-postprocessing"),
        (["evaluate", "--model", "s.h5", "--threshold", 0.3, "--tune-postprocessing"], "give one of them"),
        (["predict", "x.tif", "--out", "o", "--gate-threshold", 0.2], "give --classifier"),
        (["predict", "x.tif", "--out", "o", "--slice-thickness-mm", 5], "--pixel-spacing-mm"),
        (["train", "unet", "--out", "o", "--max-minutes", 10, "--snapshot-minutes", 5, 15], "past max_minutes"),
    ],
)
def test_an_option_that_would_have_no_effect_is_refused(capsys, tmp_path, monkeypatch, args, words):
    """Once silently dropped: the gate's options beside --classifier, a gate threshold without a gate, a slice
    thickness without a pixel spacing, snapshots after the run's time limit."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *args)
    refused(code, err, words)
    assert list(tmp_path.iterdir()) == []


def test_demo_data_never_replaces_a_kaggle_3m_that_is_not_a_demo_set(capsys, tmp_path):
    """A `kaggle_3m/` of other files (an archive, NIfTI volumes, notes; no `_mask.tif` cases) was deleted to
    put the demo set there: now only an earlier demo set (or an empty folder) is replaced."""
    root = tmp_path / "kaggle_3m"
    root.mkdir()
    (root / "archive.zip").write_bytes(b"the download")
    code, _, err = run(capsys, "demo-data", "--dest", tmp_path, "--cases", 1)
    refused(code, err, "not a demo set")
    assert [path.name for path in root.iterdir()] == ["archive.zip"]
    assert [path.name for path in tmp_path.iterdir()] == ["kaggle_3m"]


@pytest.mark.parametrize(("kind", "tune"), [("unet", True), ("classifier", False)])
def test_resuming_a_finished_unscored_run_names_the_command_that_scores_it(tmp_path, kind, tune):
    """The command suggested must be one `evaluate` accepts: a classifier has no post-processing to tune."""
    from lgg import guards
    from lgg.train import check_run_dir

    run = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    (run / "model.h5").write_bytes(b"a model")
    (run / "config.json").write_text(json.dumps({"kind": kind}))
    with pytest.raises(FileExistsError, match="evaluation did not finish") as refused:
        check_run_dir(run, resume=True)
    assert ("--tune-postprocessing" in str(refused.value)) is tune


def test_overwrite_removes_an_earlier_runs_files_and_keeps_what_train_did_not_write(tmp_path, capsys):
    """`--overwrite` once emptied the whole run folder: a user's notes or analysis put beside the run went too.
    A link named like one of ours is removed, never what it points to; names merely like ours stay."""
    from lgg import guards
    from lgg.train import prepare_run_dir

    run = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    users = tmp_path / "users"
    users.mkdir()
    (users / "precious.txt").write_text("x")
    ours = ["model.h5", "model.keras", "config.json", "history.csv", "test_cases.csv", "val_postprocessing.csv",
            "test_postprocessing_cases.csv", "two_stage_test.csv", "dice_vs_minutes.png",
            ".partial-model.h5"]  # fmt: skip
    theirs = ["notes.txt", "model_v2.h5", "test_manual_review.json", "config.json\n", ".partial-thesis.docx"]
    for name in ours + theirs:
        (run / name).write_text("x")
    for folder in ("snapshots", "my_analysis", "predict", "fit"):
        (run / folder).mkdir()
        (run / folder / "file.csv").write_text("x")
    guards.mark_folder(run / "fit", guards.EVALUATE_MARKER)  # results.py's; `predict/` here is not our predict's
    (run / "resume").symlink_to(users, target_is_directory=True)
    prepare_run_dir(run, overwrite=True)
    kept = sorted(["my_analysis", "predict", *theirs, "fit/file.csv", "snapshots/file.csv"])
    top = {name.split("/")[0] for name in kept}
    assert sorted(path.name for path in run.iterdir()) == sorted([guards.RUN_MARKER, *top])
    assert (run / "my_analysis" / "file.csv").is_file() and (users / "precious.txt").is_file()
    assert sorted(path.name for path in (run / "fit").iterdir()) == [guards.EVALUATE_MARKER, "file.csv"]
    assert [path.name for path in (run / "snapshots").iterdir()] == ["file.csv"]
    assert f"kept {', '.join(sorted(kept))}" in capsys.readouterr().out


def earlier_run_with_subfolders(run):
    """A run folder as train, evaluate, results.py and a notebook's predict leave it, with files of a user's among
    theirs; returns the user's files (relative to `run`)."""
    from lgg import guards

    guards.mark_folder(run, guards.RUN_MARKER)
    (run / "model.h5").write_text("x")
    predict = guards.mark_folder(run / "predict", guards.PREDICT_MARKER)
    (predict / "predict.json").write_text(json.dumps({"planned": ["CASE_1"]}))
    (predict / "cases.csv").write_text("x")
    (predict / "my_reading.xlsx").write_text("theirs")
    (predict / "CASE_1").mkdir()
    for name in ("CASE_1_1_pred.tif", "CASE_1_montage.png", "CASE_1_1_pred_corrected_by_me.tif"):
        (predict / "CASE_1" / name).write_text("x")
    fit = guards.mark_folder(run / "fit", guards.EVALUATE_MARKER)
    for name in ("val_cases.csv", "train_summary.json"):
        (fit / name).write_text("x")
    snapshots = run / "snapshots"
    (snapshots / "after-15min").mkdir(parents=True)
    (snapshots / "after-1e-05min").mkdir()
    ours = ["after-15min.weights.h5", ".partial-after-30min.weights.h5", "after-1e-05min.weights.h5", "curve.csv",
            "snapshots.csv", "after-15min/test_cases.csv", "after-15min/postprocess.json",
            "after-1e-05min/val_postprocessing.csv", "after-15min/val_postprocessing_cases.csv"]  # fmt: skip
    theirs = ["after-15min/my_figure.svg", "after-15min/config.json", "after-15min/model.h5"]
    for name in ours + theirs:
        (snapshots / name).write_text("x")
    (run / "resume" / "epoch-3").mkdir(parents=True)
    for name in ("state.json", "epoch-3/model.weights.h5", "epoch-3/optimizer.npz"):
        (run / "resume" / name).write_text("x")
    return sorted(["predict/CASE_1/CASE_1_1_pred_corrected_by_me.tif", "predict/my_reading.xlsx",
                   *(f"snapshots/{name}" for name in theirs)])  # fmt: skip


def test_overwrite_empties_the_folders_of_a_run_of_what_our_commands_wrote_only(tmp_path, capsys):
    """`--overwrite` (and `make clean`) removed a run's `predict/`, `fit/` and `snapshots/` whole: a spreadsheet or a
    corrected mask a user kept beside the predictions in the run's `predict/` went with them. Now only what predict,
    evaluate and train wrote there goes; a subfolder with nothing else left goes whole; a case folder kept for a
    file of yours stays in predict's manifest, so that predicting that case there again is not refused."""
    from lgg import guards
    from lgg.predict import remove_earlier_predictions
    from lgg.train import prepare_run_dir

    run = tmp_path / "run"
    kept = earlier_run_with_subfolders(run)
    prepare_run_dir(run, overwrite=True)
    assert sorted(path.name for path in run.iterdir()) == sorted([guards.RUN_MARKER, "predict", "snapshots"])
    assert sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file()) == sorted(
        [guards.RUN_MARKER, "predict/" + guards.PREDICT_MARKER, "predict/predict.json", *kept]
    )
    assert f"kept {', '.join(kept)}" in capsys.readouterr().out
    guards.empty_run_folder(run)  # a second time, with nothing of ours left in them: they stay as they are
    assert all((run / name).read_text() in ("x", "theirs") for name in kept)
    assert remove_earlier_predictions(run / "predict", ["CASE_1"]) == [
        "CASE_1/CASE_1_1_pred_corrected_by_me.tif", "my_reading.xlsx"]  # fmt: skip


@pytest.mark.parametrize(
    "conflict, words",
    [
        ("resume/notes.txt", "resume/notes.txt is not train's"),
        ("resume/epoch-3/notes.txt", "resume/epoch-3/notes.txt is not train's"),
        ("predict/cases.csv/", "predict/cases.csv is a folder where predict writes a file"),
        ("snapshots/curve.csv/", "snapshots/curve.csv is a folder where our commands write a file"),
        ("snapshots/after-45min", "snapshots/after-45min is a file where our commands write a folder"),
    ],
)
def test_overwrite_refuses_what_a_new_run_would_remove_or_trip_on_before_removing_anything(tmp_path, conflict, words):
    """A user's file in `resume/` survived `--overwrite` and was removed by the new run's end (train removes that
    folder whole); a folder `snapshots/curve.csv/` failed the new run at its end; and a refusal in `predict/` came
    after `fit/` was already emptied."""
    from lgg.train import prepare_run_dir

    run = tmp_path / "run"
    earlier_run_with_subfolders(run)
    path = run / conflict.rstrip("/")
    if conflict.endswith("/"):
        path.unlink()
        path.mkdir()
    else:
        path.write_text("theirs")
    before = sorted(str(entry.relative_to(run)) for entry in run.rglob("*"))
    with pytest.raises(FileExistsError, match=re.escape(words)):
        prepare_run_dir(run, overwrite=True)
    assert sorted(str(entry.relative_to(run)) for entry in run.rglob("*")) == before


@pytest.mark.parametrize(("name", "folder"), [("curves.png", True), ("snapshots", False)])
def test_overwrite_refuses_a_folder_where_train_writes_a_file_before_removing_anything(tmp_path, name, folder):
    """`curves.png/` (a folder) was kept, and the new run failed at its end, the earlier run already deleted."""
    from lgg import guards
    from lgg.train import prepare_run_dir

    run = guards.mark_folder(tmp_path / "run", guards.RUN_MARKER)
    (run / "model.h5").write_text("the earlier run")
    if folder:
        (run / name).mkdir()
    else:
        (run / name).write_text("x")
    with pytest.raises(FileExistsError, match=f"{name} is a {'folder' if folder else 'file'} where train writes"):
        prepare_run_dir(run, overwrite=True)
    assert (run / "model.h5").read_text() == "the earlier run"
