"""The telemetry buffer: windows on the baseline bins, bounded with drop-oldest, durable across kill -9,
acknowledged deletes, a full disk and a corrupt file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edgefleet.runtime as rt
from edgefleet._drift import window_counts
from edgefleet.protocol import check_window, latency_quantile

from .conftest import run_cli


def _model(mlp_bundles: dict, publisher, tmp_path: Path, summary_budget: float | None = None, **kw):
    buf = rt.TelemetryBuffer(tmp_path / "telemetry.db", **kw)
    m = rt.load(mlp_bundles["1.0.0"], [publisher[2]])
    agg = m.attach_telemetry(buf, device_id="dev-1", window_s=3600, summary_budget=summary_budget)
    return m, buf, agg


def test_window_counts_match_the_baseline_bins(mlp_bundles: dict, publisher, tmp_path: Path, digits: dict) -> None:
    m, buf, _ = _model(mlp_bundles, publisher, tmp_path)
    x = digits["eval"][0]
    ys = [m.predict(x[i : i + 7]) for i in range(0, len(x), 7)]  # many small calls, summarised in batches
    with pytest.raises(rt.InputError if hasattr(rt, "InputError") else Exception):
        m.predict(np.zeros((1, 8, 8), np.float32))
    m.flush_telemetry()
    (w,) = list(buf.windows())
    check_window(w)
    assert w["device_id"] == "dev-1" and w["bundle"]["version"] == "1.0.0"
    assert w["calls"] == len(ys) + 1 and w["samples"] == len(x) == w["summarised"]
    assert w["errors"] == {"input": 1}
    expected = window_counts(x, np.concatenate(ys), m.manifest.drift_baseline)
    assert w["inputs"] == expected["inputs"]
    assert w["outputs"]["predicted_class"] == expected["predicted_class"]
    assert sum(w["latency_ms"]["counts"]) == w["calls"]
    assert latency_quantile(w["latency_ms"]["counts"], 0.95) is not None
    # the device summarises inputs against the very bins the bundle's baseline was built with
    base = {f["name"]: f for f in m.manifest.drift_baseline["inputs"]}
    for name, counts in w["inputs"].items():
        assert len(counts) == len(base[name]["edges"]) + 1


def test_bounded_drop_oldest_and_ack(mlp_bundles: dict, publisher, tmp_path: Path) -> None:
    buf = rt.TelemetryBuffer(tmp_path / "b.db", max_bytes=20_000)
    for i in range(60):
        buf.add({"key": f"k{i}", "start": float(i), "end": float(i + 1), "pad": "x" * 900})
    st = buf.stats()
    assert st.bytes <= 20_000 and st.windows < 60 and st.dropped_windows == 60 - st.windows
    keys = [k for _, _, k, _ in buf.pending(limit=1000)]
    assert keys == [f"k{i}" for i in range(60 - st.windows, 60)]  # the newest survive, in order
    buf.ack(keys[0])
    assert [k for _, _, k, _ in buf.pending(limit=1)] == [keys[1]]
    buf.close()
    again = rt.TelemetryBuffer(tmp_path / "b.db", max_bytes=20_000)
    assert again.stats().windows == st.windows - 1 and again.stats().dropped_windows == st.dropped_windows


def test_a_full_buffer_gives_up_windows_before_events(tmp_path: Path) -> None:
    """An update's outcome must reach the server late rather than never: offline for long, a buffer over
    its cap drops telemetry windows (oldest first) and keeps the events, even the oldest. Events go only
    once no window is left. Before, events shared the windows' drop-oldest order and were evicted."""
    buf = rt.TelemetryBuffer(tmp_path / "e.db", max_bytes=20_000)
    buf.add({"key": "ev-committed", "ts": 0.0, "type": "committed"}, kind="events")
    for i in range(60):
        buf.add({"key": f"k{i}", "start": float(i), "end": float(i + 1), "pad": "x" * 900})
    buf.add({"key": "ev-rolled-back", "ts": 61.0, "type": "rolled_back"}, kind="events")
    pending = [(kind, k) for _, kind, k, _ in buf.pending(limit=1000)]
    assert ("events", "ev-committed") in pending and ("events", "ev-rolled-back") in pending
    windows = [k for kind, k in pending if kind == "telemetry"]
    assert windows and windows == [f"k{i}" for i in range(60 - len(windows), 60)]  # the newest windows kept
    assert buf.stats().dropped_windows == 60 - len(windows)
    for i in range(40):  # events alone over the cap: the oldest events go
        buf.add({"key": f"ev{i}", "ts": 100.0 + i, "type": "x", "pad": "y" * 900}, kind="events")
    kinds = [kind for _, kind, _, _ in buf.pending(limit=1000)]
    assert "telemetry" not in kinds and buf.stats().bytes <= 20_000
    assert [k for _, _, k, _ in buf.pending(limit=1000)][-1] == "ev39"
    buf.close()


