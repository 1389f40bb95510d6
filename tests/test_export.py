"""`BufferDrain` over a real SQLite buffer: order, the byte budget, refusals, reconnects and
acknowledgements, with a transport the test steers (the MQTT exporter itself runs in test_agent)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

from edgefleet.runtime import TelemetryBuffer
from edgefleet.runtime._export import BufferDrain, ExportResult, Record


class Transport:
    """Takes what it has room for; delivered keys are acknowledged when the test says so."""

    def __init__(self, room: int = 4) -> None:
        self.max, self.epoch, self.refuse_after = room, 0, None
        self.sent: list[str] = []
        self.inflight: list[str] = []
        self.acked: list[str] = []

    def room(self) -> int:
        return self.max - len(self.inflight)

    def export(self, batch: Sequence[Record]) -> ExportResult:
        took = batch if self.refuse_after is None else batch[: self.refuse_after]
        self.sent += [r.key for r in took]
        self.inflight += [r.key for r in took]
        return ExportResult(len(took), None if len(took) == len(batch) else 0.5)

    def deliver(self) -> None:
        self.acked += self.inflight
        self.inflight = []

    def reconnect(self) -> None:
        self.inflight, self.epoch = [], self.epoch + 1

    def acknowledged(self) -> list[str]:
        keys, self.acked = self.acked, []
        return keys

    def unacknowledged(self, keys: list[str]) -> None:
        self.acked[:0] = keys


def _buffer(tmp_path: Path, n: int, pad: int = 0) -> TelemetryBuffer:
    buf = TelemetryBuffer(tmp_path / "telemetry.db")
    for i in range(n):
        buf.add({"key": f"w{i}", "start": i, "pad": "x" * pad})
    return buf


def test_oldest_first_within_the_in_flight_room_and_deleted_only_when_delivered(tmp_path: Path) -> None:
    buf, t = _buffer(tmp_path, 10), Transport(room=4)
    drain = BufferDrain(buf, t, bytes_per_s=1e9)
    drain.run_once()
    assert t.sent == ["w0", "w1", "w2", "w3"]
    drain.run_once()  # no room until something is delivered
    assert len(t.sent) == 4 and len(buf.pending(limit=100)) == 10
    t.deliver()
    drain.run_once()
    assert t.sent[4:] == ["w4", "w5", "w6", "w7"] and len(buf.pending(limit=100)) == 6
    t.deliver()
    drain.run_once()
    t.deliver()
    drain.run_once()
    assert t.sent == [f"w{i}" for i in range(10)] and buf.pending(limit=100) == []


def test_a_reconnect_sends_everything_unacknowledged_again(tmp_path: Path) -> None:
    buf, t = _buffer(tmp_path, 6), Transport(room=4)
    drain = BufferDrain(buf, t, bytes_per_s=1e9)
    drain.run_once()
    t.reconnect()  # w0..w3 were taken, never acknowledged
    drain.run_once()
    assert t.sent == ["w0", "w1", "w2", "w3", "w0", "w1", "w2", "w3"]
    t.deliver()
    drain.rewind()  # the fleet's flush command: the same, without a reconnect
    drain.run_once()
    assert t.sent[8:] == ["w4", "w5"]


def test_a_refused_export_is_retried_from_where_it_stopped(tmp_path: Path) -> None:
    buf, t = _buffer(tmp_path, 4), Transport(room=8)
    t.refuse_after = 1
    drain = BufferDrain(buf, t, bytes_per_s=1e9)
    drain.run_once()
    assert t.sent == ["w0"] and drain.retry_at > time.monotonic()
    t.refuse_after = None
    drain.run_once()
    assert t.sent == ["w0", "w1", "w2", "w3"]


def test_the_byte_budget_paces_sending(tmp_path: Path) -> None:
    buf, t = _buffer(tmp_path, 30, pad=900), Transport(room=100)
    size = len(json.dumps({"key": "w0", "start": 0, "pad": "x" * 900}))
    rate = 4 * size  # four records a second
    drain = BufferDrain(buf, t, bytes_per_s=rate)
    t0 = time.monotonic()
    while len(t.sent) < 12:
        drain.run_once()
        t.deliver()
        time.sleep(max(0.0, min(0.05, drain.retry_at - time.monotonic())))
    # 12 records at 4/s with an empty bucket at the start: about 3 s, and never a burst above the cap.
    assert time.monotonic() - t0 >= 2.0


def test_flush_waits_for_delivery_and_gives_up_at_its_timeout(tmp_path: Path) -> None:
    buf, t = _buffer(tmp_path, 3), Transport(room=8)
    drain = BufferDrain(buf, t, bytes_per_s=1e9)
    assert drain.flush(0.2) is False  # sent, never delivered
    t.deliver()
    assert drain.flush(1.0) is True and buf.pending(limit=10) == []
