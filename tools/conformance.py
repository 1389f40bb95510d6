"""Write the conformance vectors in docs/conformance/: bundles and MQTT payloads with the verdict an
implementation of docs/bundle-format.md and docs/topics.md must reach.

    python tools/conformance.py docs/conformance      # what `make` never needs: the files are committed

Everything is deterministic (a fixed Ed25519 seed, fixed archive timestamps), so running it again gives
the same bytes; tests/test_conformance.py checks that, then runs every vector against edgefleet.
"""

from __future__ import annotations

import copy
import io
import json
import stat
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgefleet import Manifest, ModelEntry, TensorSpec
from edgefleet._bundle import sha256_bytes
from edgefleet._manifest import FileEntry, canonical_json
from edgefleet._signing import SigningKey, encode_signature
from edgefleet.protocol import (
    COMMAND_SCHEMA,
    DESIRED_SCHEMA,
    EVENT_SCHEMA,
    LATENCY_EDGES_MS,
    STATE_SCHEMA,
    STATUS_SCHEMA,
    WINDOW_SCHEMA,
)

SEED = bytes(range(1, 33))  # the vectors' signing key: public, for tests only
OTHER_SEED = bytes(range(101, 133))


def _key(seed: bytes) -> SigningKey:
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _members() -> dict[str, bytes]:
    return {
        "models/onnx-fp32.onnx": b"placeholder model bytes: these vectors test the container, not inference",
        "golden/inputs.npy": _npy(np.zeros((2, 4), np.float32)),
        "golden/onnx-fp32.outputs.npy": _npy(np.zeros((2, 3), np.float32)),
    }


def _manifest(members: dict[str, bytes]) -> dict[str, Any]:
    entry = ModelEntry(
        id="onnx-fp32",
        format="onnx",
        path="models/onnx-fp32.onnx",
        precision="fp32",
        inputs=[TensorSpec("x", "float32", [None, 4])],
        outputs=[TensorSpec("y", "float32", [None, 3])],
        requirements={"onnx_opset": 17, "min_onnxruntime": "1.14"},
        golden_outputs="golden/onnx-fp32.outputs.npy",
        golden_tolerance={"atol": 0.0001, "rtol": 0.0001},
    )
    m = Manifest(
        name="conformance",
        version="1.0.0",
        models=[entry],
        files=[],
        golden={"inputs": "golden/inputs.npy", "count": 2},
        # The histogram sizes the telemetry vectors are checked against (`_BINS`): brightness in 3 bins,
        # 3 classes.
        drift_baseline={
            "version": 1,
            "n_samples": 4,
            "layout": "NC",
            "inputs": [
                {"name": "brightness", "level": "sample", "edges": [0.25, 0.75], "proportions": [0.25, 0.5, 0.25]}
            ],
            "outputs": {"apply_softmax": False, "predicted_class": {"proportions": [0.5, 0.25, 0.25]}},
        },
    )
    m.files = [FileEntry(n, sha256_bytes(b), len(b)) for n, b in sorted(members.items())]
    doc: dict[str, Any] = json.loads(m.canonical_bytes())
    return doc


def _info(name: str, mode: int = stat.S_IFREG | 0o644) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zi.create_system = 3
    zi.external_attr = mode << 16
    return zi


