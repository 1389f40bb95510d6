"""Judging a shadow deployment from its merged reports (pure functions, no broker): agreement when no labels
came back, ground truth when enough did; a device's labels weigh at most 4x the median device's."""

from __future__ import annotations

from typing import Any

import pytest

from edgefleet import InputError
from edgefleet.fleet._shadows import _report, check_passed, merge_reports


def _dev(samples: int, agreement: float, labelled: int = 0, active: int = 0, cand: int = 0) -> dict[str, Any]:
    body = {"samples": samples, "agreement": agreement, "active_p95_ms": 1.0, "candidate_p95_ms": 1.1}
    if labelled:
        body |= {"labelled": labelled, "active_correct": active, "candidate_correct": cand}
    r = _report(body)
    assert r is not None
    return r


def _shadow(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"id": "s-1", "bundle": "m:2.0.0", "state": "completed", "overall": merge_reports(reports)}


def test_without_labels_agreement_judges() -> None:
    s = _shadow({"a": _dev(200, 0.90), "b": _dev(200, 0.92)})
    assert s["overall"]["labelled"] == 0 and s["overall"]["candidate_accuracy"] is None
    with pytest.raises(InputError, match=r"agreement 0\.9100 with the active bundle < 0\.98"):
        check_passed(s, "m:2.0.0", 0.98, 1.5)
    check_passed(s, "m:2.0.0", 0.9, 1.5)


def test_with_enough_labels_the_candidate_that_is_right_where_the_active_is_wrong_passes() -> None:
    # The retraining case: 11% disagreement, all of it where the active bundle is wrong.
    s = _shadow({"a": _dev(200, 0.89, 150, 133, 149), "b": _dev(200, 0.89, 150, 134, 148)})
    o = s["overall"]
    assert o["labelled"] == 300
    assert o["active_accuracy"] == round(267 / 300, 6) and o["candidate_accuracy"] == round(297 / 300, 6)
    check_passed(s, "m:2.0.0", 0.98, 1.5)  # agreement 0.89 < 0.98 does not matter: ground truth does


def test_with_enough_labels_a_candidate_that_agrees_but_is_worse_is_held_back() -> None:
    s = _shadow({"a": _dev(200, 0.99, 120, 118, 110)})
    with pytest.raises(InputError, match=r"candidate accuracy 0.9167 < the active bundle's 0.9833 - 0.02 on 120"):
        check_passed(s, "m:2.0.0", 0.98, 1.5)


def test_too_few_labels_leave_it_to_agreement() -> None:
    s = _shadow({"a": _dev(200, 0.99, 60, 60, 40)})  # 60 < 100 labelled calls
    check_passed(s, "m:2.0.0", 0.98, 1.5)


def test_one_device_cannot_outvote_the_fleet_with_labels() -> None:
    honest = {d: _dev(200, 0.99, 100, 90, 98) for d in ("a", "b", "c")}
    liar = _dev(10**4, 0.99, 10**4, 10**4, 0)  # claims 10,000 labelled calls, the candidate never right
    o = merge_reports({**honest, "liar": liar})
    # the liar's labels weigh as 4x the median device's samples (200): (3 * 98 + 0) / 1100, (3 * 90 + 800) / 1100
    assert o["labelled"] == 1100
    assert o["candidate_accuracy"] == round(294 / 1100, 6) and o["active_accuracy"] == round(1070 / 1100, 6)
    # one device with labels among many without cannot claim more than the fleet's typical device ran
    lone = merge_reports({"a": _dev(200, 0.9), "b": _dev(200, 0.9), "c": _dev(10**4, 0.9, 10**4, 0, 10**4)})
    assert lone["labelled"] == 800


