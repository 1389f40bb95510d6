"""The agent's bundle download against servers that misbehave: redirects to another host, a trickle, an
announced size beyond the device's limit or its disk, endless data (real HTTP servers on loopback)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from edgefleet import BundleError
from edgefleet.runtime import _download
from edgefleet.runtime._download import DownloadError, download, origin

BODY = bytes(range(256)) * 64  # 16 KiB
SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Authorization")))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", srv.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        if self.path != "/endless":  # endless: no length, the body ends when the connection does (never)
            self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if self.path == "/trickle":
            for b in BODY:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.25)
        elif self.path == "/endless":
            while True:
                self.wfile.write(BODY)
        else:
            self.wfile.write(BODY)


@pytest.fixture()
def servers() -> Iterator[tuple[Any, Any]]:
    """Two HTTP servers on different ports: two origins."""
    made = []
    for _ in range(2):
        s = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        s.daemon_threads = True
        s.seen = []  # type: ignore[attr-defined]
        s.url = f"http://127.0.0.1:{s.server_address[1]}"  # type: ignore[attr-defined]
        threading.Thread(target=s.serve_forever, daemon=True).start()
        made.append(s)
    yield made[0], made[1]
    for s in made:
        s.shutdown()
        s.server_close()


def test_the_token_never_leaves_the_trusted_origin(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    home, other = servers
    trusted = {origin(home.url)}
    allow = lambda url: origin(url) in trusted  # noqa: E731
    download(f"{home.url}/b.efb", tmp_path / "a.efb", size=len(BODY), sha256=SHA, token="s3cret", token_for=allow)
    assert home.seen[-1] == ("/b.efb", "Bearer s3cret")
    # A desired state naming another host, and a redirect from the trusted one to another: no token goes there.
    download(f"{other.url}/b.efb", tmp_path / "b.efb", size=len(BODY), sha256=SHA, token="s3cret", token_for=allow)
    home.redirect_to = f"{other.url}/b.efb"  # type: ignore[attr-defined]
    download(f"{home.url}/redirect", tmp_path / "c.efb", size=len(BODY), sha256=SHA, token="s3cret", token_for=allow)
    assert home.seen[-1] == ("/redirect", "Bearer s3cret")
    assert other.seen == [("/b.efb", None), ("/b.efb", None)]
    assert (tmp_path / "c.efb").read_bytes() == BODY


def test_a_trickling_server_is_cut_off_and_the_part_file_kept(
    tmp_path: Path, servers, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    home, _ = servers
    monkeypatch.setattr(_download, "_RATE_WINDOW_S", 1.5)  # a 30 s window in the product; 1.5 s here
    t = time.monotonic()
    with pytest.raises(DownloadError, match="stalled"):
        download(f"{home.url}/trickle", tmp_path / "t.efb", size=len(BODY), sha256=SHA)
    assert time.monotonic() - t < 10
    assert (tmp_path / "t.efb.part").exists() and not (tmp_path / "t.efb").exists()


def test_announced_sizes_beyond_the_limit_or_the_disk_are_refused_unfetched(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    home, _ = servers
    with pytest.raises(BundleError, match="more than this device's"):
        download(f"{home.url}/b.efb", tmp_path / "x.efb", size=10**12, sha256=SHA)
    with pytest.raises(DownloadError, match="not enough disk"):
        download(f"{home.url}/b.efb", tmp_path / "x.efb", size=10**15, sha256=SHA, max_size=10**16)
    assert home.seen == []


def test_endless_data_stops_at_the_announced_size(tmp_path: Path, servers) -> None:  # type: ignore[no-untyped-def]
    home, _ = servers
    with pytest.raises(DownloadError, match="larger than the announced"):
        download(f"{home.url}/endless", tmp_path / "e.efb", size=len(BODY) * 3, sha256=SHA)
    assert not (tmp_path / "e.efb").exists()
