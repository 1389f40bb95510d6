"""The runtime on real bundles built by the converters: verification, both backends, accelerator
fallback, input checks, and the `edgefleet run` command."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import edgefleet.runtime as rt
from edgefleet import BundleError, InputError, Manifest, SignatureError, generate_keypair, open_bundle, write_bundle

from .conftest import run_cli

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_predict_matches_golden_and_batches(digits_bundle: Path, publisher, backend: str) -> None:
    m = rt.load(digits_bundle, [publisher[2]], backend=backend)
    assert m.info.format == backend and m.info.precision == "int8"
    assert m.info.backend == ("onnxruntime" if backend == "onnx" else "litert")
    assert m.info.signed_by is not None and m.info.fallbacks == ()
    res = m.check_golden()
    assert res.ok and res.agreement == 1.0
    x = m.bundle.golden_inputs()
    expected = m.bundle.load_array(m.entry.golden_outputs)
    # float in, float out: the int8 file's scales are applied by the runtime
    y = m.predict(x)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, atol=1e-6)
    # a batch larger than the file's fixed batch (TFLite is exported for batch 1) is split and joined
    big = np.concatenate([x] * 5)
    np.testing.assert_allclose(m.predict(big), np.concatenate([expected] * 5), atol=1e-6)
    assert m.predict(x[:1]).shape == (1, 10)


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_threads_are_chosen_at_load_and_reported(
    digits_bundle: Path, publisher, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet.runtime import _model

    monkeypatch.setattr(_model, "_cpu_count", lambda: 2)
    assert rt.load(digits_bundle, [publisher[2]], backend=backend, threads=2).info.threads == 2
    # The timing is made up; the sessions are real. A small model that runs faster on one thread gets one...
    monkeypatch.setattr(_model, "_call_s", lambda m, x: 1e-5 * (m._session.threads or 0))
    one = rt.load(digits_bundle, [publisher[2]], backend=backend)
    assert one.info.threads == 1
    # ...one that runs faster on all cores, or is not small, gets all cores.
    monkeypatch.setattr(_model, "_call_s", lambda m, x: 1e-5 / (m._session.threads or 1))
    assert rt.load(digits_bundle, [publisher[2]], backend=backend).info.threads == 2
    monkeypatch.setattr(_model, "_call_s", lambda m, x: 1.0)
    both = rt.load(digits_bundle, [publisher[2]], backend=backend)
    assert both.info.threads == 2
    if backend == "onnx":  # the number is what the backend was given
        opts = [m._session._s.get_session_options().intra_op_num_threads for m in (one, both)]
        assert opts == [1, 2]
    x = one.bundle.golden_inputs()
    np.testing.assert_array_equal(one.predict(x), both.predict(x))


def test_auto_picks_first_runnable_model(digits_bundle: Path, publisher) -> None:
    m = rt.load(digits_bundle, [publisher[2]])
    assert m.info.model_id == open_bundle(digits_bundle).manifest.models[0].id


def test_refuses_before_running(tmp_path: Path, digits_bundle: Path, publisher) -> None:
    other = generate_keypair(tmp_path / "other")
    with pytest.raises(SignatureError):
        rt.load(digits_bundle, [tmp_path / "other.pub"])
    del other
    with pytest.raises(InputError, match="trusted_keys"):
        rt.load(digits_bundle)
    data = bytearray(digits_bundle.read_bytes())
    # A flipped byte is caught by the archive's CRC; an attacker who rebuilds the archive is caught by the hash.
    b = open_bundle(digits_bundle)
    model_path = b.manifest.models[0].path
    at = bytes(data).index(b.read(model_path)[100:164]) + 10
    data[at] ^= 0xFF
    (tmp_path / "flipped.efb").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        rt.load(tmp_path / "flipped.efb", [publisher[2]])
    with zipfile.ZipFile(digits_bundle) as zin, zipfile.ZipFile(tmp_path / "tampered.efb", "w") as zout:
        for info in zin.infolist():
            body = zin.read(info)
            if info.filename == model_path:
                body = body[:-1] + bytes([body[-1] ^ 1])
            zout.writestr(info, body)
    with pytest.raises(BundleError, match="sha256"):
        rt.load(tmp_path / "tampered.efb", [publisher[2]])
    (tmp_path / "truncated.efb").write_bytes(digits_bundle.read_bytes()[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or corrupt"):
        rt.load(tmp_path / "truncated.efb", [publisher[2]])


def _rewrite(src: Path, dst: Path, key, edit) -> None:
    b = open_bundle(src)
    d = b.manifest.to_dict()
    members = {n: b.read(n) for n in b.member_names}
    edit(d, members)
    write_bundle(dst, Manifest.parse(d), members, key)


def test_refuses_incompatible_bundle(tmp_path: Path, mlp_bundles: dict, publisher) -> None:
    def newer(d, members):
        d["models"][0]["requirements"]["min_onnxruntime"] = "99.0"

    _rewrite(mlp_bundles["1.0.0"], tmp_path / "newer.efb", publisher[0], newer)
    with pytest.raises(BundleError, match=r"needs onnxruntime >= 99.0"):
        rt.load(tmp_path / "newer.efb", [publisher[2]])

    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Frobnicate", ["input"], ["logits"], domain="com.example")],
        "unknown_op",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    m.ir_version = 9
    unknown = m.SerializeToString()

    def swap(d, members):
        from edgefleet._bundle import sha256_bytes

        path = d["models"][0]["path"]
        members[path] = unknown
        for f in d["files"]:
            if f["path"] == path:
                f["sha256"], f["size"] = sha256_bytes(unknown), len(unknown)

    _rewrite(mlp_bundles["1.0.0"], tmp_path / "unknown.efb", publisher[0], swap)
    with pytest.raises(BundleError, match="Frobnicate"):
        rt.load(tmp_path / "unknown.efb", [publisher[2]])
    r = run_cli("run", str(tmp_path / "unknown.efb"), "--golden", "--key", str(publisher[2]))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Frobnicate" in r.stderr
    del onnx


def test_bad_inputs_name_the_expected_shape(mlp_bundles: dict, publisher) -> None:
    m = rt.load(mlp_bundles["1.0.0"], [publisher[2]])
    with pytest.raises(InputError, match=r"shape \(8, 8\); expected \(N, 1, 8, 8\)"):
        m.predict(np.zeros((8, 8), np.float32))
    with pytest.raises(InputError, match=r"expected \(N, 1, 8, 8\)"):
        m.predict(np.zeros((2, 1, 8, 9), np.float32))
    with pytest.raises(InputError, match="dtype"):
        m.predict(np.array([[[["a"] * 8] * 8]]))
    x = np.zeros((2, 1, 8, 8), np.float32)
    x[1, 0, 3, 3] = np.nan
    with pytest.raises(InputError, match="NaN"):
        m.predict(x)
    x[1, 0, 3, 3] = -np.inf
    with pytest.raises(InputError, match="infinite"):
        m.predict(x)
    with pytest.raises(InputError, match="empty batch"):
        m.predict(np.zeros((0, 1, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"expected \(N, 1, 8, 8\)"):
        m.predict(np.float32(1.0))
    # float64 and integer pixel arrays are accepted and converted
    assert m.predict(np.zeros((1, 1, 8, 8), np.float64)).shape == (1, 10)


def test_accelerator_fallback(digits_bundle: Path, publisher, tmp_path: Path) -> None:
    m = rt.load(digits_bundle, [publisher[2]], backend="onnx", accelerators=["CUDAExecutionProvider"])
    assert m.info.accelerator == "CPUExecutionProvider"
    assert any("CUDAExecutionProvider is not available" in f for f in m.info.fallbacks)
    # an external delegate library that fails to initialise (not a delegate at all) -> next choice
    import numpy._core._multiarray_umath as umath  # a real shared library that is not a delegate

    lib = Path(umath.__file__)
    m2 = rt.load(digits_bundle, [publisher[2]], backend="tflite", accelerators=[str(lib), "xnnpack"])
    assert m2.info.accelerator == "xnnpack"
    assert any("is not a LiteRT external delegate" in f for f in m2.info.fallbacks)
    m3 = rt.load(digits_bundle, [publisher[2]], backend="tflite", accelerators=[str(tmp_path / "missing.so")])
    assert m3.info.accelerator == "xnnpack" and "no delegate library" in m3.info.fallbacks[0]
    assert m3.check_golden().ok
    # the fallback is reported in telemetry too
    buf = rt.TelemetryBuffer(tmp_path / "t.db")
    m3.attach_telemetry(buf, device_id="d1")
    m3.predict(m3.bundle.golden_inputs())
    m3.flush_telemetry()
    (w,) = list(buf.windows())
    assert w["accelerator"] == "xnnpack" and "no delegate library" in w["fallbacks"][0]


def test_cli_run(tmp_path: Path, digits_bundle: Path, publisher) -> None:
    x = open_bundle(digits_bundle).golden_inputs()
    np.save(tmp_path / "x.npy", x)
    r = run_cli(
        "run",
        str(digits_bundle),
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "y.npy"),
        "--backend",
        "tflite",
        "--key",
        str(publisher[2]),
    )
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npy")
    assert y.shape == (len(x), 10)
    assert len(r.stdout.strip().splitlines()) == len(x)
    assert "litert" in r.stderr and "xnnpack" in r.stderr
    r = run_cli("run", str(digits_bundle), "--golden", "--key", str(publisher[2]))
    assert r.returncode == 0 and "golden sample: PASS" in r.stdout
    # --json: the same figures, machine-readable (issue 16: run had no --json)
    r = run_cli("run", str(digits_bundle), "--golden", "--key", str(publisher[2]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (
        doc["golden"]["ok"] is True and doc["golden"]["count"] == len(x) and doc["backend"] in ("onnxruntime", "litert")
    )
    r = run_cli("run", str(digits_bundle), "--input", str(tmp_path / "x.npy"), "--key", str(publisher[2]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["shape"] == [len(x), 10] and [t["index"] for t in doc["top1"]] == list(range(len(x)))
    assert all(t["label"] == str(t["class"]) and 0 <= t["score"] for t in doc["top1"])
    np.save(tmp_path / "bad.npy", np.zeros((3, 8, 8), np.float32))
    r = run_cli("run", str(digits_bundle), "--input", str(tmp_path / "bad.npy"), "--key", str(publisher[2]))
    assert r.returncode == 1 and "expected (N, 1, 8, 8)" in r.stderr and not (tmp_path / "out.npy").exists()
    generate_keypair(tmp_path / "wrong")
    r = run_cli("run", str(digits_bundle), "--golden", "--key", str(tmp_path / "wrong.pub"))
    assert r.returncode == 1 and r.stderr.startswith("edgefleet: error:") and r.stderr.count("\n") == 1


def test_manifest_golden_agrees_with_runtime_info(digits_bundle: Path, publisher) -> None:
    d = json.loads(zipfile.ZipFile(digits_bundle).read("manifest.json"))
    assert {m["format"] for m in d["models"]} == {"onnx", "tflite"}
    m = rt.load(digits_bundle, [publisher[2]], backend="tflite")
    info = m.info.as_dict()
    assert info["bundle"] == d["name"] and info["version"] == d["version"]


def test_onnx_cpu_calls_the_session_directly_with_the_same_results(digits_bundle: Path, publisher) -> None:
    m = rt.load(digits_bundle, [publisher[2]], backend="onnx")
    session = m._session
    assert session._raw is not None  # CPU provider: InferenceSession.run's Python layer is skipped
    x = m.bundle.golden_inputs()[:4].astype(np.float32)
    public = session._s.run(None, {session._s.get_inputs()[0].name: x})[0]
    assert np.array_equal(m.predict(x), public)

    class Changed:  # an onnxruntime whose private session object takes other arguments
        def run(self, *args: object) -> None:
            raise TypeError("run() takes 2 positional arguments")

    session._raw = Changed()
    assert np.array_equal(m.predict(x), public) and session._raw is None


def test_finite_check_of_inputs_small_and_large() -> None:
    """`predict`'s NaN / infinity check: a Python sum for small arrays, numpy for the rest, same answers."""
    from edgefleet.runtime._model import _all_finite

    rng = np.random.default_rng(0)
    for shape in [(1, 64), (1, 1, 8, 8), (4, 3, 32, 32)]:
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dtype)
            assert _all_finite(x)
            for bad in (np.nan, np.inf, -np.inf):
                for pos in (0, x.size // 2, x.size - 1):
                    y = x.copy()
                    y.reshape(-1)[pos] = bad
                    assert not _all_finite(y), (shape, dtype, bad, pos)
    # huge but finite values overflow a plain sum, small and large arrays: still finite
    assert _all_finite(np.full((1, 8), 1e308))
    assert _all_finite(np.full((1, 3, 64, 64), 3e38, np.float32))
    big = np.full((1, 3, 64, 64), 3e38, np.float32)
    big[0, 1, 5, 5] = np.inf
    assert not _all_finite(big)
    # +inf and -inf together sum to NaN: still caught
    mixed = np.zeros((1, 3, 64, 64), np.float32)
    mixed[0, 0, 0, 0], mixed[0, 2, 9, 9] = np.inf, -np.inf
    assert not _all_finite(mixed)
    # a non-contiguous view is checked too
    z = np.zeros((2, 64), np.float32)
    z[1, 5] = np.nan
    assert not _all_finite(z[:, 1::2])
    assert _all_finite(z[:, ::2])


@pytest.mark.parametrize("backend", ["onnx", "tflite"])
def test_predict_from_several_threads_at_once(digits_bundle: Path, publisher, backend: str) -> None:
    """An app's threads and the device agent's health probes call one model at the same time. A LiteRT
    interpreter must not be used during another call's invoke: unserialised, this raised RuntimeError
    ("reference to internal data") or returned another call's outputs."""
    import threading

    m = rt.load(digits_bundle, [publisher[2]], backend=backend)
    g = m.bundle.golden_inputs().astype(np.float32)
    rng = np.random.default_rng(0)
    # batches of different sizes: the digits LiteRT file takes one sample per invoke, so each is many invokes
    xs = [
        (np.concatenate([g] * 40)[: 60 + k] + rng.normal(0, 0.3, (60 + k, *g.shape[1:]))).astype(np.float32)
        for k in range(4)
    ]
    ref = [m.predict(x) for x in xs]
    failures: list[str] = []

    def work(k: int) -> None:
        for _ in range(40):
            try:
                if not np.array_equal(m.predict(xs[k]), ref[k]):
                    failures.append(f"thread {k}: other outputs")
            except Exception as exc:  # every failure is the finding
                failures.append(f"thread {k}: {exc!r}"[:200])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]


