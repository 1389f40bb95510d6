from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ._mqtt_driver import Observer
from ._servers import FileServer, Mosquitto

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


def make_mlp_onnx(path: Path, digits: dict, seed: int = 0, hidden: int = 64, slow_layers: int = 0) -> Path:
    """A real classifier: scikit-learn MLP trained on digits, as an ONNX graph (N, 1, 8, 8) -> (N, 10).

    SLOW_LAYERS > 0 adds a heavy branch (that many 512x512 MatMul + Tanh) whose result is multiplied by
    zero: same predictions, much slower, the kind of bundle a device's health window must catch.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.neural_network import MLPClassifier

    x, y = digits["train"]
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed).fit(x.reshape(len(x), -1), y)
    w1, w2 = (c.astype(np.float32) for c in clf.coefs_)
    b1, b2 = (b.astype(np.float32) for b in clf.intercepts_)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    out = "logits"
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits0" if slow_layers else "logits"], name="fc2"),
    ]
    if slow_layers:
        rng = np.random.default_rng(seed)
        inits.append(numpy_helper.from_array((rng.standard_normal((64, 512)) * 0.1).astype(np.float32), "s0"))
        inits.append(numpy_helper.from_array((rng.standard_normal((512, 512)) * 0.04).astype(np.float32), "sw"))
        inits.append(numpy_helper.from_array(np.zeros((1,), np.float32), "zero"))
        nodes.append(helper.make_node("MatMul", ["flat", "s0"], ["t0"], name="slow0"))
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [f"t{i}", "sw"], [f"m{i}"], name=f"slow_mm{i}"))
            nodes.append(helper.make_node("Tanh", [f"m{i}"], [f"t{i + 1}"], name=f"slow_tanh{i}"))
        nodes.append(helper.make_node("ReduceMean", [f"t{slow_layers}"], ["r"], keepdims=1, name="slow_mean"))
        nodes.append(helper.make_node("Mul", ["r", "zero"], ["rz"], name="slow_zero"))
        nodes.append(helper.make_node("Add", ["logits0", "rz"], [out], name="slow_add"))
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def mlp_onnx(tmp_path_factory: pytest.TempPathFactory, digits: dict) -> Path:
    return make_mlp_onnx(tmp_path_factory.mktemp("mlp") / "mlp.onnx", digits)


@pytest.fixture(scope="session")
def publisher(tmp_path_factory: pytest.TempPathFactory):
    """One publisher key pair for the session's bundles: (private key, key path, public key path)."""
    from edgefleet import generate_keypair

    d = tmp_path_factory.mktemp("publisher")
    key = generate_keypair(d / "publisher.key")
    return key, d / "publisher.key", d / "publisher.key.pub"


@pytest.fixture(scope="session")
def mlp_bundles(tmp_path_factory: pytest.TempPathFactory, digits: dict, publisher) -> dict[str, Path]:
    """Signed ONNX bundles built by the converters: v1 and v2 (int8, different training), v3 (fp32, slow).

    `3.0.0-qemu` is a v3 with a lighter slow branch: under qemu every instruction is emulated (the full v3
    takes 12 s per golden batch there), and eight layers are already 200x slower than v1.
    """
    from edgefleet.converters import BuildConfig, Dataset, Quantize, build

    d = tmp_path_factory.mktemp("mlp_bundles")
    out = {}
    specs = {
        "1.0.0": (0, 64, 0, "int8"),
        "2.0.0": (1, 96, 0, "int8"),
        "3.0.0": (2, 64, 500, "none"),
        "3.0.0-qemu": (2, 64, 8, "none"),
    }
    for label, (seed, hidden, slow, mode) in specs.items():
        version = label.split("-")[0]
        src = make_mlp_onnx(d / f"mlp-{label}.onnx", digits, seed=seed, hidden=hidden, slow_layers=slow)
        cfg = BuildConfig(
            name="mlp",
            version=version,
            formats=["onnx"],
            layout="NCHW",
            labels=[str(i) for i in range(10)],
            quantize=Quantize(mode=mode),
        )
        out[label] = d / f"mlp-{label}.efb"
        build(
            src,
            out[label],
            cfg,
            calibration=Dataset(*digits["calib"], name="calib"),
            evaluation=Dataset(*digits["eval"], name="eval"),
            signing_key=publisher[0],
            progress=lambda msg: None,
        )
    return out


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory, publisher) -> Path:
    """The digits example bundle (torch -> distilled, pruned, int8; ONNX and TFLite files), short training."""
    sys.path.insert(0, str(ROOT))
    from examples.digits.build import main

    d = tmp_path_factory.mktemp("digits_bundle")
    rc = main(["--out", str(d), "--epochs", "3", "--key", str(publisher[1])])
    assert rc == 0
    (path,) = d.glob("digits-*.efb")
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


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory):
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, mlp_bundles: dict):
    root = tmp_path_factory.mktemp("www")
    for p in mlp_bundles.values():
        shutil.copy(p, root / p.name)
    srv = FileServer(root)
    yield srv
    srv.close()


@pytest.fixture()
def observer(broker: Mosquitto):
    o = Observer(broker.port)
    yield o
    o.close()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian's postgresql), started on a loopback port for the session."""
    import glob
    import os
    import tempfile

    from ._servers import free_port

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    assert bins, "PostgreSQL is not installed: make test installs the Debian package 'postgresql'"
    bindir = Path(bins[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root: run it as the package's own user.
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "edgefleet"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    yield f"postgresql://edgefleet@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)