@pytest.mark.parametrize("how", ["truncated", "deleted_wal_kept", "swapped"])
def test_a_buffer_emptied_or_swapped_while_closed_is_reported(tmp_path: Path, how: str) -> None:
    """SQLite opens a zero-byte or missing file as a new empty database: 400 unsent windows vanished with
    no `buffer_reset` and every counter at 0. The buffer's id, kept inside and beside the file, tells."""
    path = tmp_path / "t.db"
    buf = rt.TelemetryBuffer(path)
    for i in range(400):
        buf.add({"key": f"k{i}", "start": float(i), "end": float(i + 1)})
    buf.close()
    again = rt.TelemetryBuffer(path)
    assert again.reset_reason is None and again.stats().windows == 400  # a plain reopen is no reset
    again.close()
    if how == "truncated":
        path.write_bytes(b"")
    elif how == "deleted_wal_kept":
        path.unlink()
    else:
        other = rt.TelemetryBuffer(tmp_path / "other.db")
        other.add({"key": "x", "start": 0.0, "end": 1.0})
        other.close()
        path.write_bytes((tmp_path / "other.db").read_bytes())
    reopened = rt.TelemetryBuffer(path)
    assert reopened.reset_reason is not None and "unsent windows are lost" in reopened.reset_reason
    assert reopened.stats().corrupt_resets == 1
    reopened.close()
    assert rt.TelemetryBuffer(path).reset_reason is None  # reported once, not at every start


def test_survives_kill_9(mlp_bundles: dict, publisher, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np, edgefleet.runtime as rt
        buf = rt.TelemetryBuffer({str(tmp_path / "k.db")!r})
        m = rt.load({str(mlp_bundles["1.0.0"])!r}, [{str(publisher[2])!r}])
        m.attach_telemetry(buf, device_id="dev-k", window_s=3600)
        x = m.bundle.golden_inputs()
        for i in range(5):
            for _ in range(10):
                m.predict(x)
            m.flush_telemetry()
        print("flushed", flush=True)
        for _ in range(10):
            m.predict(x)  # this window is still in memory when the process dies
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL and "flushed" in p.stdout
    buf = rt.TelemetryBuffer(tmp_path / "k.db")
    ws = list(buf.windows())
    assert len(ws) == 5 and all(w["calls"] == 10 for w in ws)
    assert buf.stats().corrupt_resets == 0


def test_corrupt_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    buf = rt.TelemetryBuffer(path)
    buf.add({"key": "a", "start": 0.0, "end": 1.0})
    buf.close()
    data = bytearray(path.read_bytes())
    data[100:4000] = os.urandom(3900)
    path.write_bytes(bytes(data))
    fresh = rt.TelemetryBuffer(path)
    assert fresh.reset_reason and "corrupt" in fresh.reset_reason
    assert fresh.stats().corrupt_resets == 1 and fresh.stats().windows == 0
    assert list(tmp_path.glob("c.db.corrupt-*"))
    fresh.add({"key": "b", "start": 0.0, "end": 1.0})
    assert fresh.stats().windows == 1


@pytest.fixture()
def small_disk(tmp_path: Path):
    """A real 1 MiB filesystem (tmpfs) when root; otherwise SQLite's page cap gives the same SQLITE_FULL."""
    d = tmp_path / "disk"
    d.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]).returncode == 0:
        yield d, None
        subprocess.run(["umount", "-l", str(d)], check=False)
    else:
        yield d, 200


def test_full_disk_drops_oldest_without_crashing(tmp_path: Path, small_disk) -> None:
    d, page_cap = small_disk
    buf = rt.TelemetryBuffer(d / "t.db", max_bytes=100 << 20)
    if page_cap:
        buf._db.execute(f"PRAGMA max_page_count={page_cap}")
    for i in range(2000):
        buf.add({"key": f"k{i}", "start": float(i), "end": float(i + 1), "pad": os.urandom(600).hex()})
    st = buf.stats()
    assert st.full_disk_events >= 1 and st.dropped_windows >= 1
    keys = [k for _, _, k, _ in buf.pending(limit=10_000)]
    assert len(keys) > 20 and keys[-1] == "k1999"  # the newest kept, the oldest gone
    assert keys == sorted(keys, key=lambda k: int(k[1:]))
    buf.close()
    again = rt.TelemetryBuffer(d / "t.db")
    assert again.stats().windows == len(keys)
    again.close()


