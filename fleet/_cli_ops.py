"""`edgefleet fleet command` and `edgefleet fleet accuracy`: one-off orders and ground-truth figures."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

__all__ = ["add_ops_parsers"]


def _command(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    from edgefleet import InputError

    if bool(args.device) == bool(args.selector):
        raise InputError("give one DEVICE or --selector TAG")
    body = {"command": args.command, **({"device": args.device} if args.device else {"selector": args.selector})}
    r = client(args, "POST", "/api/commands", json.dumps(body).encode())
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        for dev, cid in r["ids"].items():
            print(f"{cid}: {args.command} sent to {dev}")
    return 0


def _accuracy(args: argparse.Namespace, client: Callable[..., Any]) -> int:
    import urllib.parse

    q = {
        "bundle": args.bundle,
        **({"tag": args.tag} if args.tag else {}),
        **({"since": args.since} if args.since else {}),
    }
    r = client(args, "GET", "/api/accuracy?" + urllib.parse.urlencode(q))
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    if not r["labelled"]:
        print(f"{r['bundle']}: no labelled predictions yet (devices report them with Agent.feedback)")
        return 0
    lo, hi = r["ci95"]
    ref = r["reference_accuracy"]
    print(
        f"{r['bundle']}{' cohort ' + args.tag if args.tag else ''}: accuracy {r['accuracy']:.4f} "
        f"(95% {lo:.4f}-{hi:.4f}) on {r['labelled']} labelled predictions"
        + (f"; {ref:.4f} at build" if ref is not None else "")
    )
    print(f"  {'class':<12} {'support':>8} {'precision':>9} {'recall':>7} {'f1':>7}")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for c in r["per_class"]:
        print(
            f"  {c['class']!s:<12} {c['support']:>8} {fmt(c['precision']):>9} {fmt(c['recall']):>7} {fmt(c['f1']):>7}"
        )
    return 0


def add_ops_parsers(
    fs: Any, client_args: Callable[[argparse.ArgumentParser], None], client: Callable[..., Any]
) -> None:
    p = fs.add_parser(
        "command",
        help="send a one-off command (flush, report) to a device or every device of a tag",
        description="Send a one-off command; the device answers with a command_done event, shown with the "
        "command on its dashboard page and in GET /api/devices/ID/commands. Neither command takes arguments; "
        "the commands that do are ordered with their own records: 'fleet shadow create' and 'fleet capture "
        "create'.",
    )
    p.add_argument("command", choices=["flush", "report"])
    p.add_argument("device", nargs="?")
    p.add_argument("--selector", help="every device with this tag, instead of one device")
    client_args(p)
    p.set_defaults(func=lambda args: _command(args, client))

    p = fs.add_parser("accuracy", help="accuracy from labels the devices fed back (per class; a cohort with --tag)")
    p.add_argument("--bundle", required=True, help="NAME:VERSION")
    p.add_argument("--tag", help="only devices with this tag")
    p.add_argument("--since", type=float, help="only windows from this Unix time on")
    client_args(p)
    p.set_defaults(func=lambda args: _accuracy(args, client))