def test_a_latency_probe_is_not_charged_for_the_wait_on_another_call(digits_bundle: Path, publisher) -> None:
    """The agent's health probes time the model beside the app's calls. With LiteRT a call waits for the
    one under way; counted as the probe's latency, that wait made a new bundle look slower than the
    previous one (which the app does not call) and could roll it back."""
    import threading
    import time

    m = rt.load(digits_bundle, [publisher[2]], backend="tflite")
    xs = m.bundle.golden_inputs()
    expected = m._run(m._prepare(xs))[0]
    got: dict = {}
    m._session._run_lock.acquire()  # another thread's call under way
    t = threading.Thread(target=lambda: got.update(r=m.timed_run(xs)))
    t.start()
    time.sleep(0.3)
    m._session._run_lock.release()
    t.join(10)
    outs, seconds = got["r"]
    np.testing.assert_array_equal(outs[0], expected)
    assert 0 < seconds < 0.15, f"{seconds:.3f} s: the 0.3 s wait for the other call was counted"
    # and an uncontended call is not charged a stale wait
    assert m.timed_run(xs)[1] > 0


def test_a_written_device_toml_reads_back_as_the_same_config(tmp_path: Path) -> None:
    """`dump_config` (what `fleet provision` writes) and `load_config` agree on every setting."""
    from edgefleet.runtime import AgentConfig, HealthPolicy, MqttConfig, load_config
    from edgefleet.runtime._config import dump_config

    cfg = AgentConfig(
        device_id="cam-7",
        data_dir=Path("cam-7-data"),
        trusted_keys=[Path("a.pub"), Path("b.pub")],
        mqtt=MqttConfig(host="h", port=8883, username="cam-7", password='q"\\uote', tls=True, ca="ca.pem"),
        health=HealthPolicy(window_s=12.5, max_restarts=3),
        accelerators=["XNNPACK"],
        threads=2,
        window_s=30.0,
        http_token="efd_x",
        token_origins=["https://fleet:8443"],
        self_test_hz=1.5,
        tags=["site-a", "hw-2"],
    )
    (tmp_path / "device.toml").write_text(dump_config(cfg))
    back = load_config(tmp_path / "device.toml")
    rel = dict(data_dir=tmp_path / "cam-7-data", trusted_keys=[tmp_path / "a.pub", tmp_path / "b.pub"])
    import dataclasses

    want = dataclasses.replace(cfg, **rel, mqtt=dataclasses.replace(cfg.mqtt, ca=str(tmp_path / "ca.pem")))
    assert back == want


