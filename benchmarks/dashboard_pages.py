"""Dashboard pages at fleet size (issue 16: "pages render in under a second with 1,000 devices and 100,000
windows"): every page through the real app (FastAPI, Jinja templates, server-drawn charts), signed in, on a
database the ingest's real write path filled (benchmarks/fleet_scale.py's `Fleet`: 10% of the devices on a
canary version, ten site tags), plus a shadow's progress events, update outcome events and the
housekeeper's device counts, so every chart has data. p50 / p95 of repeated requests.

    .venv/bin/python benchmarks/dashboard_pages.py [--sizes 1000:100,10000:10] [--db sqlite|postgresql]

Writes benchmarks/results/dashboard_pages.json and benchmarks/results/dashboard_pages.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.fleet_scale import RESULTS, Fleet, mlp_manifests, timed  # noqa: E402

TARGET_MS = 1000.0


def _extras(fleet: Fleet) -> str:
    """A finished shadow with a progress event per device and minute of its hour, update outcome events, and
    a device count per minute: what the shadows page and the overview's charts read. Returns the shadow id."""
    sid = "s-bench"
    canary = sorted(fleet.canary)
    start = fleet.t_end - 3600
    lat = [0] * 62
    lat[24] = 30
    with fleet.db.transaction() as cur:
        cur.execute(
            "INSERT INTO shadows (id, bundle_name, bundle_version, selector, sample_rate, duration_s, min_samples, "
            "state, created, ends, devices) VALUES (?, ?, '2.0.0', 'fleet', 0.1, 3600, 0, 'completed', ?, ?, ?)",
            (sid, fleet.m["2.0.0"].name, start, fleet.t_end, json.dumps(canary)),
        )
        n = 0
        for d in canary:
            for minute in range(0, 60, 5):
                body = {
                    "schema": "edgefleet.event/1", "key": f"{d}:ev:p{minute}", "device_id": d,
                    "type": "shadow_progress", "ts": start + 60 * minute, "command_id": sid,
                    "candidate": {"name": fleet.m["2.0.0"].name, "version": "2.0.0"}, "start": start,
                    "end": start + 60 * minute, "samples": 30, "agree": 28, "labelled": 0, "active_correct": 0,
                    "candidate_correct": 0, "dropped": 0, "candidate_errors": 0, "active_classes": [15, 15],
                    "candidate_classes": [14, 16], "active_latency_ms": lat, "candidate_latency_ms": lat,
                }  # fmt: skip
                cur.execute(
                    "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, 'shadow_progress', ?, ?)",
                    (body["key"], d, body["ts"], json.dumps(body)),
                )
                n += 1
            cur.execute(
                "INSERT INTO events (key, device_id, type, ts, body) VALUES (?, ?, 'committed', ?, '{}')",
                (f"{d}:ev:c", d, start + 120.0),
            )
        for minute in range(fleet.minutes):
            b = fleet.t0 + 60 * minute
            cur.execute(
                "INSERT INTO device_counts (bucket, online, registered) VALUES (?, ?, ?) ON CONFLICT (bucket) "
                "DO NOTHING",
                (b, len(fleet.devices) - minute % 7, len(fleet.devices)),
            )
    return sid


def measure(fleet: Fleet, server: Any, tmp: Path, reps: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from edgefleet.fleet._auth import create_token
    from edgefleet.fleet._http import create_app

    token = create_token(tmp / "server", "bench", fleet.db.url)
    client = TestClient(create_app(server))
    client.cookies.set("edgefleet_token", token)
    name = fleet.m["1.0.0"].name
    dev = fleet.devices[len(fleet.devices) // 2]
    pages = {
        "overview (6 h)": "/?hours=6",
        "overview (7 d)": "/?hours=168",
        "devices, page 1": "/devices",
        "devices, page 10": "/devices?page_no=10",
        "devices, search + filter": "/devices?q=00012&tag=site-3&online=no",
        "device page": f"/devices/{dev}",
        "rollouts": "/rollouts",
        "shadows": "/shadows",
        "drift (all devices)": f"/drift?bundle={name}:1.0.0",
        "drift (cohort vs cohort)": f"/drift?bundle={name}:1.0.0&tag=site-3&against=site-4",
        "metrics": "/metrics",
    }
    out = {}
    for label, path in pages.items():
        r = client.get(path, headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code, r.text[:300])
        out[label] = {"path": path, "bytes": len(r.content), **timed(lambda p=path: client.get(p), reps)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000:100,10000:10", help="DEVICES:MINUTES,... (a window each a minute)")
    ap.add_argument("--db", default="sqlite", choices=["sqlite", "postgresql"])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in part.split(":")) for part in args.sizes.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        manifests = mlp_manifests(tmp)
        pg = None
        try:
            for devices, minutes in sizes:
                if args.db == "sqlite":
                    url = f"sqlite:///{tmp / f'fleet-{devices}.db'}"
                else:
                    from tests.conftest import Postgres

                    pg = pg or Postgres()
                    url = pg.fresh_database()
                from edgefleet.fleet import FleetServer, ServerConfig

                fleet = Fleet(url, manifests, devices, minutes)
                ingest = fleet.ingest()
                server = FleetServer(ServerConfig(data_dir=tmp / f"server-{devices}", db_url=url))  # every table
                _extras(fleet)
                pages = measure(fleet, server, tmp / f"server-{devices}", args.reps)
                runs.append({"devices": devices, "windows": ingest["windows"], "shadow_events": len(fleet.canary) * 12,
                             "pages": pages})  # fmt: skip
        finally:
            if pg is not None:
                pg.close()
    result = {
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "db": args.db,
        "target_ms": TARGET_MS,
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dashboard_pages.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Dashboard pages at fleet size",
        "",
        f"Measured {result['measured']} on {result['machine']}; {args.db}. Telemetry windows through the ingest's "
        "write path, a finished shadow with a progress event per canary device every 5 minutes of its hour, update "
        f"outcomes and per-minute device counts; each page through the real app, signed in, {args.reps} requests. "
        f"Target: under {TARGET_MS:.0f} ms.",
    ]
    for run in runs:
        lines += [
            "",
            f"## {run['devices']:,} devices, {run['windows']:,} windows, {run['shadow_events']:,} shadow events",
            "",
            "| page | path | p50 ms | p95 ms | KiB | under target |",
            "|---|---|---:|---:|---:|---|",
        ]
        for label, p in run["pages"].items():
            ok = "yes" if p["p95_ms"] < TARGET_MS else "**no**"
            lines.append(
                f"| {label} | `{p['path']}` | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} | {p['bytes'] / 1024:.0f} | {ok} |"
            )
    (RESULTS / "dashboard_pages.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
