"""Fleet-wide drift: merge the devices' telemetry windows for a bundle version and compare them with
the bundle's baseline (and cohorts with each other) using the statistics in `edgefleet._drift`."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from edgefleet import InputError, Manifest
from edgefleet._drift import chi2_goodness, chi2_two_sample, js_distance, ks_binned, psi

from ._db import Database

__all__ = ["DEFAULT_THRESHOLDS", "drift_report", "merge_windows"]

# A feature drifts when its PSI passes this (0.1: watch, 0.25: act, the usual reading) or the chi-square
# p-value falls below P_VALUE with enough samples to mean something.
DEFAULT_THRESHOLDS = {"psi": 0.25, "p_value": 1e-4, "min_samples": 200}


def merge_windows(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counts of telemetry windows (same bundle, so the same bins)."""
    inputs: dict[str, np.ndarray] = {}
    outputs: dict[str, np.ndarray] = {}
    calls = samples = summarised = 0
    for w in bodies:
        calls += int(w["calls"])
        samples += int(w["samples"])
        summarised += int(w.get("summarised", w["samples"]))
        for group, acc in ((w["inputs"], inputs), (w["outputs"], outputs)):
            for k, v in group.items():
                a = np.asarray(v, dtype=np.int64)
                acc[k] = acc[k] + a if k in acc and acc[k].shape == a.shape else a
    return {"calls": calls, "samples": samples, "summarised": summarised, "inputs": inputs, "outputs": outputs}


def _feature(ref: list[float], cur: np.ndarray, thresholds: dict[str, float]) -> dict[str, Any]:
    n = int(cur.sum())
    if n == 0:
        return {"psi": None, "js": None, "ks": None, "chi2": None, "p_value": None, "samples": 0, "drifted": False}
    p = psi(ref, cur)
    stat, pv = chi2_goodness(ref, cur)
    drifted = p > thresholds["psi"] or (n >= thresholds["min_samples"] and pv < thresholds["p_value"])
    return {
        "psi": round(p, 6),
        "js": round(js_distance(ref, cur), 6),
        "ks": round(ks_binned(ref, cur), 6),
        "chi2": round(stat, 4),
        "p_value": pv,
        "samples": n,
        "drifted": bool(drifted),
    }


def drift_report(
    db: Database,
    name: str,
    version: str,
    *,
    devices: list[str] | None = None,
    since: float | None = None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per input feature and for the predicted-class distribution: PSI, JS, KS, chi-square against the baseline."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    rows = db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
    if not rows:
        raise InputError(f"bundle {name}:{version} is not published")
    baseline = Manifest.from_bytes(rows[0][0].encode()).drift_baseline
    if not baseline:
        raise InputError(f"bundle {name}:{version} carries no drift baseline")
    sql = "SELECT device_id, body FROM windows WHERE bundle_name = ? AND bundle_version = ?"
    params: list[Any] = [name, version]
    if since is not None:
        sql += " AND start >= ?"
        params.append(since)
    bodies = [json.loads(b) for d, b in db.query(sql, params) if devices is None or d in devices]
    merged = merge_windows(bodies)
    features: dict[str, Any] = {}
    for f in baseline["inputs"]:
        cur = merged["inputs"].get(f["name"], np.zeros(len(f["proportions"]), np.int64))
        features[f["name"]] = _feature(f["proportions"], cur, th)
    out = baseline["outputs"]
    for key in ("predicted_class", "confidence"):
        cur = merged["outputs"].get(key, np.zeros(len(out[key]["proportions"]), np.int64))
        features[f"output:{key}"] = _feature(out[key]["proportions"], cur, th)
    return {
        "bundle": f"{name}:{version}",
        "windows": len(bodies),
        "calls": merged["calls"],
        "samples": merged["samples"],
        "thresholds": th,
        "features": features,
        "drifted": sorted(k for k, v in features.items() if v["drifted"]),
    }


def compare_cohorts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Chi-square homogeneity and PSI between two merged cohorts, per feature present in both."""
    out = {}
    for group in ("inputs", "outputs"):
        for k in set(a[group]) & set(b[group]):
            ca, cb = a[group][k], b[group][k]
            if ca.shape != cb.shape or not ca.sum() or not cb.sum():
                continue
            stat, pv = chi2_two_sample(ca, cb)
            out[k] = {"psi": round(psi(ca, cb), 6), "js": round(js_distance(ca, cb), 6), "chi2": stat, "p_value": pv}
    return out