def _archive(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for info, data in entries:
            zf.writestr(info if isinstance(info, zipfile.ZipInfo) else _info(info), data)
    return buf.getvalue()


def _bundle(
    doc: dict[str, Any] | None = None,
    members: dict[str, bytes] | None = None,
    *,
    body: bytes | None = None,
    key: SigningKey | None = None,
    signed: bool = True,
    extra: list[tuple[zipfile.ZipInfo | str, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    members = _members() if members is None else members
    body = canonical_json(_manifest(members) if doc is None else doc) if body is None else body
    entries: list[tuple[zipfile.ZipInfo | str, bytes]] = [("manifest.json", body)]
    if signed:
        entries.append(("manifest.sig", canonical_json(encode_signature(key or _key(SEED), body))))
    entries += sorted(members.items()) + list(extra)
    return _archive(entries)


def _signed_with(sig: bytes) -> bytes:
    """A bundle whose manifest.sig is SIG, as given."""
    m = _members()
    body = canonical_json(_manifest(m))
    return _archive([("manifest.json", body), ("manifest.sig", sig), *sorted(m.items())])


def _signature(**over: Any) -> dict[str, Any]:
    sig = encode_signature(_key(SEED), canonical_json(_manifest(_members())))
    sig.update(over)
    return sig


def _edit(fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    doc = copy.deepcopy(_manifest(_members()))
    fn(doc)
    return doc


def bundle_vectors() -> list[tuple[str, bytes, str, str, str]]:
    """(file, bytes, verdict, error substring, rule). Verified with the vectors' public key unless the
    rule says otherwise."""
    m = _members()
    tampered = dict(m)
    tampered["models/onnx-fp32.onnx"] = m["models/onnx-fp32.onnx"][:-1] + b"!"
    numbers = {"ints": [0, -7, 12345678901234567890], "floats": [1.5, 0.0001, 1e-05, 1e16, 1e22, -0.0, 2.5e-07]}
    v = [
        ("valid.efb", _bundle(), "accept", "", "a signed bundle of format 1.0"),
        (
            "valid-newer-minor.efb",
            _bundle(
                _edit(
                    lambda d: (
                        d.update(format_version="1.7", future_field={"nested": [1, 2.5, "x"]}),
                        d["models"][0].update(future_model_field="npu"),
                        d["models"][0]["inputs"][0].update(future_tensor_field=True),
                        d["files"][0].update(future_file_field=None),
                        d["golden"].update(future_golden_field="é ü 水"),
                    )
                )
            ),
            "accept",
            "",
            "a newer MINOR with fields added at every level (kept and ignored)",
        ),
        (
            "valid-canonical-numbers.efb",
            _bundle(_edit(lambda d: d.update(format_version="1.1", x_numbers=numbers))),
            "accept",
            "",
            "numbers in canonical form: integers as written, floats in shortest round-trip form "
            "(exponent below 1e-4 and from 1e16 up)",
        ),
        (
            "valid-canonical-strings.efb",
            _bundle(
                _edit(
                    lambda d: d.update(
                        format_version="1.1", x_text='quote " backslash \\ tab \t nl \n bell \x07 / del \x7f é \u2028 𝄞'
                    )
                )
            ),
            "accept",
            "",
            "strings: only quote, backslash and control characters escaped; '/', DEL and non-ASCII as themselves",
        ),
        (
            "refused-escaped-slash.efb",
            _bundle(body=canonical_json(_manifest(m)).replace(b"models/onnx-fp32.onnx", b"models\\/onnx-fp32.onnx", 1)),
            "refuse",
            "canonical form",
            "'/' escaped as '\\/' is not canonical",
        ),
        (
            "refused-duplicate-key.efb",
            _bundle(
                body=canonical_json(_manifest(m)).replace(
                    b'"name":"conformance"', b'"name":"evil","name":"conformance"'
                )
            ),
            "refuse",
            "canonical form",
            "a duplicate key (parsers differ in which value they keep)",
        ),
        (
            "refused-noncanonical-number.efb",
            _bundle(body=canonical_json(_manifest(m)).replace(b'"atol":0.0001', b'"atol":1E-4')),
            "refuse",
            "canonical form",
            "1E-4 is not the canonical 0.0001",
        ),
        (
            "refused-whitespace.efb",
            _bundle(body=json.dumps(_manifest(m), sort_keys=True, indent=1).encode()),
            "refuse",
            "canonical form",
            "whitespace between tokens",
        ),
        (
            "refused-unsorted-keys.efb",
            _bundle(body=json.dumps(dict(reversed(_manifest(m).items())), separators=(",", ":")).encode()),
            "refuse",
            "canonical form",
            "keys not sorted",
        ),
        (
            "refused-tampered-member.efb",
            _bundle(members=tampered, doc=_manifest(m)),
            "refuse",
            "sha256",
            "a member's bytes changed after signing",
        ),
        (
            "refused-unsigned.efb",
            _bundle(signed=False),
            "refuse",
            "not signed",
            "no manifest.sig while trusted keys are given",
        ),
        (
            "refused-other-key.efb",
            _bundle(key=_key(OTHER_SEED)),
            "refuse",
            "does not verify",
            "signed by an untrusted key",
        ),
        (
            "refused-major-2.efb",
            _bundle(_edit(lambda d: d.update(format_version="2.0"))),
            "refuse",
            "format version 2.0 is not supported",
            "another MAJOR",
        ),
        (
            "refused-missing-field.efb",
            _bundle(_edit(lambda d: d.pop("version"))),
            "refuse",
            "'version' is missing",
            "a required field is missing (named in the error)",
        ),
        (
            "refused-version-newline.efb",
            _bundle(_edit(lambda d: d.update(version="1.0.0\n"))),
            "refuse",
            "version",
            "versions are whole-string semver",
        ),
        (
            "refused-nan.efb",
            _bundle(body=canonical_json(_manifest(m)).replace(b'"atol":0.0001', b'"atol":NaN')),
            "refuse",
            "NaN",
            "NaN / Infinity are not JSON",
        ),
        (
            "refused-unlisted-member.efb",
            _bundle(extra=[("models/extra.bin", b"x")]),
            "refuse",
            "not listed in the manifest",
            "every member is listed",
        ),
        (
            "refused-missing-member.efb",
            _bundle(doc=_manifest(m), members={k: b for k, b in m.items() if not k.startswith("golden/onnx")}),
            "refuse",
            "does not contain it",
            "every listed file is present",
        ),
        ("refused-traversal.efb", _bundle(extra=[("../evil.txt", b"x")]), "refuse", "..", "no '..' components"),
        (
            "refused-dot-component.efb",
            _bundle(extra=[("models/./evil.txt", b"x")]),
            "refuse",
            "'.'",
            "no '.' components",
        ),
        ("refused-absolute.efb", _bundle(extra=[("/etc/evil", b"x")]), "refuse", "absolute", "no absolute names"),
        (
            "refused-symlink.efb",
            _bundle(extra=[(_info("models/link", stat.S_IFLNK | 0o777), b"/etc/passwd")]),
            "refuse",
            "link or special file",
            "only regular files",
        ),
        (
            "refused-duplicate.efb",
            _bundle(extra=[("golden/inputs.npy", m["golden/inputs.npy"])]),
            "refuse",
            "appears twice",
            "no duplicate names",
        ),
        ("refused-not-a-zip.efb", b"PK\x03\x04 this is no archive", "refuse", "not a readable bundle", "a ZIP archive"),
        (
            "valid-signature-newer-field.efb",
            _signed_with(canonical_json(_signature(future_field="kept and ignored"))),
            "accept",
            "",
            "a newer MINOR's field in manifest.sig",
        ),
        (
            "refused-signature-key-id-other.efb",
            _signed_with(canonical_json(_signature(key_id=_key(OTHER_SEED).key_id))),
            "refuse",
            "not trusted",
            "key_id names the key that signed; a signature naming another key is refused",
        ),
        (
            "refused-signature-key-id-malformed.efb",
            _signed_with(canonical_json(_signature(key_id="KEY-1"))),
            "refuse",
            "key_id",
            "key_id is 16 lowercase hex digits",
        ),
        (
            "refused-signature-whitespace.efb",
            _signed_with(json.dumps(_signature(), sort_keys=True, indent=1).encode()),
            "refuse",
            "canonical form",
            "manifest.sig is canonical JSON too",
        ),
        (
            "refused-number-out-of-range.efb",
            _bundle(body=canonical_json(_manifest(m)).replace(b'"atol":0.0001', b'"atol":1e400')),
            "refuse",
            "out of range",
            "a number no IEEE-754 double holds (parsers read it as infinity)",
        ),
        (
            "refused-lone-surrogate.efb",
            _bundle(body=canonical_json(_manifest(m)).replace(b'"atol":0.0001', b'"atol":0.0001,"x":"\\ud800"')),
            "refuse",
            "surrogate",
            "a string with a lone UTF-16 surrogate has no UTF-8 (so no canonical) form",
        ),
        (
            "refused-format-version-newline.efb",
            _bundle(_edit(lambda d: d.update(format_version="1.0\n"))),
            "refuse",
            "format_version",
            "format_version is exactly MAJOR.MINOR",
        ),
        (
            "refused-golden-count-string.efb",
            _bundle(_edit(lambda d: d["golden"].update(count="2"))),
            "refuse",
            "golden.count",
            "golden.count is an integer",
        ),
        (
            "refused-baseline-edges.efb",
            _bundle(_edit(lambda d: d["drift_baseline"]["inputs"][0].update(edges=[0.75, 0.25]))),
            "refuse",
            "edges",
            "a baseline feature has one inner edge fewer than proportions, increasing",
        ),
    ]
    return v


def _window(**over: Any) -> dict[str, Any]:
    counts = [0] * (len(LATENCY_EDGES_MS) + 1)
    counts[20] = 5
    w: dict[str, Any] = {
        "schema": WINDOW_SCHEMA,
        "key": "cam-7:1700000000000:0123456789ab",
        "device_id": "cam-7",
        "bundle": {"name": "conformance", "version": "1.0.0"},
        "start": 1700000000.0,
        "end": 1700000060.0,
        "calls": 5,
        "samples": 5,
        "errors": {},
        "nan_outputs": 0,
        "latency_ms": {"counts": counts},
        "inputs": {"brightness": [1, 2, 2]},
        "outputs": {"predicted_class": [2, 3, 0]},
    }
    w.update(over)
    return w


_BINS = {"inputs": {"brightness": 3}, "outputs": {"predicted_class": 3}}
_REF = {
    "name": "conformance",
    "version": "1.0.0",
    "url": "https://fleet.example/bundles/conformance/1.0.0.efb",
    "sha256": "ab" * 32,
    "size": 1234,
}


def message_vectors() -> list[dict[str, Any]]:
    """Payloads with the verdict a receiver reaches. Telemetry windows are checked against the bundle's
    baseline bins `bins` (from its drift baseline) and the device id of the topic."""
    desired = {"schema": DESIRED_SCHEMA, "bundle": _REF, "action": "update", "rollout": "r-1", "issued_at": 1.0}
    shadow = {
        "schema": COMMAND_SCHEMA,
        "id": "s-1",
        "command": "shadow",
        "args": {"bundle": _REF, "sample_rate": 0.1, "duration_s": 60},
    }
    out: list[dict[str, Any]] = []

    def add(kind: str, name: str, payload: Any, verdict: str, error: str = "", **ctx: Any) -> None:
        out.append({"name": name, "kind": kind, "payload": payload, "verdict": verdict, "error": error, **ctx})

    add("desired", "desired-valid", desired, "accept")
    add("desired", "desired-newer-minor-field", {**desired, "future": {"x": 1}}, "accept")
    add("desired", "desired-wrong-schema", {**desired, "schema": "edgefleet.desired/2"}, "refuse", "schema")
    add("desired", "desired-unknown-action", {**desired, "action": "wipe"}, "refuse", "action")
    add("desired", "desired-bad-sha256", {**desired, "bundle": {**_REF, "sha256": "xyz"}}, "refuse", "sha256")
    add("desired", "desired-file-url", {**desired, "bundle": {**_REF, "url": "file:///etc/passwd"}}, "refuse", "http")
    add(
        "desired", "desired-version-newline", {**desired, "bundle": {**_REF, "version": "1.0.0\n"}}, "refuse", "version"
    )
    add("command", "command-shadow", shadow, "accept")
    add("command", "command-flush", {"schema": COMMAND_SCHEMA, "id": "c-1", "command": "flush"}, "accept")
    add("command", "command-newer-minor-field", {**shadow, "future": {"x": 1}}, "accept")
    add("command", "command-unknown", {"schema": COMMAND_SCHEMA, "id": "c-2", "command": "wipe"}, "refuse", "unknown")
    add(
        "command",
        "command-shadow-rate-zero",
        {**shadow, "args": {**shadow["args"], "sample_rate": 0}},
        "refuse",
        "sample_rate",
    )
    capture = {
        "schema": COMMAND_SCHEMA,
        "id": "c-3",
        "command": "capture",
        "args": {"capture_id": "cap-1", "samples": 100, "url": "https://fleet.example/api/captures/cap-1/upload"},
    }
    add("command", "command-capture", capture, "accept")
    add(
        "command",
        "command-capture-no-samples",
        {**capture, "args": {**capture["args"], "samples": 0}},
        "refuse",
        "samples",
    )
    add(
        "command",
        "command-capture-file-url",
        {**capture, "args": {**capture["args"], "url": "file:///etc/passwd"}},
        "refuse",
        "url",
    )
    refusal = {
        "schema": "edgefleet.refusal/1",
        "device_id": "cam-7",
        "kind": "telemetry",
        "key": "cam-7:1700000000000:0123456789ab",
        "reason": "telemetry window lacks field 'calls'",
        "ts": 1700000061.5,
    }
    add("refusal", "refusal-valid", refusal, "accept")
    add("refusal", "refusal-no-key", {**refusal, "key": None}, "accept")
    add("refusal", "refusal-newer-minor-field", {**refusal, "future": 1}, "accept")
    add("refusal", "refusal-no-reason", {k: v for k, v in refusal.items() if k != "reason"}, "refuse", "reason")
    ctx = {"bins": _BINS, "device_id": "cam-7"}
    add("telemetry", "window-valid", _window(), "accept", **ctx)
    add("telemetry", "window-newer-minor-field", _window(future={"x": 1}), "accept", **ctx)
    add("telemetry", "window-other-device", _window(device_id="cam-8"), "refuse", "device", **ctx)
    add(
        "telemetry",
        "window-wrong-bin-count",
        _window(inputs={"brightness": [1, 2]}),
        "refuse",
        "bins",
        **ctx,
    )
    add("telemetry", "window-negative-count", _window(nan_outputs=-1), "refuse", "nan_outputs", **ctx)
    lat = [0] * (len(LATENCY_EDGES_MS) + 1)
    lat[3] = 4
    add("telemetry", "window-latency-sum", _window(latency_ms={"counts": lat}), "refuse", "latency", **ctx)
    fb = {"labelled": 5, "confusion": [[2, 0, 0], [1, 1, 0], [0, 0, 1]]}
    add("telemetry", "window-with-feedback", _window(feedback=fb), "accept", **ctx)
    add(
        "telemetry",
        "window-feedback-not-square",
        _window(feedback={"labelled": 2, "confusion": [[1, 1], [0, 0]]}),
        "refuse",
        "one row per class",
        **ctx,
    )
    add("telemetry", "window-feedback-sum", _window(feedback={**fb, "labelled": 6}), "refuse", "add up", **ctx)
    add("telemetry", "window-missing-key", {k: v for k, v in _window().items() if k != "key"}, "refuse", "key", **ctx)

    dev = {"device_id": "cam-7"}
    status = {"schema": STATUS_SCHEMA, "device_id": "cam-7", "online": True, "ts": 1700000000.0}
    add("status", "status-valid", status, "accept", **dev)
    add("status", "status-offline-will", {**status, "online": False}, "accept", **dev)
    add("status", "status-newer-minor-field", {**status, "future": [1]}, "accept", **dev)
    add("status", "status-other-device", {**status, "device_id": "cam-8"}, "refuse", "came from", **dev)
    add("status", "status-online-string", {**status, "online": "yes"}, "refuse", "online", **dev)
    add("status", "status-wrong-schema", {**status, "schema": "edgefleet.status/2"}, "refuse", "schema", **dev)
    named = {"name": "conformance", "version": "1.0.0", "sha256": "ab" * 32}
    state = {
        "schema": STATE_SCHEMA,
        "device_id": "cam-7",
        "agent_version": "0.1.0",
        "tags": ["eu"],
        "active": {
            "bundle": "conformance",
            "version": "1.0.0",
            "model_id": "onnx-fp32",
            "backend": "onnxruntime",
            "accelerator": "CPUExecutionProvider",
            "fallbacks": [],
            "slot": "a",
        },
        "committed": {"slot": "a", **named},
        "staged": None,
        "update": {"state": "idle", "rollout": None, "last_result": None, "refused": {}},
        "buffer": {"windows": 0, "bytes": 0, "dropped_windows": 0},
        "refused_by_fleet": {"count": 0, "last": None},
        "capabilities": {"machine": "x86_64", "runtimes": {}},
        "ts": 1700000000.0,
    }
    add("state", "state-valid", state, "accept", **dev)
    add("state", "state-minimal", {"schema": STATE_SCHEMA, "device_id": "cam-7"}, "accept", **dev)
    add("state", "state-newer-minor-field", {**state, "future": {"x": 1}}, "accept", **dev)
    add("state", "state-other-device", {**state, "device_id": "cam-8"}, "refuse", "came from", **dev)
    add("state", "state-unknown-update-state", {**state, "update": {"state": "nap"}}, "refuse", "update.state", **dev)
    add("state", "state-staged-version-string", {**state, "staged": "2.0.0"}, "refuse", "staged", **dev)
    add("state", "state-active-version-newline", {**state, "active": {**state["active"], "version": "1.0.0\n"}},
        "refuse", "version", **dev)  # fmt: skip
    ev = {"schema": EVENT_SCHEMA, "key": "cam-7:ev:0123456789ab", "device_id": "cam-7", "ts": 1700000000.0}
    add("event", "event-committed", {**ev, "type": "committed", "bundle": {**_REF}, "rollout": "r-1"}, "accept", **dev)
    add(
        "event",
        "event-update-state",
        {**ev, "type": "update_state", "from_state": "idle", "to_state": "downloading", "target": _REF,
         "rollout": "r-1"},
        "accept",
        **dev,
    )  # fmt: skip
    add("event", "event-installed", {**ev, "type": "installed", "bundle": named}, "accept", **dev)
    add("event", "event-newer-minor-field", {**ev, "type": "installed", "bundle": named, "future": [1]}, "accept",
        **dev)  # fmt: skip
    add("event", "event-newer-minor-type", {**ev, "type": "npu_thermal_throttle", "celsius": 91}, "accept", **dev)
    add(
        "event",
        "event-target-legacy-version-string",
        {**ev, "type": "update_state", "from_state": "idle", "to_state": "downloading", "target": "1.0.0"},
        "accept",
        **dev,
    )
    add(
        "event",
        "event-target-number",
        {**ev, "type": "update_state", "from_state": "idle", "to_state": "downloading", "target": 7},
        "refuse",
        "bundle object",
        **dev,
    )
    add("event", "event-installed-version-string", {**ev, "type": "installed", "bundle": "1.0.0"}, "refuse",
        "bundle object", **dev)  # fmt: skip
    add("event", "event-no-key", {k: v for k, v in ev.items() if k != "key"} | {"type": "installed",
        "bundle": named}, "refuse", "key", **dev)  # fmt: skip
    add("event", "event-other-device", {**ev, "device_id": "cam-8", "type": "buffer_reset"}, "refuse", "came from",
        **dev)  # fmt: skip
    add("event", "event-rollout-number", {**ev, "type": "committed", "bundle": named, "rollout": 7}, "refuse",
        "rollout", **dev)  # fmt: skip
    return out


def write(dest: Path) -> None:
    (dest / "bundles").mkdir(parents=True, exist_ok=True)
    key = _key(SEED)
    (dest / "conformance.pub").write_bytes(key.public.pem())
    index = []
    for name, data, verdict, error, rule in bundle_vectors():
        (dest / "bundles" / name).write_bytes(data)
        index.append({"file": f"bundles/{name}", "verdict": verdict, "error": error, "rule": rule})
    (dest / "bundles.json").write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n")
    (dest / "messages.json").write_text(json.dumps(message_vectors(), indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/conformance"))
