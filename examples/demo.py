"""The whole edgefleet loop on one machine, on embedded defaults (`make demo`):

1. build the digits bundles: v1 (teacher -> distilled student -> pruned -> int8, signed), v2 (retrained
   on more data) and a deliberately bad v3 (right predictions, but a leftover debugging branch makes it
   tens of times slower: only the devices' health windows can see that);
2. start the fleet server (embedded Mosquitto, SQLite) and publish the three bundles;
3. start simulated devices running the real runtime and agent on v1;
4. shift the input distribution on one cohort: the fleet flags drift on the affected features;
5. roll out v2 in canary stages to completion;
6. roll out v3: its first stage breaks the gates, the rollout rolls back by itself and the devices
   that took v3 return to v2;
7. print what happened, with the figures, and the dashboard URL.

    python -m examples.demo [--devices 50] [--keep-running] [--out build/demo]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from edgefleet import EdgefleetError

from ._common import run, signing_key

SELECTOR = "demo"
DRIFT_COHORT = "cohort-1"


class DemoFailed(EdgefleetError):
    """A step of the scenario did not turn out as it must."""


def _free_port(preferred: int | None = None) -> int:
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
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Content-Type", "application/octet-stream" if raw is not None else "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise DemoFailed(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc


def _wait(
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
def _stderr_to(path: Path) -> Iterator[None]:
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


def _reusable(out: Path, key: Path) -> dict[str, Any] | None:
    """The bundles of an earlier run, if all three are there, verify and have their reports."""
    from edgefleet import open_bundle

    found: dict[str, Any] = {}
    for label, version in (("v1", "1.0.0"), ("v2", "2.0.0"), ("v3", "3.0.0")):
        path = out / label / f"digits-{version}.efb"
        report = out / label / f"digits-{version}.report.json"
        if not (path.is_file() and report.is_file() and Path(f"{key}.pub").is_file()):
            return None
        try:
            open_bundle(path, [Path(f"{key}.pub")])
        except EdgefleetError:
            return None
        found[label] = (path, version, json.loads(report.read_text()))
    if not (out / "v1" / "data" / "eval.npz").is_file():
        return None
    return found


def build_bundles(out: Path, epochs: int, story: Story, rebuild: bool) -> dict[str, Any]:
    from .digits.build import build_digits, build_regressed

    s = story.step("Build the digits bundles (teacher -> distilled student -> pruned -> int8, signed)")
    key_path = out / "keys" / "release.key"
    key = signing_key(key_path)
    found = None if rebuild else _reusable(out, key_path)
    if found is not None:
        story.say(s, f"reusing the bundles built by an earlier run in {out} (--rebuild builds them again)")
    else:
        log = out / "build.log"
        story.say(s, f"training and converting; the frameworks' logs go to {log}")
        with _stderr_to(log):
            # v1 learns from 40% of the data; v2 is retrained on 70% (the rest: calibration and held-out eval).
            v1, _, _ = build_digits(out / "v1", key, "1.0.0", 0.4, epochs, echo_table=False)
            v2, teacher2, data2 = build_digits(out / "v2", key, "2.0.0", 0.7, epochs, echo_table=False)
            v3 = build_regressed(out / "v3", key, teacher2, data2, "3.0.0")
        found = {k: (r.path, r.manifest.version, r.report) for k, r in (("v1", v1), ("v2", v2), ("v3", v3))}
    figures = {}
    for label, (path, version, rep) in found.items():
        arts = rep["artifacts"]
        best = {a["format"]: a for a in arts}
        fmt = "onnx"
        a = best[fmt]
        figures[label] = {
            "bundle": str(path),
            "bundle_bytes": rep["bundle"]["size_bytes"],
            "teacher_bytes": rep["source"]["size_bytes"],
            "teacher_accuracy": rep["source"]["accuracy"],
            "accuracy": a.get("accuracy"),
            "precision": a.get("precision"),
            "onnx_bytes": a.get("size_bytes"),
            "p50_ms": a.get("latency_ms_p50"),
            "evaluated_on": rep["evaluated_on"]["samples"],
        }
        f = figures[label]
        if label == "v3":
            slower = f["p50_ms"] / max(figures["v2"]["p50_ms"], 1e-9)
            story.say(
                s,
                f"v3 {version}: fp32 ONNX {f['onnx_bytes'] / 1024:.0f} KiB, accuracy {f['accuracy']:.4f} "
                f"(passes the build checks), p50 {f['p50_ms']:.3f} ms: {slower:.0f}x slower than v2",
            )
            continue
        story.say(
            s,
            f"{label} {version}: {f['precision']} ONNX {f['onnx_bytes'] / 1024:.0f} KiB "
            f"(teacher {f['teacher_bytes'] / 1024:.0f} KiB), accuracy {f['accuracy']:.4f} "
            f"(teacher {f['teacher_accuracy']:.4f}) on {f['evaluated_on']} held-out digits, "
            f"p50 {f['p50_ms']:.3f} ms",
        )
    story.say(s, f"signed with {out / 'keys' / 'release.key'}; reports beside the bundles", bundles=figures)
    return {"key": key_path, **{k: v[0] for k, v in found.items()}, "inputs": out / "v1" / "data" / "eval.npz"}


class FleetProcess:
    """`edgefleet fleet serve` as an operator starts it, in its own process."""

    def __init__(self, data: Path, http_port: int, trusted_key: Path) -> None:
        self.data = data
        self.http = http_port
        self.mqtt = _free_port(1883)
        self.url = f"http://127.0.0.1:{self.http}"
        self.log = open(data.parent / "server.log", "ab")
        exe = Path(sys.executable).parent / "edgefleet"
        self.proc = subprocess.Popen(
            [
                *(str(exe), "fleet", "serve", "--data-dir", str(data), "--http-port", str(self.http)),
                *("--mqtt-port", str(self.mqtt), "--trusted-key", str(trusted_key)),
                # Drift alerts checked every few seconds over the last minute: the demo is short.
                *("--drift-interval", "3", "--drift-window", "60"),
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

        _wait("the fleet server's /healthz", healthy, 90, 0.3)
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


def _versions(api: Api) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in api("GET", "/api/devices"):
        if d["online"]:
            v = d["bundle_version"] or "-"
            counts[v] = counts.get(v, 0) + 1
    return counts


def _laggards(api: Api, version: str) -> str:
    """Why devices are not on VERSION: each one's newest update event, for the error message."""
    out = []
    for d in api("GET", "/api/devices"):
        if d["bundle_version"] != version:
            evs = api("GET", f"/api/devices/{d['id']}/events")[:1]
            last = f"{evs[0]['type']} {evs[0]['body'].get('reason', '')}".strip() if evs else "no events"
            out.append(f"{d['id']} on {d['bundle_version']} ({last})")
    return "; ".join(out)


