"""Data capture for retraining: an operator (or an alert) asks a cohort for samples; devices that opted in
(`capture_upload = true`) upload captured inputs with the labels fed back for them; the server keeps each
capture as a dataset with provenance, and exports it as the `.npz` `edgefleet build` reads.

A capture is a row of `captures` (who asked, which tag, how many samples per device, the alert that asked)
and one file per device that answered under `DATA_DIR/captures/<id>/` with a row of `capture_uploads`
(device, bundle, samples, labelled, bytes, when). A device answers once per capture, with at most the
samples asked for; refusals (a device that did not opt in) arrive as `capture_refused` events. Captures
are deleted after `keep_s` (housekeeping), and all of one device's data on request.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import shutil
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet import InputError
from edgefleet._fs import atomic_write
from edgefleet.protocol import MAX_CAPTURE_SAMPLES

if TYPE_CHECKING:
    from ._server import FleetServer

__all__ = ["MAX_UPLOAD_BYTES", "Captures"]

log = logging.getLogger("edgefleet.fleet.captures")

MAX_UPLOAD_BYTES = 64 << 20  # one device's answer to one capture
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS captures (
        id TEXT PRIMARY KEY, selector TEXT NOT NULL, samples INTEGER NOT NULL, state TEXT NOT NULL,
        created FLOAT8 NOT NULL, created_by TEXT NOT NULL, alert_id TEXT, devices INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS capture_uploads (
        capture_id TEXT NOT NULL, device_id TEXT NOT NULL, bundle TEXT NOT NULL, samples INTEGER NOT NULL,
        labelled INTEGER NOT NULL, bytes INTEGER NOT NULL, path TEXT NOT NULL, received FLOAT8 NOT NULL,
        PRIMARY KEY (capture_id, device_id))""",
]
_FIELDS = ("id", "selector", "samples", "state", "created", "created_by", "alert_id", "devices")


