"""Accuracy from ground truth the devices learnt later: confusion matrices counted on the devices (no raw
inputs), merged per bundle version and cohort, and the concept-drift rule.

Data drift is the inputs moving (`_drift`), prediction drift the outputs moving; concept drift is the
relation between them changing: accuracy falls while the inputs look as they did.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgefleet import InputError, Manifest

from ._db import Database
from ._rollups import ALL, Rollup, accumulate, empty_merge, read

__all__ = [
    "CONCEPT_THRESHOLDS",
    "accuracy_figures",
    "accuracy_report",
    "accuracy_series",
    "concept_drift",
    "reference_accuracy",
]

# A cohort's accuracy has drifted when, with at least MIN_LABELLED labelled predictions, it is more than
# MAX_DROP below the reference and a one-sided test says the drop is no accident (p < P_VALUE).
CONCEPT_THRESHOLDS = {"max_drop": 0.1, "min_labelled": 50, "p_value": 1e-3}


def _wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    if not n:
        return (0.0, 1.0)
    p = k / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (round(max(0.0, mid - half), 6), round(min(1.0, mid + half), 6))


def accuracy_figures(confusion: np.ndarray | None, labels: list[str] | None = None) -> dict[str, Any]:
    """Accuracy with its 95% (Wilson) interval, and precision, recall and F1 per class, of CONFUSION
    (rows: true class, columns: predicted)."""
    if confusion is None or not confusion.sum():
        return {"labelled": 0, "accuracy": None, "ci95": None, "per_class": []}
    c = confusion.astype(np.int64)
    n, correct = int(c.sum()), int(np.trace(c))
    per = []
    for i in range(len(c)):
        tp, predicted, actual = int(c[i, i]), int(c[:, i].sum()), int(c[i].sum())
        precision = tp / predicted if predicted else None
        recall = tp / actual if actual else None
        f1 = 2 * precision * recall / (precision + recall) if precision and recall else (0.0 if actual else None)
        per.append(
            {
                "class": labels[i] if labels and i < len(labels) else i,
                "support": actual,
                "precision": None if precision is None else round(precision, 6),
                "precision_ci95": _wilson(tp, predicted) if predicted else None,
                "recall": None if recall is None else round(recall, 6),
                "recall_ci95": _wilson(tp, actual) if actual else None,
                "f1": None if f1 is None else round(f1, 6),
            }
        )
    return {"labelled": n, "accuracy": round(correct / n, 6), "ci95": _wilson(correct, n), "per_class": per}


def _manifest(db: Database, name: str, version: str) -> Manifest | None:
    rows = db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
    return Manifest.from_bytes(rows[0][0].encode()) if rows else None


def _build_accuracy(m: Manifest) -> float | None:
    scores = [float(e.metrics["accuracy"]) for e in m.models if isinstance(e.metrics.get("accuracy"), (int, float))]
    return max(scores) if scores else None


def reference_accuracy(db: Database, name: str, version: str) -> float | None:
    """What the bundle scored on its build's labelled evaluation set (the best of its models), if known."""
    m = _manifest(db, name, version)
    return None if m is None else _build_accuracy(m)


def concept_drift(acc: dict[str, Any], reference: float | None, th: dict[str, float]) -> dict[str, Any] | None:
    """The drop of ACC's accuracy below REFERENCE, when it is large, significant and well sampled; else None."""
    n, a = acc["labelled"], acc["accuracy"]
    if reference is None or a is None or n < th["min_labelled"] or reference - a <= th["max_drop"]:
        return None
    sd = math.sqrt(max(reference * (1 - reference), 1e-6) / n)
    p = 0.5 * math.erfc(((reference - a) / sd) / math.sqrt(2))
    if p >= th["p_value"]:
        return None
    return {"accuracy": a, "reference": reference, "drop": round(reference - a, 6), "p_value": p, "labelled": n}


def accuracy_report(
    db: Database,
    name: str,
    version: str,
    *,
    cohort: str = ALL,
    since: float | None = None,
    merged: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Accuracy of bundle NAME:VERSION on the labels fed back from COHORT (a tag; `*`: all) since SINCE
    (MERGED: those rollups, already read)."""
    m = _manifest(db, name, version)
    if m is None:
        raise InputError(f"bundle {name}:{version} is not published")
    merged = read(db, name, version, cohort, since) if merged is None else merged
    fig = accuracy_figures(merged["confusion"], m.labels or None)
    return {"bundle": f"{name}:{version}", **fig, "reference_accuracy": _build_accuracy(m)}


def accuracy_series(rows: list[Rollup], since: float, until: float, buckets: int = 48) -> dict[str, list[Any]]:
    """Accuracy over time from rollup ROWS (one bundle version and cohort): per span of BUCKETS equal spans of
    [SINCE, UNTIL), the labelled predictions, the accuracy and its 95% interval (None where nothing was
    labelled)."""
    width = max(1e-9, (until - since) / buckets)
    spans = [empty_merge() for _ in range(buckets)]
    for r in rows:
        i = int((r.bucket - since) / width)
        if 0 <= i < buckets:
            accumulate(spans[i], r.counts)
    out: dict[str, list[Any]] = {"labelled": [], "accuracy": [], "ci_low": [], "ci_high": []}
    for m in spans:
        fig = accuracy_figures(m["confusion"])
        out["labelled"].append(fig["labelled"])
        out["accuracy"].append(fig["accuracy"])
        out["ci_low"].append(fig["ci95"][0] if fig["ci95"] else None)
        out["ci_high"].append(fig["ci95"][1] if fig["ci95"] else None)
    return out
