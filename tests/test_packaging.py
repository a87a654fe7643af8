"""What ``pip install .`` installs: every package of the source tree, the configs and ``py.typed``.

The wheel is built from a copy of the tree (setuptools' PEP 517 backend, no network, no isolation),
so the checkout gets no build/ or egg-info folders.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def _installed_name(folder: Path) -> str:
    """The import name a source folder installs as, through ``package-dir``."""
    relative = folder.relative_to(ROOT).as_posix()
    for package, source in sorted(SETUPTOOLS["package-dir"].items(), key=lambda kv: -len(kv[1])):
        if relative == source or relative.startswith(source + "/"):
            return package + relative[len(source):].replace("/", ".")
    return relative.replace("/", ".")


def _source_packages() -> set:
    roots = ["tsm_surgery", *SETUPTOOLS["package-dir"].values()]
    return {_installed_name(init.parent) for root in roots for init in (ROOT / root).rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_every_source_package_is_listed():
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(_source_packages() - listed)
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml, or the wheel lacks them"
    assert not sorted(listed - _source_packages()), "pyproject.toml lists packages the tree does not have"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for name in ("tsm_surgery", "integrations", "configs"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    code = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return zipfile.ZipFile(out / proc.stdout.strip().splitlines()[-1])


def test_wheel_holds_every_package(wheel):
    names = wheel.namelist()
    packages = {n.rsplit("/", 1)[0].replace("/", ".") for n in names if n.endswith("/__init__.py")}
    assert packages == set(SETUPTOOLS["packages"])
    assert "tsm_surgery/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "integrations/", "configs/"))]


def test_wheel_holds_the_configs(wheel):
    names = set(wheel.namelist())
    configs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.py"))
    assert configs and "configs/demo/tsm_r18w32_1x1x8_demo.py" in configs
    missing = [c for c in configs if "tsm_surgery/" + c not in names]
    assert not missing, f"configs missing from the wheel: {missing}"


def test_wheel_declares_the_command(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "tsm-surgery = tsm_surgery.cli:main" in wheel.read(entry_points).decode()