@pytest.mark.parametrize(
    "labels",
    [
        {"labelled": 10, "active_correct": 11, "candidate_correct": 0},  # more right than labelled
        {"labelled": 25, "active_correct": 1, "candidate_correct": 1},  # more labels than calls run
        {"labelled": -1, "active_correct": 0, "candidate_correct": 0},
        {"labelled": 5.5, "active_correct": 1, "candidate_correct": 1},
        {"labelled": True, "active_correct": 1, "candidate_correct": 1},
        {"labelled": "10", "active_correct": 1, "candidate_correct": 1},
    ],
)
def test_label_counts_that_do_not_add_up_count_for_nothing(labels: dict[str, Any]) -> None:
    r = _report({"samples": 20, "agreement": 1.0, **labels})
    assert r is not None and r["samples"] == 20  # the rest of the report stands
    assert (r["labelled"], r["active_correct"], r["candidate_correct"]) == (0, 0, 0)


def _progress(end: float, samples: int, agree: int, a: list[int], c: list[int], lat_bin: int = 20) -> dict[str, Any]:
    from edgefleet.fleet._shadows import _progress as check

    lat = [0] * 62
    lat[lat_bin] = samples
    body = {
        "samples": samples, "agree": agree, "labelled": 0, "active_correct": 0, "candidate_correct": 0,
        "dropped": 0, "end": end, "active_latency_ms": lat, "candidate_latency_ms": lat,
        "active_classes": a, "candidate_classes": c,
    }  # fmt: skip
    p = check(body)
    assert p is not None
    return p


def test_output_drift_between_the_bundles_is_merged_from_the_devices_answer_counts() -> None:
    from edgefleet._drift import psi

    a = _report({"samples": 100, "agreement": 0.9, "active_classes": [50, 50], "candidate_classes": [60, 40]})
    b = _report({"samples": 100, "agreement": 0.8, "active_classes": [30, 70], "candidate_classes": [50, 50]})
    liar = _report({"samples": 100, "agreement": 1.0, "active_classes": [5, 5], "candidate_classes": [5, 5]})
    assert a and b and liar and liar["classes"] is None  # counts that do not add up to its samples: not used
    o = merge_reports({"a": a, "b": b, "liar": liar})
    assert o["output_psi"] == round(psi([80, 120], [110, 90]), 6) and o["output_js"] > 0


def test_a_shadow_over_time_is_merged_per_span_with_each_device_capped() -> None:
    from edgefleet.fleet._shadows import _progress as check
    from edgefleet.fleet._shadows import merge_progress

    t0 = 1_700_000_000.0
    progress = [
        ("a", _progress(t0 + 30, 100, 90, [50, 50], [50, 50])),
        ("b", _progress(t0 + 40, 100, 80, [50, 50], [50, 50])),
        ("a", _progress(t0 + 90, 100, 50, [50, 50], [90, 10], lat_bin=30)),
        ("b", _progress(t0 + 95, 100, 70, [50, 50], [50, 50])),
        ("c", _progress(t0 + 99, 100, 60, [50, 50], [50, 50])),
        # a liar in the second minute: 10^6 samples, weighed as 4x the median device's (100)
        ("liar", _progress(t0 + 100, 10**6, 10**6, [10**6, 0], [10**6, 0])),
    ]
    s = merge_progress(progress, t0, t0 + 120, buckets=2)
    assert s["samples_per_min"] == [200.0, 300.0 + 10**6]
    assert s["agreement"][0] == 0.85
    assert s["agreement"][1] == round((50 + 70 + 60 + 400) / (300 + 400), 6)
    assert s["active_p95_ms"][0] is not None and s["output_psi"][0] == 0.0
    assert merge_progress([], t0, t0 + 60, buckets=3)["agreement"] == [None, None, None]
    # figures that cannot be: more agreeing than samples, a latency histogram of the wrong size
    assert check({**progress[0][1], "agree": 101, "active_classes": [50, 50], "candidate_classes": [50, 50]}) is None
    bad = {**progress[0][1], "active_latency_ms": [1] * 3, "active_classes": [50, 50], "candidate_classes": [50, 50]}
    assert check(bad) is None