def test_raw_sample_capture_is_rate_limited_and_capped(mlp_bundles: dict, publisher, tmp_path: Path) -> None:
    buf = rt.TelemetryBuffer(tmp_path / "s.db", sample_max_bytes=3000)
    m = rt.load(mlp_bundles["1.0.0"], [publisher[2]])
    t = [1000.0]
    agg = m.attach_telemetry(buf, device_id="d", window_s=60, capture_per_hour=60)  # one per minute
    agg._clock = lambda: t[0]
    agg._capture.clock = agg._clock  # type: ignore[union-attr]
    agg._capture.next = t[0]  # type: ignore[union-attr]
    x = m.bundle.golden_inputs()
    for _ in range(20):
        m.predict(x[:1])
        t[0] += 20  # 20 calls over 400 s: at most 7 captures
    samples = list(buf.samples())
    assert 1 <= len(samples) <= 7
    assert buf.stats().samples == len(samples)
    assert sum(s[2].nbytes + s[3].nbytes for s in samples) < 3000  # the byte cap dropped the oldest
    # default: nothing raw is kept
    m2, buf2, _ = _model(mlp_bundles, publisher, tmp_path / "nocap")
    m2.predict(x)
    assert buf2.stats().samples == 0


def test_captured_samples_leave_newest_first(tmp_path: Path) -> None:
    """The fleet asks for samples when something changed (a drift alert): an upload of N takes the newest N,
    not the oldest the byte cap kept, and bundle filtering and the byte limit still apply."""
    buf = rt.TelemetryBuffer(tmp_path / "telemetry.db")
    for i in range(10):
        buf.add_sample(
            1000.0 + i, "m:1.0.0" if i != 8 else "other:1.0.0", np.full((1, 4), i, np.float32), np.zeros((1, 2))
        )
    got = buf.take_samples(3, 1 << 20, "m")
    assert [r[1] for r in got] == [1006.0, 1007.0, 1009.0]  # the newest three, the other bundle's skipped
    one = buf.take_samples(10, 400, None)
    assert len(one) == 1 and one[0][1] == 1009.0  # the byte limit holds: each sample is over 200 bytes


@pytest.mark.parametrize("point", ["buffer.add", "buffer.add_sample", "buffer.label"])
@pytest.mark.parametrize("code", ["EIO", "EROFS"])
def test_a_disk_error_in_the_buffer_never_reaches_the_apps_call(
    mlp_bundles: dict, publisher, tmp_path: Path, digits, monkeypatch, point: str, code: str
) -> None:
    """A write the disk refuses (EIO, a read-only filesystem) at any of the buffer's writes: the app's predict
    and feedback go on, the record is lost and counted (write_errors), the next write goes through."""
    import errno
    import time

    from edgefleet.runtime import _failpoints

    monkeypatch.setattr(_failpoints, "_FAULTS", {point: getattr(errno, code)})
    monkeypatch.setattr(_failpoints, "_fired", set())
    buf = rt.TelemetryBuffer(tmp_path / "t.db")
    m = rt.load(mlp_bundles["1.0.0"], [str(publisher[2])])
    m.attach_telemetry(buf, window_s=3600, capture_per_hour=3600 * 1000, feedback_calls=100)
    x, y = digits["eval"]
    for i in range(3):
        time.sleep(0.01)  # past the capture rate limit (1,000 a second here)
        m.predict(x[i : i + 1])  # captures a sample each
        m.feedback(m.last_call_id, int(y[i]))  # labels it
        m.flush_telemetry()  # closes a window each
    st = buf.stats()
    labels = [r[5] for r in buf.take_samples(10, 1 << 20)]
    # (windows, samples, unlabelled samples) kept: the one record lost, the rest as if nothing happened
    want = {"buffer.add": (2, 3, 0), "buffer.add_sample": (3, 2, 0), "buffer.label": (3, 3, 1)}[point]
    assert (st.windows, st.samples, labels.count(None)) == want and st.write_errors == 1, st


def test_a_disk_error_on_an_event_is_raised_to_the_agent_to_retry(tmp_path: Path, monkeypatch) -> None:
    """Update outcomes must reach the fleet: a disk error on an event raises (the agent's step fails, backs off
    and emits it again), where a telemetry window is dropped and counted."""
    import errno

    from edgefleet.runtime import _failpoints

    monkeypatch.setattr(_failpoints, "_FAULTS", {"buffer.add": errno.EIO})
    monkeypatch.setattr(_failpoints, "_fired", set())
    buf = rt.TelemetryBuffer(tmp_path / "t.db")
    ev = {"key": "d:ev:1", "type": "committed", "ts": 1.0}
    with pytest.raises(OSError):
        buf.add(ev, kind="events")
    assert buf.stats().windows == 0 and buf.write_errors == 0
    buf.add(ev, kind="events")  # the retry
    assert buf.stats().windows == 1