def test_verify_runs_every_models_golden_sample(tmp_path: Path, digits_bundle: Path, publisher) -> None:
    """`edgefleet verify` runs the golden sample of each model (ONNX and TFLite here): a bundle re-signed
    with wrong golden outputs passes every static check and fails it; `--no-golden` skips it."""
    import io

    from edgefleet._bundle import write_bundle
    from edgefleet._signing import load_signing_key

    r = run_cli("verify", str(digits_bundle), "--key", str(publisher[2]))
    assert r.returncode == 0, r.stderr
    golden = [ln for ln in r.stdout.splitlines() if ln.startswith("golden ")]
    b = open_bundle(digits_bundle)
    assert len(golden) == len(b.manifest.models) and all(": OK," in ln for ln in golden), r.stdout

    entry = b.manifest.models[0]
    wrong = b.load_array(entry.golden_outputs) + 5.0
    buf = io.BytesIO()
    np.save(buf, wrong.astype(np.float32), allow_pickle=False)
    members = {n: b.read(n) for n in b.member_names if n not in ("manifest.json", "manifest.sig")}
    members[entry.golden_outputs] = buf.getvalue()
    bad = tmp_path / "wrong-golden.efb"
    write_bundle(bad, b.manifest, members, load_signing_key(publisher[1]))
    r = run_cli("verify", str(bad), "--key", str(publisher[2]))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"golden {entry.id}: FAILED" in r.stdout and "do not reproduce their golden outputs" in r.stderr
    r = run_cli("verify", str(bad), "--key", str(publisher[2]), "--no-golden")
    assert r.returncode == 0 and "golden" not in r.stdout, r.stdout

    # A bundle with no golden sample at all passes the static checks and is refused by verify.
    import dataclasses

    bare = dataclasses.replace(
        b.manifest, golden={}, models=[dataclasses.replace(m, golden_outputs=None) for m in b.manifest.models]
    )
    kept = {n: data for n, data in members.items() if not n.startswith("golden/")}
    none = tmp_path / "no-golden.efb"
    write_bundle(none, bare, kept, load_signing_key(publisher[1]))
    r = run_cli("verify", str(none), "--key", str(publisher[2]))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "golden" in r.stderr, (r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
