"""Reproducible installs: every import declared, every package locked, the supported Ray."""

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from mlplatform.serving import SUPPORTED_RAY, require_supported_ray

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCK = tomllib.loads((REPO / "uv.lock").read_text())
LOCKED: dict[str, set[str]] = {}  # a package may be locked per Python version (markers)
for _package in LOCK["package"]:
    LOCKED.setdefault(_package["name"], set()).add(_package["version"])


def _requirements(*extras: str) -> dict[str, Requirement]:
    specs = [*PYPROJECT["dependencies"]]
    for extra in extras:
        specs += PYPROJECT["optional-dependencies"][extra]
    return {canonicalize_name(Requirement(spec).name): Requirement(spec) for spec in specs}


def _imported_modules(*folders: str) -> set[str]:
    """Top-level names of every module imported by the files under ``folders``."""
    names = set()
    for folder in folders:
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    local = {"mlplatform", "mlplatform_tests", "conftest", "processes"}
    return names - set(sys.stdlib_module_names) - local


def _undeclared(modules: set[str], declared: dict[str, Requirement]) -> dict[str, list[str]]:
    providers = importlib.metadata.packages_distributions()
    missing = {}
    for module in sorted(modules):
        distributions = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not distributions & set(declared):
            missing[module] = sorted(distributions)
    return missing


def test_every_package_the_platform_imports_is_a_declared_dependency():
    assert _imported_modules("mlplatform") >= {"numpy", "scipy", "matplotlib", "pydantic"}
    assert _undeclared(_imported_modules("mlplatform"), _requirements()) == {}


def test_tests_and_benchmarks_imports_are_declared_in_their_extras():
    declared = _requirements("dev", "bench")
    assert _undeclared(_imported_modules("mlplatform_tests", "benchmarks"), declared) == {}


def test_the_lock_pins_every_declared_package_and_this_environment_is_the_locked_one():
    for name, requirement in _requirements("dev", "bench").items():
        assert name in LOCKED, f"{name} is not in uv.lock: run `make lock`"
        assert all(Version(v) in requirement.specifier for v in LOCKED[name]), name
        installed = importlib.metadata.version(name)
        assert installed in LOCKED[name], f"{name} {installed} installed, {LOCKED[name]} locked"


def test_ray_is_pinned_to_the_minor_release_whose_internals_serving_uses():
    ray = _requirements()["ray"]
    assert ray.extras == {"serve"}
    allowed = {f"{SUPPORTED_RAY}.0", f"{SUPPORTED_RAY}.9"}
    assert all(Version(v) in ray.specifier for v in allowed)
    major, minor = map(int, SUPPORTED_RAY.split("."))
    assert Version(f"{major}.{minor + 1}.0") not in ray.specifier
    assert Version(f"{major}.{minor - 1}.9") not in ray.specifier
    assert all(v.startswith(f"{SUPPORTED_RAY}.") for v in LOCKED["ray"])


@pytest.mark.parametrize("version", ["2.61.0", "2.59.1", "3.0.0"])
def test_another_ray_release_stops_the_platform_with_a_clear_message(version):
    with pytest.raises(RuntimeError, match=re.escape(f"needs Ray {SUPPORTED_RAY}.x, found Ray")):
        require_supported_ray(version)


def test_the_supported_ray_release_passes():
    require_supported_ray(f"{SUPPORTED_RAY}.3")
    require_supported_ray()  # the installed one
