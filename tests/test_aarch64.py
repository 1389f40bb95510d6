"""The runtime and the agent on aarch64: an arm64 Debian Python 3.11 under qemu-aarch64 (user mode) with
aarch64 wheels (tools/aarch64-env.sh). Same bundles, same outputs as on this x86_64 host."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT
from .test_agent import KILL_POINTS, kill_case, update_scenario

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.fixture(scope="session")
def arm() -> tuple[list[str], dict[str, str]]:
    """(command prefix, environment) that runs the aarch64 Python; prepared (and cached) on first use."""
    cache = ROOT / ".cache" / "aarch64"
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(
        ["bash", str(ROOT / "tools" / "aarch64-env.sh"), str(cache)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    qemu = shutil.which("qemu-aarch64")
    assert qemu, "qemu-aarch64 missing: make test installs qemu-user"
    sysroot = cache / "sysroot"
    prefix = [qemu, "-L", str(sysroot), str(sysroot / "usr" / "bin" / "python3.11")]
    return prefix, {"PYTHONPATH": str(cache / "site"), "PYTHONHOME": str(sysroot / "usr")}


def _run(arm, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    prefix, extra = arm
    return subprocess.run(
        [*prefix, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **extra},
        check=False,
    )


def test_it_really_is_aarch64(arm) -> None:
    r = _run(arm, "-c", "import platform, onnxruntime, ai_edge_litert; print(platform.machine())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "aarch64"


def test_same_outputs_as_x86(arm, tmp_path: Path, digits_bundle: Path, mlp_bundles: dict, publisher, digits) -> None:
    x = digits["eval"][0][:64]
    np.save(tmp_path / "x.npy", x)
    bundles = [str(digits_bundle), str(mlp_bundles["1.0.0"]), str(mlp_bundles["3.0.0-qemu"])]
    args = [str(ROOT / "tests" / "_probe.py"), "OUT", str(publisher[2]), str(tmp_path / "x.npy"), *bundles]
    # the host runs the LiteRT release the aarch64 side has (newer aarch64 wheels crash under qemu)
    host_env = {**os.environ, "PYTHONPATH": str(ROOT / ".cache" / "aarch64" / "host-litert")}
    host = subprocess.run(
        [sys.executable, *[a if a != "OUT" else str(tmp_path / "x86.npz") for a in args]],
        capture_output=True,
        text=True,
        timeout=600,
        env=host_env,
    )
    assert host.returncode == 0, host.stderr[-3000:]
    r = _run(arm, *[a if a != "OUT" else str(tmp_path / "arm.npz") for a in args])
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [line for line in r.stdout.splitlines() if "fallback:" not in line]
    assert len(runs) == 4 and all(line.startswith("aarch64 ") for line in runs)  # digits onnx+tflite, mlp x2
    # Under qemu-user, LiteRT's XNNPACK int8 kernels compute wrong results; the golden check catches that
    # and the runtime drops to the reference kernels, saying so. On real arm64 hardware it keeps XNNPACK.
    for line in r.stdout.splitlines():
        if "fallback:" in line:
            assert "failed the golden sample check" in line
    assert "litert 2.1" in host.stdout and "litert 2.1" in r.stdout
    assert "litert 2.1" in host.stdout and "litert 2.1" in r.stdout
    a, b = np.load(tmp_path / "x86.npz"), np.load(tmp_path / "arm.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        if "int8" in k:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # int8: bit-exact per backend
        else:
            np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=0, err_msg=k)


def test_cli_on_aarch64(arm, tmp_path: Path, digits_bundle: Path, publisher) -> None:
    r = _run(
        arm,
        "-m",
        "edgefleet._cli",
        "run",
        str(digits_bundle),
        "--golden",
        "--backend",
        "tflite",
        "--key",
        str(publisher[2]),
    )
    assert r.returncode == 0 and "golden sample: PASS" in r.stdout, r.stderr[-2000:]
    bad = tmp_path / "truncated.efb"
    bad.write_bytes(digits_bundle.read_bytes()[:5000])
    r = _run(arm, "-m", "edgefleet._cli", "run", str(bad), "--golden", "--key", str(publisher[2]))
    assert r.returncode == 1 and "truncated or corrupt" in r.stderr


# The agent tests, with the agent process on aarch64 (the broker and file server stay on the host).


def _qemu_set(mlp_bundles: dict) -> dict:
    return {**mlp_bundles, "3.0.0": mlp_bundles["3.0.0-qemu"]}


def test_agent_updates_on_aarch64(arm, tmp_path, broker, files, observer, mlp_bundles, publisher) -> None:
    update_scenario(tmp_path, broker, files, observer, _qemu_set(mlp_bundles), publisher, python=arm, device="arm-a")


ARM_KILLS = [
    k
    for k in KILL_POINTS
    if k[0]
    in ("download.mid", "stage.temp_written", "switch.renamed", "watch.tick", "commit.before", "rollback.switched")
]


@pytest.mark.parametrize(("failpoint", "offer", "final"), ARM_KILLS, ids=[f"{k[0]}-{k[1]}" for k in ARM_KILLS])
def test_kill_9_on_aarch64(arm, tmp_path, broker, files, observer, mlp_bundles, publisher, failpoint, offer, final):
    kill_case(tmp_path, broker, files, observer, _qemu_set(mlp_bundles), publisher, failpoint, offer, final, python=arm)
