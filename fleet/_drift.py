"""Fleet-wide drift: merge the devices' telemetry windows for a bundle version and compare them with
the bundle's baseline (and cohorts with each other) using the statistics in `edgefleet._drift`."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from edgefleet import InputError, Manifest
from edgefleet._drift import chi2_two_sample, js_distance, ks_binned, psi

from ._accuracy import CONCEPT_THRESHOLDS, accuracy_figures, concept_drift, reference_accuracy
from ._db import Database
from ._lease import Lease, LeasedLoop
from ._rollups import ALL, accumulate, add_counts, empty_merge, merge_windows, read, series

log = logging.getLogger("edgefleet.fleet.drift")

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DriftMonitor",
    "acknowledge",
    "add_counts",
    "cohort_report",
    "drift_report",
    "list_alerts",
    "merge_windows",
]

# A feature drifts when its PSI passes this (0.1: watch, 0.25: act, the usual reading) or the chi-square
# p-value falls below P_VALUE with enough samples to mean something.
DEFAULT_THRESHOLDS = {"psi": 0.25, "p_value": 1e-4, "min_samples": 200}
_SKEW_S = 3600.0  # windows stamped this far ahead of the server's clock still count as recent


def _feature(
    ref: list[float], cur: np.ndarray, thresholds: dict[str, float], ref_n: float, per_sample: float
) -> dict[str, Any]:
    n = int(cur.sum())
    if n == 0:
        return {"psi": None, "js": None, "ks": None, "chi2": None, "p_value": None, "samples": 0, "drifted": False}
    p = psi(ref, cur)
    # The baseline is itself a sample (a few hundred evaluation inputs), so the test is two-sample
    # homogeneity, not goodness of fit against exact proportions. Pixel-level features count many
    # correlated pixels per input: both sides are scaled to input-equivalents so the p-value is not
    # inflated by pixel counts.
    stat, pv = chi2_two_sample(np.asarray(ref, np.float64) * ref_n, cur / per_sample)
    samples = round(n / per_sample)
    drifted = p > thresholds["psi"] or (samples >= thresholds["min_samples"] and pv < thresholds["p_value"])
    return {
        "psi": round(p, 6),
        "js": round(js_distance(ref, cur), 6),
        "ks": round(ks_binned(ref, cur), 6),
        "chi2": round(stat, 4),
        "p_value": pv,
        "samples": samples,
        "drifted": bool(drifted),
    }


def baseline_of(db: Database, name: str, version: str) -> dict[str, Any]:
    rows = db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
    if not rows:
        raise InputError(f"bundle {name}:{version} is not published")
    baseline = Manifest.from_bytes(rows[0][0].encode()).drift_baseline
    if not baseline:
        raise InputError(f"bundle {name}:{version} carries no drift baseline")
    return dict(baseline)


def feature_stats(baseline: dict[str, Any], merged: dict[str, Any], th: dict[str, float]) -> dict[str, Any]:
    """PSI, JS, KS, chi-square and the verdict per input feature and per output feature."""
    features: dict[str, Any] = {}
    ref_n = float(baseline.get("n_samples") or 1)
    units = max(1, merged["summarised"])
    for f in baseline["inputs"]:
        cur = merged["inputs"].get(f["name"], np.zeros(len(f["proportions"]), np.int64))
        per = max(1.0, cur.sum() / units) if f.get("level") == "pixel" else 1.0
        features[f["name"]] = _feature(f["proportions"], cur, th, ref_n, per)
    out = baseline["outputs"]
    for key in ("predicted_class", "confidence"):
        cur = merged["outputs"].get(key, np.zeros(len(out[key]["proportions"]), np.int64))
        features[f"output:{key}"] = _feature(out[key]["proportions"], cur, th, ref_n, 1.0)
    return features


def drift_report(
    db: Database,
    name: str,
    version: str,
    *,
    cohort: str = ALL,
    since: float | None = None,
    thresholds: dict[str, float] | None = None,
    merged: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per input feature and for the predicted-class distribution: PSI, JS, KS, chi-square against the
    baseline, for COHORT (a tag; `*`: all devices) since SINCE (rounded down to its rollup bucket).
    MERGED: those rollups already read and merged (a page that shows them in other ways too)."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    baseline = baseline_of(db, name, version)
    merged = read(db, name, version, cohort, since) if merged is None else merged
    features = feature_stats(baseline, merged, th)
    return {
        "bundle": f"{name}:{version}",
        "cohort": cohort,
        "windows": merged["windows"],
        "calls": merged["calls"],
        "samples": merged["samples"],
        "thresholds": th,
        "features": features,
        "drifted": sorted(k for k, v in features.items() if v["drifted"]),
    }


def cohort_report(db: Database, name: str, version: str, a: str, b: str, since: float | None = None) -> dict[str, Any]:
    """Cohort A against cohort B (tags) on the same bundle version, per feature."""
    ma, mb = (read(db, name, version, c, since) for c in (a, b))
    return {"samples": [ma["samples"], mb["samples"]], "features": compare_cohorts(ma, mb)}


def compare_cohorts(a: dict[str, Any], b: dict[str, Any], thresholds: dict[str, float] | None = None) -> dict[str, Any]:
    """Cohort A against cohort B (merged windows), per feature present in both: PSI, JS, KS and a
    chi-square test of homogeneity (pixel-level counts scaled to input-equivalents)."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    out = {}
    for group, prefix in (("inputs", ""), ("outputs", "output:")):
        for k in sorted(set(a[group]) & set(b[group])):
            ca, cb = (np.asarray(m[group][k], np.float64) for m in (a, b))
            if ca.shape != cb.shape or not ca.sum() or not cb.sum():
                continue
            ua, ub = (
                (max(1.0, c.sum() / max(1, m["summarised"])) if group == "inputs" else 1.0)
                for c, m in ((ca, a), (cb, b))
            )
            stat, pv = chi2_two_sample(ca / ua, cb / ub)
            p = psi(ca, cb)
            n = min(ca.sum() / ua, cb.sum() / ub)
            out[prefix + k] = {
                "psi": round(p, 6),
                "js": round(js_distance(ca, cb), 6),
                "ks": round(ks_binned(ca, cb), 6),
                "chi2": round(stat, 4),
                "p_value": pv,
                "samples": [round(ca.sum() / ua), round(cb.sum() / ub)],
                "drifted": bool(p > th["psi"] or (n >= th["min_samples"] and pv < th["p_value"])),
            }
    return out


