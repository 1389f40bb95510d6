"""Bundle format v1: determinism, signing, and every refusal the reader promises."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from edgefleet import (
    BundleError,
    InputError,
    Manifest,
    ModelEntry,
    SignatureError,
    TensorSpec,
    generate_keypair,
    open_bundle,
    sign_bundle,
    write_bundle,
)
from edgefleet._manifest import canonical_json


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def make_manifest(version: str = "1.0.0") -> Manifest:
    entry = ModelEntry(
        id="onnx-fp32",
        format="onnx",
        path="models/onnx-fp32.onnx",
        precision="fp32",
        inputs=[TensorSpec("input", "float32", [None, 1, 8, 8])],
        outputs=[TensorSpec("logits", "float32", [None, 10])],
        requirements={"onnx_opset": 17, "min_onnxruntime": "1.14"},
        golden_outputs="golden/onnx-fp32.outputs.npy",
    )
    return Manifest(
        name="digits", version=version, models=[entry], files=[], golden={"inputs": "golden/inputs.npy", "count": 2}
    )


def make_members(model_bytes: bytes = b"model-bytes") -> dict[str, bytes]:
    return {
        "models/onnx-fp32.onnx": model_bytes,
        "golden/inputs.npy": _npy(np.zeros((2, 1, 8, 8), np.float32)),
        "golden/onnx-fp32.outputs.npy": _npy(np.zeros((2, 10), np.float32)),
    }


def rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a bundle member by member, letting EDIT change (name, data, info) or add members."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        items = [(i, zin.read(i.filename)) for i in zin.infolist()]
        for info, data in edit(items):
            zout.writestr(info, data)


def test_same_inputs_and_key_give_identical_bytes(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k")
    a, b = tmp_path / "a.efb", tmp_path / "b.efb"
    write_bundle(a, make_manifest(), make_members(), key)
    write_bundle(b, make_manifest(), make_members(), key)
    assert a.read_bytes() == b.read_bytes()
    # Different content gives different bytes: the comparison above is not vacuous.
    write_bundle(b, make_manifest(), make_members(b"other"), key)
    assert a.read_bytes() != b.read_bytes()


def test_roundtrip_with_signature(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k")
    write_bundle(tmp_path / "x.efb", make_manifest(), make_members(), key)
    b = open_bundle(tmp_path / "x.efb", trusted_keys=[tmp_path / "k.pub"])
    assert b.signed_by == key.key_id
    assert b.manifest.model("onnx-fp32").inputs[0].shape == [None, 1, 8, 8]
    assert b.read("models/onnx-fp32.onnx") == b"model-bytes"
    assert b.golden_inputs().shape == (2, 1, 8, 8)
    fe = b.manifest.file("models/onnx-fp32.onnx")
    assert fe.size == len(b"model-bytes")


def test_wrong_key_missing_signature_and_tamper(tmp_path: Path) -> None:
    key = generate_keypair(tmp_path / "k")
    other = generate_keypair(tmp_path / "other")
    path = tmp_path / "x.efb"
    write_bundle(path, make_manifest(), make_members(), key)
    with pytest.raises(SignatureError, match="does not verify"):
        open_bundle(path, trusted_keys=[other.public])
    unsigned = tmp_path / "u.efb"
    write_bundle(unsigned, make_manifest(), make_members(), None)
    with pytest.raises(SignatureError, match="not signed"):
        open_bundle(unsigned, trusted_keys=[key.public])
    assert open_bundle(unsigned).signature_present is False
    # A manifest edited after signing (version bumped, then re-canonicalised) fails the signature.
    forged = tmp_path / "f.efb"

    def bump(items):
        for info, data in items:
            if info.filename == "manifest.json":
                doc = json.loads(data)
                doc["version"] = "9.9.9"
                data = canonical_json(doc)
            yield info, data

    rewrite(path, forged, bump)
    with pytest.raises(SignatureError):
        open_bundle(forged, trusted_keys=[key.public])


def test_member_hash_mismatch_is_refused(tmp_path: Path) -> None:
    path, bad = tmp_path / "x.efb", tmp_path / "bad.efb"
    write_bundle(path, make_manifest(), make_members(), None)

    def flip(items):
        for info, data in items:
            if info.filename.startswith("models/"):
                data = b"X" + data[1:]
            yield info, data

    rewrite(path, bad, flip)
    with pytest.raises(BundleError, match="does not match its sha256"):
        open_bundle(bad)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil", "path traversal"),
        ("models/../../evil", "path traversal"),
        ("/etc/passwd", "absolute path"),
        ("C:/x", "absolute path"),
        ("models\\x", "backslash"),
    ],
)
def test_dangerous_member_names_are_refused(tmp_path: Path, name: str, message: str) -> None:
    path, bad = tmp_path / "x.efb", tmp_path / "bad.efb"
    write_bundle(path, make_manifest(), make_members(), None)

    def add(items):
        yield from items
        yield zipfile.ZipInfo(name), b"payload"

    rewrite(path, bad, add)
    with pytest.raises(BundleError, match=message):
        open_bundle(bad)


def test_links_duplicates_unlisted_and_oversize(tmp_path: Path) -> None:
    path = tmp_path / "x.efb"
    write_bundle(path, make_manifest(), make_members(), None)

    def add_link(items):
        yield from items
        zi = zipfile.ZipInfo("models/link")
        zi.external_attr = (stat.S_IFLNK | 0o777) << 16
        yield zi, b"/etc/passwd"

    rewrite(path, tmp_path / "l.efb", add_link)
    with pytest.raises(BundleError, match="link"):
        open_bundle(tmp_path / "l.efb")

    def dup(items):
        items = list(items)
        yield from items
        yield items[-1]

    with pytest.warns(UserWarning):  # zipfile itself warns about the duplicate name
        rewrite(path, tmp_path / "d.efb", dup)
    with pytest.raises(BundleError, match="appears twice"):
        open_bundle(tmp_path / "d.efb")

    def extra(items):
        yield from items
        yield zipfile.ZipInfo("notes.txt"), b"hello"

    rewrite(path, tmp_path / "e.efb", extra)
    with pytest.raises(BundleError, match="not listed in the manifest"):
        open_bundle(tmp_path / "e.efb")

    with pytest.raises(BundleError, match="larger than"):
        open_bundle(path, max_member_bytes=8)


def test_unknown_major_version_and_malformed_fields(tmp_path: Path) -> None:
    path = tmp_path / "x.efb"
    write_bundle(path, make_manifest(), make_members(), None)

    def edit_manifest(change):
        def edit(items):
            for info, data in items:
                if info.filename == "manifest.json":
                    doc = json.loads(data)
                    change(doc)
                    data = canonical_json(doc)
                yield info, data

        return edit

    cases = [
        (lambda d: d.update(format_version="2.0"), "not supported"),
        (lambda d: d["models"][0].update(sha="x") or d["models"][0].update(precision="int4"), "precision"),
        (lambda d: d["models"][0].update(format="pickle"), "format"),
        (lambda d: d["files"][0].update(sha256="nothex"), "sha256"),
        (lambda d: d.update(version="one"), "semantic version"),
        (lambda d: d["models"][0]["inputs"][0].update(shape=[-1, 8]), "non-negative"),
        (lambda d: d["models"][0].pop("requirements"), "requirements"),
        (lambda d: d.update(models=[]), "at least one model"),
    ]
    for i, (change, msg) in enumerate(cases):
        bad = tmp_path / f"bad{i}.efb"
        rewrite(path, bad, edit_manifest(change))
        with pytest.raises(BundleError, match=msg):
            open_bundle(bad)


def test_non_canonical_manifest_and_truncation(tmp_path: Path) -> None:
    path = tmp_path / "x.efb"
    write_bundle(path, make_manifest(), make_members(), None)

    def pretty(items):
        for info, data in items:
            if info.filename == "manifest.json":
                data = json.dumps(json.loads(data), indent=2).encode()
            yield info, data

    rewrite(path, tmp_path / "p.efb", pretty)
    with pytest.raises(BundleError, match="canonical"):
        open_bundle(tmp_path / "p.efb")
    data = path.read_bytes()
    (tmp_path / "t.efb").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        open_bundle(tmp_path / "t.efb")
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "missing.efb")


def test_pickled_arrays_are_never_loaded(tmp_path: Path) -> None:
    members = make_members()
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    members["golden/inputs.npy"] = buf.getvalue()
    write_bundle(tmp_path / "x.efb", make_manifest(), members, None)
    b = open_bundle(tmp_path / "x.efb")
    with pytest.raises(BundleError, match=r"not a plain \.npy"):
        b.golden_inputs()


def test_extract_stays_inside_directory(tmp_path: Path) -> None:
    write_bundle(tmp_path / "x.efb", make_manifest(), make_members(), None)
    b = open_bundle(tmp_path / "x.efb")
    dest = tmp_path / "out"
    root = b.extract(dest)
    assert (root / "models" / "onnx-fp32.onnx").read_bytes() == b"model-bytes"
    # A pre-existing link inside the target pointing elsewhere is not followed.
    outside = tmp_path / "outside"
    outside.mkdir()
    dest2 = tmp_path / "out2"
    dest2.mkdir()
    os.symlink(outside, dest2 / "models")
    with pytest.raises(BundleError, match="link out of"):
        b.extract(dest2)
    assert list(outside.iterdir()) == []


def test_writer_refuses_bad_names_and_dangling_references(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="path traversal"):
        write_bundle(tmp_path / "x.efb", make_manifest(), {**make_members(), "../x": b""}, None)
    members = make_members()
    del members["golden/inputs.npy"]
    with pytest.raises(BundleError, match="not in 'files'"):
        write_bundle(tmp_path / "y.efb", make_manifest(), members, None)
    assert not (tmp_path / "x.efb").exists() and not (tmp_path / "y.efb").exists()
    assert list(tmp_path.glob("*.tmp")) == []


def test_sign_existing_bundle_and_bad_key(tmp_path: Path) -> None:
    write_bundle(tmp_path / "x.efb", make_manifest(), make_members(), None)
    key = generate_keypair(tmp_path / "k")
    sign_bundle(tmp_path / "x.efb", key)
    assert open_bundle(tmp_path / "x.efb", trusted_keys=[key.public]).signed_by == key.key_id
    (tmp_path / "junk.key").write_text("not a key")
    from edgefleet import load_signing_key

    with pytest.raises(InputError, match="not an unencrypted PEM Ed25519 private key"):
        load_signing_key(tmp_path / "junk.key")
    with pytest.raises(InputError, match="already exists"):
        generate_keypair(tmp_path / "k")


# Peak RSS from /proc (VmHWM, this process image only): getrusage's ru_maxrss survives exec on Linux and
# would report the forking pytest's own size.
_RSS_PROBE = """
import resource, sys
from edgefleet import BundleError, open_bundle
keys = sys.argv[2:] or None
# An address-space limit 256 MiB above what the process holds now, as on a small device (resource.setrlimit):
# decompressing the bomb would need more.
size = next(line for line in open("/proc/self/status") if line.startswith("VmSize:"))
limit = (int(size.split()[1]) << 10) + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
try:
    open_bundle(sys.argv[1], trusted_keys=keys)
    print("opened")
