"""Shadow runs: a candidate bundle beside the active one on a sample of live inputs, in its own thread.

The app's call only offers its input and output to a bounded queue (dropped, and counted, when the
candidate falls behind), so a shadow never slows the call it samples by more than a queue put.

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
from edgefleet.protocol import BundleRef

from ._health import quantile
from ._model import Model

__all__ = ["Shadow"]

_KEPT = 4096  # sampled calls (and early labels) remembered for labels fed back later


class Shadow:
    def __init__(
        self, model: Model, ref: BundleRef, rate: float, duration_s: float, command_id: str, min_samples: int = 0
    ) -> None:
        self.model, self.ref, self.rate = model, ref, rate
        self.command_id = command_id
        self.min_samples = min_samples
        self.deadline = time.monotonic() + duration_s
        self.q: queue.Queue[tuple[np.ndarray, np.ndarray, float, tuple[int, int] | None]] = queue.Queue(maxsize=64)
        self.samples = self.agree = self.dropped = self.errors = 0
        self.labelled = self.active_correct = self.candidate_correct = 0
        self._lock = threading.Lock()
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
            self.q.put_nowait((x, y, ms, call_id))
        except queue.Full:
            self.dropped += 1

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
            t0 = time.perf_counter()
            try:
                yc = self.model.predict(x)
            except EdgefleetError:
                self.errors += 1
                continue
            self.cand_ms.append((time.perf_counter() - t0) * 1000)
            self.active_ms.append(ms)
            n = len(x)
            cand, active = yc.reshape(n, -1).argmax(1), y.reshape(n, -1).argmax(1)
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
        }
