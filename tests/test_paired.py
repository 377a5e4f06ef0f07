"""benchmarks/paired.py: two per-case tables paired case by case, on the committed cross-validation tables."""

import json
import shlex
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import flat

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paired  # noqa: E402

RESULTS = ROOT / "results"
FLAIR, AUG = RESULTS / "unet-aug-flair-bf16-cross-validation.csv", RESULTS / "unet-aug-bf16-cross-validation.csv"
GROUPS = RESULTS / "missing_sequences-unet-aug-flair-bf16.csv"


@pytest.mark.parametrize("committed", sorted((RESULTS / "paired").glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_pairing_is_what_its_recorded_command_gives_on_the_files_it_names(committed, tmp_path):
    """The README quotes these files: each must come from its command, on inputs unchanged since."""
    recorded = json.loads(committed.read_text())
    argv = shlex.split(recorded["command"])[2:]
    out = argv.index("--out")
    argv[out + 1] = str(tmp_path / "again.json")
    for side in ("candidate", "other", "groups_from"):
        for path, sha256 in recorded.get(side, {}).items():
            assert paired.file_sha256(ROOT / path) == sha256, f"{path} changed since {committed.name} was written"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        paired.main(argv)
    again = json.loads((tmp_path / "again.json").read_text())
    del again["command"], recorded["command"]
    assert flat(again) == pytest.approx(flat(recorded), abs=1e-9)


def test_the_flair_only_recipe_against_the_one_it_replaced_as_the_readme_quotes_it():
    result = paired.paired([FLAIR], [AUG], GROUPS)
    p = result["paired"]
    assert (p["cases"], p["better"], p["worse"]) == (88, 49, 39)
    assert round(p["mean_difference"], 3) == 0.017 and [round(x, 3) for x in p["mean_difference_ci95"]] == [
        0.007,
        0.034,
    ]
    smallest = result["by_tumor_volume_quarter"][0]
    assert smallest["cases"] == 22 and (round(smallest["other_mean"], 3), round(smallest["candidate_mean"], 3)) == (
        0.740,
        0.783,
    )
    flair_only = result["by_group"]["FLAIR only"]
    assert sorted(round(d, 2) for d in flair_only["within"]["differences"].values()) == [0.03, 0.10, 0.10, 0.11]
    others = flair_only["outside"]["paired"]
    assert (others["cases"], others["better"], others["worse"], round(others["mean_difference"], 3)) == (
        84,
        45,
        39,
        0.014,
    )
    # the candidate and the other swapped: the same pairs, the difference negated
    swapped = paired.paired([AUG], [FLAIR])["paired"]
    assert swapped["mean_difference"] == pytest.approx(-p["mean_difference"], abs=1e-12)
    assert (swapped["better"], swapped["worse"]) == (39, 49)


def test_fold_tables_of_both_sides_are_concatenated_and_a_case_twice_is_refused(tmp_path):
    folds = pd.read_csv(FLAIR)
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    folds[folds.fold == "unet-aug-flair-bf16"].to_csv(first, index=False)
    folds[folds.fold == "unet-aug-flair-bf16-fold2"].to_csv(second, index=False)
    other = pd.read_csv(AUG)
    other = other[
        other.case_id.isin(folds[folds.fold.isin(["unet-aug-flair-bf16", "unet-aug-flair-bf16-fold2"])].case_id)
    ]
    other.to_csv(tmp_path / "other.csv", index=False)
    result = paired.paired([first, second], [tmp_path / "other.csv"])
    assert result["paired"]["cases"] == 22 + 17
    with pytest.raises(ValueError, match=r"case TCGA_\w+ appears twice .*a\.csv"):
        paired.paired([first, first], [tmp_path / "other.csv"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.iloc[1:], "the two sides hold different cases"),
        (lambda t: t.drop(columns="true_volume_px"), "no column true_volume_px"),
        (lambda t: t.assign(case_dice=t.case_dice * 2), r"case_dice must be numbers in \[0, 1\]"),
        (lambda t: t.assign(true_volume_px=t.true_volume_px + 1), r"true_volume_px of TCGA_\w+ differs .*88 cases"),
        (lambda t: t.iloc[:0], "changed.csv: no cases"),
        (lambda t: t.assign(case_id=t.case_id.where(t.index > 0, None)), "a blank case_id"),
        (lambda t: t.assign(case_id=t.case_id + " "), r"changed.csv.: case id .TCGA_\w+ . is not usable"),
        (lambda t: t.assign(true_volume_px=-t.true_volume_px), "true_volume_px must be whole numbers"),
        (lambda t: t.assign(true_volume_px=t.true_volume_px.astype(str).where(t.index > 0, "big")), "whole numbers"),
        (lambda t: t.assign(true_volume_px=t.true_volume_px + 0.5), "whole numbers"),
    ],
)
def test_tables_that_do_not_pair_are_refused_naming_what_is_wrong(tmp_path, change, message):
    table = tmp_path / "changed.csv"
    change(pd.read_csv(AUG)).to_csv(table, index=False)
    with pytest.raises(ValueError, match=message):
        paired.paired([FLAIR], [table])


def test_out_never_replaces_a_file_of_another_command_or_of_another_pairing(tmp_path):
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": 1}\n')
    with pytest.raises(SystemExit, match="not a file of benchmarks/paired.py"):
        paired.main(["--candidate", str(FLAIR), "--other", str(AUG), "--out", str(foreign)])
    assert foreign.read_text() == '{"mine": 1}\n'
    with pytest.raises(SystemExit, match="notes.json is a file: --out names a JSON file in a folder"):
        paired.main(["--candidate", str(FLAIR), "--other", str(AUG), "--out", str(foreign / "out.json")])
    ours = tmp_path / "ours.json"
    paired.main(["--candidate", str(FLAIR), "--other", str(AUG), "--out", str(ours)])
    paired.main(["--candidate", str(FLAIR), "--other", str(AUG), "--out", str(ours)])  # itself, again: replaced
    written = ours.read_text()
    for argv in (
        ["--candidate", str(AUG), "--other", str(FLAIR)],  # the sides swapped
        ["--candidate", str(FLAIR), "--other", str(AUG), "--groups", str(GROUPS)],  # the groups added
    ):
        with pytest.raises(SystemExit, match="holds the pairing of other tables"):
            paired.main([*argv, "--out", str(ours)])
    assert ours.read_text() == written


def test_a_table_against_itself_is_refused_and_few_cases_have_no_quarters(tmp_path, capsys):
    with pytest.raises(ValueError, match="is on both sides"):
        paired.paired([FLAIR], [AUG, FLAIR])
    for path, table in ((tmp_path / "a.csv", FLAIR), (tmp_path / "b.csv", AUG)):
        pd.read_csv(table).iloc[:7].to_csv(path, index=False)
    paired.main(
        ["--candidate", str(tmp_path / "a.csv"), "--other", str(tmp_path / "b.csv"), "--out", str(tmp_path / "o.json")]
    )
    assert "no quarters of tumor volume: 7 cases, fewer than 8" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["by_tumor_volume_quarter"] is None


def test_the_groups_of_sequences_are_taken_among_the_tables_cases(tmp_path):
    fold = pd.read_csv(FLAIR)
    fold = fold[fold.fold == "unet-aug-flair-bf16-fold5"]
    fold.to_csv(tmp_path / "fold5.csv", index=False)
    other = pd.read_csv(AUG)
    other[other.case_id.isin(fold.case_id)].to_csv(tmp_path / "other.csv", index=False)
    groups = paired.paired([tmp_path / "fold5.csv"], [tmp_path / "other.csv"], GROUPS)["by_group"]
    sequences = pd.read_csv(GROUPS).set_index("case_id").sequences.loc[fold.case_id]
    assert {name: group["within"]["cases"] for name, group in groups.items()} == sequences.value_counts().to_dict()
    single = [group["within"]["paired"] for group in groups.values() if group["within"]["cases"] == 1]
    assert single and all(p["mean_difference_ci95"] is None for p in single)  # no interval from one case, not NaN
    pd.read_csv(GROUPS).iloc[1:].to_csv(tmp_path / "lacking.csv", index=False)
    for table, message in (
        (tmp_path / "lacking.csv", r"lacking.csv: no sequences for \['TCGA_"),
        (FLAIR, "not a missing_sequences CSV"),  # a per-case table, but without the sequences column
        (RESULTS / "missing_sequences-unet-aug-flair-bf16.json", "not a missing_sequences CSV"),
    ):
        with pytest.raises(ValueError, match=message):
            paired.paired([FLAIR], [AUG], table)
    twice = pd.read_csv(GROUPS)
    pd.concat([twice, twice.iloc[:1]]).to_csv(tmp_path / "twice.csv", index=False)
    with pytest.raises(ValueError, match="not a missing_sequences CSV"):
        paired.paired([FLAIR], [AUG], tmp_path / "twice.csv")
