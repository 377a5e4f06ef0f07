"""`make bench` (benchmarks/bench.py) runs end to end on real cases and its figures hang together.

The smoke run (`--quick`: 3 cases at 32x32, 2 steps) says nothing about speed; it checks that every section
runs, that every rate is a steady-state rate of real steps, and that the README's speed section renders.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402  (benchmarks/results.py: writes the README's speed section)


@pytest.mark.slow
def test_the_benchmark_runs_and_renders(real_data, tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--data", str(real_data)]
    completed = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    bench = json.loads(out.read_text())
    for key, model in bench["models"].items():
        training = model["training"]
        assert training["steps"] == bench["settings"]["steps"][key] and training["slices_per_s"] > 0, key
    both = bench["side_by_side"]
    assert set(both["slices_per_s"]) == {"original", "xla", "no_xla", "mixed_bfloat16"}
    assert all(len(r["all"]) == bench["settings"]["side_by_side_rounds"] for r in both["slices_per_s"].values())
    real = bench["real_loop"]
    assert real["epochs"] == 2 and len(real["train_slices_per_s_by_epoch"]) == 2 and real["slices_per_s"] > 0
    assert real["jit_compile_used"] == bench["settings"]["jit_compile"] and real["precision"] == "float32"
    from lgg import train

    bfloat16 = train.resolve_precision(None, both["ours"] == "xla") == "mixed_bfloat16"  # what `train` picks here
    picks, ratio = (
        ("mixed_bfloat16", "mixed_bfloat16_over_original") if bfloat16 else (both["ours"], "ours_over_original")
    )
    assert both["train_picks"] == picks and both["train_picks_over_original"] == both[ratio]
    assert set(bench["agreement"]["slices_per_s"]) == {"single timing", "side-by-side median", "real loop"}
    assert "memory" not in bench  # --quick leaves it out
    assert results.benchmark_table(bench) is None  # a smoke run never reaches the README
    text = results.benchmark_table({**bench, "settings": {**bench["settings"], "quick": False}})
    assert "steady-state" in text and "The same code timed three ways" in text
    assert ("Ours as `train` picks here (`mixed_bfloat16`" in text) == (picks == "mixed_bfloat16")


def test_the_speed_text_says_what_train_picks_on_the_benchmarked_machine():
    """A benchmark file from before `train` chose the precision (no `train_picks`): the rule decides."""
    bench = json.loads((ROOT / "results" / "benchmark.json").read_text())
    both, machine = bench["side_by_side"], bench["machine"]
    both.pop("train_picks", None)
    for bf16, expected in [(True, "Ours as `train` picks here (`mixed_bfloat16`"), (False, "**Ours (float32, XLA")]:
        machine["cpu_flags"]["avx512_bf16"] = bf16
        assert expected in results.ours_line(both, machine)
    assert f"{both['mixed_bfloat16_over_original']['median']:.2f}x" in results.ours_line(
        both, {"cpu_flags": {"avx512_bf16": True}}
    )


def test_a_smoke_run_may_not_replace_the_committed_benchmark():
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode != 0 and "give --out" in completed.stderr


def test_the_readme_keeps_its_speed_section_for_a_smoke_run():
    bench = json.loads((ROOT / "results" / "benchmark.json").read_text())
    assert results.benchmark_table({**bench, "settings": {**bench["settings"], "quick": True}}) is None


@pytest.mark.parametrize("args", [["--steps", "0"], ["--rounds", "-1"], ["--image-size", "100"], ["--cases", "x"]])
def test_the_benchmark_refuses_nonsense_settings(args, tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), *args, "--out", str(tmp_path / "b.json")]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode != 0 and args[0] in completed.stderr and not (tmp_path / "b.json").exists()


def test_an_ensemble_refuses_a_run_twice_a_classifier_and_another_split(tmp_path):
    def run(name, split="train", kind_file="test_cases.csv", model=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.h5").write_bytes((model or name).encode())
        (folder / "split.csv").write_text(f"case_id,split\nTCGA_A,{split}\nTCGA_B,test\n")
        (folder / kind_file).write_text("case_id\n")
        return str(folder)

    a, other, classifier = run("a"), run("c", split="val"), run("d", kind_file="test_slices.csv")
    copy = run("b", model="a")  # a copy of run a under another name: the same model averaged with itself
    for runs, message in (([a, a], "same run twice"), ([a, classifier], "classifier"), ([a, other], "another split"),
                          ([a, copy], "is the same file as")):  # fmt: skip
        command = [sys.executable, str(ROOT / "benchmarks" / "ensemble.py"), "--name", "x", "--fold", *runs]
        completed = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert completed.returncode != 0 and message in completed.stderr, completed.stderr
    assert not (ROOT / "runs" / "ensemble-x").exists() and not (ROOT / "results" / "ensemble-x.json").exists()


def test_an_ensemble_of_two_sides_is_averaged_at_256_and_one_larger_is_refused_before_any_prediction(tmp_path):
    import ensemble

    from lgg import models
    from lgg.files import save_model

    def run(name, side):
        folder = tmp_path / name
        folder.mkdir()
        save_model(models.build_unet((side, side, 3), base_filters=4, depth=3), folder / "model.h5")
        return folder

    small, medium, large = run("small", 32), run("medium", 48), run("large", 288)
    averaged = ensemble.build_ensemble([small, medium])
    assert averaged.input_shape == (None, 256, 256, 3) and averaged.output_shape == (None, 256, 256, 1)
    assert ensemble.build_ensemble([small, run("again", 32)]).input_shape == (None, 32, 32, 3)  # one side: its own
    with pytest.raises(SystemExit, match="large: size must be a whole number of pixels no smaller than any member"):
        ensemble.build_ensemble([small, large])


def test_an_ensembles_per_case_table_keeps_each_patients_fold_and_each_members_own_score():
    import ensemble
    import pandas as pd

    def tables(recipe):  # two folds' committed per-case tables of one recipe, in the order ensemble.py pools them
        return [pd.read_csv(ROOT / "results" / f"{recipe}-fold{k}" / "test.csv") for k in (3, 4)]

    first, second = tables("unet-aug-flair-bf16-again"), tables("unet-aug-flair-160-bf16")
    second = [table.sample(frac=1, random_state=0) for table in second]  # a member's rows in another order
    folds = pd.concat([pd.Series(k, index=t.index) for k, t in zip((1, 2), first)], ignore_index=True)
    table = ensemble.per_case_table(pd.concat(first, ignore_index=True), [pd.concat(first), pd.concat(second)], folds)
    assert list(table.columns) == ["case_id", "fold", "case_dice", "member_1_case_dice", "member_2_case_dice"]
    assert len(table) == 16 + 18 and table.case_id.is_unique and list(table.fold.value_counts()[[1, 2]]) == [16, 18]
    assert (table.case_dice == table.member_1_case_dice).all()
    member = pd.concat(second).set_index("case_id").case_dice
    assert np.allclose(table.member_2_case_dice, member.loc[table.case_id]) and not np.allclose(
        table.member_2_case_dice, table.member_1_case_dice, atol=1e-3
    )
    with pytest.raises(ValueError, match="member 2 has no test score for"):
        ensemble.per_case_table(table, [pd.concat(first), second[0]], folds)


def test_the_precision_benchmark_refuses_a_nonsense_setting_before_it_measures(tmp_path):
    out = tmp_path / "precision.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--out", str(out)]
    for setting, words in [(["--rounds", "0"], "--rounds must be at least 1, got 0"),
                           (["--image-size", "144"], "--image-size must be a multiple of 32")]:  # fmt: skip
        completed = subprocess.run([*command, *setting], capture_output=True, text=True, cwd=ROOT)
        assert completed.returncode == 2 and words in completed.stderr, completed.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "setting, words",
    [(["--models", "unet,foo"], "unknown --models ['foo']"), (["--minutes", "0"], "--minutes"),
     (["--minutes", "-1"], "--minutes"), (["--models", "unet,unet"], "names a model twice")],
)  # fmt: skip
def test_the_gpu_comparison_refuses_a_model_it_does_not_know_or_no_time(tmp_path, capsys, setting, words):
    """`--models unet,foo` trained "foo" as a ResNet50 U-Net under that name; `--minutes 0` divided by zero."""
    import gpu_architectures

    with pytest.raises(SystemExit) as stop:
        gpu_architectures.main(["run", "--arrays", str(tmp_path / "a.npz"), "--out", str(tmp_path / "o"), *setting])
    assert stop.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_gpu_comparison_never_replaces_what_it_did_not_write(tmp_path, capsys):
    """`run --out` into a folder of results replaced its gpu_architectures.json model by model (the committed
    three-model file by a one-model one); `prepare --out x` (no .npz) crashed after decoding, leaving
    `.partial-x.npz`, and replaced any file at --out."""
    import gpu_architectures

    earlier = tmp_path / "results-gpu"
    earlier.mkdir()
    (earlier / "gpu_architectures.json").write_text('{"models": ["three"]}')
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for command, words in [
        (["run", "--arrays", str(tmp_path / "a.npz"), "--out", str(earlier)], "is not an empty folder"),
        (["run", "--arrays", str(tmp_path / "a.npz"), "--out", str(notes)], "is not an empty folder"),
        (["prepare", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "arrays")], "ends in .npz"),
        (["prepare", "--data", str(tmp_path / "none"), "--out", str(notes.with_suffix(".npz"))], None),
    ]:
        if words is None:  # a file of another kind where the arrays would go
            notes.with_suffix(".npz").write_text("mine too")
            words = "is not an arrays file of this script"
        with pytest.raises(SystemExit) as stop:
            gpu_architectures.main(command)
        assert stop.value.code == 2 and words in capsys.readouterr().err
    assert (earlier / "gpu_architectures.json").read_text() == '{"models": ["three"]}'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["notes.npz", "notes.txt", "results-gpu"]
    assert notes.read_text() == "mine" and notes.with_suffix(".npz").read_text() == "mine too"


@pytest.mark.slow
def test_the_precision_benchmark_times_every_setup_in_every_round(real_data, tmp_path):
    out = tmp_path / "precision.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--data", str(real_data), "--out", str(out)]
    settings = ["--cases", "2", "--image-size", "32", "--rounds", "2"]
    completed = subprocess.run([*command, *settings], capture_output=True, text=True, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["settings"]["rounds"] == 2 and found["settings"]["cases"] == 2
    for model, precisions in [("unet", {"float32", "mixed_bfloat16", "float32_xla"}),
                              ("resnet50_unet", {"float32", "mixed_bfloat16"})]:  # fmt: skip
        rates = found[model]["slices_per_s"]
        assert set(rates) == precisions, model
        assert all(len(r["all"]) == 2 and min(r["all"]) > 0 for r in rates.values()), model
        ratio = found[model]["mixed_bfloat16_over_float32"]["median"]
        assert ratio == pytest.approx(np.median(np.divide(rates["mixed_bfloat16"]["all"], rates["float32"]["all"])))
    from lgg import train

    assert found["train_picks"]["unet"]["precision"] == train.resolve_precision(None, train.resolve_jit_compile(None))
    assert found["train_picks"]["resnet50_unet"]["precision"] == "float32"  # not measured for Dice: float32
    assert found["busy"] == (found["machine"]["other_processes_cpu_share"] > 0.1)


def test_the_precision_benchmark_never_replaces_a_file_it_did_not_write(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "precision.py"), "--data", str(tmp_path / "none")]
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}')
    completed = subprocess.run([*command, "--out", str(foreign)], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 1 and "is not a file of benchmarks/precision.py" in completed.stderr
    assert foreign.read_text() == '{"mine": 1}'
    completed = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 1 and "is a folder" in completed.stderr
    # its own file may be measured again (here the missing data stops it, after the check, with a message)
    own = ROOT / "results" / "precision-amd-epyc.json"
    completed = subprocess.run([*command, "--out", str(own)], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 1 and "precision.py" not in completed.stderr and "none" in completed.stderr


@pytest.mark.parametrize("script", ["bench.py", "batchnorm_lag.py"])
def test_the_other_benchmarks_never_replace_a_file_they_did_not_write(tmp_path, script):
    """`--out README.md` was replaced by the benchmark's JSON after its minutes of measuring: now refused first."""
    command = [sys.executable, str(ROOT / "benchmarks" / script), "--data", str(tmp_path / "none")]
    foreign = tmp_path / "README.md"
    foreign.write_text("# my notes")
    for out, words in [(foreign, f"is not a file of benchmarks/{script}"), (tmp_path, "is a folder")]:
        completed = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
        assert completed.returncode == 1 and words in completed.stderr, completed.stderr
    assert foreign.read_text() == "# my notes"
    if script == "bench.py":  # the committed benchmark, named by its absolute path, is no target of a smoke run
        own = ROOT / "results" / "benchmark.json"
        completed = subprocess.run([*command, "--quick", "--out", str(own)], capture_output=True, text=True, cwd="/")
        assert completed.returncode == 1 and "--quick is a smoke run" in completed.stderr, completed.stderr
        # a full run is replaced only by its kind: not by a smoke run, and fused and stock batch normalization
        # never replace each other (the README reads results/benchmark.json as the fused one)
        for name in ("benchmark.json", "benchmark-stock-batchnorm.json"):
            shutil.copy(ROOT / "results" / name, tmp_path / name)
        for flags, words in [
            (["--stock-batchnorm", "--out", tmp_path / "benchmark.json"], "with fused batch normalization"),
            (["--out", tmp_path / "benchmark-stock-batchnorm.json"], "with stock batch normalization"),
            (["--quick", "--out", tmp_path / "benchmark-stock-batchnorm.json"], "holds a full benchmark"),
        ]:
            completed = subprocess.run([*command, *map(str, flags)], capture_output=True, text=True, cwd=ROOT)
            assert completed.returncode == 1 and words in completed.stderr, completed.stderr
        for name in ("benchmark.json", "benchmark-stock-batchnorm.json"):
            assert (tmp_path / name).read_bytes() == (ROOT / "results" / name).read_bytes()
        stock = json.loads((ROOT / "results" / "benchmark-stock-batchnorm.json").read_text())
        assert results.benchmark_table(stock) is None  # not the README's speed section


