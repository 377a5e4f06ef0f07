"""Atomic writes and run folders that are never overwritten silently."""

import json
import os

import pandas as pd
import pytest

from lgg import files, train


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "test_summary.json"
    files.save_json({"case_dice_mean": 0.8}, path)
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(path) as temporary:
            temporary.write_text('{"case_dice_mean": 0.')  # half written, then interrupted
            raise KeyboardInterrupt
    assert path.read_text() == '{\n  "case_dice_mean": 0.8\n}\n'
    assert list(tmp_path.iterdir()) == [path]


def test_csv_written_whole(tmp_path):
    files.save_csv(pd.DataFrame({"case_id": ["a", "b"], "case_dice": [0.5, 1.0]}), tmp_path / "cases.csv")
    assert (tmp_path / "cases.csv").read_text() == "case_id,case_dice\na,0.5\nb,1.0\n"


def test_run_folder_is_not_overwritten_silently(tmp_path):
    run_dir = train.prepare_run_dir(tmp_path / "run")
    (run_dir / "model.h5").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        train.prepare_run_dir(run_dir)
    (run_dir / "resume").mkdir()  # left by an interrupted run: --overwrite must not resume from it
    assert train.prepare_run_dir(run_dir, overwrite=True) == run_dir
    assert list(run_dir.iterdir()) == [run_dir / ".lgg-run"]  # emptied, and marked as a run folder of ours


def test_a_write_never_goes_through_a_link_or_hard_link_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".partial-a.json").symlink_to(victim)
    os.link(victim, out / ".partial-b.json")
    files.save_json({"x": 1}, out / "a.json")
    files.save_json({"x": 2}, out / "b.json")
    assert victim.read_text() == "precious"
    assert json.loads((out / "a.json").read_text()) == {"x": 1} and not (out / "a.json").is_symlink()
    assert json.loads((out / "b.json").read_text()) == {"x": 2} and sorted(p.name for p in out.iterdir()) == [
        "a.json",
        "b.json",
    ]
