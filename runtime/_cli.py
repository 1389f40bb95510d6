"""`edgefleet run`, `edgefleet agent`, `edgefleet telemetry`: registered through `edgefleet.commands`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import io
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]


def _keys(args: argparse.Namespace) -> list[str] | None:
    from edgefleet import InputError

    if args.key:
        return list(args.key)
    if args.allow_unsigned:
        return None
    raise InputError("give --key PUBKEY to verify the bundle's signature (or --allow-unsigned for your own builds)")


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from edgefleet import InputError

    from . import load

    if not args.golden and not args.input:
        raise InputError("give --input X.npy, or --golden to run the bundle's own golden sample")
    model = load(
        args.bundle,
        _keys(args),
        args.backend,
        args.accelerator or None,
        allow_unsigned=args.allow_unsigned,
        threads=args.threads,
    )
    info = model.info
    about = info.as_dict()  # the --json documents: the ModelInfo that ran
    print(
        f"{info.bundle} {info.version}: model {info.model_id} ({info.precision}) on {info.backend} "
        f"{info.backend_version}, accelerator {info.accelerator}"
        + (f", {info.threads} thread{'s' if info.threads != 1 else ''}" if info.threads else "")
        + (f", fixed batch {info.batch} (larger inputs run in pieces)" if info.batch else ""),
        file=sys.stderr,
    )
    for note in info.fallbacks:
        print(f"fallback: {note}", file=sys.stderr)
    if args.golden:
        res = model.check_golden()
        verdict = "PASS" if res.ok else "FAIL"
        if args.json:
            print(json.dumps({**about, "golden": dataclasses.asdict(res)}, indent=1, default=float))
            return 0 if res.ok else 1
        print(
            f"golden sample: {verdict}  {res.count} inputs, max |diff| {res.max_abs_diff:.3g} "
            f"(atol {res.atol:.3g}, rtol {res.rtol:.3g}), top-1 agreement {res.agreement:.3f}"
        )
        return 0 if res.ok else 1
    try:
        x = np.load(args.input, allow_pickle=False)
    except FileNotFoundError as exc:
        raise InputError(f"input file {args.input} does not exist") from exc
    except ValueError as exc:
        raise InputError(f"input file {args.input} is not a plain .npy array: {exc}") from exc
    y = model.predict(x)
    if args.output:
        from edgefleet._fs import atomic_write

        buf = io.BytesIO()
        np.save(buf, y, allow_pickle=False)
        atomic_write(args.output, buf.getvalue())
    labels = model.manifest.labels
    rows = []
    for i, row in enumerate(y.reshape(len(y), -1)):
        k = int(row.argmax())
        rows.append({"index": i, "class": k, "label": labels[k] if k < len(labels) else str(k), "score": float(row[k])})
    if args.json:
        print(json.dumps({**about, "output": args.output, "shape": list(y.shape), "top1": rows}, indent=1))
        return 0
    for r in rows:
        print(f"{r['index']}\t{r['label']}\t{r['score']:.4f}")
    return 0


def _cmd_agent(args: argparse.Namespace) -> int:
    from ._agent import Agent
    from ._config import load_config

    if args.action == "status":
        return _agent_status(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s")
    agent = Agent(load_config(args.config))

    def _term(signum: int, frame: Any) -> None:
        agent.request_stop()

    signal.signal(signal.SIGTERM, _term)
    print(f"edgefleet agent {agent.device_id}: data in {agent.root}", file=sys.stderr, flush=True)
    agent.run_forever()
    return 0


def _agent_status(args: argparse.Namespace) -> int:
    """`edgefleet agent status`: whether the agent of a device.toml runs and its loop is not stuck (exit 0),
    or not (exit 1, one line saying which), from the heartbeat in its data directory."""
    from ._config import load_config
    from ._liveness import agent_status

    cfg = load_config(args.config)
    st = agent_status(Path(cfg.data_dir), args.max_age) if args.max_age else agent_status(Path(cfg.data_dir))
    st["device_id"] = cfg.device_id
    if args.json:
        print(json.dumps(st))
    elif st["healthy"]:
        print(
            f"agent {cfg.device_id}: running (pid {st['pid']}), loop passed {st['age_s']:.1f} s ago, "
            f"update state {st['update_state']}"
        )
    else:
        print(f"agent {cfg.device_id}: {st['reason']}", file=sys.stderr)
    return 0 if st["healthy"] else 1


def _buffer_path(args: argparse.Namespace) -> Path:
    from edgefleet import InputError

    if args.buffer:
        return Path(args.buffer)
    if args.config:
        from ._config import load_config

        return Path(load_config(args.config).data_dir) / "telemetry.db"
    raise InputError("give --buffer PATH (telemetry.db) or --config device.toml")


def _cmd_telemetry(args: argparse.Namespace) -> int:
    from edgefleet import InputError
    from edgefleet.protocol import latency_quantile

    from ._telemetry import TelemetryBuffer

    path = _buffer_path(args)
    if not path.exists():
        raise InputError(f"no telemetry buffer at {path}")
    buf = TelemetryBuffer(path)
    try:
        if args.action == "export":
            out = open(args.output, "w") if args.output else sys.stdout
            try:
                for kind in ("telemetry", "events"):
                    for w in buf.windows(kind):
                        out.write(json.dumps({"kind": kind, **w}, sort_keys=True) + "\n")
            finally:
                if out is not sys.stdout:
                    out.close()
            return 0
        st = buf.stats()
        if args.json:
            print(json.dumps({"stats": st.__dict__, "windows": list(buf.windows())[-args.last :]}, indent=1))
            return 0
        print(
            f"buffer {path}: {st.windows} records, {st.bytes} of {st.max_bytes} bytes; dropped {st.dropped_windows}; "
            f"disk-full events {st.full_disk_events}; corrupt resets {st.corrupt_resets}; raw samples {st.samples}"
        )
        rows = list(buf.windows())[-args.last :]
        if rows:
            head = ("window start (UTC)", "bundle", "calls", "err", "nan", "p50 ms", "p95 ms")
            print("{:<20} {:<18} {:>6} {:>4} {:>4} {:>8} {:>8}".format(*head))

        for w in rows:
            counts = w["latency_ms"]["counts"]
            p50, p95 = latency_quantile(counts, 0.5), latency_quantile(counts, 0.95)
            print(
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(w['start'])):<20} "
                f"{w['bundle']['name'] + ' ' + w['bundle']['version']:<18} {w['calls']:>6} "
                f"{sum(w['errors'].values()):>4} {w['nan_outputs']:>4} "
                f"{(p50 or 0):>8.3f} {(p95 or 0):>8.3f}"
            )
    finally:
        buf.close()
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    """`edgefleet verify` with the runtime installed: the static checks, then every model's golden sample."""
    from edgefleet import BundleError
    from edgefleet._cli import static_report, verify_static

    from ._model import _BACKEND_EXTRA, _BACKEND_MODULE, load

    b = verify_static(args.bundle, args.key, quiet=args.json)
    m = b.manifest
    doc: dict[str, Any] = {**static_report(b), "golden": None}
    say = (lambda _line: None) if args.json else print
    if args.no_golden:
        if args.json:
            print(json.dumps(doc))
        return 0
    if b.golden_inputs() is None:
        raise BundleError(f"{args.bundle} has no golden sample to check its models with (--no-golden to skip)")
    failed = 0
    doc["golden"] = []
    for e in m.models:
        mod = _BACKEND_MODULE.get(e.format)
        if mod is None or importlib.util.find_spec(mod) is None:
            extra = _BACKEND_EXTRA.get(e.format, "runtime")
            why = f"{mod} is not installed (pip install 'edgefleet[{extra}]')"
            doc["golden"].append({"model": e.id, "ran": False, "reason": why})
            say(f"golden {e.id}: not run, {why}")
            continue
        try:
            with load(args.bundle, args.key, model_id=e.id) as model:
                r = model.check_golden()
                where = model.info.accelerator
        except BundleError as exc:
            failed += 1
            doc["golden"].append({"model": e.id, "ran": True, "ok": False, "reason": str(exc)})
            say(f"golden {e.id}: FAILED: {exc}")
            continue
        failed += not r.ok
        doc["golden"].append(
            {
                "model": e.id,
                "ran": True,
                "ok": r.ok,
                "inputs": r.count,
                "accelerator": where,
                "max_abs_diff": r.max_abs_diff,
                "atol": r.atol,
                "rtol": r.rtol,
                "agreement": r.agreement,
            }
        )
        say(
            f"golden {e.id}: {'OK' if r.ok else 'FAILED'}, {r.count} inputs on {where}: max |diff| "
            f"{r.max_abs_diff:.3g} (atol {r.atol:g}, rtol {r.rtol:g}), top-1 agreement {r.agreement:.4f}"
        )
    doc["ok"] = not failed
    if args.json:
        print(json.dumps(doc))
    if failed:
        raise BundleError(f"{failed} model(s) of {args.bundle} do not reproduce their golden outputs")
    return 0


