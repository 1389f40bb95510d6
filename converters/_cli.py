"""`edgefleet build`: registered into the core CLI through the `edgefleet.commands` entry point."""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["register"]

# Lines of edgefleet's own that reach the terminal while the frameworks' go to the build log.
_OWN = ("[edgefleet]", "edgefleet:", "error:")


class _Split(io.TextIOBase):
    """sys.stderr during a quiet build: edgefleet's own lines to the terminal, every other line (warnings,
    framework logging) to the log."""

    def __init__(self, terminal: TextIO, log: TextIO) -> None:
        self.terminal, self.log, self._line = terminal, log, ""

    def write(self, s: str) -> int:
        self._line += s
        *done, self._line = self._line.split("\n")
        for ln in done:
            (self.terminal if ln.startswith(_OWN) else self.log).write(ln + "\n")
        self.terminal.flush()
        return len(s)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def close_line(self) -> None:
        """Write out a last line that never got its newline."""
        if self._line:
            self.write("\n")


@contextlib.contextmanager
def _frameworks_to(log_path: Path) -> Iterator[None]:
    """Send what torch, TensorFlow, absl and friends print (C++ logging on fd 2, Python warnings and
    logging) to LOG_PATH; edgefleet's own progress lines and errors stay on the terminal."""
    sys.stderr.flush()
    saved = os.dup(2)
    log = open(log_path, "a", buffering=1)
    terminal = os.fdopen(os.dup(saved), "w", buffering=1)
    old_stderr = sys.stderr
    split = _Split(terminal, log)
    os.dup2(log.fileno(), 2)
    sys.stderr = split  # Python warnings are written here too: to the log, being nobody's own line
    try:
        yield
    finally:
        # restore first: a failing log (a full disk) must not leave fd 2 pointing at it
        sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(OSError, ValueError):
            split.close_line()
            split.flush()
        terminal.close()
        with contextlib.suppress(OSError):
            log.close()


def _run(args: argparse.Namespace) -> int:
    from edgefleet import EdgefleetError, InputError, load_signing_key

    from ._build import BuildConfig, build, load_recipe
    from ._data import load_npz
    from ._passes import Quantize

    cfg = load_recipe(args.recipe) if args.recipe else BuildConfig()
    if args.format:
        cfg.formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if args.name:
        cfg.name = args.name
    if args.version:
        cfg.version = args.version
    if args.layout:
        cfg.layout = args.layout
    BuildConfig.__post_init__(cfg)
    q = cfg.quantize
    overrides: dict[str, Any] = {
        k: v
        for k, v in {
            "mode": args.quantize,
            "calibration": args.calibration_method,
            "max_accuracy_drop": args.max_accuracy_drop,
            "activation_type": args.activation_type,
        }.items()
        if v is not None
    }
    if overrides:
        params = {**q.params(), **overrides}
        cfg.quantize = Quantize(**params)
    key = load_signing_key(args.sign_key) if args.sign_key else None
    calib = load_npz(args.calibration) if args.calibration else None
    ev = load_npz(args.eval) if args.eval else None
    train = load_npz(args.train, need_labels=True) if args.train else None
    if cfg.quantize.mode == "int8" and calib is None:
        raise InputError("--quantize int8 needs --calibration CALIB.npz (representative inputs)")
    run = lambda: build(  # noqa: E731
        args.model,
        args.output,
        cfg,
        calibration=calib,
        evaluation=ev,
        train=train,
        signing_key=key,
        report_path=args.report,
        echo_table=True,
    )
    if args.verbose:
        run()
        return 0
    # Python loggers of the frameworks too: their handlers may hold the terminal's stream.
    for name in ("torch", "tensorflow", "absl", "jax", "torchao", "onnxscript", "tf_keras", "keras"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The log is written aside and moved beside the bundle once it exists: a failed build leaves nothing
    # where its output would have been (the log stays in the temporary directory, named on the terminal).
    fd, tmp = tempfile.mkstemp(prefix="edgefleet-build-", suffix=".log")
    os.close(fd)
    final = Path(args.output).with_suffix(".build.log")
    try:
        with _frameworks_to(Path(tmp)):
            run()
    except EdgefleetError as exc:
        # One line still: it names the log when the frameworks said something (a converter's diagnostics).
        if os.path.getsize(tmp):
            exc.args = (f"{exc.args[0] if exc.args else exc} (the frameworks' log: {tmp})", *exc.args[1:])
        else:
            os.unlink(tmp)
        raise
    except BaseException:
        print(f"[edgefleet] the frameworks' log of this build: {tmp}", file=sys.stderr)
        raise
    shutil.move(tmp, final)
    print(f"[edgefleet] the frameworks' own logs: {final} (-v shows them)", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    from edgefleet._errors import missing_note

    p = sub.add_parser(
        "build",
        help="distill / prune / quantize a model into a signed bundle with a report"
        + missing_note(("onnx", "onnxruntime"), "convert"),
    )
    p.add_argument("model", help="model file: .onnx, .pt2 (torch.export) or .keras")
    p.add_argument("-o", "--output", required=True, help="bundle to write (.efb)")
    p.add_argument("--recipe", help="TOML recipe with [[steps]] and bundle metadata")
    p.add_argument("--calibration", help=".npz with representative inputs 'x'")
    p.add_argument("--eval", help=".npz with evaluation inputs 'x' and optional integer labels 'y'")
    p.add_argument("--train", help=".npz with 'x' and 'y' for passes that train (distill, prune, qat)")
    p.add_argument("--quantize", choices=["none", "dynamic", "int8", "fp16"])
    p.add_argument("--calibration-method", choices=["minmax", "entropy", "percentile"])
    p.add_argument("--activation-type", choices=["auto", "uint8", "int8"])
    p.add_argument("--format", help="comma-separated: onnx,tflite")
    p.add_argument("--layout", choices=["NCHW", "NHWC", "NC"])
    p.add_argument("--max-accuracy-drop", type=float)
    p.add_argument("--sign-key", help="private key from 'edgefleet keygen'")
    p.add_argument("--name")
    p.add_argument("--version")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show the frameworks' own logs (else: OUTPUT.build.log)"
    )
    p.set_defaults(func=_run)
