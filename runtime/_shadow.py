"""Shadow runs: a candidate bundle beside the active one on a sample of live inputs, in its own thread.

The app's call only offers its input and output to a bounded queue (dropped, and counted, when the
candidate falls behind), so a shadow never slows the call it samples by more than a queue put. The
candidate runs on one inference thread, only once the app has been between calls for IDLE_S (it waits
for that at most WAIT_S, then drops the sample: an app that keeps the cores busy back to back is not
shadowed, not slowed), and rests after each call so that it is busy at most `cpu_share` of the time
(default SHADOW_CPU_SHARE) (docs/device-agent.md, "Shadow runs"). What it drops is counted.

Every `progress_s` the agent reports what was added since the last time (`shadow_progress`), so the fleet
can show a shadow over time; the final `shadow_report` has the totals.

Labels the app feeds back for a sampled call (`label`) score both bundles on the same calls: where the two
disagree, ground truth says which one was right. A label may arrive before the candidate has run the call,
so labels wait in a bounded table for it.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from edgefleet import EdgefleetError
from edgefleet.protocol import LATENCY_EDGES_MS, BundleRef

from ._health import quantile
from ._model import Model

__all__ = ["SHADOW_CPU_SHARE", "Shadow", "rest_after"]

_KEPT = 4096  # sampled calls (and early labels) remembered for labels fed back later
# Per-class answer counts are kept for outputs of at most this many classes: a segmentation or embedding
# model's "classes" would make every report too large to send, and mean nothing.
MAX_CLASSES = 1024
SHADOW_CPU_SHARE = 0.25
IDLE_S = 0.001  # the app between calls this long: the candidate may run now
WAIT_S = 1.0  # ... waited for at most this long per sample
_COUNTS = ("samples", "agree", "labelled", "active_correct", "candidate_correct", "dropped", "errors")


def rest_after(busy_s: float, share: float) -> float:
    """How long the candidate rests after BUSY_S of work so that it is busy SHARE of the time."""
    return busy_s * (1.0 - share) / share if 0 < share < 1 else 0.0


def _latency_bin(ms: float) -> int:
    return int(np.searchsorted(LATENCY_EDGES_MS, ms, side="right"))


class Shadow:
    def __init__(
        self,
        model: Model,
        ref: BundleRef,
        rate: float,
        duration_s: float,
        command_id: str,
        min_samples: int = 0,
        *,
        cpu_share: float = SHADOW_CPU_SHARE,
        progress_s: float = 60.0,
    ) -> None:
        self.model, self.ref, self.rate = model, ref, rate
        self.command_id = command_id
        self.min_samples = min_samples
        self.cpu_share = cpu_share
        self.progress_s = progress_s
        self.deadline = time.monotonic() + duration_s
        self.q: queue.Queue[tuple[np.ndarray, np.ndarray, float, tuple[int, int] | None]] = queue.Queue(maxsize=64)
        self.samples = self.agree = self.dropped = self.errors = 0
        self.labelled = self.active_correct = self.candidate_correct = 0
        self.busy_s = 0.0  # the candidate's inference time, all told
        # Per class, how often each bundle answered it; latency histograms on LATENCY_EDGES_MS.
        self.active_classes = np.zeros(0, np.int64)
        self.candidate_classes = np.zeros(0, np.int64)
        self.active_latency = np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)
        self.candidate_latency = np.zeros(len(LATENCY_EDGES_MS) + 1, np.int64)
        self._reported: dict[str, Any] = self._totals()  # what the last progress report covered
        self._progress_at = time.monotonic() + progress_s
        self._progress_wall = time.time()
        self._lock = threading.Lock()
        self._started = time.monotonic()
        # The app's calls in progress, and when the last one ended (the candidate runs between them).
        self._app = threading.Condition()
        self._app_active = 0
        self._app_ended = 0.0
        # call -> (active classes, candidate classes) of calls run; call -> labels not yet matched. A call is
        # (the active model, its call id): ids restart with each model, and a shadow outlives an update.
        self._classes: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._labels: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.active_ms: list[float] = []
        self.cand_ms: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgefleet-shadow", daemon=True)
        self.thread.start()

    def offer(self, x: np.ndarray, y: np.ndarray, ms: float, call_id: tuple[int, int] | None = None) -> None:
        if random.random() >= self.rate:
            return
        try:
            # a copy: an app may reuse its input buffer for the next call before the candidate has run
            self.q.put_nowait((np.array(x, copy=True), y, ms, call_id))
        except queue.Full:
            with self._lock:  # the candidate's thread counts drops too
                self.dropped += 1  # the candidate is behind, or resting within its CPU share

    def app_call_started(self) -> None:
        with self._app:
            self._app_active += 1

    def app_call_ended(self) -> None:
        with self._app:
            self._app_active -= 1
            self._app_ended = time.monotonic()
            self._app.notify_all()

    def _app_idle(self) -> bool:
        """Wait until the app has been between calls for IDLE_S (at most WAIT_S); whether it was."""
        deadline = time.monotonic() + WAIT_S
        while not self.stop.is_set():
            with self._app:
                if not self._app.wait_for(lambda: self._app_active == 0, max(0.0, deadline - time.monotonic())):
                    return False
                quiet = time.monotonic() - self._app_ended
            if quiet >= IDLE_S:
                with self._app:
                    if self._app_active == 0:
                        return True
                continue
            if time.monotonic() + (IDLE_S - quiet) > deadline:
                return False
            time.sleep(IDLE_S - quiet)
        return False

    def label(self, call_id: tuple[int, int], labels: Any) -> None:
        """The true class(es) of call CALL_ID (already checked by the model's own feedback): counted for both
        bundles if the call was sampled; kept until the candidate has run it if it has not yet."""
        truth = np.asarray(labels, np.int64).reshape(-1)
        with self._lock:
            seen = self._classes.pop(call_id, None)
            if seen is None:
                self._labels[call_id] = truth
                while len(self._labels) > _KEPT:
                    self._labels.popitem(last=False)
                return
            self._score(seen, truth)

    def _score(self, seen: tuple[np.ndarray, np.ndarray], truth: np.ndarray) -> None:
        active, cand = seen
        if len(truth) != len(active):
            return  # the model's feedback accepted it for another call shape: not this call's labels
        self.labelled += len(truth)
        self.active_correct += int((active == truth).sum())
        self.candidate_correct += int((cand == truth).sum())

    def done(self, now: float) -> bool:
        return now >= self.deadline or bool(self.min_samples and self.samples >= self.min_samples)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                x, y, ms, call_id = self.q.get(timeout=0.1)
            except queue.Empty:
                continue
            if not self._app_idle():
                with self._lock:
                    self.dropped += 1  # the app kept calling: its calls come first
                continue
            t0 = time.perf_counter()
            try:
                yc: np.ndarray | None = self.model.predict(x)
            except EdgefleetError:
                yc = None
            busy = time.perf_counter() - t0
            with self._lock:
                self.busy_s += busy
                self.errors += yc is None
            if yc is None:
                self.stop.wait(rest_after(busy, self.cpu_share))
                continue
            cand_ms = busy * 1000
            n = len(x)
            cand, active = yc.reshape(n, -1).argmax(1), y.reshape(n, -1).argmax(1)
            with self._lock:
                self.cand_ms.append(cand_ms)
                self.active_ms.append(ms)
                self.active_latency[_latency_bin(ms)] += 1
                self.candidate_latency[_latency_bin(cand_ms)] += 1
                k = max(yc.reshape(n, -1).shape[1], y.reshape(n, -1).shape[1], len(self.active_classes))
                if k <= MAX_CLASSES:
                    self.active_classes = _grown(self.active_classes, k) + np.bincount(active, minlength=k)
                    self.candidate_classes = _grown(self.candidate_classes, k) + np.bincount(cand, minlength=k)
                self.samples += n
                self.agree += int((cand == active).sum())
            if call_id is not None:
                with self._lock:
                    truth = self._labels.pop(call_id, None)
                    if truth is not None:
                        self._score((active, cand), truth)
                    else:
                        self._classes[call_id] = (active, cand)
                        while len(self._classes) > _KEPT:
                            self._classes.popitem(last=False)
            self.stop.wait(rest_after(busy, self.cpu_share))

    def _totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in _COUNTS}
        for k in ("active_classes", "candidate_classes", "active_latency", "candidate_latency"):
            out[k] = getattr(self, k).copy()
        return out

    @property
    def progress_at(self) -> float:
        return self._progress_at

    def progress_due(self, now: float) -> bool:
        return now >= self._progress_at

    def progress(self) -> dict[str, Any]:
        """The `shadow_progress` event's fields: what was added since the last progress (or the start)."""
        with self._lock:
            now, then = self._totals(), self._reported
            self._reported = now
        start, self._progress_wall = self._progress_wall, time.time()
        self._progress_at = time.monotonic() + self.progress_s
        out: dict[str, Any] = {
            "command_id": self.command_id,
            "candidate": {"name": self.ref.name, "version": self.ref.version},
            "start": start,
            "end": self._progress_wall,
        }
        for k in _COUNTS:
            out["candidate_errors" if k == "errors" else k] = int(now[k] - then[k])
        for k in ("active_classes", "candidate_classes"):
            out[k] = (now[k] - _grown(then[k], len(now[k]))).tolist()
        for k in ("active_latency", "candidate_latency"):
            out[f"{k}_ms"] = (now[k] - then[k]).tolist()
        return out

    def report(self) -> dict[str, Any]:
        """Stop the run and close the candidate; the `shadow_report` event's fields."""
        self.stop.set()
        self.thread.join(timeout=5)
        self.model.close()
        return {
            "command_id": self.command_id,
            "candidate": {"name": self.ref.name, "version": self.ref.version},
            "samples": self.samples,
            "agreement": round(self.agree / self.samples, 6) if self.samples else None,
            "active_p50_ms": quantile(self.active_ms, 0.5),
            "active_p95_ms": quantile(self.active_ms, 0.95),
            "candidate_p50_ms": quantile(self.cand_ms, 0.5),
            "candidate_p95_ms": quantile(self.cand_ms, 0.95),
            "candidate_errors": self.errors,
            "dropped": self.dropped,
            "labelled": self.labelled,
            "active_correct": self.active_correct,
            "candidate_correct": self.candidate_correct,
            "active_classes": self.active_classes.tolist(),
            "candidate_classes": self.candidate_classes.tolist(),
            "cpu_share": round(self.busy_s / max(1e-9, time.monotonic() - self._started), 4),
        }


def _grown(counts: np.ndarray, k: int) -> np.ndarray:
    """COUNTS padded with zeros to K classes."""
    return counts if len(counts) >= k else np.concatenate([counts, np.zeros(k - len(counts), np.int64)])
