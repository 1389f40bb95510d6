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
sys.path.insert(0, str(ROOT))

from examples.digits.mlp import build_mlp_bundle, make_mlp_onnx  # noqa: E402


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
    d = tmp_path_factory.mktemp("mlp_bundles")
    out = {}
    specs = {
        "1.0.0": (0, 64, 0, "int8"),
        "2.0.0": (1, 96, 0, "int8"),
        "3.0.0": (2, 64, 500, "none"),
        "3.0.0-qemu": (2, 64, 8, "none"),
    }
    for label, (seed, hidden, slow, mode) in specs.items():
        out[label] = build_mlp_bundle(
            d / f"mlp-{label}.efb", digits, label.split("-")[0], publisher[0], seed, hidden, slow, mode
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


class Postgres:
    """A real PostgreSQL server (Debian's postgresql) on a loopback port; `stop()` then `start()` is an outage."""

    def __init__(self) -> None:
        import glob
        import os
        import tempfile

        from ._servers import free_port

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        assert bins, "PostgreSQL is not installed: make test installs the Debian package 'postgresql'"
        self.bindir = Path(bins[-1]).parent
        self.root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the package's own user.
            shutil.chown(self.root, "postgres", "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.root / "data"
        subprocess.run(
            [*self.as_user, str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "edgefleet"],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql://edgefleet@127.0.0.1:{self.port}/postgres"
        self.start()

    def fresh_database(self) -> str:
        """The URL of a new, empty database on this server (one per test keeps tests apart)."""
        import uuid

        import psycopg

        name = "t" + uuid.uuid4().hex[:10]
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url.rsplit("/", 1)[0] + "/" + name

    def _ctl(self, *args: str, check: bool = True) -> None:
        cmd = [*self.as_user, str(self.bindir / "pg_ctl"), "-D", str(self.data), *args]
        subprocess.run(cmd, check=check, capture_output=True)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._ctl("-l", str(self.root / "log"), "-w", "-o", opts, "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    def close(self) -> None:
        self._ctl("-m", "fast", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    pg = Postgres()
    yield pg
    pg.close()


@pytest.fixture(scope="session")
def teacher(digits: dict):
    """The digits CNN teacher (PyTorch, with batch norms), trained once per session; builds copy it."""
    from examples.digits.build import train_teacher

    return train_teacher(*digits["train"], epochs=8)


@pytest.fixture(scope="session")
def teacher_pt2(tmp_path_factory: pytest.TempPathFactory, teacher, digits: dict) -> Path:
    """The teacher exported as the README says: `torch.export` with a concrete batch of 1."""
    import torch

    path = tmp_path_factory.mktemp("teacher") / "teacher.pt2"
    torch.export.save(torch.export.export(teacher, (torch.from_numpy(digits["eval"][0][:1]),)), path)
    return path
