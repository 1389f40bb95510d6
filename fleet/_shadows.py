"""Shadow deployments ordered from the fleet: a candidate bundle runs beside the active one on a sample of
each selected device's live inputs, and the devices' reports are merged per cohort and overall.

The server sends each selected, online device a `shadow` command (docs/topics.md); the agent downloads
and verifies the candidate, runs it on a sample of its app's calls beside the active bundle (in its own
thread, never delaying the call by more than a queue put) and reports `shadow_report` when the duration
is over or `min_samples` are reached. A report is the device's own word: every figure is validated, a
device's weight in the merged agreement is capped at 4x the median device's samples (one device claiming
millions of samples cannot outvote the fleet), and a report for a shadow or bundle it was not given is
ignored.
"""

from __future__ import annotations

import builtins
import json
import math
import statistics
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet import InputError
from edgefleet._drift import js_distance, psi
from edgefleet.protocol import COMMAND_SCHEMA, LATENCY_EDGES_MS, latency_quantile, topic

from ._db import Database

if TYPE_CHECKING:
    from ._server import FleetServer

__all__ = ["ShadowDeployments", "merge_progress", "merge_reports"]

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS shadows (
        id TEXT PRIMARY KEY, bundle_name TEXT NOT NULL, bundle_version TEXT NOT NULL, selector TEXT NOT NULL,
        sample_rate FLOAT8 NOT NULL, duration_s FLOAT8 NOT NULL, min_samples INTEGER NOT NULL,
        state TEXT NOT NULL, created FLOAT8 NOT NULL, ends FLOAT8 NOT NULL, devices TEXT NOT NULL)""",
]
_GRACE_S = 60.0  # after the duration, how long reports are waited for before the shadow counts as done
_REPORT_FIELDS = ("active_p50_ms", "active_p95_ms", "candidate_p50_ms", "candidate_p95_ms")
_MAX_CLASSES = 100_000
_PROGRESS_COUNTS = ("samples", "agree", "labelled", "active_correct", "candidate_correct", "dropped")


def _counts(v: Any, n: int | None = None) -> list[int] | None:
    """A list of non-negative integer counts (of length N when given), or None."""
    if not isinstance(v, list) or not 0 < len(v) <= _MAX_CLASSES or (n is not None and len(v) != n):
        return None
    return v if all(type(c) is int and c >= 0 for c in v) else None


def _class_pair(body: dict[str, Any], total: int | None = None) -> tuple[list[int], list[int]] | None:
    """A report's per-class answer counts of both bundles: same length, each summing to TOTAL when given."""
    a, c = _counts(body.get("active_classes")), _counts(body.get("candidate_classes"))
    if a is None or c is None or len(a) != len(c):
        return None
    if total is not None and (sum(a) != total or sum(c) != total):
        return None
    return a, c


def _output_drift(active: np.ndarray, candidate: np.ndarray) -> dict[str, float | None]:
    """How far the candidate's answers moved from the active bundle's, over the same calls."""
    if not active.sum() or not candidate.sum():
        return {"output_psi": None, "output_js": None}
    return {"output_psi": round(psi(active, candidate), 6), "output_js": round(js_distance(active, candidate), 6)}


def _padded(a: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([a, np.zeros(n - len(a))]) if len(a) < n else a


def _number(v: Any, lo: float = 0.0, hi: float = math.inf) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
    return float(v) if ok else None


def _report(body: dict[str, Any]) -> dict[str, Any] | None:
    """A device's shadow_report with every figure checked, or None if it is not one."""
    samples = body.get("samples")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
        return None
    agreement = _number(body.get("agreement"), 0.0, 1.0)
    if samples and agreement is None:
        return None
    out: dict[str, Any] = {"samples": samples, "agreement": agreement if samples else None}
    for k in _REPORT_FIELDS:
        out[k] = _number(body.get(k), 0.0, 3.6e6)
    for k in ("candidate_errors", "dropped"):
        v = body.get(k, 0)
        out[k] = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0
    # Labels fed back for sampled calls (absent from older agents: none). Counts that do not add up make
    # the device's accuracy figures count for nothing rather than the whole report being dropped.
    counts = [body.get(k, 0) for k in ("labelled", "active_correct", "candidate_correct")]
    whole = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts)
    # a label is fed back for a shadowed call's row: never more labels than rows the device ran
    if whole and counts[1] <= counts[0] and counts[2] <= counts[0] and counts[0] <= samples:
        out["labelled"], out["active_correct"], out["candidate_correct"] = counts
    else:
        out["labelled"] = out["active_correct"] = out["candidate_correct"] = 0
    # Per class, how often each bundle answered it (absent from older agents): kept only if both sum to samples.
    out["classes"] = _class_pair(body, samples)
    return out


