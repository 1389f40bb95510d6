"""Per-window aggregation of a model's calls in memory: what `predict` pays for telemetry.

Per call it appends a few numbers (and a copy of small inputs); histograms are computed in batches
on the drift baseline's bins, so telemetry stays a few microseconds per call. Closed windows go to a
sink (the durable `TelemetryBuffer`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._drift import window_counts
from edgefleet.protocol import LATENCY_EDGES_MS, WINDOW_SCHEMA

__all__ = ["SUMMARY_BUDGET", "WindowAggregator"]

_LAT_EDGES_S = np.asarray(LATENCY_EDGES_MS, dtype=np.float64) / 1000.0
# Small inputs are copied and summarised in batches (cheap per call); large ones are summarised at once,
# which costs little beside their inference and avoids holding many copies.
_BATCH_SAMPLES = 256
# Fast-path calls queued before they are filed into windows (at most this many per filing).
_BATCH_CALLS = 256
_COPY_LIMIT_BYTES = 64 * 1024
# Input histograms are computed only while that costs at most this share of the inference time itself
# (the window's `summarised` says how many rows they hold); every call's output class and confidence
# are always counted. Measured between inference calls of a tiny model, summarising an 8x8 input costs
# ~2 us, a tenth of the call itself: all of them would double telemetry's cost per call.
SUMMARY_BUDGET = 0.01


class _RateLimit:
    """Token bucket: at most RATE events per hour, bursts of one."""

    def __init__(self, per_hour: float, clock: Callable[[], float]) -> None:
        self.interval = 3600.0 / per_hour if per_hour > 0 else float("inf")
        self.clock = clock
        self.next = clock()

    def allow(self) -> bool:
        now = self.clock()
        if now < self.next:
            return False
        self.next = now + self.interval
        return True


class WindowAggregator:
    """Aggregates `predict` calls of one model into telemetry windows handed to a sink.

    Per call it appends a few numbers (and a copy of small inputs); histograms are computed in
    batches, so telemetry stays a few microseconds per call. SUMMARY_BUDGET: the largest share of
    inference time spent on input histograms (None: every input, whatever it costs).
    """

    def __init__(
        self,
        sink: Callable[[dict[str, Any]], None],
        *,
        device_id: str,
        bundle: dict[str, str],
        baseline: dict[str, Any],
        backend: str,
        accelerator: str,
        fallbacks: list[str],
        window_s: float = 60.0,
        capture_per_hour: float = 0.0,
        capture_sink: Callable[[float, np.ndarray, np.ndarray, str | None], None] | None = None,
        label_sink: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.time,
        summary_budget: float | None = SUMMARY_BUDGET,
        feedback_calls: int = 0,
        feedback_ttl_s: float = 86400.0,
    ) -> None:
        self._sink = sink
        self.device_id = device_id
        self.bundle = dict(bundle)
        self.baseline = baseline
        self.backend = backend
        self.accelerator = accelerator
        self.fallbacks = list(fallbacks)
        self.window_s = float(window_s)
        self._clock = clock
        self._capture = _RateLimit(capture_per_hour, clock) if capture_per_hour > 0 and capture_sink else None
        self._capture_sink = capture_sink
        # A captured sample is keyed by its call (this aggregator's run and call id), so the label fed back
        # for that call later labels the sample too.
        self._label_sink = label_sink
        self._run = uuid.uuid4().hex[:12]
        self._budget = summary_budget
        self._lock = threading.Lock()
        self._q: collections.deque[tuple[float, float, np.ndarray, np.ndarray]] = collections.deque()
        # Raw-sample capture decides per call, so it takes the filed path.
        self._fast = self._capture is None
        self._start = self._window_start(clock())
        self._end = self._start + self.window_s
        # Ground truth that arrives later: the predicted classes of the last FEEDBACK_CALLS calls, by call id.
        self.feedback_calls, self.feedback_ttl_s = int(feedback_calls), float(feedback_ttl_s)
        self._kept: collections.OrderedDict[int, tuple[float, np.ndarray]] = collections.OrderedDict()
        self._ids = itertools.count(1)
        self._fb_lock = threading.Lock()
        self._classes = len(((baseline or {}).get("outputs") or {}).get("predicted_class", {}).get("proportions", []))
        self._confusion: np.ndarray | None = None
        self._reset()

    def remember(self, y: np.ndarray) -> int | None:
        """Keep the predicted class of each row of a call's output Y; its call id (None: feedback is off)."""
        if not self.feedback_calls:
            return None
        cid = next(self._ids)
        pred = y.reshape(len(y), -1).argmax(1).astype(np.int32)
        if not self._classes:
            self._classes = int(y.reshape(len(y), -1).shape[1])
        with self._fb_lock:
            self._kept[cid] = (self._clock(), pred)
            while len(self._kept) > self.feedback_calls:
                self._kept.popitem(last=False)
        return cid

    def feedback(self, call_id: int, labels: Any) -> None:
        """The true class of each row of call CALL_ID, counted once into the current window's confusion
        matrix (rows: true class, columns: predicted)."""
        if not self.feedback_calls:
            raise InputError("feedback is off for this model: attach telemetry with feedback_calls > 0")
        with self._fb_lock:
            kept = self._kept.get(call_id) if isinstance(call_id, int) else None
        if kept is None or self._clock() - kept[0] > self.feedback_ttl_s:
            raise InputError(
                f"call id {call_id!r} is unknown, already given feedback, or expired (the last "
                f"{self.feedback_calls} calls of the last {self.feedback_ttl_s:g} s are kept)"
            )
        pred = kept[1]
        true = np.asarray(labels)
        if true.ndim == 0:
            true = true.reshape(1)
        if true.shape != pred.shape or not np.issubdtype(true.dtype, np.integer):
            raise InputError(f"feedback for call {call_id} needs {len(pred)} integer class label(s), got {labels!r}")
        if true.min() < 0 or true.max() >= self._classes:
            raise InputError(f"feedback label outside the model's {self._classes} classes (0..{self._classes - 1})")
        with self._fb_lock:
            if self._kept.pop(call_id, None) is None:  # another thread gave it first: count it once
                raise InputError(f"call id {call_id!r} was already given feedback")
        with self._lock:
            if self._confusion is None:
                self._confusion = np.zeros((self._classes, self._classes), np.int64)
            np.add.at(self._confusion, (true, pred), 1)
        if self._label_sink is not None:
            self._label_sink(f"{self._run}:{call_id}", int(true[0]))  # a captured sample is the call's first row

    def _window_start(self, now: float) -> float:
        return now - (now % self.window_s)

    def _reset(self) -> None:
        self._lat: list[float] = []
        self._errors: dict[str, int] = {}
        self._xs: list[np.ndarray] = []
        self._ys: list[np.ndarray] = []
        self._ys_only: list[np.ndarray] = []  # outputs of large calls whose inputs are not summarised
        self._pending = 0
        self._samples = 0
        self._summarised = 0
        self._nan = 0
        self._infer_s = 0.0
        self._summary_s = 0.0
        self._counts: dict[str, Any] | None = None
        self._confusion = None

    def record(
        self,
        x: np.ndarray | None,
        y: np.ndarray | None,
        latency_s: float,
        error: str | None = None,
        call_id: int | None = None,
    ) -> None:
        """One predict call: its float input and output batches, or the kind of error it raised; CALL_ID
        (from `remember`) keys a captured sample of it."""
        if self._fast and error is None and x is not None and y is not None and x.nbytes <= _COPY_LIMIT_BYTES:
            # The common call: one append, no lock (deque appends are atomic); it is sorted into its
            # window with the others of its batch. Measured between two ORT runs of a tiny model, this
            # costs ~2 us where taking the lock and filing each call costs ~7 us.
            q = self._q
            q.append((self._clock(), latency_s, x.copy(), y.copy()))
            if len(q) >= _BATCH_CALLS:
                with self._lock:
                    self._absorb()
            return
        now = self._clock()
        with self._lock:
            self._absorb()
            if now >= self._end:
                self._roll(now)
            self._lat.append(latency_s)
            if error is not None or x is None or y is None:
                self._errors[error or "runtime"] = self._errors.get(error or "runtime", 0) + 1
                return
            self._infer_s += latency_s
            if x.nbytes > _COPY_LIMIT_BYTES:
                if self._within_budget():
                    self._add_counts(x, y)
                else:  # outputs only, counted in batches
                    self._ys_only.append(y.copy())
                    self._pending += len(y)
                    if self._pending >= _BATCH_SAMPLES:
                        self._summarise()
            else:
                self._xs.append(x.copy())
                self._ys.append(y.copy())
                self._pending += len(x)
                if self._pending >= _BATCH_SAMPLES:
                    self._summarise()
            if self._capture is not None and self._capture.allow() and self._capture_sink is not None:
                call = None if call_id is None else f"{self._run}:{call_id}"
                self._capture_sink(now, x[:1].copy(), y[:1].copy(), call)

    def _absorb(self) -> None:
        """File the queued fast-path calls into their windows (closing a window a call is past)."""
        q = self._q
        n = len(q)
        if not n:
            return
        items = [q.popleft() for _ in range(n)]
        i = 0
        while i < n:
            end = self._end
            j = i
            while j < n and items[j][0] < end:
                j += 1
            if j > i:
                for _, lat, x, y in items[i:j]:
                    self._lat.append(lat)
                    self._infer_s += lat
                    self._xs.append(x)
                    self._ys.append(y)
                    self._pending += len(x)
            if j < n:
                self._roll(items[j][0])
            i = j
        if self._pending >= _BATCH_SAMPLES:
            self._summarise()

    def _within_budget(self) -> bool:
        """Whether summarising inputs now keeps their cost within the budget share of inference time."""
        return self._budget is None or self._summary_s <= self._budget * self._infer_s

    def _summarise(self) -> None:
        if self._xs:
            ys = np.concatenate(self._ys)
            self._add_counts(np.concatenate(self._xs) if self._within_budget() else None, ys)
            self._xs, self._ys = [], []
        if self._ys_only:
            self._add_counts(None, np.concatenate(self._ys_only))
            self._ys_only = []
        self._pending = 0

    def _add_counts(self, x: np.ndarray | None, y: np.ndarray) -> None:
        """Count a batch: outputs always (every call's class and confidence), inputs when X is given."""
        t0 = time.perf_counter()
        ok = np.isfinite(y.reshape(len(y), -1)).all(axis=1)
        n_bad = int(len(ok) - ok.sum())
        if n_bad:
            self._nan += n_bad
            y = y[ok]
            x = None if x is None else x[ok]
        self._samples += len(y)
        if len(y) and self.baseline:
            if x is not None:
                self._summarised += len(x)
            c = window_counts(x, y, self.baseline)
            if self._counts is None:
                self._counts = c
            else:
                acc = self._counts
                for k, v in c["inputs"].items():
                    old = acc["inputs"].get(k)
                    acc["inputs"][k] = v if old is None else [a + b for a, b in zip(old, v, strict=True)]
                for k in ("predicted_class", "confidence"):
                    acc[k] = [a + b for a, b in zip(acc[k], c[k], strict=True)]
        if x is not None:
            self._summary_s += time.perf_counter() - t0

    def _roll(self, now: float, forced: bool = False) -> None:
        window = self._close()
        aligned = self._window_start(now)
        self._start = now if forced else aligned
        self._end = aligned + self.window_s
        self._reset()
        if window is not None:
            self._sink(window)

    def _close(self) -> dict[str, Any] | None:
        self._summarise()
        if not self._lat and self._confusion is None:
            return None
        lat = np.asarray(self._lat, dtype=np.float64)
        hist = np.bincount(np.searchsorted(_LAT_EDGES_S, lat, side="right"), minlength=len(_LAT_EDGES_S) + 1)
        counts = self._counts or {"inputs": {}, "predicted_class": [], "confidence": []}
        return {
            "schema": WINDOW_SCHEMA,
            "key": f"{self.device_id}:{int(self._start * 1000)}:{uuid.uuid4().hex[:12]}",
            "device_id": self.device_id,
            "bundle": self.bundle,
            "backend": self.backend,
            "accelerator": self.accelerator,
            "fallbacks": self.fallbacks,
            "start": self._start,
            "end": min(self._end, self._clock()),
            "calls": len(self._lat),
            "samples": self._samples,
            "summarised": self._summarised,
            "errors": dict(self._errors),
            "nan_outputs": self._nan,
            "latency_ms": {
                "counts": hist.tolist(),
                "sum": round(float(lat.sum()) * 1000, 6),
                "max": round(float(lat.max()) * 1000, 6) if len(lat) else 0.0,
            },
            "inputs": counts["inputs"],
            "outputs": {"predicted_class": counts["predicted_class"], "confidence": counts["confidence"]},
            **(
                {}
                if self._confusion is None
                else {"feedback": {"labelled": int(self._confusion.sum()), "confusion": self._confusion.tolist()}}
            ),
        }

    def seconds_left(self) -> float:
        """Time until the current window is due to close."""
        return max(0.0, self._end - self._clock())

    def flush(self, force: bool = False) -> None:
        """Close the current window if its time is up (or now, with FORCE) and hand it to the sink."""
        now = self._clock()
        with self._lock:
            self._absorb()
            if force or now >= self._end:
                self._roll(now, forced=now < self._end)