except BundleError as exc:
    print(type(exc).__name__, exc)
except MemoryError:
    print("MemoryError")
try:
    bytearray(600 << 20)
    print("limit not in force")
except MemoryError:
    print("limit in force")
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) // 1024)
"""


def test_a_zip_bomb_is_refused_before_it_is_decompressed(tmp_path: Path) -> None:
    """A small bundle whose model member inflates to 600 MiB: refused by the signature (an untrusted key) or
    by the size the signed manifest declares, without decompressing it (peak memory stays low), under an
    address-space limit (setrlimit) the inflated member would not fit in."""
    import subprocess
    import sys

    from edgefleet import generate_keypair

    good, other = generate_keypair(tmp_path / "good"), generate_keypair(tmp_path / "other")
    bomb = 600 << 20
    for label, signer in (("untrusted", other), ("trusted", good)):
        src, dst = tmp_path / f"{label}.efb", tmp_path / f"{label}-bomb.efb"
        write_bundle(src, make_manifest(), make_members(), signer)

        def inflate(items):
            for info, data in items:
                if info.filename == "models/onnx-fp32.onnx":
                    info = zipfile.ZipInfo(info.filename)
                    info.compress_type = zipfile.ZIP_DEFLATED
                    data = bytes(bomb)
                yield info, data

        rewrite(src, dst, inflate)
        assert dst.stat().st_size < 2 << 20
        r = subprocess.run(
            [sys.executable, "-c", _RSS_PROBE, str(dst), str(tmp_path / "good.pub")],
            capture_output=True,
            text=True,
            check=True,
        )
        verdict, limit, rss_mb = r.stdout.strip().splitlines()
        assert limit == "limit in force"  # the member, inflated, would not have fit
        if label == "untrusted":
            assert verdict.startswith("SignatureError"), verdict
        else:
            assert verdict.startswith("BundleError") and "does not match its size in the manifest" in verdict
        assert int(rss_mb) < 200, f"{label}: peak RSS {rss_mb} MB while refusing a {bomb >> 20} MiB member"


def test_a_nul_in_a_stored_member_name_is_refused(tmp_path: Path) -> None:
    path, bad = tmp_path / "x.efb", tmp_path / "bad.efb"
    write_bundle(path, make_manifest(), make_members(), None)
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, zin.read(info.filename))
    # zipfile cuts names at NUL when it reads them; write one into the archive's bytes directly.
    data = bad.read_bytes()
    bad.write_bytes(data.replace(b"golden/inputs.npy", b"golden/i\x00puts.npy"))
    with zipfile.ZipFile(bad) as z:
        assert "golden/i" in z.namelist()  # what a reader that trusts ZipInfo.filename sees
    with pytest.raises(BundleError, match="NUL"):
        open_bundle(bad)


def _resigned(src: Path, dst: Path, key, edit) -> None:  # type: ignore[no-untyped-def]
    """A copy of SRC whose manifest document EDIT changed, re-encoded canonically and signed by KEY."""
    from edgefleet._signing import encode_signature

    def change(items):
        for info, data in items:
            if info.filename == "manifest.json":
                doc = json.loads(data)
                edit(doc)
                body = canonical_json(doc)
                yield info, body
                sig = zipfile.ZipInfo("manifest.sig")
                yield sig, canonical_json(encode_signature(key, body))
            elif info.filename != "manifest.sig":
                yield info, data

    rewrite(src, dst, change)


def test_a_newer_minor_with_added_fields_is_read_and_another_major_refused(tmp_path: Path) -> None:
    from edgefleet import generate_keypair

    key = generate_keypair(tmp_path / "k")
    src = tmp_path / "x.efb"
    write_bundle(src, make_manifest(), make_members(), key)

    def newer(doc: dict) -> None:
        doc["format_version"] = "1.1"
        doc["future_top_level"] = {"anything": [1, 2.5, "x"]}
        doc["models"][0]["future_model_field"] = "npu-profile"
        doc["models"][0]["inputs"][0]["future_tensor_field"] = 1
        doc["files"][0]["future_file_field"] = True
        doc["golden"]["future_golden_field"] = "é"  # non-ASCII, written as UTF-8

    _resigned(src, tmp_path / "v1_1.efb", key, newer)
    b = open_bundle(tmp_path / "v1_1.efb", trusted_keys=[tmp_path / "k.pub"])
    assert b.manifest.format_version == "1.1" and b.manifest.models[0].id == "onnx-fp32"
    _resigned(src, tmp_path / "v2.efb", key, lambda doc: doc.update(format_version="2.0"))
    with pytest.raises(BundleError, match=r"format version 2\.0 is not supported"):
        open_bundle(tmp_path / "v2.efb", trusted_keys=[tmp_path / "k.pub"])
    # An integer where this reader writes a float is still canonical JSON.
    _resigned(src, tmp_path / "int.efb", key, lambda doc: doc["models"][0]["golden_tolerance"].update(atol=1))
    open_bundle(tmp_path / "int.efb", trusted_keys=[tmp_path / "k.pub"])
    # Re-signing the newer bundle with this version (another key) signs its manifest as written: the
    # fields this reader does not know are kept, byte for byte (they used to be dropped by re-encoding).
    other = generate_keypair(tmp_path / "k2")
    sign_bundle(tmp_path / "v1_1.efb", other, tmp_path / "v1_1.resigned.efb")
    with zipfile.ZipFile(tmp_path / "v1_1.efb") as a, zipfile.ZipFile(tmp_path / "v1_1.resigned.efb") as b2:
        assert a.read("manifest.json") == b2.read("manifest.json")
        assert b"future_model_field" in b2.read("manifest.json")
    again = open_bundle(tmp_path / "v1_1.resigned.efb", trusted_keys=[tmp_path / "k2.pub"])
    assert again.read("models/onnx-fp32.onnx") == b.read("models/onnx-fp32.onnx")


def test_nan_in_a_manifest_is_one_bundle_error(tmp_path: Path) -> None:
    src, bad = tmp_path / "x.efb", tmp_path / "nan.efb"
    write_bundle(src, make_manifest(), make_members(), None)

    def nan(items):
        for info, data in items:
            yield info, data.replace(b'"count":2', b'"count":NaN') if info.filename == "manifest.json" else data

    rewrite(src, bad, nan)
    with pytest.raises(BundleError, match="NaN"):
        open_bundle(bad)


def test_versions_follow_semver_org_precedence_and_syntax(tmp_path: Path) -> None:
    from edgefleet._manifest import semver_key

    # The precedence example of semver.org 2.0.0, section 11; build metadata does not count.
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2", "1.0.0-beta.11",
             "1.0.0-rc.1", "1.0.0", "1.0.1", "1.10.0", "2.0.0"]  # fmt: skip
    assert sorted(reversed(order), key=semver_key) == order
    assert semver_key("1.0.0+build.7") == semver_key("1.0.0")
    for bad in ("1.0", "01.0.0", "1.0.0-", "1.0.0-01", "1.0.0-rc..1", "1.0.0+", "1.0.0\n"):
        with pytest.raises(ValueError):
            semver_key(bad)
        with pytest.raises(BundleError, match="not a semantic version"):
            write_bundle(tmp_path / "v.efb", make_manifest(bad), make_members(), None)
