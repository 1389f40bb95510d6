"""The `edgefleet` command. Parts add their subcommands through the `edgefleet.commands`
entry-point group, so this core never imports them and heavy imports happen only when
the subcommand that needs them runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import Any

from . import __version__
from ._bundle import open_bundle, sign_bundle
from ._errors import EdgefleetError
from ._signing import generate_keypair, load_signing_key

__all__ = ["main"]


def _cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_keypair(args.key, overwrite=args.force)
    if args.json:
        print(json.dumps({"private_key": str(args.key), "public_key": f"{args.key}.pub", "key_id": key.key_id}))
    else:
        print(f"wrote private key {args.key} and public key {args.key}.pub (key id {key.key_id})")
    return 0


def _cmd_sign(args: argparse.Namespace) -> int:
    key = load_signing_key(args.key)
    m = sign_bundle(args.bundle, key, args.output)
    out = args.output or args.bundle
    if args.json:
        print(json.dumps({"bundle": m.name, "version": m.version, "key_id": key.key_id, "output": str(out)}))
    else:
        print(f"signed {m.name} {m.version} with key {key.key_id} -> {out}")
    return 0


def verify_static(bundle: str, keys: list[str], quiet: bool = False) -> Any:
    """`edgefleet verify`'s checks that need no runtime: open BUNDLE with KEYS and say what passed."""
    b = open_bundle(bundle, trusted_keys=keys)
    m = b.manifest
    if not quiet:
        print(
            f"OK: {m.name} {m.version} (format {m.format_version}), signed by {b.signed_by}, "
            f"{len(m.files)} files hash-checked"
        )
    return b


def static_report(b: Any) -> dict[str, Any]:
    """What `verify --json` says of the checks `verify_static` made."""
    m = b.manifest
    return {
        "ok": True,
        "bundle": m.name,
        "version": m.version,
        "format": m.format_version,
        "signed_by": b.signed_by,
        "files_checked": len(m.files),
    }


def _cmd_verify(args: argparse.Namespace) -> int:
    b = verify_static(args.bundle, args.key, quiet=args.json)
    if args.json:
        print(json.dumps({**static_report(b), "golden": None}))
    elif not args.no_golden:
        # The runtime extra replaces this command with one that also runs the golden sample.
        print("golden sample not run: that needs the runtime (pip install 'edgefleet[runtime]'); --no-golden to skip")
    return 0


def _summary(b: Any) -> str:
    m = b.manifest
    lines = [
        f"bundle    {m.name} {m.version}  (format {m.format_version})",
        f"signature {'present' if b.signature_present else 'none'}",
        f"source    {m.source.get('format', '?')} sha256 {str(m.source.get('sha256', ''))[:16]}",
        "built by  " + ", ".join(f"{k} {v}" for k, v in sorted(m.created_by.items())),
        "models:",
    ]
    for e in m.models:
        fe = m.file(e.path)
        ins = "; ".join(f"{t.name} {t.dtype}{t.shape}" for t in e.inputs)
        outs = "; ".join(f"{t.name} {t.dtype}{t.shape}" for t in e.outputs)
        acc = e.metrics.get("accuracy")
        lines.append(
            f"  {e.id:<24} {e.format:<6} {e.precision:<5} {fe.size:>10} B  "
            f"acc={'-' if acc is None else f'{acc:.4f}'} agree={e.metrics.get('agreement', '-')}"
        )
        lines.append(f"  {'':<24} in: {ins}  out: {outs}  needs {e.requirements}")
    if m.steps:
        lines.append("steps:")
        for s in m.steps:
            lines.append(f"  {s.get('pass')}: {json.dumps(s.get('params', {}), sort_keys=True)}")
    base = m.drift_baseline
    if base:
        lines.append(
            f"drift     baseline on {base.get('n_samples')} samples, {len(base.get('inputs', []))} input features"
        )
    if m.golden:
        lines.append(f"golden    {m.golden.get('count')} samples")
    if m.labels:
        lines.append(f"labels    {', '.join(m.labels[:10])}{' ...' if len(m.labels) > 10 else ''}")
    return "\n".join(lines)


def _cmd_inspect(args: argparse.Namespace) -> int:
    b = open_bundle(args.bundle, trusted_keys=args.key)
    if args.json:
        doc = {"manifest": b.manifest.to_dict(), "signature_present": b.signature_present, "signed_by": b.signed_by}
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(_summary(b))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefleet", description="Build, run and roll out edge model bundles.")
    parser.add_argument("--version", action="version", version=f"edgefleet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("keygen", help="create an Ed25519 signing key (KEY) and its public key (KEY.pub)")
    p.add_argument("key")
    p.add_argument("--force", action="store_true", help="overwrite existing key files")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_keygen)

    p = sub.add_parser("sign", help="sign (or re-sign) a bundle")
    p.add_argument("bundle")
    p.add_argument("--key", required=True, help="private key written by 'edgefleet keygen'")
    p.add_argument("-o", "--output", help="write the signed bundle here instead of in place")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_sign)

    p = sub.add_parser("verify", help="check a bundle's signature, hashes and manifest; exit 0 only if all pass")
    p.add_argument("bundle")
    p.add_argument("--key", required=True, action="append", help="trusted public key (repeatable)")
    p.add_argument("--no-golden", action="store_true", help="skip running the golden sample on each model")
    p.add_argument("--json", action="store_true", help="machine-readable output (one object)")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("inspect", help="show what a bundle holds")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--key", action="append", help="also verify the signature with this public key")
    p.set_defaults(func=_cmd_inspect)

    for ep in sorted(entry_points(group="edgefleet.commands"), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgefleetError as exc:
        print(f"edgefleet: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgefleet: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`edgefleet inspect --json | head`): not an error of ours. Point stdout at
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        # Every error a user can cause is an EdgefleetError with its own line; reaching here is a bug of
        # edgefleet's. Still one line, with the way to get the traceback for a report.
        if os.environ.get("EDGEFLEET_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(
            f"edgefleet: internal error: {type(exc).__name__}: {first} (this is a bug in edgefleet; "
            "run again with EDGEFLEET_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
