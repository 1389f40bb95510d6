"""Fleet statistics at scale: what drift queries, rollout gates and the drift page cost as the fleet grows,
read from the rollups and (side by side, in the same run) from the raw windows as before rollups.

For each fleet size (devices x minutes of telemetry at one window per device per minute, compressed in
time) the windows go through the ingest's real write path (`IngestWorker._write`: checks against the
bundle's baseline, one transaction per 500 windows, rollups and `window_devices` in it) at the speed it
takes; 10% of the devices run version 2.0.0 (a canary), every device carries one of ten site tags. Then:

- ingest rate (windows/s) with the rollups written in the same transaction;
- drift query (`drift_report`, all devices and one site) over the last 15 minutes and over everything,
  p50 / p95 of repeated runs; the raw path merges every stored window in range, as the server did before;
- gate evaluation: the canary's and the control's figures (`RolloutStore.cohort`) and `evaluate`;
  raw: the old query of the same devices' windows since the stage began;
- the dashboard's drift page (`GET /drift` through the app, rendered), and `/metrics`;
- database size, and one housekeeping sweep (compaction of minute rows older than 6 h).

    .venv/bin/python benchmarks/fleet_scale.py [--sizes 1000:1440,10000:120,100000:10] [--db sqlite,postgresql]

Writes benchmarks/results/fleet_scale.json and benchmarks/results/fleet_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgefleet import generate_keypair, open_bundle  # noqa: E402
from edgefleet.fleet._drift import drift_report, feature_stats  # noqa: E402
from edgefleet.fleet._endpoint import BrokerEndpoint  # noqa: E402
from edgefleet.fleet._gates import Cohort, Gates, StageDevices, evaluate  # noqa: E402
from edgefleet.fleet._ingest import IngestWorker  # noqa: E402
from edgefleet.fleet._retention import Retention, sweep  # noqa: E402
from edgefleet.fleet._rollout_store import RolloutStore  # noqa: E402
from edgefleet.fleet._rollups import merge_windows  # noqa: E402
from edgefleet.protocol import LATENCY_EDGES_MS, WINDOW_SCHEMA, latency_quantile, topic  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGETS = {"drift_p95_ms": 200.0, "gate_ms": 50.0, "page_ms": 200.0}
RAW_LIMIT = 100_000  # windows a raw-path query is run on; past it the figure is extrapolated, and said so


def _p(v: list[float], q: float) -> float:
    return float(np.percentile(v, q)) if v else float("nan")


def timed(fn: Callable[[], Any], reps: int) -> dict[str, float]:
    ms = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t) * 1000)
    return {"p50_ms": round(_p(ms, 50), 2), "p95_ms": round(_p(ms, 95), 2), "runs": reps}


class Fleet:
    def __init__(self, url: str, manifests: dict[str, Any], devices: int, minutes: int, seed: int = 0) -> None:
        from edgefleet.fleet._db import Database

        self.db = Database(url)
        self.devices = [f"dev-{i:06d}" for i in range(devices)]
        self.minutes = minutes
        self.canary = set(self.devices[: max(1, devices // 10)])
        self.m = manifests
        self.rng = np.random.default_rng(seed)
        self.t_end = float(int(time.time() // 60) * 60)
        self.t0 = self.t_end - 60 * minutes
        with self.db.transaction() as cur:
            for m in manifests.values():
                cur.execute(
                    "INSERT INTO bundles (name, version, sha256, size, path, manifest, created) "
                    "VALUES (?, ?, 'x', 1, 'x', ?, ?)",
                    (m.name, m.version, m.canonical_bytes().decode(), self.t0),
                )
            for i, d in enumerate(self.devices):
                v = "2.0.0" if d in self.canary else "1.0.0"
                cur.execute(
                    "INSERT INTO devices (id, tags, created, bundle_name, bundle_version, update_state) "
                    "VALUES (?, ?, ?, ?, ?, 'idle')",
                    (d, json.dumps(["fleet", f"site-{i % 10}"]), self.t0, manifests[v].name, v),
                )
        self.templates = [self._template(v) for v in ("1.0.0", "2.0.0") for _ in range(16)]

    def _template(self, version: str) -> dict[str, Any]:
        base = self.m[version].drift_baseline
        calls = 60
        lat = [0] * (len(LATENCY_EDGES_MS) + 1)
        for b in self.rng.integers(22, 27, calls):
            lat[int(b)] += 1
        p_in = {f["name"]: np.asarray(f["proportions"]) + 1e-4 for f in base["inputs"]}
        p_out = {k: np.asarray(v["proportions"]) + 1e-4 for k, v in base["outputs"].items() if isinstance(v, dict)}
        return {
            "schema": WINDOW_SCHEMA,
            "bundle": {"name": self.m[version].name, "version": version},
            "calls": calls,
            "samples": calls,
            "errors": {"input": int(self.rng.integers(0, 2))},
            "nan_outputs": 0,
            "latency_ms": {"counts": lat, "sum": 60.0, "max": 3.0},
            "inputs": {k: self.rng.multinomial(calls, p / p.sum()).tolist() for k, p in p_in.items()},
            "outputs": {k: self.rng.multinomial(calls, p / p.sum()).tolist() for k, p in p_out.items()},
        }

    def ingest(self, limit: int | None = None) -> dict[str, Any]:
        worker = IngestWorker(self.db, BrokerEndpoint("127.0.0.1", 1))
        n = 0
        t = time.perf_counter()
        batch: list[tuple[str, bytes]] = []
        for minute in range(self.minutes):
            start = self.t0 + 60 * minute
            for i, d in enumerate(self.devices):
                tpl = self.templates[(i + minute) % 16 + (16 if d in self.canary else 0)]
                s = start + (i % 60)
                w = {**tpl, "key": f"{d}:{minute}", "device_id": d, "start": s, "end": s + 59}
                batch.append((topic(d, "telemetry"), json.dumps(w).encode()))
                if len(batch) == 500:
                    worker._write(batch)
                    n += len(batch)
                    batch = []
                    if limit is not None and n >= limit:
                        break
            if limit is not None and n >= limit:
                break
        if batch:
            worker._write(batch)
            n += len(batch)
        s = time.perf_counter() - t
        assert worker.stats["stored"] == n, worker.stats
        return {"windows": n, "seconds": round(s, 1), "windows_per_s": round(n / s)}

    # -- the raw path, as the server read telemetry before rollups ------------------------------------
    def raw_drift(self, version: str, tag: str | None, since: float | None) -> dict[str, Any]:
        sql = "SELECT device_id, body FROM windows WHERE bundle_name = ? AND bundle_version = ?"
        params: list[Any] = [self.m[version].name, version]
        if since is not None:
            sql += " AND start >= ?"
            params.append(since)
        members = None
        if tag:
            members = {d for d, t in self.db.query("SELECT id, tags FROM devices") if tag in json.loads(t)}
        bodies = [json.loads(b) for d, b in self.db.query(sql, params) if members is None or d in members]
        return feature_stats(
            self.m[version].drift_baseline, merge_windows(bodies), {"psi": 0.25, "p_value": 1e-4, "min_samples": 200}
        )

    def raw_gate(self, since: float) -> Cohort:
        canary = sorted(self.canary)
        bodies = []
        for i in range(0, len(canary), 500):
            chunk = canary[i : i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.query(
                f"SELECT body FROM windows WHERE bundle_name = ? AND device_id IN ({marks}) AND start >= ? "
                "AND bundle_version = '2.0.0'",
                [self.m["2.0.0"].name, *chunk, since],
            )
            bodies += [json.loads(b) for (b,) in rows]
        lat = np.sum([w["latency_ms"]["counts"] for w in bodies], axis=0).tolist() if bodies else None
        return Cohort(calls=sum(w["calls"] for w in bodies), p95_ms=latency_quantile(lat, 0.95) if lat else None)

    def windows_in(self, since: float | None, version: str | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM windows WHERE 1 = 1", []
        if since is not None:
            sql, params = sql + " AND start >= ?", [since]
        if version is not None:
            sql, params = sql + " AND bundle_version = ?", [*params, version]
        return int(self.db.query(sql, params)[0][0])

    def size_bytes(self) -> int:
        if self.db.kind == "sqlite":
            p = self.db.path
            return sum(os.path.getsize(f) for f in (p, Path(f"{p}-wal")) if os.path.exists(f))
        return int(self.db.query("SELECT pg_database_size(current_database())")[0][0])


def page_timer(fleet: Fleet, tmp: Path, reps: int) -> dict[str, Any]:
    """The drift page and /metrics through the real app (rendered templates), signed in."""
    from fastapi.testclient import TestClient

    from edgefleet.fleet._auth import create_token
    from edgefleet.fleet._http import create_app
    from edgefleet.fleet._server import FleetServer, ServerConfig

    server = FleetServer(ServerConfig(data_dir=tmp / "server", db_url=fleet.db.url))
    token = create_token(tmp / "server", "bench", fleet.db.url)
    client = TestClient(create_app(server))
    client.cookies.set("edgefleet_token", token)
    name = fleet.m["1.0.0"].name
    out = {}
    for label, path in (
        ("drift_page", f"/drift?bundle={name}:1.0.0"),
        ("drift_page_site", f"/drift?bundle={name}:1.0.0&tag=site-3"),
        ("metrics", "/metrics"),
    ):
        r = client.get(path, headers={"Authorization": f"Bearer {token}"}, follow_redirects=False)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
        out[label] = timed(lambda p=path: client.get(p, headers={"Authorization": f"Bearer {token}"}), reps)
    return out


def ingest_without_rollups(url: str, manifests: dict[str, Any], devices: int, minutes: int) -> dict[str, Any]:
    """The same write path with the rollups left out (what ingest cost before them), on the first 50,000."""
    import edgefleet.fleet._ingest as ingest

    kept = ingest.add_windows
    ingest.add_windows = lambda *a, **k: None  # type: ignore[assignment]
    try:
        return Fleet(url, manifests, devices, minutes).ingest(limit=50_000)
    finally:
        ingest.add_windows = kept


def mlp_manifests(tmp: Path) -> dict[str, Any]:
    """The manifests of the digits MLP bundles 1.0.0 and 2.0.0 (the canary), built and signed under TMP."""
    from examples.digits.data import load_splits
    from examples.digits.mlp import build_mlp_bundle

    key = generate_keypair(tmp / "key")
    digits = load_splits()
    return {
        v: open_bundle(build_mlp_bundle(tmp / f"mlp-{v}.efb", digits, v, key, seed)).manifest
        for v, seed in (("1.0.0", 0), ("2.0.0", 1))
    }


def run(
    kind: str, url: str, bare_url: str, manifests: dict[str, Any], devices: int, minutes: int, tmp: Path
) -> dict[str, Any]:
    bare = ingest_without_rollups(bare_url, manifests, devices, minutes)
    fleet = Fleet(url, manifests, devices, minutes)
    res: dict[str, Any] = {"db": kind, "devices": devices, "minutes": minutes, "run": time.strftime("%Y-%m-%d %H:%M")}
    res["ingest"] = fleet.ingest()
    res["ingest_without_rollups"] = bare
    name = manifests["1.0.0"].name
    recent = fleet.t_end - 900
    reps = 20
    q: dict[str, Any] = {}
    for label, tag, since in (
        ("15min_all", None, recent),
        ("15min_site", "site-3", recent),
        ("all_time_all", None, None),
        ("all_time_site", "site-3", None),
    ):
        roll = timed(lambda t=tag, s=since: drift_report(fleet.db, name, "1.0.0", cohort=t or "*", since=s), reps)
        n = fleet.windows_in(since, "1.0.0")
        if n <= RAW_LIMIT:
            raw = timed(lambda t=tag, s=since: fleet.raw_drift("1.0.0", t, s), 3 if n > 20_000 else 10)
        else:
            # measured on the last 15 minutes, scaled by the windows in range (the raw path is linear in them)
            small = fleet.windows_in(recent, "1.0.0")
            per = timed(lambda t=tag: fleet.raw_drift("1.0.0", t, recent), 3)["p50_ms"] / max(1, small)
            raw = {"p50_ms": round(per * n, 1), "p95_ms": None, "runs": 0, "extrapolated_from": small}
        q[label] = {"windows_in_range": n, "rollups": roll, "raw": raw}
    res["drift"] = q
    store = RolloutStore(fleet.db)
    since = fleet.t_end - 3600
    updated = sorted(fleet.canary)

    def gate() -> None:
        new = store.cohort(name, "fleet", since, version="2.0.0", reporting_of=updated)
        ctl = store.cohort(name, "fleet", since, exclude_version="2.0.0")
        evaluate(new, ctl, StageDevices(len(updated), len(updated), 0, True), Gates())

    n_gate = fleet.windows_in(since)
    res["gate"] = {
        "canary_devices": len(updated),
        "windows_since_stage_start": n_gate,
        "rollups": timed(gate, reps),
        "raw_canary_only": timed(lambda: fleet.raw_gate(since), 3) if n_gate <= RAW_LIMIT else None,
    }
    res["pages"] = page_timer(fleet, tmp, 10)
    res["db_bytes"] = fleet.size_bytes()
    res["rollup_rows"] = int(fleet.db.query("SELECT COUNT(*) FROM rollups")[0][0])
    t = time.perf_counter()
    swept = sweep(fleet.db, time.time(), Retention())
    res["housekeeping"] = {"seconds": round(time.perf_counter() - t, 2), **swept}
    res["rollup_rows_after"] = int(fleet.db.query("SELECT COUNT(*) FROM rollups")[0][0])
    res["drift_all_time_after_compaction"] = timed(lambda: drift_report(fleet.db, name, "1.0.0"), reps)
    return res


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| db | devices x minutes | windows | ingest w/s (without rollups) | drift 15 min p95 (rollups / raw) "
        "| drift all p95 (rollups / raw) | gate p95 (rollups / raw) | drift page p95 | db size |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        d = r["drift"]

        def pair(x: dict[str, Any]) -> str:
            raw = x["raw"]
            rv = raw["p95_ms"] if raw.get("p95_ms") is not None else raw["p50_ms"]
            # extrapolated from fewer windows than in range (the same number: measured on exactly these)
            mark = (
                " (extrapolated)" if raw.get("extrapolated_from", x["windows_in_range"]) < x["windows_in_range"] else ""
            )
            return f"{x['rollups']['p95_ms']:.1f} / {rv:,.0f} ms{mark}"

        g = r["gate"]
        graw = f"{g['raw_canary_only']['p95_ms']:,.0f}" if g["raw_canary_only"] else "-"
        lines.append(
            f"| {r['db']} | {r['devices']:,} x {r['minutes']:,} | {r['ingest']['windows']:,} | "
            f"{r['ingest']['windows_per_s']:,} ({r['ingest_without_rollups']['windows_per_s']:,}) | "
            f"{pair(d['15min_all'])} | {pair(d['all_time_all'])} | "
            f"{g['rollups']['p95_ms']:.1f} / {graw} ms | {r['pages']['drift_page']['p95_ms']:.0f} ms | "
            f"{r['db_bytes'] / 1e6:,.0f} MB |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000:1440,10000:120,100000:10", help="DEVICES:MINUTES,...")
    ap.add_argument("--db", default="sqlite,postgresql", help="sqlite, postgresql or both (comma-separated)")
    ap.add_argument(
        "--append", action="store_true", help="keep the results of earlier runs (other sizes or databases) in the files"
    )
    args = ap.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split(":")) for s in args.sizes.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        manifests = mlp_manifests(tmp)
        pg = None
        for kind in args.db.split(","):
            for devices, minutes in sizes:
                if kind == "sqlite":
                    url = f"sqlite:///{tmp / f'fleet-{devices}-{minutes}.db'}"
                    bare = f"sqlite:///{tmp / f'fleet-{devices}-{minutes}-bare.db'}"
                else:
                    if pg is None:
                        from tests.conftest import Postgres

                        pg = Postgres()
                    url, bare = pg.fresh_database(), pg.fresh_database()
                print(f"[fleet_scale] {kind}: {devices:,} devices x {minutes:,} minutes", flush=True)
                r = run(kind, url, bare, manifests, devices, minutes, tmp / f"{kind}-{devices}")
                print(json.dumps(r), flush=True)
                results.append(r)
                if kind == "sqlite":
                    for f in tmp.glob(f"fleet-{devices}-{minutes}.db*"):
                        f.unlink()
        if pg is not None:
            pg.close()
    RESULTS.mkdir(exist_ok=True)
    old = RESULTS / "fleet_scale.json"
    if args.append and old.exists():
        ran = {(r["db"], r["devices"], r["minutes"]) for r in results}
        kept = [r for r in json.loads(old.read_text())["results"] if (r["db"], r["devices"], r["minutes"]) not in ran]
        results = kept + results
    doc = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "targets": TARGETS,
        "results": results,
    }
    (RESULTS / "fleet_scale.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = (
        "# Fleet statistics at scale (rollups against the raw windows, one run)\n\n"
        f"{table(results)}\n\nTargets: drift query and drift page <= {TARGETS['drift_p95_ms']:.0f} ms p95, gate "
        f"evaluation <= {TARGETS['gate_ms']:.0f} ms per rollout per tick. Raw: every window in range merged, as "
        "before rollups; gate raw is the canary's windows only (the control read as many again).\n"
    )
    (RESULTS / "fleet_scale.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
