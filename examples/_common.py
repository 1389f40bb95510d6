"""What every example script shares: its signing key and how it ends."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from edgefleet import EdgefleetError, SigningKey, generate_keypair, load_signing_key


def signing_key(path: Path) -> SigningKey:
    """The example's signing key: loaded if it exists, else created (with PATH.pub beside it)."""
    return load_signing_key(path) if path.exists() else generate_keypair(path)


def run(main: Callable[[], int]) -> None:
    """Run MAIN; an edgefleet error ends the script with its one-line message and exit code 1."""
    try:
        sys.exit(main())
    except EdgefleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