def test_feedback_is_kept_for_its_time_and_count_only(mlp_bundles: dict, publisher, tmp_path: Path, digits) -> None:
    """A call's prediction is kept for feedback_ttl_s and among the last feedback_calls calls; later or older
    feedback is an InputError naming why, and counts nothing."""
    from edgefleet import InputError

    m = rt.load(mlp_bundles["1.0.0"], [str(publisher[2])])
    agg = m.attach_telemetry(rt.TelemetryBuffer(tmp_path / "t.db"), feedback_calls=3, feedback_ttl_s=60.0)
    now = [1000.0]
    agg._clock = lambda: now[0]
    x = digits["eval"][0]
    ids = []
    for i in range(4):
        m.predict(x[i : i + 1])
        ids.append(m.last_call_id)
    with pytest.raises(InputError, match="unknown, already given feedback, or expired"):
        m.feedback(ids[0], 1)  # the 4th call pushed the 1st out
    m.feedback(ids[1], 1)
    now[0] += 61.0
    with pytest.raises(InputError, match="last 60 s are kept"):
        m.feedback(ids[2], 1)
    m.flush_telemetry()


def test_a_capture_upload_keeps_to_its_bandwidth_cap(tmp_path: Path) -> None:
    """The upload is paced (capture_upload_bytes_per_s) and arrives whole, as one plain body with its length;
    uncapped it is not held back. Against a real HTTP server on loopback."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from edgefleet.runtime._upload import paced, upload_samples

    got: list[tuple[bytes, str | None]] = []

    class Sink(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_POST(self) -> None:  # http.server calls it by this name
            n = int(self.headers["Content-Length"])
            got.append((self.rfile.read(n), self.headers.get("Transfer-Encoding")))
            self.send_response(200)
            self.end_headers()

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/upload"
    try:
        times = {}
        for cap in (None, 100_000.0):
            buf = rt.TelemetryBuffer(tmp_path / f"t-{cap}.db")
            rng = np.random.default_rng(0)
            for i in range(40):  # ~10 KiB each, incompressible
                buf.add_sample(1000.0 + i, "m:1.0.0", rng.random((1, 1280)).astype(np.float64), np.zeros((1, 2)))
            t0 = time.monotonic()
            sent = upload_samples(buf, url, "tok", limit=40, max_bytes=1 << 20, bytes_per_s=cap)
            times[cap] = time.monotonic() - t0
            assert sent["samples"] == 40 and len(got[-1][0]) == sent["bytes"] and got[-1][1] is None
            assert not buf.take_samples(40, 1 << 20, None)  # gone from the device once stored
        assert times[100_000.0] >= sent["bytes"] / 100_000.0 * 0.9 > times[None], times
    finally:
        srv.shutdown()
    # The pacing itself, on a clock of its own: a chunk goes once the time for the bytes before it has passed.
    now = [0.0]
    slept: list[float] = []
    chunks = list(paced(b"x" * 50_000, 16_384.0, clock=lambda: now[0], sleep=lambda s: slept.append(s)))
    assert b"".join(chunks) == b"x" * 50_000 and slept == [1.0, 2.0, 3.0]


def test_cli_show_and_export(mlp_bundles: dict, publisher, tmp_path: Path) -> None:
    m, buf, _ = _model(mlp_bundles, publisher, tmp_path)
    for _ in range(3):
        m.predict(m.bundle.golden_inputs())
    m.flush_telemetry()
    buf.close()
    r = run_cli("telemetry", "show", "--buffer", str(tmp_path / "telemetry.db"))
    assert r.returncode == 0, r.stderr
    assert "1 records" in r.stdout and "mlp 1.0.0" in r.stdout
    r = run_cli("telemetry", "export", "--buffer", str(tmp_path / "telemetry.db"), "-o", str(tmp_path / "out.jsonl"))
    assert r.returncode == 0
    (line,) = (tmp_path / "out.jsonl").read_text().splitlines()
    assert json.loads(line)["calls"] == 3
    r = run_cli("telemetry", "show", "--buffer", str(tmp_path / "nope.db"))
    assert r.returncode == 1 and "no telemetry buffer" in r.stderr


def test_large_inputs_are_summarised_within_a_budget(tmp_path: Path) -> None:
    from edgefleet import compute_baseline

    rng = np.random.default_rng(0)
    ref = rng.random((32, 3, 128, 128), dtype=np.float32)
    logits = rng.standard_normal((32, 5)).astype(np.float32)
    baseline = compute_baseline(ref, logits, "NCHW")
    out: list[dict] = []
    agg = rt.WindowAggregator(
        out.append,
        device_id="d",
        bundle={"name": "b", "version": "1.0.0"},
        baseline=baseline,
        backend="onnxruntime",
        accelerator="cpu",
        fallbacks=[],
        window_s=3600,
    )
    x = rng.random((1, 3, 128, 128), dtype=np.float32)
    for _ in range(200):
        agg.record(x, logits[:1], latency_s=0.0002)  # a fast model: summarising every call would cost more
    agg.flush(force=True)
    (w,) = out
    check_window(w)
    assert w["samples"] == 200 and 0 < w["summarised"] < 200
    assert sum(w["outputs"]["predicted_class"]) == w["samples"]  # every call's output is counted
    assert sum(w["inputs"]["brightness"]) == w["summarised"]


def test_input_histograms_keep_to_their_budget_outputs_count_every_call(
    mlp_bundles: dict, publisher, tmp_path: Path, digits: dict
) -> None:
    x = digits["eval"][0]
    for budget, everything in ((None, True), (1e-4, False)):
        m, buf, _ = _model(mlp_bundles, publisher, tmp_path / str(budget), summary_budget=budget)
        for _ in range(4):
            for i in range(len(x)):
                m.predict(x[i : i + 1])
        m.flush_telemetry()
        (w,) = list(buf.windows())
        check_window(w)
        n = 4 * len(x)
        assert w["calls"] == w["samples"] == n == sum(w["outputs"]["predicted_class"])
        assert sum(w["inputs"]["brightness"]) == w["summarised"]
        if everything:
            assert w["summarised"] == n
        else:  # a tiny budget: the first batch of the window, and little more
            assert 0 < w["summarised"] < n / 2, w["summarised"]


def test_queued_calls_land_in_their_own_windows_and_none_are_lost(tmp_path: Path) -> None:
    """Small calls are queued without a lock and filed in batches: each still counts in the window
    its time falls in, and calls from many threads racing with flushes are each counted once."""
    import threading
    import time

    from edgefleet import compute_baseline

    rng = np.random.default_rng(1)
    ref = rng.random((64, 4), dtype=np.float32)
    logits = rng.standard_normal((64, 3)).astype(np.float32)
    out: list[dict] = []
    t = [960.0]
    agg = rt.WindowAggregator(
        out.append,
        device_id="d",
        bundle={"name": "b", "version": "1.0.0"},
        baseline=compute_baseline(ref, logits, "NC"),
        backend="onnxruntime",
        accelerator="cpu",
        fallbacks=[],
        window_s=60,
        clock=lambda: t[0],
    )
    # 100 calls in the window [960, 1020), then 30 after it ended (at 1030): not yet filed when they arrive
    for i in range(100):
        agg.record(ref[i % 64 : i % 64 + 1], logits[i % 64 : i % 64 + 1], latency_s=0.001)
        t[0] += 0.5
    t[0] = 1030.0
    for _ in range(30):
        agg.record(ref[:1], logits[:1], latency_s=0.002)
    assert not out  # filed in batches: nothing closed yet
    agg.flush()  # the first window closes with its own calls; the second stays open
    (first,) = out
    assert first["calls"] == 100 and first["samples"] == 100 == sum(first["outputs"]["predicted_class"])
    assert first["start"] == 960.0 and first["end"] == 1020.0
    agg.flush(force=True)
    assert out[1]["calls"] == 30 and out[1]["start"] == 1020.0

    # Many threads, flushes in between: every call counted exactly once.
    out.clear()
    agg._clock = time.time  # real time from here
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            agg.flush(force=True)

    def caller() -> None:
        for i in range(3000):
            agg.record(ref[i % 64 : i % 64 + 1], logits[i % 64 : i % 64 + 1], latency_s=0.001)

    f = threading.Thread(target=flusher)
    f.start()
    callers = [threading.Thread(target=caller) for _ in range(4)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    stop.set()
    f.join()
    agg.flush(force=True)
    assert sum(w["calls"] for w in out) == 4 * 3000
    assert sum(w["samples"] for w in out) == 4 * 3000 == sum(sum(w["outputs"]["predicted_class"]) for w in out)