class Captures:
    def __init__(self, server: FleetServer) -> None:
        self.server = server
        self.db = server.db
        self.dir = server.dir / "captures"
        with self.db.transaction() as cur:
            for stmt in SCHEMA:
                cur.execute(stmt)

    # -- asking ----------------------------------------------------------------------------------------
    def create(
        self,
        selector: str,
        samples: int,
        *,
        alert_id: str | None = None,
        when_alert: bool = False,
        by: str = "operator",
    ) -> dict[str, Any]:
        """Ask the devices tagged SELECTOR for up to SAMPLES captured samples each (now, or, WHEN_ALERT, the
        next time a drift alert opens on that cohort)."""
        if not isinstance(selector, str) or not selector:
            raise InputError("a capture needs --selector TAG")
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= MAX_CAPTURE_SAMPLES:
            raise InputError(f"--samples must be a whole number from 1 to {MAX_CAPTURE_SAMPLES}, got {samples!r}")
        if alert_id is not None and not self.db.query("SELECT 1 FROM alerts WHERE id = ?", (alert_id,)):
            raise InputError(f"no drift alert {alert_id}")
        cid = "cap-" + secrets.token_hex(5)
        state = "armed" if when_alert else "asked"
        self.db.execute(
            "INSERT INTO captures (id, selector, samples, state, created, created_by, alert_id, devices) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
            (cid, selector, samples, state, time.time(), by, alert_id),
        )
        if not when_alert:
            self._ask(cid, selector, samples)
        return self.get(cid)

    def _ask(self, cid: str, selector: str, samples: int) -> None:
        devices = [d["id"] for d in self.server.devices() if selector in d["tags"]]
        if not devices:
            self.db.execute("UPDATE captures SET state = 'asked' WHERE id = ?", (cid,))
            return
        url = f"{self.server.config.base_url}/api/captures/{cid}/upload"
        args = {"capture_id": cid, "samples": samples, "url": url}
        # 'asked' before anyone is asked: a fast device's upload would otherwise find the capture still
        # armed, be refused, and keep its samples (the demo's test saw a whole cohort refused so)
        self.db.execute("UPDATE captures SET state = 'asked', devices = ? WHERE id = ?", (len(devices), cid))
        self.server.send_command("capture", args, devices, by=f"capture {cid}")

    def on_alerts(self, opened: list[dict[str, Any]]) -> None:
        """Fire the armed captures whose cohort an alert just opened on (the drift monitor calls this)."""
        cohorts = {a["cohort"]: a["id"] for a in opened}
        for cid, selector, samples in self.db.query("SELECT id, selector, samples FROM captures WHERE state = 'armed'"):
            if selector in cohorts:
                self.db.execute("UPDATE captures SET alert_id = ? WHERE id = ?", (cohorts[selector], cid))
                try:
                    self._ask(cid, selector, samples)
                except InputError as exc:
                    log.warning("capture %s: %s", cid, exc)

    # -- answers ---------------------------------------------------------------------------------------
    def upload(self, cid: str, device_id: str, body: bytes) -> dict[str, Any]:
        """DEVICE_ID's answer to capture CID: an `.npz` (see runtime/_upload.py), checked, stored once."""
        cap = self.get(cid)
        if cap["state"] != "asked":
            raise InputError(f"capture {cid} is {cap['state']}: it takes no uploads")
        if not self.db.query(
            "SELECT 1 FROM commands WHERE device_id = ? AND command = 'capture' AND sent_by = ?",
            (device_id, f"capture {cid}"),
        ):
            raise InputError(f"device {device_id} was not asked for capture {cid}")
        arrays = _read_npz(body)
        x, label = arrays["x"], arrays["label"]
        if len(x) > cap["samples"]:
            raise InputError(f"{len(x)} samples uploaded; capture {cid} asked for at most {cap['samples']}")
        bundles = sorted({str(b) for b in arrays["bundle"]})
        for b in bundles:
            self._check_labels(b, label[arrays["bundle"] == b])
        d = self.dir / cid
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"{device_id}.npz"
        labelled = int((label >= 0).sum())
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO capture_uploads (capture_id, device_id, bundle, samples, labelled, bytes, path, "
                "received) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (capture_id, device_id) DO NOTHING",
                (cid, device_id, ",".join(bundles), len(x), labelled, len(body), str(path), time.time()),
            )
            if not cur.rowcount:
                raise InputError(f"device {device_id} has answered capture {cid} already")
            atomic_write(path, body)  # inside the transaction: a failed write stores no row either
        return {"capture": cid, "device": device_id, "samples": len(x), "labelled": labelled}

    def _check_labels(self, bundle: str, labels: np.ndarray) -> None:
        """Labels of samples from BUNDLE (NAME:VERSION) must be classes of it (its drift baseline's classes),
        or -1 (none fed back); a bundle not published here is refused."""
        name, _, version = bundle.partition(":")
        rows = self.db.query("SELECT manifest FROM bundles WHERE name = ? AND version = ?", (name, version))
        if not rows:
            raise InputError(f"upload names bundle {bundle!r}, which is not published here")
        outputs = (json.loads(rows[0][0]).get("drift_baseline") or {}).get("outputs") or {}
        classes = len((outputs.get("predicted_class") or {}).get("proportions") or [])
        labelled = labels[labels >= 0]
        if classes and len(labelled) and int(labelled.max()) >= classes:
            raise InputError(
                f"upload has label {int(labelled.max())}; bundle {bundle} has {classes} classes (0-{classes - 1})"
            )

    # -- reading ---------------------------------------------------------------------------------------
    def get(self, cid: str) -> dict[str, Any]:
        rows = self.db.query(f"SELECT {', '.join(_FIELDS)} FROM captures WHERE id = ?", (cid,))
        if not rows:
            raise InputError(f"no capture {cid}")
        out = dict(zip(_FIELDS, rows[0], strict=True))
        ups = self.db.query(
            "SELECT device_id, bundle, samples, labelled, bytes, received FROM capture_uploads WHERE capture_id = ? "
            "ORDER BY device_id",
            (cid,),
        )
        out["uploads"] = [
            {"device": d, "bundle": b, "samples": n, "labelled": lab, "bytes": nb, "received": r}
            for d, b, n, lab, nb, r in ups
        ]
        out["total_samples"] = sum(u["samples"] for u in out["uploads"])
        out["total_labelled"] = sum(u["labelled"] for u in out["uploads"])
        events = self.db.query(
            "SELECT device_id, body FROM events WHERE type IN ('capture_refused', 'capture_failed') ORDER BY ts"
        )
        bodies = [(dev, json.loads(body)) for dev, body in events]
        out["refused"] = [{"device": dev, "reason": b.get("reason")} for dev, b in bodies if b.get("capture_id") == cid]
        return out

    def list(self) -> list[dict[str, Any]]:
        return [
            dict(zip(_FIELDS, r, strict=True))
            for r in self.db.query(f"SELECT {', '.join(_FIELDS)} FROM captures ORDER BY created DESC")
        ]

    def export(self, cid: str, labelled_only: bool = False) -> bytes:
        """Capture CID as one `.npz`: `x`, `y` (the fed-back labels; -1 where none), and per sample its
        `device`, `bundle` and `ts` (provenance). LABELLED_ONLY: only samples with a label, so `y` can go
        to `edgefleet build --train / --eval` as it is."""
        self.get(cid)
        parts = []
        for dev, path in self.db.query(
            "SELECT device_id, path FROM capture_uploads WHERE capture_id = ? ORDER BY device_id", (cid,)
        ):
            a = _read_npz(Path(path).read_bytes())
            a["device"] = np.asarray([dev] * len(a["x"]))
            parts.append(a)
        if not parts:
            raise InputError(f"capture {cid} has no uploads yet")
        shape = parts[0]["x"].shape[1:]
        if any(p["x"].shape[1:] != shape for p in parts):
            raise InputError(f"capture {cid} holds inputs of different shapes (several models?): export per bundle")
        keys = ("x", "label", "device", "bundle", "ts")
        merged = {k: np.concatenate([p[k] for p in parts]) for k in keys}
        if labelled_only:
            keep = merged["label"] >= 0
            if not keep.any():
                raise InputError(f"capture {cid} has no labelled samples (devices fed back no labels for them)")
            merged = {k: v[keep] for k, v in merged.items()}
        buf = io.BytesIO()
        np.savez(
            buf,
            x=merged["x"].astype(np.float32),
            y=merged["label"].astype(np.int64),
            device=merged["device"],
            bundle=merged["bundle"],
            ts=merged["ts"],
        )
        return buf.getvalue()

    # -- forgetting ------------------------------------------------------------------------------------
    def delete_device(self, device_id: str) -> int:
        """Delete every captured sample of DEVICE_ID; returns how many uploads went."""
        rows = self.db.query("SELECT capture_id, path FROM capture_uploads WHERE device_id = ?", (device_id,))
        for _, path in rows:
            Path(path).unlink(missing_ok=True)
        self.db.execute("DELETE FROM capture_uploads WHERE device_id = ?", (device_id,))
        return len(rows)

    def expire(self, now: float, keep_s: float) -> int:
        """Delete captures created before NOW - KEEP_S, with their files."""
        old = [cid for (cid,) in self.db.query("SELECT id FROM captures WHERE created < ?", (now - keep_s,))]
        for cid in old:
            shutil.rmtree(self.dir / cid, ignore_errors=True)
            with self.db.transaction() as cur:
                cur.execute("DELETE FROM capture_uploads WHERE capture_id = ?", (cid,))
                cur.execute("DELETE FROM captures WHERE id = ?", (cid,))
        return len(old)


def _read_npz(body: bytes) -> dict[str, np.ndarray]:
    """An uploaded answer, checked: numeric `x` with a batch dimension, one `label` (integer, -1 or a
    class), `ts` and `bundle` per sample; anything else is an InputError naming it."""
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"upload is not a readable .npz of plain arrays: {exc}") from None
    missing = {"x", "label", "ts", "bundle"} - set(arrays)
    if missing:
        raise InputError(f"upload lacks array(s) {sorted(missing)}")
    x, label = arrays["x"], arrays["label"]
    if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or not len(x):
        raise InputError(f"upload 'x' must be a numeric array with a batch dimension, got {x.dtype} {x.shape}")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise InputError("upload 'x' holds NaN or infinite values")
    n = len(x)
    if not np.issubdtype(label.dtype, np.integer) or label.shape != (n,) or (label < -1).any():
        raise InputError("upload 'label' must hold one integer per sample (-1: no label)")
    if arrays["ts"].shape != (n,) or arrays["bundle"].shape != (n,) or arrays["bundle"].dtype.kind != "U":
        raise InputError("upload 'ts' and 'bundle' must hold one value per sample")
    return arrays
