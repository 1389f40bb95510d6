from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """Run the installed `edgefleet` command the way a user does."""
    exe = Path(sys.executable).parent / "edgefleet"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    sys.path.insert(0, str(ROOT))
    from examples.digits.data import load_splits

    return load_splits()


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory, digits: dict) -> Path:
    """A real classifier: scikit-learn MLP trained on digits, written as an ONNX graph (N, 1, 8, 8) -> (N, 10)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.neural_network import MLPClassifier

    x, y = digits["train"]
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(x.reshape(len(x), -1), y)
    w1, w2 = (c.astype(np.float32) for c in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = tmp_path_factory.mktemp("mlp") / "mlp.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory: pytest.TempPathFactory, digits: dict) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("npz")
    paths = {}
    for name, (x, y) in digits.items():
        paths[name] = out / f"{name}.npz"
        np.savez(paths[name], x=x, y=y)
    return paths


@pytest.fixture()
def keypair(tmp_path: Path):
    from edgefleet import generate_keypair

    key = generate_keypair(tmp_path / "key")
    return key, tmp_path / "key", tmp_path / "key.pub"
