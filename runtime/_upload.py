"""Uploading captured samples to the fleet (opt-in): one `.npz` per request, with the device's token, to the
fleet's own origin only; samples leave the device's buffer once the server has stored them."""

from __future__ import annotations

import io
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np

from edgefleet import EdgefleetError

from ._download import https_handler
from ._telemetry import TelemetryBuffer

__all__ = ["encode_samples", "upload_samples"]


def encode_samples(rows: list[tuple[int, float, str, np.ndarray, np.ndarray, int | None]]) -> tuple[bytes, list[int]]:
    """The `.npz` of ROWS that share the first row's input shape and type: `x` (inputs), `outputs`, `label`
    (-1: none fed back), `ts`, `bundle` (NAME:VERSION). Returns it and the seqs it holds."""
    first = rows[0][3]
    keep = [
        r for r in rows if r[3].shape == first.shape and r[3].dtype == first.dtype and r[4].shape == rows[0][4].shape
    ]
    buf = io.BytesIO()
    np.savez(
        buf,
        x=np.concatenate([r[3] for r in keep]),
        outputs=np.concatenate([r[4] for r in keep]),
        label=np.asarray([-1 if r[5] is None else r[5] for r in keep], np.int64),
        ts=np.asarray([r[1] for r in keep], np.float64),
        bundle=np.asarray([r[2] for r in keep]),
    )
    return buf.getvalue(), [r[0] for r in keep]


_CHUNK = 16 * 1024


def paced(
    body: bytes, bytes_per_s: float | None, clock: Any = time.monotonic, sleep: Any = time.sleep
) -> Iterator[bytes]:
    """BODY in chunks, sent no faster than BYTES_PER_S (None or 0: as fast as the link takes them)."""
    t0 = clock()
    for i in range(0, len(body), _CHUNK):
        if bytes_per_s:
            ahead = i / bytes_per_s - (clock() - t0)
            if ahead > 0:
                sleep(ahead)
        yield body[i : i + _CHUNK]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a redirect would carry the token elsewhere: the upload fails instead


def upload_samples(
    buffer: TelemetryBuffer,
    url: str,
    token: str,
    *,
    limit: int,
    max_bytes: int,
    bundle_name: str | None = None,
    timeout_s: float = 60.0,
    ca: str | None = None,
    bytes_per_s: float | None = None,
) -> dict[str, int]:
    """Send up to LIMIT captured samples (at most MAX_BYTES) to URL, no faster than BYTES_PER_S; they are
    dropped from BUFFER once the server answers 2xx. Returns what was sent; raises EdgefleetError naming what
    went wrong."""
    rows = buffer.take_samples(limit, max_bytes, bundle_name)
    if not rows:
        raise EdgefleetError("no captured samples to upload (capture_per_hour is 0, or none captured yet)")
    body, seqs = encode_samples(rows)
    req = urllib.request.Request(
        url,
        data=paced(body, bytes_per_s),
        method="POST",
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/octet-stream",
            "Content-Length": str(len(body)),  # a length, so the paced chunks go as one plain body
        },
    )
    try:
        with urllib.request.build_opener(_NoRedirect, https_handler(ca)).open(req, timeout=timeout_s) as r:
            r.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise EdgefleetError(f"upload to {url} refused: HTTP {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise EdgefleetError(f"upload to {url} failed: {exc}") from None
    buffer.drop_samples(seqs)
    labels = [r[5] for r in rows if r[0] in set(seqs)]
    return {"samples": len(seqs), "labelled": sum(1 for v in labels if v is not None), "bytes": len(body)}
