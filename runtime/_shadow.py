"""Shadow runs: a candidate bundle beside the active one on a sample of live inputs, in its own thread.

The app's call only offers its input and output to a bounded queue (dropped, and counted, when the
candidate falls behind), so a shadow never slows the call it samples by more than a queue put.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Any

import numpy as np

from edgefleet import EdgefleetError
from edgefleet.protocol import BundleRef

from ._health import quantile
from ._model import Model

__all__ = ["Shadow"]


class Shadow:
    def __init__(
        self, model: Model, ref: BundleRef, rate: float, duration_s: float, command_id: str, min_samples: int = 0
    ) -> None:
        self.model, self.ref, self.rate = model, ref, rate
        self.command_id = command_id
        self.min_samples = min_samples
        self.deadline = time.monotonic() + duration_s
        self.q: queue.Queue[tuple[np.ndarray, np.ndarray, float]] = queue.Queue(maxsize=64)
        self.samples = self.agree = self.dropped = self.errors = 0
        self.active_ms: list[float] = []
        self.cand_ms: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="edgefleet-shadow", daemon=True)
        self.thread.start()

    def offer(self, x: np.ndarray, y: np.ndarray, ms: float) -> None:
        if random.random() >= self.rate:
            return
        try:
            self.q.put_nowait((x, y, ms))
        except queue.Full:
            self.dropped += 1

    def done(self, now: float) -> bool:
        return now >= self.deadline or bool(self.min_samples and self.samples >= self.min_samples)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                x, y, ms = self.q.get(timeout=0.1)
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
            self.samples += n
            self.agree += int((yc.reshape(n, -1).argmax(1) == y.reshape(n, -1).argmax(1)).sum())

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
        }
