"""What the demo's steps share: the fleet server as an operator starts it, its REST API, waiting with a
reason, and the story the demo tells with its figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgefleet import EdgefleetError

SELECTOR = "demo"
DRIFT_COHORT = "cohort-1"
CONTROL_COHORT = "cohort-0"


class DemoFailed(EdgefleetError):
    """A step of the scenario did not turn out as it must."""


def free_port(preferred: int | None = None) -> int:
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as s:
            # As the servers bind: a port left in TIME_WAIT by an earlier run is free for them.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DemoFailed("no free TCP port on 127.0.0.1")


class Api:
    """The REST API as `edgefleet fleet ...` uses it."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token

    def __call__(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> Any:
        return json.loads(self.fetch(method, path, body, raw))

    def fetch(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> bytes:
        """The response's bytes (a dataset export is an .npz, not JSON)."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Cookie", f"edgefleet_token={self.token}")  # the dashboard's pages sign in by cookie
        req.add_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return bytes(r.read())
        except urllib.error.HTTPError as exc:
            raise DemoFailed(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc


def wait(
    what: str, check: Callable[[], Any], timeout: float, every: float = 1.0, detail: Callable[[], Any] | None = None
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DemoFailed(
                f"timed out after {timeout:.0f} s waiting for {what}" + (f": {detail()}" if detail else "")
            )
        time.sleep(every)


class Story:
    """What happened, step by step, with figures; printed as it goes and as the closing summary."""

    def __init__(self, out: Path) -> None:
        self.t0 = time.monotonic()
        self.steps: list[dict[str, Any]] = []
        self.out = out

    def step(self, title: str) -> dict[str, Any]:
        s: dict[str, Any] = {"step": len(self.steps) + 1, "title": title, "start_s": round(self.elapsed(), 1)}
        self.steps.append(s)
        print(f"\n== {s['step']}. {title}  (t+{s['start_s']:.0f} s)", flush=True)
        return s

    def say(self, s: dict[str, Any], line: str, **figures: Any) -> None:
        s.setdefault("lines", []).append(line)
        s.update(figures)
        print("   " + line, flush=True)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def save(self, extra: dict[str, Any]) -> Path:
        path = self.out / "summary.json"
        path.write_text(json.dumps({"steps": self.steps, **extra, "total_s": round(self.elapsed(), 1)}, indent=1))
        return path


@contextlib.contextmanager
def stderr_to(path: Path) -> Iterator[None]:
    """Send fd 2 to PATH: the frameworks' C++ logging bypasses Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


class FleetProcess:
    """`edgefleet fleet serve` as an operator starts it, in its own process."""

    def __init__(self, data: Path, http_port: int, trusted_key: Path, drift_window: float = 60.0) -> None:
        self.data = data
        self.http = http_port
        self.mqtt = free_port(1883)
        self.url = f"http://127.0.0.1:{self.http}"
        self.log = open(data.parent / "server.log", "ab")
        exe = Path(sys.executable).parent / "edgefleet"
        self.proc = subprocess.Popen(
            [
                *(str(exe), "fleet", "serve", "--data-dir", str(data), "--http-port", str(self.http)),
                *("--mqtt-port", str(self.mqtt), "--trusted-key", str(trusted_key)),
                # Drift alerts checked every few seconds over the last minute: the demo is short.
                *("--drift-interval", "3", "--drift-window", f"{drift_window:g}"),
            ],
            stdout=self.log,
            stderr=self.log,
            start_new_session=True,  # Ctrl-C reaches the demo only; it stops the server in order
        )

        def healthy() -> bool:
            if self.proc.poll() is not None:
                tail = (data.parent / "server.log").read_text(errors="replace")[-2000:]
                raise DemoFailed(f"the fleet server exited ({self.proc.returncode}):\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False

        wait("the fleet server's /healthz", healthy, 90, 0.3)
        r = subprocess.run(
            [str(exe), "fleet", "token", "create", "--data-dir", str(data)], capture_output=True, text=True
        )
        if r.returncode:
            raise DemoFailed(f"token create failed: {r.stderr.strip()}")
        self.token = r.stdout.strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def versions(api: Api) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in api("GET", "/api/devices"):
        if d["online"]:
            v = d["bundle_version"] or "-"
            counts[v] = counts.get(v, 0) + 1
    return counts


def laggards(api: Api, version: str) -> str:
    """Why devices are not on VERSION: each one's newest update event, for the error message."""
    out = []
    for d in api("GET", "/api/devices"):
        if d["bundle_version"] != version:
            evs = api("GET", f"/api/devices/{d['id']}/events")[:1]
            last = f"{evs[0]['type']} {evs[0]['body'].get('reason', '')}".strip() if evs else "no events"
            out.append(f"{d['id']} on {d['bundle_version']} ({last})")
    return "; ".join(out)


def rollout(
    api: Api,
    story: Story,
    s: dict[str, Any],
    bundle: str,
    gates: dict[str, float],
    timeout: float,
    selector: str = SELECTOR,
    **extra: Any,
) -> Any:
    """Create a three-stage rollout (EXTRA: more of the API's body, e.g. after_shadow), narrate its history
    as it goes, and return its final status with `duration_s`."""
    body = {"bundle": bundle, "selector": selector, "stages": [10, 50, 100], "gates": gates, **extra}
    r = api("POST", "/api/rollouts", body)
    rid = r["id"]
    story.say(s, f"rollout {rid}: {bundle} to '{selector}' in stages 10% -> 50% -> 100%")
    seen: set[str] = set()

    def done() -> Any:
        st = api("GET", f"/api/rollouts/{rid}")
        for h in st.get("history", []):
            if h["note"] not in seen:
                seen.add(h["note"])
                story.say(s, f"  t+{story.elapsed():.0f} s: {h['note']}")
        return st if st["state"] not in ("running",) else None

    t0 = time.monotonic()
    st = wait(f"rollout {rid} of {bundle} to finish", done, timeout)
    st["duration_s"] = round(time.monotonic() - t0, 1)
    return st
