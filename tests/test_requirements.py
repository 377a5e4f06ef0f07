"""The lock (`requirements.txt`) installs on the platforms users have: `tensorflow-cpu` has no macOS wheels, so a
Mac gets `tensorflow` of the same version; every other pin is the same everywhere, and `pyproject.toml`'s
ranges admit the pinned TensorFlow."""

import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = {"linux": "x86_64", "win32": "AMD64", "darwin": "arm64"}


def pins():
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def chosen(platform):
    environment = {**default_environment(), "sys_platform": platform, "platform_machine": PLATFORMS[platform]}
    return [pin for pin in pins() if pin.marker is None or pin.marker.evaluate(environment)]


def test_each_platform_gets_one_tensorflow_of_the_same_version():
    versions = {}
    for platform in PLATFORMS:
        tensorflow = [pin for pin in chosen(platform) if pin.name.startswith("tensorflow")]
        assert len(tensorflow) == 1, (platform, [str(pin) for pin in tensorflow])
        expected = "tensorflow" if platform == "darwin" else "tensorflow-cpu"  # no tensorflow-cpu wheel for macOS
        assert tensorflow[0].name == expected, (platform, str(tensorflow[0]))
        versions[platform] = str(tensorflow[0].specifier)
    assert len(set(versions.values())) == 1 and next(iter(versions.values())).startswith("=="), versions
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    tensorflow_range = next(Requirement(d) for d in declared if Requirement(d).name == "tensorflow").specifier
    assert tensorflow_range.contains(versions["linux"].removeprefix("==")), (tensorflow_range, versions)


def test_every_other_pin_is_exact_and_the_same_on_every_platform():
    others = {platform: sorted(str(p) for p in chosen(platform) if not p.name.startswith("tensorflow"))
              for platform in PLATFORMS}  # fmt: skip
    assert others["linux"] == others["win32"] == others["darwin"]
    assert all(str(pin.specifier).startswith("==") for pin in pins()), [str(p) for p in pins() if p.marker is None]
    assert all(pin.marker is None for pin in pins() if not pin.name.startswith("tensorflow"))