class DriftMonitor:
    """Turns drift into alerts: every `interval_s` it checks each bundle version's windows of the last
    `window_s`, for the whole fleet and for every device tag (cohort), against the bundle's baseline.

    A feature that drifts with at least `min_samples` inputs opens an alert (a row in `alerts`); the
    alert is updated while it lasts and closed at the first check that no longer sees it drift (or sees
    no data). `last` keeps the latest PSI per (bundle, cohort, feature) for /metrics. With several server
    processes on one database, only the holder of the `drift-monitor` lease checks (see `_lease`).
    """

    def __init__(
        self,
        db: Database,
        interval_s: float = 30.0,
        window_s: float = 900.0,
        thresholds: dict[str, float] | None = None,
        lease_holder: str | None = None,
    ) -> None:
        self.db = db
        self.interval_s = interval_s
        self.window_s = window_s
        self.th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
        self.last: dict[tuple[str, str, str], float] = {}
        self.accuracy: dict[tuple[str, str], float] = {}  # (bundle, cohort) -> accuracy at the last check
        self.accuracy_detail: dict[tuple[str, str], dict[str, Any]] = {}  # ... its accuracy_figures
        self._references: dict[tuple[str, str], float | None] = {}
        self._baselines: dict[tuple[str, str], dict[str, Any] | None] = {}
        # Called with the alerts a check opened (after they are stored): armed captures listen here.
        self.on_open: Callable[[list[dict[str, Any]]], None] | None = None
        # Held across checks: it must outlast the interval between them.
        self.lease = Lease(db, "drift-monitor", max(10.0, 3 * interval_s), lease_holder)
        self._loop = LeasedLoop("drift check", self.lease, interval_s, self.check)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def _baseline(self, name: str, version: str) -> dict[str, Any] | None:
        if (name, version) not in self._baselines:
            try:
                self._baselines[(name, version)] = baseline_of(self.db, name, version)
            except InputError:
                self._baselines[(name, version)] = None
        return self._baselines[(name, version)]

    def _reference(self, name: str, version: str) -> float | None:
        if (name, version) not in self._references:
            self._references[(name, version)] = reference_accuracy(self.db, name, version)
        return self._references[(name, version)]

    def check(self, now: float | None = None) -> list[dict[str, Any]]:
        """One pass; returns the alerts open afterwards."""
        now = time.time() if now is None else now
        # The rollups of the look-back window, every bundle version and cohort: a check costs
        # versions x cohorts x buckets, whatever the number of devices.
        merged_by: dict[tuple[str, str, str], dict[str, Any]] = {}
        for r in series(self.db, cohort=None, since=now - self.window_s, until=now + _SKEW_S):
            accumulate(merged_by.setdefault((*r.bundle, r.cohort), empty_merge()), r.counts)
        seen: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        last: dict[tuple[str, str, str], float] = {}
        accuracy: dict[tuple[str, str], float] = {}
        detail: dict[tuple[str, str], dict[str, Any]] = {}
        for (name, version, cohort), merged in sorted(merged_by.items()):
            baseline = self._baseline(name, version)
            if baseline is None:
                continue
            try:
                stats = feature_stats(baseline, merged, self.th)
            except Exception:  # one bundle's bad data must not stop the checks of every other bundle
                log.exception("drift check of %s:%s cohort %s failed", name, version, cohort)
                continue
            for feature, st in stats.items():
                if st["psi"] is not None:
                    last[(f"{name}:{version}", cohort, feature)] = st["psi"]
                if st["drifted"] and st["samples"] >= self.th["min_samples"]:
                    seen[(name, version, cohort, feature)] = st
            acc = accuracy_figures(merged["confusion"])
            if acc["labelled"]:
                accuracy[(f"{name}:{version}", cohort)] = acc["accuracy"]
                detail[(f"{name}:{version}", cohort)] = acc
            cd = concept_drift(acc, self._reference(name, version), CONCEPT_THRESHOLDS)
            if cd is not None:
                moved = any(
                    st["drifted"] and st["samples"] >= self.th["min_samples"]
                    for f, st in stats.items()
                    if not f.startswith("output:")
                )
                kind = "accuracy" if moved else "concept"
                seen[(name, version, cohort, "accuracy")] = {"psi": None, "samples": cd["labelled"], **cd, "kind": kind}
        self.last = last
        self.accuracy, self.accuracy_detail = accuracy, detail
        opened: list[dict[str, Any]] = []
        with self.db.transaction() as cur:
            cur.execute("SELECT id, bundle_name, bundle_version, cohort, feature FROM alerts WHERE state = 'open'")
            open_now = {(r[1], r[2], r[3], r[4]): r[0] for r in cur.fetchall()}
            for key, st in seen.items():
                vals = (st["psi"], st["p_value"], st["samples"], json.dumps(st), now)
                if key in open_now:
                    cur.execute(
                        "UPDATE alerts SET psi = ?, p_value = ?, samples = ?, detail = ?, updated = ? WHERE id = ?",
                        (*vals, open_now[key]),
                    )
                else:
                    aid = "a-" + uuid.uuid4().hex[:12]
                    cur.execute(
                        "INSERT INTO alerts (id, bundle_name, bundle_version, cohort, feature, state, opened, "
                        "psi, p_value, samples, detail, updated) VALUES (?, ?, ?, ?, ?, 'open', ?, ?, ?, ?, ?, ?)",
                        (aid, *key, now, *vals),
                    )
                    opened.append({"id": aid, "bundle": f"{key[0]}:{key[1]}", "cohort": key[2], "feature": key[3]})
                    log.warning("drift alert: %s:%s cohort %s feature %s psi %s", *key, st["psi"])
            for key, aid in open_now.items():
                if key not in seen:
                    cur.execute(
                        "UPDATE alerts SET state = 'closed', closed = ?, updated = ? WHERE id = ?", (now, now, aid)
                    )
        if opened and self.on_open is not None:
            try:
                self.on_open(opened)
            except Exception:  # what listens must not stop the checks
                log.exception("drift alert listener failed")
        return list_alerts(self.db, "open")