def _median(values: list[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return round(statistics.median(vs), 4) if vs else None


def merge_reports(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Devices' checked reports merged: agreement weighted by samples (each device capped at 4x the median
    device's), the median across devices of each latency figure, and the accuracy of both bundles on the
    calls labels were fed back for (each device's labels capped the same way)."""
    with_samples = {d: r for d, r in reports.items() if r["samples"]}
    cap = 4 * statistics.median([r["samples"] for r in with_samples.values()]) if with_samples else 0
    weight = {d: min(r["samples"], cap) for d, r in with_samples.items()}
    total = sum(weight.values())
    merged: dict[str, Any] = {
        "devices_reported": len(reports),
        "samples": sum(r["samples"] for r in reports.values()),
        "agreement": round(sum(r["agreement"] * weight[d] for d, r in with_samples.items()) / total, 6)
        if total
        else None,
        "min_device_agreement": min((r["agreement"] for r in with_samples.values()), default=None),
        "candidate_errors": sum(r["candidate_errors"] for r in reports.values()),
        "dropped": sum(r["dropped"] for r in reports.values()),
    }
    for k in _REPORT_FIELDS:
        merged[k] = _median([r[k] for r in reports.values()])
    labelled = {d: r for d, r in reports.items() if r["labelled"]}
    # capped like the agreement: at 4x the median device's samples (not the median labelled device's, or a
    # lone device with labels would weigh whatever it claims)
    lcap = cap
    share = {d: min(r["labelled"], lcap) / r["labelled"] for d, r in labelled.items()}
    n = sum(r["labelled"] * share[d] for d, r in labelled.items())
    merged["labelled"] = round(n)
    for side in ("active", "candidate"):
        right = sum(r[f"{side}_correct"] * share[d] for d, r in labelled.items())
        merged[f"{side}_accuracy"] = round(right / n, 6) if n else None
    # The two bundles' answer distributions over the same calls, each device weighed as in the agreement.
    classes = {d: r["classes"] for d, r in with_samples.items() if r.get("classes")}
    n_classes = max((len(c[0]) for c in classes.values()), default=0)
    sides = [np.zeros(n_classes), np.zeros(n_classes)]
    for d, (a, c) in classes.items():
        w = weight[d] / with_samples[d]["samples"]
        sides[0] += _padded(np.asarray(a, np.float64), n_classes) * w
        sides[1] += _padded(np.asarray(c, np.float64), n_classes) * w
    merged.update(_output_drift(*sides))
    return merged


def _progress(body: dict[str, Any]) -> dict[str, Any] | None:
    """A device's shadow_progress with every figure checked, or None if it is not one."""
    out: dict[str, Any] = {}
    for k in _PROGRESS_COUNTS:
        v = body.get(k)
        if type(v) is not int or v < 0:
            return None
        out[k] = v
    if out["agree"] > out["samples"] or out["active_correct"] > out["labelled"] or out["labelled"] > out["samples"]:
        return None
    if out["candidate_correct"] > out["labelled"]:
        return None
    end = _number(body.get("end"), 0.0, 1e11)
    if end is None:
        return None
    out["end"] = end
    bins = len(LATENCY_EDGES_MS) + 1
    for k in ("active_latency_ms", "candidate_latency_ms"):
        lat = _counts(body.get(k), bins)
        if lat is None and out["samples"]:
            return None
        out[k] = lat or [0] * bins
    out["classes"] = _class_pair(body, out["samples"]) if out["samples"] else None
    return out


def merge_progress(
    progress: builtins.list[tuple[str, dict[str, Any]]], since: float, until: float, buckets: int = 48
) -> dict[str, builtins.list[float | None]]:
    """A shadow over time: (device, checked progress) merged into BUCKETS equal spans of [SINCE, UNTIL) by
    each report's end. Per span: samples per minute, agreement, both bundles' p95 latency from their merged
    histograms, the output PSI between them; a device counts at most 4x the span's median device."""
    width = max(1e-9, (until - since) / buckets)
    spans: builtins.list[dict[str, dict[str, Any]]] = [{} for _ in range(buckets)]
    for dev, p in progress:
        i = int((p["end"] - since) / width)
        if 0 <= i < buckets:
            per = spans[i].setdefault(dev, {"n": 0, "agree": 0, "a": None, "c": None, "lat_a": 0, "lat_c": 0, "k": []})
            per["n"] += p["samples"]
            per["agree"] += p["agree"]
            per["lat_a"] = per["lat_a"] + np.asarray(p["active_latency_ms"])
            per["lat_c"] = per["lat_c"] + np.asarray(p["candidate_latency_ms"])
            if p["classes"]:
                per["k"].append(p["classes"])
    out: dict[str, builtins.list[float | None]] = {
        k: [] for k in ("samples_per_min", "agreement", "active_p95_ms", "candidate_p95_ms", "output_psi")
    }
    for devs in spans:
        live = {d: v for d, v in devs.items() if v["n"]}
        if not live:
            for vs in out.values():
                vs.append(None)
            continue
        cap = 4 * statistics.median(v["n"] for v in live.values())
        w = {d: min(v["n"], cap) / v["n"] for d, v in live.items()}
        n = sum(v["n"] * w[d] for d, v in live.items())
        out["samples_per_min"].append(round(sum(v["n"] for v in live.values()) / (width / 60.0), 2))
        out["agreement"].append(round(sum(v["agree"] * w[d] for d, v in live.items()) / n, 6))
        for side, key in (("lat_a", "active_p95_ms"), ("lat_c", "candidate_p95_ms")):
            lat = sum(np.asarray(v[side], np.float64) * w[d] for d, v in live.items())
            out[key].append(latency_quantile(np.round(lat).astype(int).tolist(), 0.95))
        k = max((len(a) for v in live.values() for a, _ in v["k"]), default=0)
        a_sum, c_sum = np.zeros(k), np.zeros(k)
        for d, v in live.items():
            for a, c in v["k"]:
                a_sum += _padded(np.asarray(a, np.float64), k) * w[d]
                c_sum += _padded(np.asarray(c, np.float64), k) * w[d]
        out["output_psi"].append(_output_drift(a_sum, c_sum)["output_psi"] if k else None)
    return out


class ShadowDeployments:
    """Create, list, inspect and stop shadow deployments; state in the `shadows` table."""

    def __init__(self, server: FleetServer) -> None:
        self.server = server
        self.db: Database = server.db
        with self.db.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    def create(self, bundle: str, selector: str, sample_rate: float, duration_s: float, min_samples: int = 0) -> str:
        name, _, version = bundle.partition(":")
        ref = self.server.bundle_ref(name, version)  # refused unless published
        if _number(sample_rate, 0.0, 1.0) in (None, 0.0):
            raise InputError(f"--sample-rate must be in (0, 1], got {sample_rate}")
        if _number(duration_s, 1.0, 7 * 86400.0) is None:
            raise InputError(f"--duration must be between 1 s and 7 days, got {duration_s}")
        if not isinstance(min_samples, int) or min_samples < 0:
            raise InputError(f"--min-samples must be a whole number >= 0, got {min_samples}")
        devices = [d for d in self.server.devices() if selector in d["tags"]]
        if not devices:
            raise InputError(f"selector {selector!r} matches no device")
        online = [d["id"] for d in devices if d["online"]]
        if not online:
            raise InputError(
                f"none of the {len(devices)} device(s) tagged {selector!r} is online; a shadow command reaches "
                "only connected devices"
            )
        sid = "s-" + uuid.uuid4().hex[:10]
        now = time.time()
        self.db.execute(
            "INSERT INTO shadows (id, bundle_name, bundle_version, selector, sample_rate, duration_s, min_samples, "
            "state, created, ends, devices) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?)",
            (
                sid,
                name,
                version,
                selector,
                sample_rate,
                duration_s,
                min_samples,
                now,
                now + duration_s,
                json.dumps(online),
            ),
        )
        cmd = {
            "schema": COMMAND_SCHEMA,
            "id": sid,
            "command": "shadow",
            "args": {"bundle": ref, "sample_rate": sample_rate, "duration_s": duration_s, "min_samples": min_samples},
        }
        body = json.dumps(cmd)
        handles = [self.server.publish(topic(d, "commands"), body) for d in online]
        for h in handles:
            h.wait_for_publish(10)
        return sid

    def stop(self, sid: str) -> dict[str, Any]:
        """Stop waiting for reports: what has arrived is the result (devices end their runs on their own)."""
        st = self.get(sid)
        if st["state"] != "running":
            raise InputError(f"shadow {sid} is {st['state']}; only a running one can be stopped")
        self.db.execute("UPDATE shadows SET state = 'stopped' WHERE id = ? AND state = 'running'", (sid,))
        return self.get(sid)

    def ids(self) -> list[str]:
        return [s for (s,) in self.db.query("SELECT id FROM shadows ORDER BY created DESC")]

    def get(self, sid: str) -> dict[str, Any]:
        rows = self.db.query(
            "SELECT bundle_name, bundle_version, selector, sample_rate, duration_s, min_samples, state, created, "
            "ends, devices FROM shadows WHERE id = ?",
            (sid,),
        )
        if not rows:
            raise InputError(f"no shadow deployment {sid}")
        name, version, selector, rate, duration, min_samples, state, created, ends, devs = rows[0]
        devices: list[str] = json.loads(devs)
        started, failed, reports = self._events(sid, name, version, devices, created - 60.0)
        if state == "running" and (len(reports) + len(failed) == len(devices) or time.time() > ends + _GRACE_S):
            self.db.execute("UPDATE shadows SET state = 'completed' WHERE id = ? AND state = 'running'", (sid,))
            state = "completed"
        tags = self._tags(devices)
        cohorts: dict[str, dict[str, Any]] = {}
        for tag in sorted({t for d in devices for t in tags.get(d, [])} - {selector}):
            members = {d: r for d, r in reports.items() if tag in tags.get(d, [])}
            if members:
                cohorts[tag] = merge_reports(members)
        return {
            "id": sid,
            "bundle": f"{name}:{version}",
            "selector": selector,
            "sample_rate": rate,
            "duration_s": duration,
            "min_samples": min_samples,
            "state": state,
            "created": created,
            "ends": ends,
            "devices": {"ordered": len(devices), "started": len(started), "failed": failed, "reported": len(reports)},
            "overall": merge_reports(reports),
            "cohorts": cohorts,
            "per_device": reports,
        }

    def list(self) -> builtins.list[dict[str, Any]]:
        return [self.get(s) for s in self.ids()]

    def series(self, sid: str, buckets: int = 48, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        """Shadow SID over time, from its devices' shadow_progress events (`merge_progress`), from its start to
        its end (or now, while it runs). SHADOW: its `get`, when the caller has it already."""
        st = self.get(sid) if shadow is None else shadow
        name, _, version = st["bundle"].partition(":")
        devices = self._devices(sid)
        progress: builtins.list[tuple[str, dict[str, Any]]] = []
        # device clocks may run a little behind the server's: a minute of slack before the shadow's start
        for dev, ev in self._shadow_events(devices, ("shadow_progress",), since=st["created"] - 60.0):
            cand = ev.get("candidate") or {}
            if ev.get("command_id") == sid and (cand.get("name"), cand.get("version")) == (name, version):
                p = _progress(ev)
                if p is not None:
                    progress.append((dev, p))
        since = st["created"]
        until = max(since + 60.0, min(time.time(), st["ends"] + _GRACE_S) if st["state"] == "running" else st["ends"])
        until = max(until, max((p["end"] for _, p in progress), default=since) + 1e-3)
        return {"since": since, "until": until, **merge_progress(progress, since, until, buckets)}

    def _tags(self, devices: builtins.list[str]) -> dict[str, builtins.list[str]]:
        out: dict[str, builtins.list[str]] = {}
        for i in range(0, len(devices), 500):
            chunk = devices[i : i + 500]
            marks = ",".join("?" for _ in chunk)
            out.update(
                (d, json.loads(t))
                for d, t in self.db.query(f"SELECT id, tags FROM devices WHERE id IN ({marks})", chunk)
            )
        return out

    def _devices(self, sid: str) -> builtins.list[str]:
        rows = self.db.query("SELECT devices FROM shadows WHERE id = ?", (sid,))
        return json.loads(rows[0][0]) if rows else []

    def _shadow_events(
        self, devices: builtins.list[str], types: tuple[str, ...], since: float = 0.0
    ) -> builtins.list[tuple[str, dict[str, Any]]]:
        out = []
        kinds = ",".join(f"'{t}'" for t in types)  # our own constants
        for i in range(0, len(devices), 500):
            chunk = devices[i : i + 500]
            marks = ",".join("?" for _ in chunk)
            for dev, body in self.db.query(
                f"SELECT device_id, body FROM events WHERE device_id IN ({marks}) AND type IN ({kinds}) "
                "AND ts >= ? ORDER BY ts",
                [*chunk, since],
            ):
                out.append((dev, json.loads(body)))
        return out

    def _events(
        self, sid: str, name: str, version: str, devices: builtins.list[str], since: float
    ) -> tuple[set[str], dict[str, str], dict[str, dict[str, Any]]]:
        started: set[str] = set()
        failed: dict[str, str] = {}
        reports: dict[str, dict[str, Any]] = {}
        for dev, ev in self._shadow_events(devices, ("shadow_started", "shadow_failed", "shadow_report"), since):
            if ev.get("command_id") != sid:
                continue
            typ = ev.get("type")
            cand = ev.get("candidate") or {}
            if typ != "shadow_failed" and (cand.get("name"), cand.get("version")) != (name, version):
                continue  # a report about another bundle than the one this shadow sent
            if typ == "shadow_started":
                started.add(dev)
            elif typ == "shadow_failed":
                failed[dev] = str(ev.get("reason", ""))[:300]
            else:
                r = _report(ev)
                if r is not None:
                    reports[dev] = r
        return started, failed, reports


# Labelled shadow calls from which ground truth, not agreement, judges the candidate's answers.
SHADOW_MIN_LABELLED = 100
SHADOW_MAX_ACCURACY_DROP = 0.02


def check_passed(shadow: dict[str, Any], bundle: str, min_agreement: float, max_p95_ratio: float) -> None:
    """Refuse (InputError) a rollout of BUNDLE after SHADOW unless the shadow ran that bundle, is over, and
    its answers and candidate latency meet the thresholds.

    Answers are judged by agreement with the active bundle, unless labels were fed back for at least
    SHADOW_MIN_LABELLED shadowed calls: then by accuracy (the candidate at most SHADOW_MAX_ACCURACY_DROP
    below the active bundle on the same calls). A candidate that disagrees because the active bundle is
    wrong - the reason to retrain - is not held back, and one that agrees but is worse is."""
    sid = shadow["id"]
    if shadow["bundle"] != bundle:
        raise InputError(f"shadow {sid} ran {shadow['bundle']}, not {bundle}")
    if shadow["state"] == "running":
        raise InputError(f"shadow {sid} is still running; wait for it to complete (or stop it)")
    o = shadow["overall"]
    if not o["samples"]:
        raise InputError(f"shadow {sid} has no reported samples to judge {bundle} by")
    ca, aa = o.get("candidate_accuracy"), o.get("active_accuracy")
    if o.get("labelled", 0) >= SHADOW_MIN_LABELLED and ca is not None and aa is not None:
        if ca < aa - SHADOW_MAX_ACCURACY_DROP:
            raise InputError(
                f"shadow {sid}: candidate accuracy {ca:.4f} < the active bundle's {aa:.4f} - "
                f"{SHADOW_MAX_ACCURACY_DROP} on {o['labelled']} labelled calls"
            )
    elif o["agreement"] < min_agreement:
        raise InputError(f"shadow {sid}: agreement {o['agreement']:.4f} with the active bundle < {min_agreement}")
    cand, act = o["candidate_p95_ms"], o["active_p95_ms"]
    if cand is not None and act is not None and cand > act * max_p95_ratio:
        raise InputError(
            f"shadow {sid}: candidate p95 {cand:.3f} ms > {max_p95_ratio} x the active bundle's {act:.3f} ms"
        )
