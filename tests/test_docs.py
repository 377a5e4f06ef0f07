"""The documents point at files and sections that exist: a link that moves with an edit is caught here."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def markdown_files():
    try:
        listed = subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True)
        names = listed.stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a zip of the repository)
        skipped = {".git", ".venv", "runs"}
        names = [
            p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if not skipped & set(p.relative_to(ROOT).parts)
        ]
    return sorted(ROOT / name for name in names if not name.startswith("tests/"))


def anchors(path):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_documents_are_found():
    names = {path.relative_to(ROOT).as_posix() for path in markdown_files()}
    assert {"README.md", "data/README.md", "results/EXPERIMENTS.md", "models/unet/MODEL_CARD.md"} <= names


@pytest.mark.parametrize("document", markdown_files(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_relative_links_resolve(document):
    broken = []
    for target in LINK.findall(document.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # https:, mailto: ...: not checked offline
            continue
        name, _, anchor = target.partition("#")
        linked = (document.parent / name).resolve() if name else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(ROOT)}")
    assert not broken, f"{document.relative_to(ROOT)}: " + "; ".join(broken)