ALERT_FIELDS = ("id", "bundle", "cohort", "feature", "state", "opened", "closed", "psi", "p_value", "samples")


def acknowledge(db: Database, alert_ids: list[str], by: str, mute_s: float = 0.0) -> int:
    """Acknowledge ALERT_IDS for BY (an operator), and mute them on the dashboard for MUTE_S seconds (0: not
    muted). They stay open while the drift lasts, and close by themselves as before. Returns how many."""
    if not alert_ids:
        raise InputError("name at least one alert to acknowledge")
    if not (isinstance(mute_s, (int, float)) and 0 <= mute_s <= 30 * 86400):
        raise InputError(f"mute must be between 0 and 30 days, got {mute_s!r} s")
    marks = ", ".join("?" * len(alert_ids))
    known = {a for (a,) in db.query(f"SELECT id FROM alerts WHERE id IN ({marks})", alert_ids)}
    unknown = [a for a in alert_ids if a not in known]
    if unknown:
        raise InputError(f"no alert {unknown[0]}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    now = time.time()
    muted = now + mute_s if mute_s else None
    with db.transaction() as cur:
        for a in sorted(known):
            cur.execute(
                "INSERT INTO alert_acks (alert_id, acked_by, acked_at, muted_until) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (alert_id) DO UPDATE SET acked_by = ?, acked_at = ?, muted_until = ?",
                (a, by, now, muted, by, now, muted),
            )
    return len(known)


def list_alerts(db: Database, state: str = "open", limit: int = 500) -> list[dict[str, Any]]:
    """Drift alerts, newest first; STATE is open, closed or all."""
    if state not in ("open", "closed", "all"):
        raise InputError(f"alert state {state!r}: use open, closed or all")
    sql = (
        "SELECT id, bundle_name, bundle_version, cohort, feature, state, opened, closed, psi, p_value, samples, "
        "detail, acked_by, acked_at, muted_until FROM alerts LEFT JOIN alert_acks ON alert_acks.alert_id = alerts.id"
    )
    params: list[Any] = []
    if state != "all":
        sql += " WHERE state = ?"
        params.append(state)
    sql += " ORDER BY opened DESC, feature LIMIT ?"
    params.append(limit)
    out = []
    now = time.time()
    for r in db.query(sql, params):
        a = dict(zip(ALERT_FIELDS, (r[0], f"{r[1]}:{r[2]}", *r[3:11]), strict=True))
        a["acknowledged"] = None if r[12] is None else {"by": r[12], "at": r[13]}
        a["muted_until"] = r[14]
        a["muted"] = r[14] is not None and float(r[14]) > now
        # Which drift it is: the inputs moved (data), the outputs moved (prediction), or accuracy fell while
        # the inputs did not (concept; 'accuracy' when the inputs moved as well).
        if a["feature"] == "accuracy":
            detail = json.loads(r[11] or "{}")
            a["kind"] = detail.get("kind", "concept")
            a["accuracy"], a["reference"] = detail.get("accuracy"), detail.get("reference")
        else:
            a["kind"] = "prediction" if str(a["feature"]).startswith("output:") else "data"
        out.append(a)
    return out
