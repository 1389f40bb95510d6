"""Finding devices in a large fleet (issue 16): search by id, filter by tag, version and online, sort and page,
in SQL on SQLite and on a real PostgreSQL; the API and the dashboard page take the same parameters."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet import InputError
from edgefleet.fleet import FleetServer, ServerConfig


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, tmp_path: Path) -> FleetServer:
    db = None if request.param == "sqlite" else request.getfixturevalue("postgres").fresh_database()
    s = FleetServer(ServerConfig(data_dir=tmp_path / "fleet", db_url=db))
    now = time.time()
    with s.db.transaction() as cur:
        for i in range(120):
            tags = ["site-a" if i % 3 else "site-b", *(["night"] if i % 10 == 0 else [])]
            cur.execute(
                "INSERT INTO devices (id, tags, created, online, bundle_version, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                (f"cam-{i:04d}", json.dumps(tags), now, i % 2, "2.0.0" if i < 30 else "1.0.0", now - i),
            )
        # ids that LIKE would take for patterns: searched as text
        for dev, tags in (("odd_one", ["line_a"]), ("oddXone", ["lineXa"]), ("pct%dev", [])):
            cur.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (dev, json.dumps(tags), now))
    return s


def test_search_filter_sort_and_page(server: FleetServer) -> None:
    total, page = server.find_devices(limit=50)
    assert total == 123 and len(page) == 50 and page[0]["id"] == "cam-0000"
    total, page = server.find_devices(limit=50, offset=100)
    assert [d["id"] for d in page] == [f"cam-{i:04d}" for i in range(100, 120)] + ["oddXone", "odd_one", "pct%dev"]
    assert server.find_devices(q="CAM-011", limit=None)[0] == 10  # case-blind
    assert [d["id"] for d in server.find_devices(q="odd_", limit=None)[1]] == ["odd_one"]  # _ is a character
    assert [d["id"] for d in server.find_devices(q="%", limit=None)[1]] == ["pct%dev"]
    night = server.find_devices(tag="night", limit=None)[1]
    assert [d["id"] for d in night] == [f"cam-{i:04d}" for i in range(0, 120, 10)]
    assert server.find_devices(tag="site", limit=None)[0] == 0  # a whole tag, not a part of one
    assert [d["id"] for d in server.find_devices(tag="line_a", limit=None)[1]] == ["odd_one"]
    assert server.find_devices(version="2.0.0", online=True, limit=None)[0] == 15
    assert server.find_devices(online=False, tag="site-b", limit=None)[0] == 20
    recent = server.find_devices(sort="last_seen", limit=3)[1]
    assert [d["id"] for d in recent] == ["cam-0000", "cam-0001", "cam-0002"]
    by_version = server.find_devices(sort="version", q="cam", limit=None)[1]
    assert [d["bundle_version"] for d in by_version] == ["1.0.0"] * 90 + ["2.0.0"] * 30
    with pytest.raises(InputError, match="sort must be"):
        server.find_devices(sort="id; DROP TABLE devices")
    assert server.device("cam-0007")["tags"] == ["site-a"] and server.device("nobody") is None