def _rollout(api: Api, story: Story, s: dict[str, Any], bundle: str, gates: dict[str, float], timeout: float) -> Any:
    r = api("POST", "/api/rollouts", {"bundle": bundle, "selector": SELECTOR, "stages": [10, 50, 100], "gates": gates})
    rid = r["id"]
    story.say(s, f"rollout {rid}: {bundle} to '{SELECTOR}' in stages 10% -> 50% -> 100%")
    seen: set[str] = set()

    def done() -> Any:
        st = api("GET", f"/api/rollouts/{rid}")
        for h in st.get("history", []):
            if h["note"] not in seen:
                seen.add(h["note"])
                story.say(s, f"  t+{story.elapsed():.0f} s: {h['note']}")
        return st if st["state"] not in ("running",) else None

    t0 = time.monotonic()
    st = _wait(f"rollout {rid} of {bundle} to finish", done, timeout)
    st["duration_s"] = round(time.monotonic() - t0, 1)
    return st


def scenario(args: argparse.Namespace) -> int:
    from edgefleet.fleet._simulate import Simulation

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # The simulated devices log every transition; the console keeps the story, the file the detail.
    logging.basicConfig(
        filename=out / "devices.log", filemode="w", level=logging.INFO, format="%(asctime)s %(name)s %(message)s"
    )
    story = Story(out)
    built = build_bundles(out, args.epochs, story, args.rebuild)

    s = story.step("Start the fleet server (embedded Mosquitto with per-device ACLs, SQLite)")
    # Every run starts from an empty fleet; the bundles and keys above are kept.
    for d in ("fleet", "devices"):
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "server.log").unlink(missing_ok=True)
    server = FleetProcess(out / "fleet", _free_port(args.http_port), Path(f"{built['key']}.pub"))
    api = Api(server.url, server.token)
    sim: Simulation | None = None
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        story.say(s, f"dashboard {server.url}/  (sign in with the token below), MQTT on 127.0.0.1:{server.mqtt}")
        for v in ("v1", "v2", "v3"):
            ref = api("PUT", "/api/bundles", raw=Path(built[v]).read_bytes())
            story.say(s, f"published {ref['name']} {ref['version']} ({ref['size'] / 1024:.0f} KiB), signature checked")

        s = story.step(f"Start {args.devices} simulated devices: real agents, real MQTT, real runtime on v1")
        sim = Simulation(
            server=server.url,
            token=server.token,
            devices=args.devices,
            bundle="digits:1.0.0",
            tags=[SELECTOR],
            rate_hz=args.rate,
            prefix="dev",
            workdir=out / "devices",
            inputs=built["inputs"],
        )
        t0 = time.monotonic()
        sim.start()
        _wait(
            f"{args.devices} devices online on v1",
            lambda: _versions(api).get("1.0.0", 0) == args.devices,
            120,
            detail=lambda: f"online devices per version {_versions(api)}",
        )
        story.say(
            s,
            f"{args.devices} devices online on digits 1.0.0 after {time.monotonic() - t0:.1f} s, each predicting "
            f"{args.rate:g} held-out digits a second (cohorts cohort-0 and cohort-1)",
            devices=args.devices,
        )

        s = story.step(f"Shift the inputs of {DRIFT_COHORT} (+{args.shift} brightness): the fleet flags drift")
        since = time.time()
        sim.drift[DRIFT_COHORT] = args.shift

        def report(tag: str) -> dict[str, Any]:
            q = f"/api/drift?bundle={quote('digits:1.0.0')}&tag={tag}&since={since}"
            return dict(api("GET", q))

        def flagged() -> Any:
            rep = report(DRIFT_COHORT)
            enough = min((f["samples"] for k, f in rep["features"].items() if not k.startswith("output")), default=0)
            return rep if enough >= 300 and rep["drifted"] else None

        rep = _wait("drift to be flagged on the shifted cohort", flagged, 90)
        calm = report("cohort-0")
        top = sorted(rep["drifted"], key=lambda k: -(rep["features"][k]["psi"] or 0))
        for k in top[:5]:
            f = rep["features"][k]
            story.say(s, f"{DRIFT_COHORT} {k}: PSI {f['psi']:.3f}, JS {f['js']:.3f}, KS {f['ks']:.3f} -> drifted")
        story.say(
            s,
            f"{len(rep['drifted'])} feature(s) drifted on {DRIFT_COHORT} ({rep['samples']} samples); cohort-0: "
            f"{len(calm['drifted'])} drifted, max PSI {max((f['psi'] or 0) for f in calm['features'].values()):.3f}",
            drifted=rep["drifted"],
            drifted_control=calm["drifted"],
        )
        alerts = _wait(
            "the drift alert to be recorded",
            lambda: [a for a in api("GET", "/api/alerts?state=open") if a["cohort"] == DRIFT_COHORT],
            60,
        )
        req = urllib.request.Request(server.url + "/", headers={"Cookie": f"edgefleet_token={server.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            overview = r.read().decode()
        req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {server.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            metrics = r.read().decode()
        shown = overview.count(f"<td>{DRIFT_COHORT}</td>")
        exported = metrics.count(f'cohort="{DRIFT_COHORT}"')
        story.say(
            s,
            f"{len(alerts)} open drift alert(s) on {DRIFT_COHORT} recorded; {shown} on the dashboard overview, "
            f"{exported} series in /metrics",
            alerts=len(alerts),
            alerts_on_dashboard=shown,
        )
        if not shown:
            raise DemoFailed("the dashboard overview does not show the drift alerts")
        if calm["drifted"]:
            raise DemoFailed(f"the unshifted cohort was flagged too: {calm['drifted']}")
        # The camera is fixed: the rollouts below compare canaries with a control cohort on equal inputs.
        sim.drift.clear()
        story.say(s, f"{DRIFT_COHORT}'s inputs are back to normal; dashboard: {server.url}/drift?bundle=digits:1.0.0")

        gates = {"min_stage_s": args.stage_s}
        s = story.step("Roll out v2 in canary stages")
        st = _rollout(api, story, s, "digits:2.0.0", gates, 600)
        # The registry follows the devices' state messages, which may trail the events the rollout counts.
        try:
            _wait("every device on v2", lambda: _versions(api).get("2.0.0") == args.devices, 20)
        except DemoFailed:
            pass
        counts = _versions(api)
        story.say(
            s,
            f"rollout {st['state']} in {st['duration_s']:.0f} s; devices now {counts}",
            v2_state=st["state"],
            v2_duration_s=st["duration_s"],
            v2_gates=[x.get("gates") for x in st["stages"]],
        )
        if st["state"] != "completed" or counts.get("2.0.0") != args.devices:
            raise DemoFailed(f"the v2 rollout ended {st['state']} with devices {counts}: {_laggards(api, '2.0.0')}")

        s = story.step("Roll out the bad v3: its first stage breaks the gates")
        st = _rollout(api, story, s, "digits:3.0.0", gates, 600)
        first = st["stages"][0]
        failed = (first.get("gates") or {}).get("failed_gates", [])
        story.say(s, f"rollout {st['state']} after {st['duration_s']:.0f} s; failed gates: {'; '.join(failed)}")
        events = [
            e
            for d in api("GET", "/api/devices")
            for e in api("GET", f"/api/devices/{d['id']}/events")
            if e["type"] == "rolled_back" and e["body"].get("rollout") == st["id"]
        ]
        for e in events[:3]:
            story.say(s, f"  {e['device_id']} rolled back by itself: {e['body'].get('reason', '')}")
        counts = _wait(
            "every device back on v2",
            lambda: (lambda c: c if c.get("2.0.0") == args.devices else None)(_versions(api)),
            120,
        )
        story.say(
            s,
            f"{first['assigned']} device(s) took v3, {len(events)} rolled back on their own health window; "
            f"devices now {counts}",
            v3_state=st["state"],
            v3_failed_gates=failed,
            v3_self_rollbacks=len(events),
        )
        if st["state"] != "rolled_back":
            raise DemoFailed(f"the v3 rollout ended {st['state']}, not rolled_back")

        s = story.step("Summary")
        path = story.save({"dashboard": server.url, "token": server.token})
        story.say(s, f"all steps passed in {story.elapsed():.0f} s; the story with its figures: {path}")
        story.say(s, f"dashboard: {server.url}/  token: {server.token}")
        story.say(
            s,
            f"try (with --keep-running): export EDGEFLEET_SERVER={server.url} EDGEFLEET_TOKEN={server.token}; "
            "edgefleet fleet devices; edgefleet fleet rollout list; edgefleet fleet alerts --state all",
        )
        if args.keep_running:
            print(f"\neverything stays up for browsing at {server.url}/ - Ctrl-C stops it all", flush=True)
            try:
                stop.wait()
            except KeyboardInterrupt:
                print("\nstopping ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 130
    finally:
        if sim is not None:
            sim.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("build/demo"))
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of teacher and student")
    ap.add_argument("--rate", type=float, default=3.0, help="predictions per second per device")
    ap.add_argument("--shift", type=float, default=0.3, help="brightness shift of the drifting cohort")
    ap.add_argument("--stage-s", type=float, default=10.0, help="minimum time a rollout stage is watched")
    ap.add_argument("--http-port", type=int, default=8080, help="dashboard port (another free one if taken)")
    ap.add_argument("--rebuild", action="store_true", help="build the bundles even if an earlier run left them")
    ap.add_argument("--keep-running", action="store_true", help="leave server and devices up; Ctrl-C stops")
    args = ap.parse_args(argv)
    if args.devices < 10:
        raise DemoFailed("--devices must be at least 10 (a 10% first stage needs a device)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return scenario(args)


if __name__ == "__main__":
    run(main)
