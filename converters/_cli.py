"""`edgefleet build`: registered into the core CLI through the `edgefleet.commands` entry point."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _run(args: argparse.Namespace) -> int:
    from edgefleet import InputError, load_signing_key

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
    build(
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
    p.set_defaults(func=_run)