def test_the_gpu_training_speed_figures_are_what_their_histories_give(tmp_path):
    """The README's GPU training rates come from `results/gpu/cli/gpu_train_speed.json`, which its own
    `--summarize` rebuilds from the committed histories; a non-empty OUT is refused before anything runs."""
    committed = ROOT / "results" / "gpu" / "cli"
    for path in committed.iterdir():
        (tmp_path / path.name).write_bytes(path.read_bytes())
    (tmp_path / "gpu_train_speed.json").unlink()
    script = ["bash", str(ROOT / "benchmarks" / "gpu_train_speed.sh")]
    subprocess.run([*script, "--summarize", str(tmp_path)], check=True, capture_output=True, cwd=ROOT)
    summary = json.loads((tmp_path / "gpu_train_speed.json").read_text())
    assert summary == json.loads((committed / "gpu_train_speed.json").read_text())
    readme = (ROOT / "README.md").read_text()
    for setting, words in [("b16-128-f32", "{} slices/s at 128² in float32"), ("b16-128-bf16", "and {} in bfloat16"),
                           ("b32-256-bf16", "{} at 256²")]:  # fmt: skip
        assert words.format(round(summary["settings"][setting]["median_train_slices_per_s"])) in readme
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    completed = subprocess.run(
        script, capture_output=True, text=True, cwd=ROOT, env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}
    )
    assert completed.returncode == 2 and "is not empty" in completed.stderr, completed.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    completed = subprocess.run([*script, "--summarize", str(tmp_path / "none")], capture_output=True, text=True)
    assert completed.returncode == 2 and "no <setting>-history.csv" in completed.stderr, completed.stderr


