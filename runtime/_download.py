"""Resumable HTTP(S) download of a bundle into a `.part` file, checked against size and sha256."""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from edgefleet import BundleError

from ._failpoints import failpoint

__all__ = ["DownloadError", "download"]

_CHUNK = 64 * 1024


class DownloadError(BundleError):
    """The download failed or was interrupted; the `.part` file stays for a Range resume."""


def _hash_existing(path: Path) -> tuple[int, hashlib._Hash]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n, h


def download(
    url: str,
    dest: Path,
    *,
    size: int,
    sha256: str,
    token: str | None = None,
    timeout: float = 30.0,
    max_bytes_per_s: float | None = None,
) -> Path:
    """Fetch URL to DEST, resuming DEST.part with a Range request; DEST appears only when complete and right."""
    part = dest.with_name(dest.name + ".part")
    have, h = _hash_existing(part) if part.exists() else (0, hashlib.sha256())
    if have > size:
        part.unlink()
        have, h = 0, hashlib.sha256()
    failpoint("download.start")
    if have < size:
        req = urllib.request.Request(url)
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416:
                part.unlink(missing_ok=True)
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise DownloadError(f"download of {url} failed: {exc}") from exc
        with resp:
            if have and resp.status != 206:
                # The server ignored the Range header: start over.
                have, h = 0, hashlib.sha256()
                mode = "wb"
            else:
                mode = "ab" if have else "wb"
            t0, sent0 = time.monotonic(), have
            with open(part, mode) as f:
                try:
                    while chunk := resp.read(_CHUNK):
                        if have + len(chunk) > size:
                            raise DownloadError(f"download of {url} is larger than the announced {size} bytes")
                        f.write(chunk)
                        h.update(chunk)
                        have += len(chunk)
                        f.flush()
                        failpoint("download.mid")
                        if max_bytes_per_s:
                            ahead = (have - sent0) / max_bytes_per_s - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)
                except (OSError, TimeoutError) as exc:
                    raise DownloadError(f"download of {url} was interrupted at {have}/{size} bytes: {exc}") from exc
                finally:
                    os.fsync(f.fileno())
    if have != size:
        raise DownloadError(f"download of {url} stopped at {have} of {size} bytes; it will resume")
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise BundleError(f"downloaded bundle from {url} does not match the announced sha256; discarded")
    os.replace(part, dest)
    failpoint("download.done")
    return dest