def register(sub: Any) -> None:
    verify = sub.choices.get("verify")
    if verify is not None:
        verify.set_defaults(func=_cmd_verify)
    from edgefleet._errors import missing_note

    backends = missing_note(("onnxruntime", "ai_edge_litert"), "runtime-onnx", "runtime-tflite", any_of=True)
    p = sub.add_parser("run", help="verify a bundle and run it on an input array, or on its golden sample" + backends)
    p.add_argument("bundle")
    p.add_argument("--input", help=".npy batch (N, ...) to run")
    p.add_argument("--output", help="write the outputs here (.npy)")
    p.add_argument("--golden", action="store_true", help="run the golden sample and check it (exit 1 on mismatch)")
    p.add_argument("--json", action="store_true", help="the model, and the golden result or each row's top-1, as JSON")
    p.add_argument("--backend", default="auto", choices=["auto", "onnx", "tflite"])
    p.add_argument(
        "--accelerator",
        action="append",
        help="ONNX Runtime execution provider or LiteRT delegate (xnnpack, cpu, /path/lib.so), repeatable",
    )
    p.add_argument("--key", action="append", help="trusted public key (repeatable)")
    p.add_argument("--allow-unsigned", action="store_true", help="skip the signature check (your own builds)")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "agent",
        help="run the device agent (MQTT link, telemetry upload, A/B updates)"
        + (backends or missing_note(("paho",), "runtime-onnx")),
    )
    p.add_argument(
        "action",
        nargs="?",
        choices=["run", "status"],
        default="run",
        help="run the agent (default), or say whether the agent of this config runs and is not stuck (exit 1 if not)",
    )
    p.add_argument("--config", required=True, help="device.toml")
    p.add_argument("--max-age", type=float, help="status: seconds since the loop's last pass that count as stuck")
    p.add_argument("--json", action="store_true", help="status: the figures as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=_cmd_agent)

    p = sub.add_parser("telemetry", help="show or export the device's telemetry buffer")
    p.add_argument("action", choices=["show", "export"])
    p.add_argument("--buffer", help="path of telemetry.db")
    p.add_argument("--config", help="device.toml (the buffer is in its data_dir)")
    p.add_argument("--last", type=int, default=20, help="show the newest N windows")
    p.add_argument("--json", action="store_true")
    p.add_argument("-o", "--output", help="export: write JSON lines here (default stdout)")
    p.set_defaults(func=_cmd_telemetry)
