"""The README's journeys, run as a newcomer types them: the commands are read from the README
itself (so the test follows the README when it changes), in a shell, from an empty directory.

What the test changes, and only that: the ports (free loopback ports instead of 8080 / 1883), the bundle
(the session's signed `mlp` bundle 2.0.0 stands in for digits-2.0.0.efb, so `digits:2.0.0` reads
`mlp:2.0.0`), and `keys/release.pub` is the key that bundle is signed with. The agent runs as printed,
with its defaults (60 s telemetry windows), so the journey takes a couple of minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _block(section: str) -> list[str]:
    """The first ```sh block under README heading SECTION, one command per line, comments stripped."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    body = text[start : text.index("\n## ", start + 1)]
    m = re.search(r"```sh\n(.*?)```", body, re.S)
    assert m, f"no sh block under '## {section}'"
    lines = []
    for ln in m.group(1).splitlines():
        ln = re.sub(r"\s+#.*$", "", ln).strip()
        if ln:
            lines.append(ln)
    return lines


def _fenced(section: str, lang: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {section}\n")
    m = re.search(rf"```{lang}\n(.*?)```", text[start : text.index("\n## ", start + 1)], re.S)
    assert m, f"no {lang} block under '## {section}'"
    return m.group(1)


@pytest.mark.torch
@pytest.mark.tensorflow
def test_build_a_bundle_as_the_readme_prints_it(tmp_path: Path, teacher_pt2: Path, digits_npz: dict) -> None:
    """'Build a bundle' typed in a clone's root (the recipe's student is the repository's example model):
    keygen, build with the README's own recipe, verify, inspect. Only the files are the session's: the
    teacher exported as the README says, and the digits splits."""
    work = tmp_path / "clone"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    shutil.copy(teacher_pt2, work / "teacher.pt2")
    for name in ("train", "calib", "eval"):
        shutil.copy(digits_npz[name], work / f"{name}.npz")
    (work / "digits.toml").write_text(_fenced("Build a bundle", "toml"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-e", "-c", _fenced("Build a bundle", "sh")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    assert "gate: at most 0.01 lost against the source" in r.stdout and ": met" in r.stdout, r.stdout[-3000:]
    assert "OK: digits 1.0.0" in r.stdout and "golden tflite-int8: OK" in r.stdout
    assert "bundle    digits 1.0.0" in r.stdout
    # the terminal shows edgefleet's own lines; torch's, TensorFlow's and absl's chatter is in the build log
    # (issue 16: the [edgefleet] lines were buried in it). LiteRT's one delegate line comes from `verify`.
    foreign = [ln for ln in r.stderr.splitlines() if not ln.startswith("[edgefleet]") and "XNNPACK delegate" not in ln]
    assert not foreign, foreign[:10]
    assert "digits-1.0.0.build.log" in r.stderr and (work / "digits-1.0.0.build.log").stat().st_size > 0
    report = json.loads((work / "report.json").read_text())
    assert {a["format"] for a in report["artifacts"]} == {"onnx", "tflite"}

    # 'Run a bundle on a device' on the bundle just built: the Python block (with an x of the app's
    # inputs), then the `edgefleet run` lines (with the x.npy they name); the agent lines need a fleet
    # (the fleet journey runs them).
    import numpy as np

    x = np.load(work / "eval.npz")["x"][:5]
    np.save(work / "x.npy", x)
    code = "import numpy as np\nx = np.load('x.npy')\n" + _fenced("Run a bundle on a device", "python")
    code += "\nprint('PRED', y.argmax(1).tolist())\n"
    r = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "PRED [" in r.stdout and (work / "telemetry.db").exists()
    runs = [c for c in _block("Run a bundle on a device") if c.startswith("edgefleet run")]
    assert len(runs) == 2
    for cmd in runs:
        r = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "Traceback" not in r.stderr, cmd + r.stderr[-2000:]
    y = np.load(work / "y.npy")
    assert y.shape == (5, 10) and (y.argmax(1) == np.load(work / "eval.npz")["y"][:5]).mean() >= 0.6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_run_a_fleet_as_the_readme_prints_it(tmp_path: Path, mlp_bundles: dict, publisher) -> None:
    cmds = _block("Run a fleet")
    by_verb = {c.split()[2] if c.startswith("edgefleet fleet") else c.split()[1]: c for c in cmds}
    http, mqtt = _free_port(), _free_port()

    def typed(cmd: str) -> str:
        cmd = cmd.replace("--http-port 8080", f"--http-port {http}").replace("--mqtt-port 1883", f"--mqtt-port {mqtt}")
        return cmd.replace("digits:2.0.0", "mlp:2.0.0")

    work = tmp_path / "journey"
    (work / "keys").mkdir(parents=True)
    shutil.copy(publisher[2], work / "keys" / "release.pub")
    shutil.copy(mlp_bundles["2.0.0"], work / "digits-2.0.0.efb")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def sh(cmd: str, **extra: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", "-c", typed(cmd)], cwd=work, env={**env, **extra}, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert "Traceback" not in r.stderr, r.stderr
        return r

    log = open(tmp_path / "serve.log", "wb")
    serve = subprocess.Popen(["bash", "-c", "exec " + typed(by_verb["serve"])], cwd=work, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    agent = None
    try:
        token = None
        deadline = time.monotonic() + 60
        while token is None:
            r = sh(by_verb["token"])
            if r.returncode == 0 and r.stdout.strip().startswith("eft_"):
                token = r.stdout.strip()
            elif time.monotonic() > deadline:
                raise AssertionError(f"token create: {r.stderr}\n{(tmp_path / 'serve.log').read_text()[-2000:]}")
            else:
                time.sleep(0.5)
        client = {"EDGEFLEET_SERVER": f"http://127.0.0.1:{http}", "EDGEFLEET_TOKEN": token}

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as resp:
                    return resp.status == 200
            except OSError:
                return False

        _until(healthy, 60, "the server's /healthz")
        r = sh(by_verb["provision"], **client)
        assert r.returncode == 0, r.stderr
        assert "self_test_hz = 2.0" in (work / "cam-7" / "device.toml").read_text()
        agent_cmd = typed(by_verb["agent"]).rstrip("&").strip()
        agent = subprocess.Popen(["bash", "-c", "exec " + agent_cmd], cwd=work, env=env,
                                 stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)  # fmt: skip

        def devices() -> dict:
            r = sh("edgefleet fleet devices --json", **client)
            assert r.returncode == 0, r.stderr
            return {d["id"]: d for d in json.loads(r.stdout)}

        _until(lambda: devices().get("cam-7", {}).get("online"), 60, "cam-7 online")
        status = re.search(r"`(edgefleet agent status [^`]+)`", (ROOT / "README.md").read_text())
        assert status, "the README lost its agent status line"
        r = sh(status.group(1))
        assert r.returncode == 0 and "running (pid" in r.stdout, (r.stdout, r.stderr)
        r = sh(by_verb["publish"], **client)
        assert r.returncode == 0, r.stderr

        create = next(c for c in cmds if c.startswith("edgefleet fleet rollout create"))
        r = sh(create + " --json", **client)
        assert r.returncode == 0, r.stderr
        rid = json.loads(r.stdout)["id"]
        status_cmd = next(c for c in cmds if c.startswith("edgefleet fleet rollout status")).replace("ID", rid)

        def finished() -> str | None:
            r = sh(status_cmd, **client)
            assert r.returncode == 0, r.stderr
            m = re.match(r"rollout \S+: \S+ to '[^']*' - (\w+)", r.stdout)
            assert m, r.stdout
            return r.stdout if m.group(1) != "running" else None

        out = _until(finished, 420, f"rollout {rid} to finish")
        assert f"rollout {rid}" in out and "completed" in out, out
        _until(lambda: devices()["cam-7"]["bundle_version"] == "2.0.0", 30, "cam-7 on 2.0.0")

        # what the journey prints next works too: drift and alerts of the new bundle, a command, audited
        r = sh("edgefleet fleet drift --bundle mlp:2.0.0 --json", **client)
        assert r.returncode == 0 and json.loads(r.stdout)["samples"] > 0, r.stdout + r.stderr
        assert sh(by_verb["alerts"], **client).returncode == 0
        r = sh(by_verb["command"], **client)
        assert r.returncode == 0, r.stderr
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(30)
        serve.send_signal(signal.SIGTERM)
        serve.wait(60)
        log.close()


def _until(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")
