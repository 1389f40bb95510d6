"""Reading and writing `.efb` bundles: a deterministic ZIP with a signed manifest.

Writing is atomic (temp file, fsync, rename). Reading validates every member before
anything is returned, never unpickles, and extracts only inside the given directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from ._errors import BundleError, InputError, SignatureError
from ._fs import atomic_write
from ._manifest import FileEntry, Manifest, canonical_json
from ._signing import PublicKey, SigningKey, check_signature, encode_signature, load_public_key

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "Bundle",
    "open_bundle",
    "sign_bundle",
    "write_bundle",
]

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
DEFAULT_MAX_MEMBER_BYTES = 1 << 30  # 1 GiB: far above any edge model, far below a zip bomb.
DEFAULT_MAX_TOTAL_BYTES = 2 << 30  # all members together
# The manifest and the signature are read before anything is verified: small limits of their own.
_MAX_MANIFEST_BYTES = 16 << 20
_MAX_SIGNATURE_BYTES = 64 << 10
_EPOCH = (1980, 1, 1, 0, 0, 0)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_member_name(name: str) -> None:
    """Refuse any archive name that could escape the extraction directory or be ambiguous."""
    if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise BundleError(f"bundle member '{name}' has an absolute path; bundles hold relative paths only")
    if "\\" in name or "\x00" in name:
        raise BundleError(f"bundle member '{name}' contains a backslash or NUL; use '/'-separated names")
    # Split by hand: PurePosixPath drops '.' components ('models/./x' has the parts 'models', 'x').
    if any(p in ("..", ".", "") for p in name.split("/")):
        raise BundleError(f"bundle member '{name}' contains '..', '.' or an empty path component (path traversal)")


def _zipinfo(name: str) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=_EPOCH)
    zi.compress_type = zipfile.ZIP_STORED
    zi.create_system = 3
    zi.external_attr = (stat.S_IFREG | 0o644) << 16
    return zi


def write_bundle(
    path: str | os.PathLike[str],
    manifest: Manifest,
    members: Mapping[str, bytes],
    signing_key: SigningKey | None = None,
) -> Manifest:
    """Write a bundle atomically; fills `manifest.files` from `members`. Same inputs, same bytes."""
    for name in members:
        check_member_name(name)
        if name in (MANIFEST, SIGNATURE):
            raise BundleError(f"'{name}' is reserved for the bundle's own manifest / signature")
    manifest.files = [FileEntry(n, sha256_bytes(b), len(b)) for n, b in sorted(members.items())]
    manifest.check_references()
    # Round-trip through the parser so a writer can never produce a bundle the reader refuses.
    manifest = Manifest.parse(json.loads(manifest.canonical_bytes()))
    _write_archive(Path(path), manifest.canonical_bytes(), members, signing_key)
    return manifest


def _write_archive(out: Path, body: bytes, members: Mapping[str, bytes], signing_key: SigningKey | None) -> None:
    def fill(raw: BinaryIO) -> None:
        with zipfile.ZipFile(raw, "w") as zf:
            zf.writestr(_zipinfo(MANIFEST), body)
            if signing_key is not None:
                zf.writestr(_zipinfo(SIGNATURE), canonical_json(encode_signature(signing_key, body)))
            for name in sorted(members):
                zf.writestr(_zipinfo(name), members[name])

    atomic_write(out, fill)


@dataclass
class Bundle:
    """A validated bundle. Member bytes were hash-checked when it was opened."""

    path: Path
    manifest: Manifest
    signed_by: str | None
    signature_present: bool
    _members: dict[str, bytes]
    # manifest.json as written: a newer MINOR's fields this reader does not know are in it, not in `manifest`
    _manifest_body: bytes = field(default=b"", repr=False, compare=False)
    _golden: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def read(self, name: str) -> bytes:
        if name not in self._members:
            raise BundleError(f"bundle {self.path.name} has no member '{name}'")
        return self._members[name]

    @property
    def member_names(self) -> list[str]:
        return sorted(self._members)

    def load_array(self, name: str) -> np.ndarray:
        """Load a `.npy` member; pickled object arrays are refused."""
        try:
            return np.load(io.BytesIO(self.read(name)), allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"bundle member '{name}' is not a plain .npy array: {exc}") from exc

    def golden_inputs(self) -> np.ndarray | None:
        """The golden sample's inputs (read-only; parsed once, since devices probe with them often)."""
        if self._golden is None:
            p = self.manifest.golden.get("inputs")
            if not p:
                return None
            arr = self.load_array(str(p))
            arr.flags.writeable = False
            self._golden = arr
        return self._golden

    def extract(self, directory: str | os.PathLike[str]) -> Path:
        """Write every member under DIRECTORY (created if needed), never outside it."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
        for name, data in sorted(self._members.items()):
            dest = root.joinpath(*PurePosixPath(name).parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.parent.resolve() != dest.parent or not dest.parent.is_relative_to(root):
                raise BundleError(f"refusing to extract '{name}': a directory on its path is a link out of {root}")
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return root


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, what: str = "limit") -> tuple[bytes, str]:
    """The member's bytes and their sha256, decompressing no more than LIMIT bytes (plus one read)."""
    chunks, total, h = [], 0, hashlib.sha256()
    with zf.open(info) as f:
        while chunk := f.read(min(1 << 20, limit - total + 1)):
            total += len(chunk)
            if total > limit:
                raise BundleError(f"bundle member '{info.filename}' is larger than {what} ({limit} bytes)")
            h.update(chunk)
            chunks.append(chunk)
    return b"".join(chunks), h.hexdigest()


