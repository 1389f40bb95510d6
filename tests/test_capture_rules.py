"""What a capture upload must be to be stored (issue 18, bad input): at most the samples asked for, labels that
are classes of the bundle each sample names (a published one), and captures expire with their files after the
configured retention. On a real fleet server's storage (SQLite), without a broker: the capture and its
command are recorded as `capture create` records them."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgefleet import InputError
from edgefleet.fleet import FleetServer, ServerConfig


def _npz(x: np.ndarray, labels: list[int], bundle: str = "mlp:1.0.0") -> bytes:
    buf = io.BytesIO()
    n = len(x)
    np.savez(buf, x=x, label=np.asarray(labels, np.int64), ts=np.zeros(n), bundle=np.asarray([bundle] * n))
    return buf.getvalue()


@pytest.fixture
def server(tmp_path: Path, publisher, mlp_bundles: dict) -> FleetServer:
    s = FleetServer(ServerConfig(data_dir=tmp_path / "fleet", trusted_keys=[Path(publisher[2])]))
    s.publish_bundle(mlp_bundles["1.0.0"])
    now = time.time()
    with s.db.transaction() as cur:
        for dev in ("cam-1", "cam-2", "cam-3", "cam-4"):
            cur.execute("INSERT INTO devices (id, tags, created) VALUES (?, ?, ?)", (dev, json.dumps(["site"]), now))
        cur.execute(
            "INSERT INTO captures (id, selector, samples, state, created, created_by, alert_id, devices) "
            "VALUES ('cap-1', 'site', 4, 'asked', ?, 'operator', NULL, 4)",
            (now,),
        )
        for i, dev in enumerate(("cam-1", "cam-2", "cam-3", "cam-4")):
            cur.execute(
                "INSERT INTO commands (id, device_id, command, args, sent, sent_by) "
                "VALUES (?, ?, 'capture', '{}', ?, 'capture cap-1')",
                (f"c-{i}", dev, now),
            )
    return s


def test_uploads_are_refused_unless_they_fit_what_was_asked_and_the_bundle(server: FleetServer, digits) -> None:
    x = digits["eval"][0][:5].astype(np.float32)
    classes = len(json.loads(server.db.query("SELECT manifest FROM bundles")[0][0])["drift_baseline"]["outputs"][
        "predicted_class"]["proportions"])  # fmt: skip
    for dev, body, why in (
        ("cam-1", _npz(x, [0, 1, 2, 3, 4]), "asked for at most 4"),
        ("cam-2", _npz(x[:2], [1, classes]), f"bundle mlp:1.0.0 has {classes} classes"),
        ("cam-3", _npz(x[:2], [1, 2], bundle="mlp:9.9.9"), "not published here"),
        ("cam-4", _npz(x[:2], [-2, 1]), "label"),
    ):
        with pytest.raises(InputError, match=why):
            server.captures.upload("cap-1", dev, body)
    assert server.db.query("SELECT COUNT(*) FROM capture_uploads")[0][0] == 0  # nothing stored half
    got = server.captures.upload("cap-1", "cam-2", _npz(x[:3], [1, -1, classes - 1]))
    assert got["samples"] == 3 and got["labelled"] == 2
    ds = np.load(io.BytesIO(server.captures.export("cap-1")))
    assert ds["x"].shape == (3, *x.shape[1:]) and ds["y"].tolist() == [1, -1, classes - 1]


def test_captures_expire_with_their_files_after_the_retention(server: FleetServer, digits) -> None:
    x = digits["eval"][0][:2].astype(np.float32)
    server.captures.upload("cap-1", "cam-1", _npz(x, [1, 2]))
    files = list((server.dir / "captures" / "cap-1").glob("*.npz"))
    assert len(files) == 1
    day = 86400.0
    assert server.captures.expire(time.time(), 2 * day) == 0  # younger than the retention: kept
    assert server.captures.expire(time.time() + 3 * day, 2 * day) == 1
    assert not files[0].exists() and not server.db.query("SELECT 1 FROM captures")
    with pytest.raises(InputError, match="no capture cap-1"):
        server.captures.get("cap-1")
