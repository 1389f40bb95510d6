"""Exception types shared by every part of edgefleet."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

__all__ = [
    "BundleError",
    "EdgefleetError",
    "InputError",
    "MissingDependencyError",
    "SignatureError",
    "missing_note",
    "require",
]


class EdgefleetError(Exception):
    """Base class: every error edgefleet raises on purpose. Its message is one line a user can act on."""


class BundleError(EdgefleetError):
    """A bundle file is malformed, unsafe, tampered with or incompatible."""


class SignatureError(BundleError):
    """A bundle's signature is missing, bad, or made by a key that is not trusted."""


class InputError(EdgefleetError):
    """User-supplied input (a model file, a data set, a recipe, a key) is unusable."""


class MissingDependencyError(EdgefleetError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, extra: str, purpose: str = "") -> ModuleType:
    """Import an optional dependency, or raise an error naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{module} is needed{why} but is not installed: pip install 'edgefleet[{extra}]' ({exc})"
        ) from exc


def missing_note(modules: tuple[str, ...], *extras: str, any_of: bool = False) -> str:
    """'' when MODULES are installed (ANY_OF: one of them), else a note for a command's help naming the
    EXTRAS that install them. Looks modules up without importing them: `edgefleet --help` stays fast."""

    def there(m: str) -> bool:
        try:
            return importlib.util.find_spec(m) is not None
        except (ImportError, ValueError):
            return False

    ok = any(map(there, modules)) if any_of else all(map(there, modules))
    return "" if ok else " [not installed: pip install " + " or ".join(f"'edgefleet[{e}]'" for e in extras) + "]"
