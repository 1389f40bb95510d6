"""A shadow's candidate keeps out of the app's way (issue 18: "shadow work never slows the app's own calls
beyond a documented budget"): it runs only between the app's calls, rests to stay within its CPU share, and
drops, counted, what it cannot take. On a real bundle's model; timings in benchmarks/shadow_budget.py."""

from __future__ import annotations

import time

import numpy as np

from edgefleet import open_bundle
from edgefleet.protocol import BundleRef
from edgefleet.runtime import load
from edgefleet.runtime._shadow import WAIT_S, Shadow, rest_after


def _shadow(path, share: float = 0.25) -> Shadow:
    ref = BundleRef("mlp", "2.0.0", "http://127.0.0.1/x.efb", "0" * 64, 1)
    return Shadow(load(path, allow_unsigned=True, threads=1), ref, 1.0, 3600.0, "s-1", cpu_share=share)


def test_the_candidate_waits_for_the_app_to_be_between_calls(mlp_bundles: dict) -> None:
    x = open_bundle(mlp_bundles["1.0.0"]).golden_inputs()[:1]
    y = np.zeros((1, 10), np.float32)
    sh = _shadow(mlp_bundles["2.0.0"])
    try:
        sh.app_call_started()  # a long app call in progress
        sh.offer(x, y, 1.0)
        time.sleep(0.3)
        assert sh.samples == 0 and sh.busy_s == 0.0  # not run while the app's call is
        sh.app_call_ended()
        deadline = time.monotonic() + 5
        while sh.samples == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sh.samples == 1 and sh.dropped == 0  # run once the app was between calls
        # An app busy for longer than the candidate waits: the sample is dropped and counted, never waited for.
        sh.app_call_started()
        sh.offer(x, y, 1.0)
        time.sleep(WAIT_S + 0.5)
        assert sh.samples == 1 and sh.dropped == 1
        sh.app_call_ended()
    finally:
        sh.stop.set()
        sh.thread.join(5)
        sh.model.close()


def test_the_candidate_rests_within_its_share(mlp_bundles: dict) -> None:
    assert rest_after(0.01, 0.25) == 0.01 * 3 and rest_after(0.01, 1.0) == 0.0
    x = open_bundle(mlp_bundles["1.0.0"]).golden_inputs()[:1]
    y = np.zeros((1, 10), np.float32)
    sh = _shadow(mlp_bundles["2.0.0"], share=0.05)
    t0 = time.monotonic()
    try:
        for _ in range(1000):  # offered far faster than a 5% share can take them: the queue overflows
            sh.offer(x, y, 1.0)
        time.sleep(1.0)  # while the candidate works through the queue at its share
        elapsed = time.monotonic() - t0
        assert sh.dropped > 0 and sh.samples > 0
        # busy at most its share of the time, give or take the one run in progress
        assert sh.busy_s <= 0.05 * elapsed + sh.busy_s / sh.samples, (sh.busy_s, elapsed)
    finally:
        sh.stop.set()
        sh.thread.join(5)
        sh.model.close()
