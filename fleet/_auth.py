"""Who may do what: operator API tokens and device download tokens, stored as hashes only."""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path

from ._db import Database

__all__ = ["create_token", "hash_token", "may_download", "may_operate"]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(data_dir: Path, name: str = "operator", db_url: str | None = None) -> str:
    """A new operator API token (only its hash is stored)."""
    db = Database(db_url or f"sqlite:///{Path(data_dir) / 'fleet.db'}")
    token = "eft_" + secrets.token_urlsafe(32)
    db.execute("INSERT INTO tokens (sha256, name, created) VALUES (?, ?, ?)", (hash_token(token), name, time.time()))
    return token


def _bearer(header: str | None) -> str | None:
    if not header or not header.startswith("Bearer "):
        return None
    return hash_token(header[7:].strip())


def may_operate(db: Database, header: str | None) -> bool:
    """Whether the Authorization HEADER carries an operator's API token."""
    h = _bearer(header)
    return h is not None and bool(db.query("SELECT 1 FROM tokens WHERE sha256 = ?", (h,)))


def device_of(db: Database, header: str | None) -> str | None:
    """The device whose download token HEADER carries (None: not a device's token)."""
    h = _bearer(header)
    rows = db.query("SELECT device_id FROM device_tokens WHERE sha256 = ?", (h,)) if h is not None else []
    return str(rows[0][0]) if rows else None


def may_download(db: Database, header: str | None) -> bool:
    """Whether HEADER's token may download bundles: a device's (from its device.toml) or an operator's."""
    h = _bearer(header)
    return h is not None and bool(
        db.query("SELECT 1 FROM tokens WHERE sha256 = ?", (h,))
        or db.query("SELECT 1 FROM device_tokens WHERE sha256 = ?", (h,))
    )
