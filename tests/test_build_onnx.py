"""Building bundles from a real ONNX classifier: quantization variants, the accuracy gate,
golden samples, the report contract, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from edgefleet import InputError, open_bundle
from edgefleet.converters import BuildConfig, Dataset, Quantize, build

from .conftest import run_cli


def _ort_predict(data: bytes, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def test_cli_int8_build_report_and_verify(tmp_path: Path, mlp_onnx: Path, digits_npz: dict, keypair) -> None:
    _, key, pub = keypair
    out, rep = tmp_path / "mlp.efb", tmp_path / "report.json"
    r = run_cli(
        "build",
        str(mlp_onnx),
        "--calibration",
        str(digits_npz["calib"]),
        "--eval",
        str(digits_npz["eval"]),
        "--quantize",
        "int8",
        "--format",
        "onnx",
        "--sign-key",
        str(key),
        "--name",
        "mlp",
        "--version",
        "1.2.3",
        "-o",
        str(out),
        "--report",
        str(rep),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "models/onnx-int8.onnx" in r.stdout and "size x" in r.stdout  # the readable table
    report = json.loads(rep.read_text())
    assert report["source"]["format"] == "onnx" and report["source"]["agreement"] == 1.0
    (art,) = report["artifacts"]
    for k in ("format", "precision", "size_bytes", "accuracy", "agreement", "latency_ms_p50"):
        assert k in art
    assert art["format"] == "onnx" and art["precision"] == "int8"
    assert art["accuracy"] > 0.9 and art["agreement"] > 0.95
    assert art["size_bytes"] < 0.5 * report["source"]["size_bytes"]
    assert [s["pass"] for s in report["steps"]] == ["quantize"]
    assert report["steps"][0]["params"]["mode"] == "int8"
    v = run_cli("verify", str(out), "--key", str(pub))
    assert v.returncode == 0, v.stderr
    b = open_bundle(out, trusted_keys=[pub])
    m = b.manifest
    assert (m.name, m.version) == ("mlp", "1.2.3")
    entry = m.model("onnx-int8")
    assert entry.requirements["onnx_opset"] >= 17 and entry.requirements["min_onnxruntime"]
    assert entry.inputs[0].shape == [None, 1, 8, 8]
    assert m.source["sha256"] and m.lineage["dataset_sha256"]
    # The golden sample reproduces with a fresh ONNX Runtime session on the bundled file.
    gx = b.golden_inputs()
    got = _ort_predict(b.read(entry.path), gx)
    want = b.load_array(entry.golden_outputs)
    np.testing.assert_allclose(got, want, atol=entry.golden_tolerance["atol"])
    assert [f["name"] for f in m.drift_baseline["inputs"]][:1] == ["channel_0_intensity"]
    js = run_cli("inspect", str(out), "--json")
    assert json.loads(js.stdout)["manifest"]["models"][0]["precision"] == "int8"


def test_same_build_twice_is_byte_identical(tmp_path: Path, mlp_onnx: Path, digits: dict, keypair) -> None:
    key, _, _ = keypair
    cfg = BuildConfig(name="mlp", quantize=Quantize(mode="int8", activation_type="uint8"))
    kw = dict(
        calibration=Dataset(*digits["calib"]),
        evaluation=Dataset(*digits["eval"]),
        signing_key=key,
        progress=lambda _: None,
    )
    build(mlp_onnx, tmp_path / "a.efb", cfg, **kw)
    build(mlp_onnx, tmp_path / "b.efb", cfg, **kw)
    assert (tmp_path / "a.efb").read_bytes() == (tmp_path / "b.efb").read_bytes()


@pytest.mark.parametrize(("mode", "precision"), [("dynamic", "int8"), ("fp16", "fp16"), ("none", "fp32")])
def test_other_quantization_modes(tmp_path: Path, mlp_onnx: Path, digits: dict, mode: str, precision: str) -> None:
    res = build(
        mlp_onnx,
        tmp_path / "m.efb",
        BuildConfig(quantize=Quantize(mode=mode)),
        evaluation=Dataset(*digits["eval"]),
        progress=lambda _: None,
    )
    (art,) = res.report["artifacts"]
    assert art["precision"] == precision
    assert art["agreement"] > 0.97
    if mode == "fp16":
        assert art["size_bytes"] < 0.6 * res.report["source"]["size_bytes"]


def test_accuracy_gate_keeps_sensitive_nodes_in_float(tmp_path: Path, mlp_onnx: Path, digits: dict) -> None:
    x_cal, _ = digits["calib"]
    # Calibrating on dimmed images sets activation ranges far too narrow: plain int8 saturates.
    bad_calib = Dataset(x_cal * 0.05)
    ev = Dataset(*digits["eval"])
    plain = build(
        mlp_onnx,
        tmp_path / "p.efb",
        BuildConfig(quantize=Quantize(mode="int8", activation_type="uint8")),
        calibration=bad_calib,
        evaluation=ev,
        progress=lambda _: None,
    )
    src_acc = plain.report["source"]["accuracy"]
    plain_drop = src_acc - plain.report["artifacts"][0]["accuracy"]
    assert plain_drop > 0.02, "the test needs a quantization that really hurts"
    gated = build(
        mlp_onnx,
        tmp_path / "g.efb",
        BuildConfig(quantize=Quantize(mode="int8", activation_type="uint8", max_accuracy_drop=0.01)),
        calibration=bad_calib,
        evaluation=ev,
        progress=lambda _: None,
    )
    (art,) = gated.report["artifacts"]
    q = gated.report["steps"][-1]["result"]["onnx"]
    assert art["precision"] == "mixed" and q["kept_in_float"], q
    assert src_acc - art["accuracy"] <= 0.01
    assert len(q["tried"]) >= 2  # the plain attempt and at least one with nodes kept in float
    assert gated.manifest.model("onnx-mixed").precision == "mixed"
    # A node kept in float keeps its float weights *and* bias: bias correction is for rounded weights only.
    bundle = open_bundle(tmp_path / "g.efb")
    mixed = onnx.load_from_string(bundle.read(gated.manifest.model("onnx-mixed").path))
    source = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(mlp_onnx)).graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in mixed.graph.initializer}
    kept = [n for n in mixed.graph.node if n.name in q["kept_in_float"]]
    assert kept and all(n.op_type in ("Gemm", "MatMul", "Conv") for n in kept)
    for n in kept:
        for name in n.input[1:]:
            np.testing.assert_array_equal(inits[name], source[name], err_msg=f"{n.name} input {name}")
    # The model's output is not quantized (logits on a uint8 grid tie).
    (last,) = [m for m in mixed.graph.node if mixed.graph.output[0].name in m.output]
    assert last.op_type != "DequantizeLinear", last


def _conv_chain(path: Path) -> None:
    """conv (int8) -> relu -> depthwise conv whose channels' weights differ 1000-fold -> relu -> conv."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    spread = np.logspace(-3, 0, 16, dtype=np.float32)[:, None, None, None]
    dw = rng.normal(size=(16, 1, 3, 3)).astype(np.float32) * spread
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 8, 3, 3)).astype(np.float32) * 0.2, "wa"),
        numpy_helper.from_array(np.zeros(16, np.float32), "ba"),
        numpy_helper.from_array(dw, "wb"),
        numpy_helper.from_array(np.full(16, 0.01, np.float32), "bb"),
        numpy_helper.from_array(rng.normal(size=(4, 16, 1, 1)).astype(np.float32), "wc"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu_a"),
        helper.make_node("Conv", ["ar", "wb", "bb"], ["b"], name="conv_b", group=16, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu_b"),
        helper.make_node("Conv", ["br", "wc"], ["y"], name="conv_c"),
    ]
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4, 8, 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_a_node_kept_in_float_runs_in_float_in_onnxruntime(tmp_path: Path) -> None:
    """ONNX Runtime's WeightBiasQuantization optimizer quantizes, at load and per tensor, the float weights of a
    Conv fed by a per-tensor DequantizeLinear: a node the accuracy gate keeps in float must not be caught by it."""
    from edgefleet.converters._onnx_quant import _finish_qdq, _static

    src, q = tmp_path / "chain.onnx", tmp_path / "q.onnx"
    _conv_chain(src)
    x = np.random.default_rng(1).normal(size=(32, 8, 8, 8)).astype(np.float32)
    _static(src, q, Dataset(x), Quantize(mode="int8"), "uint8", ["conv_b"])
    _finish_qdq(q, ["conv_b"])

    def run(level: ort.GraphOptimizationLevel) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        opts.optimized_model_filepath = str(tmp_path / f"as_run_{int(level)}.onnx")
        s = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})[0]

    # The file's own QDQ arithmetic (nothing fused) against what ORT runs by default.
    exact = run(ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    served = run(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    scale = float(np.abs(exact).max())
    worst = float(np.abs(served - exact).max())
    assert worst < 0.002 * scale, (worst, scale)
    as_run = onnx.load(str(tmp_path / f"as_run_{int(ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)}.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in as_run.graph.initializer}
    (conv_b,) = [n for n in as_run.graph.node if n.name == "conv_b"]
    dw_float = numpy_helper.to_array(onnx.load(str(src)).graph.initializer[2])
    np.testing.assert_array_equal(weights[conv_b.input[1]], dw_float)


def test_bad_inputs_leave_nothing_behind(tmp_path: Path, mlp_onnx: Path, digits_npz: dict) -> None:
    out = tmp_path / "out" / "x.efb"
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(mlp_onnx.read_bytes()[:300])
    r = run_cli("build", str(trunc), "--eval", str(digits_npz["eval"]), "-o", str(out))
    assert r.returncode == 1 and "truncated or corrupt" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((10, 3, 8, 8), np.float32))
    r = run_cli("build", str(mlp_onnx), "--eval", str(wrong), "-o", str(out))
    assert r.returncode == 1 and "per-sample shape (3, 8, 8), but the model expects (1, 8, 8)" in r.stderr
    tiny = tmp_path / "tiny.npz"
    np.savez(tiny, x=np.zeros((2, 1, 8, 8), np.float32))
    r = run_cli("build", str(mlp_onnx), "--calibration", str(tiny), "--quantize", "int8", "-o", str(out))
    assert r.returncode == 1 and "calibration set of at least 8 samples" in r.stderr
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nnope\n")
    r = run_cli(
        "build",
        str(mlp_onnx),
        "--eval",
        str(digits_npz["eval"]),
        "--sign-key",
        str(tmp_path / "bad.key"),
        "-o",
        str(out),
    )
    assert r.returncode == 1 and "not an unencrypted PEM Ed25519 private key" in r.stderr
    r = run_cli("build", str(mlp_onnx), "--eval", str(digits_npz["eval"]), "--format", "tflite", "-o", str(out))
    assert r.returncode == 1 and "ONNX -> TFLite conversion is not supported" in r.stderr
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_both_formats_from_onnx_builds_what_works_and_says_so(tmp_path: Path, mlp_onnx: Path, digits: dict) -> None:
    res = build(
        mlp_onnx,
        tmp_path / "m.efb",
        BuildConfig(formats=["onnx", "tflite"]),
        evaluation=Dataset(*digits["eval"]),
        progress=lambda _: None,
    )
    assert [a["format"] for a in res.report["artifacts"]] == ["onnx"]
    assert any("tflite not built" in w for w in res.report["warnings"])


def test_external_data_outside_model_dir_or_via_link_is_refused(tmp_path: Path, mlp_onnx: Path) -> None:
    import onnx

    from edgefleet.converters.backends import load_model

    m = onnx.load(str(mlp_onnx))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    onnx.save(
        m,
        str(model_dir / "ok.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    load_model(model_dir / "ok.onnx")  # the honest layout loads
    # Point the external data outside the directory.
    evil = onnx.load(str(model_dir / "ok.onnx"), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.bin"
    onnx.save(evil, str(model_dir / "evil.onnx"))
    with pytest.raises(InputError, match="outside the model's directory"):
        load_model(model_dir / "evil.onnx")
    # Or through a link that leads outside.
    (tmp_path / "elsewhere.bin").write_bytes((model_dir / "weights.bin").read_bytes())
    (model_dir / "weights.bin").unlink()
    (model_dir / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(InputError, match="link"):
        load_model(model_dir / "ok.onnx")


def test_cli_keygen_sign_verify_inspect(tmp_path: Path, mlp_onnx: Path, digits_npz: dict) -> None:
    key = tmp_path / "keys" / "release"
    key.parent.mkdir()
    r = run_cli("keygen", str(key))
    assert r.returncode == 0 and key.exists() and (tmp_path / "keys" / "release.pub").exists()
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert run_cli("keygen", str(key)).returncode == 1  # never overwrites a key silently
    out = tmp_path / "m.efb"
    assert run_cli("build", str(mlp_onnx), "--eval", str(digits_npz["eval"]), "-o", str(out)).returncode == 0
    r = run_cli("verify", str(out), "--key", f"{key}.pub")
    assert r.returncode == 1 and "not signed" in r.stderr
    r = run_cli("sign", str(out), "--key", str(key))
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", str(out), "--key", f"{key}.pub").returncode == 0
    human = run_cli("inspect", str(out), "--key", f"{key}.pub")
    assert human.returncode == 0 and "signature present" in human.stdout and "onnx-fp32" in human.stdout
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.efb").write_bytes(bytes(data))
    r = run_cli("verify", str(tmp_path / "bad.efb"), "--key", f"{key}.pub")
    assert r.returncode == 1 and r.stderr.startswith("edgefleet: error:")