def _reject_constant(name: str) -> Any:
    raise BundleError(f"manifest.json contains {name}, which JSON does not allow; the manifest is malformed")


def _manifest_document(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"manifest.json is not valid UTF-8 JSON: {exc}") from exc
    except RecursionError as exc:
        raise BundleError("manifest.json is nested too deeply") from exc


def _canonical(doc: Any) -> bytes:
    """The canonical encoding of a parsed document, or a BundleError for what has none: a number JSON parsers
    read as infinity (1e400) or a string holding a lone surrogate (\\ud800), which UTF-8 cannot encode."""
    try:
        return canonical_json(doc)
    except ValueError as exc:  # UnicodeEncodeError is one
        raise BundleError(
            "manifest.json holds a number out of range (read as infinity) or a lone UTF-16 surrogate escape; "
            "no canonical form exists for it"
        ) from exc


def open_bundle(
    path: str | os.PathLike[str],
    trusted_keys: Sequence[PublicKey | str | os.PathLike[str] | bytes] | None = None,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Bundle:
    """Open and fully validate a bundle.

    With `trusted_keys`, the signature must be present and made by one of them. Without
    it the signature is not checked (the result says whether one is present).

    The manifest and its signature are read and checked first; each member is then decompressed
    through its hash with the size the (signed) manifest declares as its limit, so an archive member
    that inflates beyond what was signed costs at most that much memory and time.
    """
    p = Path(path)
    keys = None if trusted_keys is None else [load_public_key(k) for k in trusted_keys]
    if keys is not None and not keys:
        raise InputError("trusted_keys is empty: pass at least one public key, or None to skip the signature check")
    try:
        zf = zipfile.ZipFile(p)
    except FileNotFoundError as exc:
        raise BundleError(f"bundle {p} does not exist") from exc
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BundleError(f"{p} is not a readable bundle (truncated or corrupt archive: {exc})") from exc
    with zf:
        infos = zf.infolist()
        seen: set[str] = set()
        for info in infos:
            # zipfile cuts a name at its first NUL; the name as stored in the archive is orig_filename.
            check_member_name(info.orig_filename)
            check_member_name(info.filename)
            if info.filename in seen:
                raise BundleError(f"bundle member '{info.filename}' appears twice")
            seen.add(info.filename)
            # Many zip writers store permission bits without a file type; only a stated non-regular type is refused.
            ftype = stat.S_IFMT(info.external_attr >> 16)
            if ftype and ftype != stat.S_IFREG:
                raise BundleError(
                    f"bundle member '{info.filename}' is a link or special file; only regular files are allowed"
                )
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BundleError(f"bundle member '{info.filename}' uses an unsupported compression method")
            if info.file_size > max_member_bytes:
                raise BundleError(f"bundle member '{info.filename}' is larger than the {max_member_bytes}-byte limit")
        if MANIFEST not in seen:
            raise BundleError(f"{p.name} has no manifest.json: not an edgefleet bundle")
        by_name = {i.filename: i for i in infos}
        try:
            # 1. The manifest and its signature, verified before any model bytes are decompressed.
            body, _ = _read_member(zf, by_name[MANIFEST], _MAX_MANIFEST_BYTES, "the manifest limit")
            sig_raw = None
            if SIGNATURE in by_name:
                sig_raw, _ = _read_member(zf, by_name[SIGNATURE], _MAX_SIGNATURE_BYTES, "the signature limit")
            signed_by = None
            if keys is not None:
                if sig_raw is None:
                    raise SignatureError(
                        f"bundle {p.name} is not signed, but trusted keys were given; sign it with 'edgefleet sign'"
                    )
                try:
                    sig_doc: Any = json.loads(sig_raw, parse_constant=_reject_constant)
                    canonical_sig = _canonical(sig_doc) == sig_raw
                except (ValueError, RecursionError, BundleError) as exc:
                    raise SignatureError(f"bundle {p.name} has a malformed signature file") from exc
                if not canonical_sig:
                    raise SignatureError(f"bundle {p.name}: manifest.sig is not in canonical form (as the manifest)")
                signed_by = check_signature(sig_doc, body, keys).key_id
            doc = _manifest_document(body)
            # Canonical form is checked over the document as written, unknown fields included: a newer
            # MINOR may add fields anywhere, and re-encoding only the fields this reader knows would refuse it.
            if _canonical(doc) != body:
                raise BundleError(
                    "manifest.json is not in canonical form (sorted keys, no whitespace); it was edited by hand"
                )
            manifest = Manifest.parse(doc)
            # 2. The archive holds exactly what the manifest lists, within the limits, before reading any of it.
            listed = {fe.path: fe for fe in manifest.files}
            for name in by_name:
                if name not in listed and name not in (MANIFEST, SIGNATURE):
                    raise BundleError(f"bundle member '{name}' is not listed in the manifest")
            total = 0
            for name, fe in listed.items():
                if name not in by_name:
                    raise BundleError(f"manifest lists '{name}', but the bundle does not contain it")
                if fe.size > max_member_bytes:
                    raise BundleError(f"bundle member '{name}' is larger than the {max_member_bytes}-byte limit")
                if by_name[name].file_size != fe.size:
                    raise BundleError(f"bundle member '{name}' does not match its size in the manifest (tampered)")
                total += fe.size
            if total > max_total_bytes:
                raise BundleError(f"bundle {p.name} holds {total} bytes, more than the {max_total_bytes}-byte limit")
            # 3. Each member through its hash, never decompressing more than its declared size.
            raw: dict[str, bytes] = {}
            for name, fe in listed.items():
                data, digest = _read_member(zf, by_name[name], fe.size, "its size in the manifest")
                if len(data) != fe.size or digest != fe.sha256:
                    raise BundleError(
                        f"bundle member '{name}' does not match its sha256 in the manifest (tampered or corrupt)"
                    )
                raw[name] = data
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise BundleError(f"{p} is truncated or corrupt: {exc}") from exc
    return Bundle(p, manifest, signed_by, sig_raw is not None, raw, body)


def sign_bundle(path: str | os.PathLike[str], key: SigningKey, out: str | os.PathLike[str] | None = None) -> Manifest:
    """(Re-)sign an existing bundle after validating it; writes OUT (default: in place) atomically.

    The manifest is signed byte for byte as it is: re-encoding it would drop the fields of a newer MINOR
    that this version does not know, and the bundle would no longer be the one its publisher built."""
    b = open_bundle(path)
    members = {n: b.read(n) for n in b.member_names}
    _write_archive(Path(out or path), b._manifest_body, members, key)
    return b.manifest
