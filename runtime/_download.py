"""Resumable HTTP(S) download of a bundle into a `.part` file, checked against size and sha256.

Everything a desired state says comes off the network: the announced size is capped and checked
against free disk before the first byte, a server that trickles is cut off by a minimum rate, and the
device's token goes only to origins the device trusts, never along a redirect to another one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefleet import BundleError
from edgefleet._fs import fsync_dir

from ._failpoints import failpoint

__all__ = ["DEFAULT_MAX_BUNDLE_BYTES", "DownloadError", "download", "origin"]

_CHUNK = 64 * 1024
DEFAULT_MAX_BUNDLE_BYTES = 2 << 30  # what the bundle reader accepts in all
_DISK_MARGIN = 64 << 20  # left free for the telemetry buffer and the state file
# Slower than this over a whole window counts as stalled (the part file stays, and the next attempt resumes).
_MIN_RATE_BYTES_PER_S = 1024.0
_RATE_WINDOW_S = 30.0


class _DiskError(OSError):
    """Writing the part file failed (ENOSPC, EIO, ...): the device's disk, not the connection."""


def origin(url: str) -> str:
    """scheme://host[:port] of URL, lower-cased, with the scheme's default port left out (ValueError for a
    malformed port)."""
    u = urllib.parse.urlsplit(url)
    default = {"http": 80, "https": 443}.get(u.scheme.lower())
    port = f":{u.port}" if u.port and u.port != default else ""
    return f"{u.scheme.lower()}://{(u.hostname or '').lower()}{port}"


def _same_origin(a: str, b: str) -> bool:
    try:
        return origin(a) == origin(b)
    except ValueError:
        return False


class _NoTokenAcrossOrigins(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but a redirect to another origin loses the Authorization header (urllib's own
    handler forwards every header, so a server could hand the device's token to any host)."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and not _same_origin(newurl, req.full_url):
            new.remove_header("Authorization")
        return new


_opener = urllib.request.build_opener(_NoTokenAcrossOrigins)


def https_handler(ca: str | os.PathLike[str] | None) -> urllib.request.HTTPSHandler:
    """HTTPS checked against CA (a PEM file) instead of the system's CAs (None: the system's)."""
    return urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca) if ca else None))


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
    token_for: Callable[[str], bool] = lambda _url: False,
    timeout: float = 30.0,
    max_bytes_per_s: float | None = None,
    max_size: int = DEFAULT_MAX_BUNDLE_BYTES,
    min_bytes_per_s: float = _MIN_RATE_BYTES_PER_S,
    cancel: threading.Event | None = None,
    ca: str | os.PathLike[str] | None = None,
) -> Path:
    """Fetch URL to DEST, resuming DEST.part with a Range request; DEST appears only when complete and right.

    TOKEN is sent only when TOKEN_FOR(url) allows it. TIMEOUT bounds each wait for data; a transfer slower
    than MIN_BYTES_PER_S over a 30 s window is cut off (DownloadError; the next attempt resumes). Setting
    CANCEL stops it between chunks (DownloadError; the part file stays for a resume). CA: the PEM file
    https:// URLs are checked against (default: the system's CAs).
    """
    try:
        origin(url)
    except ValueError as exc:
        raise BundleError(f"bundle URL {url!r} is malformed: {exc}") from exc
    if size > max_size:
        raise BundleError(
            f"bundle at {url} is announced as {size} bytes, more than this device's {max_size}-byte limit"
        )
    part = dest.with_name(dest.name + ".part")
    have, h = _hash_existing(part) if part.exists() else (0, hashlib.sha256())
    if have > size:
        part.unlink()
        have, h = 0, hashlib.sha256()
    free = shutil.disk_usage(dest.parent).free
    if size - have + _DISK_MARGIN > free:
        raise DownloadError(
            f"not enough disk for the bundle at {url}: {size - have} bytes to go, {free} free "
            f"(keeping {_DISK_MARGIN >> 20} MiB spare); it will retry"
        )
    failpoint("download.start")
    if have < size:
        req = urllib.request.Request(url)
        if token and token_for(url):
            req.add_header("Authorization", f"Bearer {token}")
        if have:
            req.add_header("Range", f"bytes={have}-")
        try:
            opener = _opener if ca is None else urllib.request.build_opener(_NoTokenAcrossOrigins, https_handler(ca))
            resp = opener.open(req, timeout=timeout)
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
            win_t, win_have = t0, have
            with open(part, mode) as f:
                try:
                    # read1: whatever has arrived, so a trickling server cannot hold a read open for ever.
                    while chunk := resp.read1(_CHUNK):
                        if have + len(chunk) > size:
                            raise DownloadError(f"download of {url} is larger than the announced {size} bytes")
                        try:
                            f.write(chunk)
                            f.flush()
                            failpoint("download.mid")
                        except OSError as exc:
                            raise _DiskError(exc.errno, f"writing {part}: {exc.strerror or exc}") from exc
                        h.update(chunk)
                        have += len(chunk)
                        if cancel is not None and cancel.is_set():
                            raise DownloadError(f"download of {url} was cancelled at {have}/{size} bytes")
                        now = time.monotonic()
                        if now - win_t >= _RATE_WINDOW_S:
                            rate = (have - win_have) / (now - win_t)
                            if rate < min_bytes_per_s:
                                raise DownloadError(
                                    f"download of {url} stalled at {have}/{size} bytes ({rate:.0f} B/s, "
                                    f"less than {min_bytes_per_s:.0f} B/s over {_RATE_WINDOW_S:.0f} s); it will resume"
                                )
                            win_t, win_have = now, have
                        if max_bytes_per_s:
                            ahead = (have - sent0) / max_bytes_per_s - (now - t0)
                            if ahead > 0:
                                if cancel is not None:
                                    cancel.wait(ahead)
                                else:
                                    time.sleep(ahead)
                except _DiskError:
                    # Our own disk, not the network: a full or failing disk must be reported (the agent's
                    # loop says so and retries the step), not retried quietly as a dropped connection.
                    raise
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
    fsync_dir(dest.parent)
    failpoint("download.done")
    return dest
