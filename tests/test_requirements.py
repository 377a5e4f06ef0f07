"""The lock (`requirements.txt`) installs on the platforms users have: `tensorflow-cpu` has no macOS wheels, so a
Mac gets `tensorflow` of the same version; every other pin is the same everywhere, and `pyproject.toml`'s
ranges admit the pinned TensorFlow. What only the tests need (`requirements-dev.txt`: the test tools, the linter,
and PyTorch with its CUDA libraries) stays out of it, and nothing users run imports it."""

import ast
import importlib.metadata
import tomllib
from pathlib import Path

import nbformat
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_notebooks import NOTEBOOKS, code_cells

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = {"linux": "x86_64", "win32": "AMD64", "darwin": "arm64"}


def lines(name):
    return [line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines() if line.split("#")[0].strip()]


def pins(name="requirements.txt"):
    return [Requirement(line) for line in lines(name) if not line.startswith("-")]


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


def test_the_development_lock_adds_exact_pins_to_the_users_lock_and_repeats_none():
    assert lines("requirements-dev.txt")[0] == "-r requirements.txt"
    assert [line for line in lines("requirements-dev.txt") if line.startswith("-")] == ["-r requirements.txt"]
    development = pins("requirements-dev.txt")
    assert all(str(pin.specifier).startswith("==") and pin.marker is None for pin in development)
    assert not {pin.name for pin in development} & {pin.name for pin in pins()}
    assert {"torch", "pytest", "ruff"} <= {pin.name for pin in development}


def imported_modules(source):
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module.split(".")[0])
    return modules


def closure(names):
    """The distributions `names` install, following each installed one's requirements (markers without extras)."""
    seen, todo = set(), [canonicalize_name(name) for name in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(requirement.name))
    return seen


def test_nothing_users_run_imports_what_only_the_development_lock_installs():
    """The package, the notebooks and the benchmarks `make bench` / `make results` run work from `requirements.txt`
    alone; only the GPU scripts (`benchmarks/gpu_*`, run where PyTorch is) may import PyTorch."""
    files = [*(ROOT / "lgg").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    sources = {path: path.read_text() for path in files if not path.name.startswith("gpu_")}
    for notebook in NOTEBOOKS.values():
        code = [line for cell in code_cells(nbformat.read(notebook, as_version=4)) for line in cell.source.splitlines()]
        sources[notebook] = "\n".join(line for line in code if not line.lstrip().startswith(("%", "!")))
    assert len(sources) > 20 and sum(path.suffix == ".ipynb" for path in sources) == 3
    development_pins = [pin.name for pin in pins("requirements-dev.txt")]
    installed = [name for name in development_pins if list(importlib.metadata.distributions(name=name))]
    assert installed == development_pins, "make setup-dev installs what this test reads"
    development_only = closure(development_pins) - closure(pin.name for pin in pins())
    assert {"torch", "pytest", "sympy"} <= development_only  # what they pull in counts too
    distributions = importlib.metadata.packages_distributions()
    for path, source in sources.items():
        for module in imported_modules(source):
            needs = {canonicalize_name(name) for name in distributions.get(module, [module])} & development_only
            assert not needs, f"{path.relative_to(ROOT)} imports {module}: {needs}"
