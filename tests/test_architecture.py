"""Dependency direction (import-linter) and the light footprint of the core and runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_sdk_contract_lists_every_sdk_module() -> None:
    # A new sdk module must be covered by the contract, or the check below would not see it.
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = cfg["tool"]["importlinter"]["contracts"][0]
    on_disk = {f"edgefleet.{p.stem}" for p in (ROOT / "sdk").glob("*.py") if p.stem != "__init__"}
    assert set(contract["source_modules"]) >= on_disk, on_disk - set(contract["source_modules"])


def _installed_layout(dest: Path) -> None:
    """Lay the sources out as they install (pyproject's package-dir mapping): grimp walks one tree."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    mapping = cfg["tool"]["setuptools"]["package-dir"]
    for pkg, src in sorted(mapping.items(), key=lambda kv: kv[0].count(".")):
        shutil.copytree(ROOT / src, dest.joinpath(*pkg.split(".")), ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")


def test_import_linter_contracts_hold(tmp_path: Path) -> None:
    _installed_layout(tmp_path)
    exe = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [str(exe), "--config", "pyproject.toml"], cwd=tmp_path, capture_output=True, text=True, check=False, env=env
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 2 kept, 0 broken" in r.stdout


def test_import_linter_catches_a_violation(tmp_path: Path) -> None:
    # The contract must be able to fail: an sdk module importing the runtime breaks it.
    _installed_layout(tmp_path)
    with open(tmp_path / "edgefleet" / "_drift.py", "a") as f:
        f.write("\nimport edgefleet.runtime  # noqa\n")
    exe = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    r = subprocess.run(
        [str(exe), "--config", "pyproject.toml"], cwd=tmp_path, capture_output=True, text=True, check=False, env=env
    )
    assert r.returncode != 0 and "edgefleet._drift -> edgefleet.runtime" in r.stdout


def test_core_and_runtime_imports_stay_light() -> None:
    code = (
        "import sys, edgefleet, edgefleet.runtime, edgefleet._cli;"
        "heavy = [m for m in ('torch', 'tensorflow', 'tf_keras', 'onnx', 'litert_torch') if m in sys.modules];"
        "print(heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_cli_help_does_not_import_frameworks() -> None:
    code = (
        "import sys; from edgefleet._cli import build_parser; build_parser();"
        "print([m for m in ('torch', 'tensorflow', 'onnx') if m in sys.modules])"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"


def test_wheel_installs_only_the_edgefleet_package(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("edgefleet-*.whl")
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"edgefleet", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in (
        "edgefleet/converters/__init__.py",
        "edgefleet/runtime/__init__.py",
        "edgefleet/fleet/__init__.py",
        "edgefleet/converters/backends/_torch.py",
        "edgefleet/_bundle.py",
    ):
        assert pkg in names


def test_every_part_exports_its_public_names() -> None:
    import importlib

    for part in ("edgefleet.protocol", "edgefleet.runtime", "edgefleet.fleet", "edgefleet.converters"):
        mod = importlib.import_module(part)
        assert mod.__all__, f"{part} exports nothing"
        for name in mod.__all__:
            obj = getattr(mod, name)
            assert obj is not None, f"{part}.{name}"
    import edgefleet.fleet

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        edgefleet.fleet.Nope  # noqa: B018
