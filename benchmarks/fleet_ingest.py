"""Fleet ingest throughput: telemetry windows per second stored by one fleet server process (one and
two ingest workers), against Mosquitto's own delivery rate to `mosquitto_sub` for the same load, in
one run on this machine.

The load: K device connections publishing N telemetry windows (QoS 1, real device credentials through
the embedded broker's ACL). A run ends when the database holds all N windows (ingest) or when
`mosquitto_sub` has received N messages (the broker's own rate, on a plain broker).

Each receiver is measured two ways:
- live: the publishers run while the clock runs, on the same 2 cores as the broker and the receivers;
- backlog: the receivers are paused (SIGSTOP, their connections stay open) while all N windows go into
  the broker's queues, then resumed; the clock runs from the resume until the last window is stored.
  This is the server's own capacity (the broker still delivers on the same cores, but the load
  generator, which in a fleet runs on the devices, takes nothing from it), and it is what a server meets
  when devices come back after an outage of the server.

    .venv/bin/python benchmarks/fleet_ingest.py [--windows 90000] [--devices 20]

Writes benchmarks/results/fleet_ingest.json and benchmarks/results/fleet_ingest.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet import generate_keypair  # noqa: E402
from edgefleet.fleet._db import Database  # noqa: E402
from edgefleet.protocol import (  # noqa: E402
    LATENCY_EDGES_MS,
    WINDOW_SCHEMA,
    topic,
)
from tests._servers import Mosquitto, free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EXE = str(Path(sys.executable).parent / "edgefleet")
TARGETS = {"one": ">= 5,000 windows/s", "two": ">= 1.7x one worker"}


def window(device: str, i: int) -> bytes:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[25] = 60
    return json.dumps(
        {
            "schema": WINDOW_SCHEMA,
            "key": f"{device}:{i}:{os.urandom(4).hex()}",
            "device_id": device,
            "bundle": {"name": "digits", "version": "1.0.0", "model_id": "onnx-int8"},
            "backend": "onnxruntime",
            "accelerator": "CPUExecutionProvider",
            "fallbacks": [],
            "start": 1.8e9 + i * 60,
            "end": 1.8e9 + i * 60 + 60,
            "calls": 60,
            "samples": 60,
            "summarised": 60,
            "errors": {},
            "nan_outputs": 0,
            "latency_ms": {"counts": counts, "sum": 12.0, "max": 0.5},
            "inputs": {"channel_0_intensity": [400] * 10, "brightness": [6] * 10, "contrast": [6] * 10},
            "outputs": {"predicted_class": [6] * 10, "confidence": [6] * 11},
        },
        separators=(",", ":"),
    ).encode()


def publish(port: int, creds: dict[str, str], total: int, tmp: Path) -> float:
    """Publish TOTAL windows spread over the devices with mosquitto_pub (C, one process per device, so
    the load generator is not the bottleneck); returns the time the first one left."""
    per = total // len(creds)
    files = {}
    for dev in creds:
        f = tmp / f"load-{dev}.jsonl"
        f.write_bytes(b"\n".join(window(dev, i) for i in range(per)) + b"\n")
        files[dev] = f
    t0 = time.perf_counter()
    procs = []
    for dev, pw in creds.items():
        auth = ["-u", dev, "-P", pw] if pw else []
        with open(files[dev], "rb") as stdin:
            procs.append(
                subprocess.Popen(
                    [
                        "mosquitto_pub",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        str(port),
                        "-i",
                        f"load-{dev}",
                        *auth,
                        "-q",
                        "1",
                        "-l",
                        "-V",
                        "mqttv5",
                        "-t",
                        topic(dev, "telemetry"),
                    ],
                    stdin=stdin,
                )
            )
    for p in procs:
        p.wait(600)
    return t0


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tail(log: Any) -> str:
    """The end of a server log file still open for writing."""
    log.flush()
    return Path(log.name).read_text()[-800:]


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


def mosquitto_rate(tmp: Path, total: int, devices: int, backlog: bool) -> float:
    broker = Mosquitto(tmp / ("plain-backlog" if backlog else "plain"))
    try:
        sub = subprocess.Popen(
            [
                "mosquitto_sub",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-t",
                "edgefleet/v1/devices/+/+",
                "-C",
                str(total),
                "-V",
                "mqttv5",
            ],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        if backlog:
            _signal_all([sub.pid], signal.SIGSTOP)
        t0 = publish(broker.port, {f"plain-{i}": "" for i in range(devices)}, total, tmp)
        if backlog:
            t0 = time.perf_counter()
            _signal_all([sub.pid], signal.SIGCONT)
        sub.wait(300)
        return total / (time.perf_counter() - t0)
    finally:
        broker.stop()


def ingest_rate(tmp: Path, total: int, devices: int, workers: int, backlog: bool) -> dict[str, Any]:
    run = f"{workers}-{'backlog' if backlog else 'live'}"
    data = tmp / f"fleet-{run}"
    data.mkdir(parents=True)
    generate_keypair(tmp / f"key-{run}")
    http, mq = free_port(), free_port()
    log = open(tmp / f"server-{run}.log", "wb")
    server = subprocess.Popen(
        [
            EXE,
            "fleet",
            "serve",
            "--data-dir",
            str(data),
            "--http-port",
            str(http),
            "--mqtt-port",
            str(mq),
            "--trusted-key",
            str(tmp / f"key-{run}.pub"),
        ],
        stdout=log,
        stderr=log,
    )
    extra = []
    try:
        import urllib.request

        ready = False
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1)
                ready = True
                break
            except OSError:
                if server.poll() is not None:
                    break
                time.sleep(0.1)
        if not ready:
            raise RuntimeError(f"fleet server not ready (exit code {server.poll()}):\n{_tail(log)}")
        creds = {}
        for i in range(devices):
            dev = f"bench-{i:03d}"
            out = tmp / f"{dev}-{run}.toml"
            subprocess.run(
                [EXE, "fleet", "provision", dev, "--data-dir", str(data), "--out", str(out), "--mqtt-port", str(mq)],
                check=True,
                capture_output=True,
            )
            pw = next(ln for ln in out.read_text().splitlines() if ln.startswith("password"))
            creds[dev] = json.loads(pw.split("=", 1)[1])
        for w in range(workers - 1):
            extra.append(
                subprocess.Popen(
                    [EXE, "fleet", "ingest", "--data-dir", str(data), "--name", f"extra-{w}"],
                    stdout=log,
                    stderr=log,
                )
            )
        time.sleep(2.0)
        db = Database(f"sqlite:///{data / 'fleet.db'}")
        pidfile = data / "mosquitto" / "mosquitto.pid"
        if not pidfile.exists():
            raise RuntimeError(f"the embedded broker is not running (no {pidfile}):\n{_tail(log)}")
        broker_pid = int(pidfile.read_text())
        procs = {"ingest (server process)": server.pid, "broker": broker_pid}
        procs.update({f"ingest worker {i + 2}": p.pid for i, p in enumerate(extra)})
        receivers = [server.pid] + [p.pid for p in extra]
        if backlog:
            _signal_all(receivers, signal.SIGSTOP)
            publish(mq, creds, total, tmp)
        before = {k: _cpu_s(pid) for k, pid in procs.items()}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        if backlog:
            t0 = time.perf_counter()
            _signal_all(receivers, signal.SIGCONT)
        else:
            t0 = publish(mq, creds, total, tmp)
        after_pub = resource.getrusage(resource.RUSAGE_CHILDREN)
        while db.counters().get("ingest_stored", 0) < (total // devices) * devices:
            time.sleep(0.02)
        elapsed = time.perf_counter() - t0
        cpu = {k: round(_cpu_s(pid) - before[k], 2) for k, pid in procs.items()}
        if not backlog:
            cpu["load generator (mosquitto_pub)"] = round(
                after_pub.ru_utime + after_pub.ru_stime - children.ru_utime - children.ru_stime, 2
            )
        c = db.counters()
        return {
            "workers": workers,
            "mode": "backlog" if backlog else "live",
            "windows": c["ingest_stored"],
            "seconds": round(elapsed, 3),
            "windows_per_s": round(c["ingest_stored"] / elapsed, 1),
            "per_worker": {k: v for k, v in c.items() if k.startswith("ingest_worker_")},
            "cpu_s": cpu,
            "cpu_available_s": round(elapsed * (os.cpu_count() or 1), 2),
        }
    finally:
        _signal_all([p.pid for p in (server, *extra) if p.poll() is None], signal.SIGCONT)
        for p in extra:
            p.send_signal(signal.SIGTERM)
            p.wait(30)
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def _mode(tmp: Path, windows: int, devices: int, backlog: bool) -> dict[str, Any]:
    broker = mosquitto_rate(tmp, windows, devices, backlog)
    one = ingest_rate(tmp, windows, devices, 1, backlog)
    two = ingest_rate(tmp, windows, devices, 2, backlog)
    # CPU per stored window is not a constant (a busier worker writes bigger batches, and the first
    # worker's process also runs the HTTP server), so no bound is derived from the one-worker run.
    per_window = {
        label: 1e6 * sum(v for k, v in run["cpu_s"].items() if k.startswith("ingest")) / max(run["windows"], 1)
        for label, run in (("one", one), ("two", two))
    }
    return {
        "mosquitto_sub_msgs_per_s": round(broker, 1),
        "one_worker": one,
        "two_workers": two,
        "ratio_one_to_mosquitto": round(one["windows_per_s"] / broker, 3),
        "speedup_two_workers": round(two["windows_per_s"] / one["windows_per_s"], 3),
        "met": {"one": one["windows_per_s"] >= 5000, "two": two["windows_per_s"] >= 1.7 * one["windows_per_s"]},
        "ingest_cpu_us_per_window": {k: round(v, 1) for k, v in per_window.items()},
        "others_cores_two_workers": round(
            sum(v for k, v in two["cpu_s"].items() if not k.startswith("ingest")) / two["seconds"], 2
        ),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=90000)
    ap.add_argument("--devices", type=int, default=20)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        modes = {m: _mode(tmp, args.windows, args.devices, m == "backlog") for m in ("backlog", "live")}
    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores; publishers, broker and server on the same machine",
        "windows": args.windows,
        "devices": args.devices,
        "targets": TARGETS,
        # The targets are about the server: judged on the backlog figures, where the load generator
        # (devices, in a fleet) takes no CPU from it; the live figures are shown beside them.
        "met": modes["backlog"]["met"],
        **modes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fleet_ingest.json").write_text(json.dumps(result, indent=1) + "\n")
    cores = os.cpu_count() or 1
    md = [
        "# Fleet ingest",
        "",
        f"Machine: {result['machine']}. {args.windows} telemetry windows from {args.devices} device "
        "connections, QoS 1. *Backlog*: the receivers are paused while every window goes into the broker, "
        "and timed from their resume to the last window stored (the server's own capacity; the targets are "
        "judged on it). *Live*: timed while the publishers run on the same 2 cores.",
        "",
        "| receiver | backlog windows/s | vs mosquitto_sub | live windows/s | vs mosquitto_sub | target | met |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    b, lv = modes["backlog"], modes["live"]
    md.append(
        f"| mosquitto_sub on a plain Mosquitto (the broker's own rate) | {b['mosquitto_sub_msgs_per_s']:,.0f} | 1.00 "
        f"| {lv['mosquitto_sub_msgs_per_s']:,.0f} | 1.00 | | |"
    )
    for n, key, tkey in ((1, "one_worker", "one"), (2, "two_workers", "two")):
        cells = []
        for m in (b, lv):
            rate = m[key]["windows_per_s"]
            cells.append(f"{rate:,.0f} | {rate / m['mosquitto_sub_msgs_per_s']:.2f}")
        target = TARGETS[tkey]
        if n == 2:
            target += f" (backlog {b['speedup_two_workers']:.2f}x, live {lv['speedup_two_workers']:.2f}x)"
        md.append(
            f"| fleet server, {n} ingest worker{'s' if n > 1 else ''} (SQLite) | {' | '.join(cells)} | {target} "
            f"| {'yes' if b['met'][tkey] else 'NO'} |"
        )
    md += ["", "CPU seconds spent while the windows went in (all on the same cores):", ""]
    cols = list(lv["two_workers"]["cpu_s"])
    md += ["| run | " + " | ".join(cols) + " | available |", "|---|" + "---:|" * (len(cols) + 1)]
    for mode, m in (("backlog", b), ("live", lv)):
        for label, run in (("1 worker", m["one_worker"]), ("2 workers", m["two_workers"])):
            cells = [f"{run['cpu_s'][k]:.1f}" if k in run["cpu_s"] else "-" for k in cols]
            md.append(f"| {mode}, {label} | " + " | ".join(cells) + f" | {run['cpu_available_s']:.1f} |")
    md += [
        "",
        f"Ingest CPU per stored window: backlog {b['ingest_cpu_us_per_window']['one']:.0f} us with one worker, "
        f"{b['ingest_cpu_us_per_window']['two']:.0f} us with two; live {lv['ingest_cpu_us_per_window']['one']:.0f} "
        f"and {lv['ingest_cpu_us_per_window']['two']:.0f} us. Beside two workers the broker took "
        f"{b['others_cores_two_workers']:.2f} of the {cores} cores in the backlog run; in the live run the broker "
        f"and the load generator took {lv['others_cores_two_workers']:.2f}. The workers share what is left, so the "
        "live two-worker figure moves with that share from run to run. On separate machines the workers "
        "(separate processes on one shared subscription) do not compete for cores.",
    ]
    (RESULTS / "fleet_ingest.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
