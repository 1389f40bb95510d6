"""Property-based fuzzing (hypothesis) of everything that reads what a device, a network or a file hands
over (issue 15): the bundle reader, the telemetry window, command and desired-state validators, the capture
upload reader and the rollups. Each raises only its documented error type, and nothing it accepts breaks
a rule: an accepted mutated bundle has the original's bytes in every member, an accepted window merges
into the rollups, an accepted upload has one label per sample."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet import BundleError, EdgefleetError, InputError, open_bundle
from edgefleet._manifest import Manifest
from edgefleet.fleet._captures import _read_npz
from edgefleet.fleet._rollups import accumulate, empty_merge
from edgefleet.protocol import (
    UPDATE_STATES,
    check_window,
    parse_command,
    parse_desired,
    parse_event,
    parse_state,
    parse_status,
)

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "conformance"
MESSAGES = json.loads((DOCS / "messages.json").read_text())
VALID = (DOCS / "bundles" / "valid.efb").read_bytes()
KEY = DOCS / "conformance.pub"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values, nested: what a hostile sender can put in any field.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


def _vector(kind: str) -> dict[str, Any]:
    return next(v for v in MESSAGES if v["kind"] == kind and v["verdict"] == "accept")


WINDOW = _vector("telemetry")


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> Any:
    """BASE with one field (at any depth) replaced by an arbitrary JSON value, or removed."""
    doc = json.loads(json.dumps(base))
    node = doc
    while True:
        if isinstance(node, dict) and node:
            k = draw(st.sampled_from(sorted(node)))
        elif isinstance(node, list) and node:
            k = draw(st.integers(0, len(node) - 1))
        else:
            return doc
        if not isinstance(node[k], (dict, list)) or draw(st.booleans()):
            if isinstance(node, dict) and draw(st.integers(0, 5)) == 0:
                del node[k]
            else:
                node[k] = draw(json_values)
            return doc
        node = node[k]


@FUZZ
@given(mutated(WINDOW["payload"]))
def test_telemetry_window_validator(doc: Any) -> None:
    try:
        w = check_window(doc, WINDOW["bins"], WINDOW["device_id"])
    except InputError:
        return
    # accepted: it merges (counts are counts), twice equals double
    once = accumulate(empty_merge(), w)
    twice = accumulate(accumulate(empty_merge(), w), w)
    assert twice["calls"] == 2 * once["calls"] >= 0 and twice["errors"] == 2 * once["errors"] >= 0
    assert sum(w["latency_ms"]["counts"]) == w["calls"]


@FUZZ
@given(json_values)
def test_telemetry_window_validator_on_anything(doc: Any) -> None:
    with pytest.raises(InputError):
        check_window(doc, WINDOW["bins"], WINDOW["device_id"])


@FUZZ
@given(st.sampled_from([v for v in MESSAGES if v["kind"] in ("command", "desired")]).flatmap(
    lambda v: st.tuples(st.just(v["kind"]), mutated(v["payload"]))
))  # fmt: skip
def test_command_and_desired_state_parsers(case: tuple[str, Any]) -> None:
    kind, doc = case
    try:
        got = parse_command(doc) if kind == "command" else parse_desired(doc)
    except InputError:
        return
    if kind == "command":
        assert isinstance(got.id, str) and isinstance(got.args, dict)
    else:
        assert got.action in ("update", "rollback") and len(got.bundle.sha256) == 64


@FUZZ
@given(json_values)
def test_parsers_on_anything(doc: Any) -> None:
    for parse in (parse_command, parse_desired):
        with pytest.raises(InputError):
            parse(doc)


_FROM_DEVICE = [v for v in MESSAGES if v["kind"] in ("status", "state", "event") and v["verdict"] == "accept"]
_PARSE = {"status": parse_status, "state": parse_state, "event": parse_event}


@FUZZ
@given(st.sampled_from(_FROM_DEVICE).flatmap(lambda v: st.tuples(st.just(v["kind"]), mutated(v["payload"]))))
def test_status_state_and_event_validators(case: tuple[str, Any]) -> None:
    """What the ingest stores from a device: accepted means the fields the server reads are of their type."""
    kind, doc = case
    try:
        got = _PARSE[kind](doc, "cam-7")
    except InputError:
        return
    assert got.device_id == "cam-7" and got.to_dict()["device_id"] == "cam-7"
    if kind == "status":
        assert isinstance(got.online, bool) and got.ts >= 0
    elif kind == "state":
        assert got.update_state is None or got.update_state in UPDATE_STATES
        for ref in (got.committed, got.staged):
            assert ref is None or (isinstance(ref["name"], str) and isinstance(ref["version"], str))
        assert got.agent_version is None or isinstance(got.agent_version, str)
    else:
        assert isinstance(got.key, str) and got.key and isinstance(got.type, str) and got.ts >= 0


@FUZZ
@given(json_values)
def test_device_message_validators_on_anything(doc: Any) -> None:
    for parse in _PARSE.values():
        with pytest.raises(InputError):
            parse(doc, "cam-7")


_MANIFEST = json.loads(zipfile.ZipFile(io.BytesIO(VALID)).read("manifest.json"))


@FUZZ
@given(mutated(_MANIFEST))
def test_manifest_parser(doc: Any) -> None:
    """A manifest with any field replaced or removed is read or refused with a BundleError, nothing else."""
    try:
        m = Manifest.parse(doc)
    except BundleError:
        return
    assert m.models and all(f.path for f in m.files)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4))
def test_bundle_reader_on_mutated_bundles(tmp_path: Path, flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for pos, val in flips:
        data[pos] = val
    p = tmp_path / "fuzzed.efb"
    p.write_bytes(bytes(data))
    try:
        b = open_bundle(p, [KEY])
    except BundleError:
        return
    # accepted: only bytes no member's content depends on changed (zip metadata); every member reads the same
    with zipfile.ZipFile(io.BytesIO(VALID)) as z:
        assert b._manifest_body == z.read("manifest.json")
        for name in z.namelist():
            if name not in ("manifest.json", "manifest.sig"):
                assert b.read(name) == z.read(name), name


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_bundle_reader_on_arbitrary_bytes(tmp_path_factory: Any, data: bytes) -> None:
    p = tmp_path_factory.mktemp("fz") / "junk.efb"
    p.write_bytes(data)
    with pytest.raises(EdgefleetError):
        open_bundle(p, [KEY])


arrays = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.uint8, np.bool_, "U"]).flatmap(
    lambda dt: st.lists(st.integers(0, 4), min_size=0, max_size=3).map(
        lambda shape: np.full(shape, "mlp:1.0.0") if dt == "U" else np.full(shape, -1 if dt == np.int64 else 0, dt)
    )
)


@FUZZ
@given(st.dictionaries(st.sampled_from(["x", "label", "ts", "bundle", "outputs", "y"]), arrays, max_size=6))
def test_capture_upload_reader(parts: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **parts)
    try:
        got = _read_npz(buf.getvalue())
    except InputError:
        return
    n = len(got["x"])
    assert n > 0 and got["label"].shape == (n,) and got["ts"].shape == (n,) and got["bundle"].shape == (n,)


@FUZZ
@given(st.binary(max_size=3000))
def test_capture_upload_reader_on_arbitrary_bytes(data: bytes) -> None:
    with pytest.raises(InputError):
        _read_npz(data)