@pytest.mark.parametrize("mode, written", [([], "gpu_train_bound.json"), (["--compiled"], "gpu_compiled.json")])
def test_the_gpu_bound_probe_never_writes_over_an_earlier_result(tmp_path, mode, written):
    """Its OUT is refused when it already holds the file it would write, before anything is loaded or timed."""
    (tmp_path / written).write_text("an earlier measurement")
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_train_bound.py"), str(tmp_path / "none"), str(tmp_path)]
    completed = subprocess.run([*command, *mode], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 1 and f"{written} exists: choose a new OUT" in completed.stderr, completed.stderr
    assert (tmp_path / written).read_text() == "an earlier measurement"


@pytest.mark.parametrize("script", ["bench", "precision", "batchnorm_lag", "gpu_architectures"])
def test_a_benchmark_never_writes_its_file_among_the_data(real_data, tmp_path, capsys, script):
    """`--out` inside the dataset (or a case folder of it) was accepted: `gpu_architectures.py prepare` wrote its
    arrays into data/kaggle_3m; the others would have written their JSON there after measuring."""
    import importlib

    main = importlib.import_module(script).main
    case = sorted(p for p in real_data.iterdir() if p.is_dir())[0]
    for out in (real_data / "x.json", case / "x.json"):
        out = out.with_suffix(".npz") if script == "gpu_architectures" else out
        argv = ["--data", str(real_data), "--out", str(out), *(["--quick"] if script == "bench" else [])]
        with pytest.raises(SystemExit) as stop:
            main(["prepare", *argv] if script == "gpu_architectures" else argv)
        said = f"{stop.value.code} {capsys.readouterr().err}"  # SystemExit's message, or argparse's on stderr
        assert f"--out {out} lies inside the input folder" in said, said
        assert not out.exists()


@pytest.mark.parametrize("argv", [[], ["/tmp/lgg"], ["/tmp/lgg", "OUT", "0"], ["/tmp/lgg", "OUT", "nan"]])
def test_the_gpu_step_timing_refuses_missing_folders_or_no_time(argv, capsys):
    """`gpu_train_bound.py` took its arguments unchecked: one missing was a TypeError, 0 seconds recorded 0
    slices/s."""
    import os

    backend = os.environ.get("KERAS_BACKEND")
    import gpu_train_bound

    assert os.environ.get("KERAS_BACKEND") == backend  # imported, it leaves the backend of later subprocesses alone
    with pytest.raises(SystemExit) as stop:
        gpu_train_bound.parse_args(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
    assert gpu_train_bound.parse_args(["/tmp/lgg", "OUT", "3", "--compiled"]).seconds == 3.0
