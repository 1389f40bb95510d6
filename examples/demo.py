"""The whole edgefleet loop on one machine, on embedded defaults (`make demo`):

1. build the digits bundles: v1 (teacher -> distilled student -> pruned -> int8, signed), v2 (retrained
   on more data) and a deliberately bad v3 (right predictions, but a leftover debugging branch makes it
   tens of times slower: only the devices' health windows can see that);
2. start the fleet server (embedded Mosquitto, SQLite) and publish the three bundles;
3. start simulated devices running the real runtime and agent on v1; their apps feed the true label of
   every prediction back, and their owners opted in to data capture;
4. roll out v2 in canary stages to completion;
5. roll out v3: its first stage breaks the gates, the rollout rolls back by itself and the devices
   that took v3 return to v2;
6. shift the inputs of one cohort: the fleet flags data and prediction drift and the accuracy the labels
   show falls; the drift alert fires a capture that was armed for it;
7. the capture: the cohort's labelled samples, exported as a dataset;
8. retrain v4 on the original data plus the captured samples;
9. run v4 in shadow beside v2 on that cohort: it disagrees where v2 is wrong, as the labels show;
10. roll v4 out to the cohort after the shadow, gated on accuracy against the cohort's control;
11. the cohort's accuracy recovers and its drift alerts close;
12. print what happened, with the figures, and the dashboard URL.

    python -m examples.demo [--devices 50] [--keep-running] [--out build/demo]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

from edgefleet import EdgefleetError

from . import _demo_loop as loop
from ._common import run, signing_key
from ._demo_fleet import (
    SELECTOR,
    Api,
    DemoFailed,
    FleetProcess,
    Story,
    free_port,
    laggards,
    rollout,
    stderr_to,
    versions,
    wait,
)


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
        with stderr_to(log):
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
    # Every run starts from an empty fleet; the bundles v1-v3 and the keys are kept, v4 is retrained.
    for d in ("fleet", "devices", "v4"):
        shutil.rmtree(out / d, ignore_errors=True)
    (out / "server.log").unlink(missing_ok=True)
    server = FleetProcess(
        out / "fleet", free_port(args.http_port), Path(f"{built['key']}.pub"), drift_window=args.drift_window
    )
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
            # The apps learn the true digit of every prediction and feed it back; every call is kept as a
            # capturable sample (the rate limit is twice the call rate), uploaded only when the fleet asks.
            feedback=1.0,
            capture_per_hour=7200 * args.rate,
            capture_upload=True,
        )
        t0 = time.monotonic()
        sim.start()
        wait(
            f"{args.devices} devices online on v1",
            lambda: versions(api).get("1.0.0", 0) == args.devices,
            120,
            detail=lambda: f"online devices per version {versions(api)}",
        )
        story.say(
            s,
            f"{args.devices} devices online on digits 1.0.0 after {time.monotonic() - t0:.1f} s, each predicting "
            f"{args.rate:g} held-out digits a second and feeding the true label back (cohorts cohort-0 and "
            "cohort-1)",
            devices=args.devices,
        )

        gates = {"min_stage_s": args.stage_s}
        s = story.step("Roll out v2 in canary stages")
        st = rollout(api, story, s, "digits:2.0.0", gates, 600)
        # The registry follows the devices' state messages, which may trail the events the rollout counts.
        try:
            wait("every device on v2", lambda: versions(api).get("2.0.0") == args.devices, 20)
        except DemoFailed:
            pass
        counts = versions(api)
        story.say(
            s,
            f"rollout {st['state']} in {st['duration_s']:.0f} s; devices now {counts}",
            v2_state=st["state"],
            v2_duration_s=st["duration_s"],
            v2_gates=[x.get("gates") for x in st["stages"]],
        )
        if st["state"] != "completed" or counts.get("2.0.0") != args.devices:
            raise DemoFailed(f"the v2 rollout ended {st['state']} with devices {counts}: {laggards(api, '2.0.0')}")

        s = story.step("Roll out the bad v3: its first stage breaks the gates")
        st = rollout(api, story, s, "digits:3.0.0", gates, 600)
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
        counts = wait(
            "every device back on v2",
            lambda: (lambda c: c if c.get("2.0.0") == args.devices else None)(versions(api)),
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

        shifted = loop.drift_and_capture(api, story, sim, args, server.url)
        captured = loop.collect(api, story, args, shifted, out)
        loop.retrain(api, story, args, built, captured)
        sid = loop.shadow(api, story, args)
        loop.roll_out_and_recover(api, story, args, sid, gates)

        s = story.step("Summary")
        path = story.save({"dashboard": server.url, "token": server.token})
        story.say(s, f"all steps passed in {story.elapsed():.0f} s; the story with its figures: {path}")
        story.say(s, f"dashboard: {server.url}/  token: {server.token}")
        story.say(
            s,
            f"try (with --keep-running): export EDGEFLEET_SERVER={server.url} EDGEFLEET_TOKEN={server.token}; "
            "edgefleet fleet devices; edgefleet fleet rollout list; edgefleet fleet alerts --state all; "
            "edgefleet fleet shadow list; edgefleet fleet capture list",
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
    ap.add_argument("--shift", type=float, default=0.35, help="brightness shift of the drifting cohort")
    ap.add_argument("--capture", type=int, default=60, help="samples each device of that cohort is asked for")
    ap.add_argument("--shadow-s", type=float, default=20.0, help="how long v4 runs in shadow")
    ap.add_argument("--drift-window", type=float, default=60.0, help="the drift monitor's look-back (s)")
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
