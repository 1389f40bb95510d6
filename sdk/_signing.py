"""Ed25519 keys and detached signatures over canonical manifest bytes."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._errors import InputError, SignatureError
from ._fs import atomic_write

__all__ = ["PublicKey", "SigningKey", "generate_keypair", "load_public_key", "load_signing_key"]


def _key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """A trusted Ed25519 public key; `key_id` is the first 16 hex digits of sha256 of its raw bytes."""

    key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return _key_id(self.key)

    def verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self.key.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    def pem(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key used to sign bundles."""

    key: Ed25519PrivateKey

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data)


def generate_keypair(path: str | os.PathLike[str], *, overwrite: bool = False) -> SigningKey:
    """Write a new private key to PATH (mode 0600) and its public key to PATH.pub."""
    priv_path = Path(path)
    pub_path = Path(str(priv_path) + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise InputError(f"{p} already exists; choose another path or remove it first")
    key = SigningKey(Ed25519PrivateKey.generate())
    pem = key.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        atomic_write(priv_path, pem, mode=0o600)
        try:
            atomic_write(pub_path, key.public.pem())
        except OSError:
            priv_path.unlink(missing_ok=True)  # no private key without its public half
            raise
    except OSError as exc:
        raise InputError(f"cannot write key {priv_path}: {exc.strerror or exc}; choose a writable path") from exc
    return key


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Load a PEM (PKCS#8) Ed25519 private key, with a clear error when it is not one."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read signing key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise InputError(
            f"{path} is not an unencrypted PEM Ed25519 private key; create one with 'edgefleet keygen KEY'"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; use 'edgefleet keygen KEY'")
    return SigningKey(key)


def load_public_key(source: str | os.PathLike[str] | bytes | PublicKey) -> PublicKey:
    """Load a PEM Ed25519 public key from a path or PEM bytes."""
    if isinstance(source, PublicKey):
        return source
    if isinstance(source, bytes):
        data, where = source, "public key bytes"
    else:
        where = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read public key {where}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where} is not a PEM public key; use the KEY.pub written by 'edgefleet keygen'") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{where} holds a {type(key).__name__}, not an Ed25519 public key")
    return PublicKey(key)


def encode_signature(key: SigningKey, data: bytes) -> dict[str, str]:
    return {"algorithm": "ed25519", "key_id": key.key_id, "signature": base64.b64encode(key.sign(data)).decode()}


_KEY_ID = re.compile(r"[0-9a-f]{16}")


def check_signature(sig_doc: object, data: bytes, trusted: list[PublicKey]) -> PublicKey:
    """Return the trusted key that made `sig_doc` over `data`, or raise SignatureError.

    The document's `key_id` names the key that signed: only a trusted key with that id is tried, so a
    signature whose `key_id` does not name the key that made it is refused (docs/bundle-format.md)."""
    if not isinstance(sig_doc, dict) or sig_doc.get("algorithm") != "ed25519":
        raise SignatureError("bundle signature is malformed (expected an ed25519 signature document)")
    key_id = sig_doc.get("key_id")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise SignatureError("bundle signature field 'key_id' must be 16 lowercase hex digits")
    sig = sig_doc.get("signature")
    try:
        raw = base64.b64decode(sig if isinstance(sig, str) else "", validate=True)
    except ValueError as exc:
        raise SignatureError("bundle signature is not valid base64") from exc
    named = [k for k in trusted if k.key_id == key_id]
    ids = ", ".join(k.key_id for k in trusted)
    if not named:
        raise SignatureError(
            f"bundle signature does not verify with the trusted key(s) {ids}: it names key {key_id}, which is not "
            "trusted; trust its public key, or sign the bundle with a trusted one"
        )
    for key in named:
        if key.verify(raw, data):
            return key
    raise SignatureError(
        f"bundle signature (key {key_id}) does not verify with that trusted key: "
        "the bundle was modified after signing, or the signature names the wrong key"
    )
