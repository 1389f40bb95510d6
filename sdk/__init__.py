"""edgefleet: build signed model bundles, run them on edge devices, and keep a fleet healthy.

This package is the shared core: the bundle format, signing, drift statistics and the CLI.
The parts live in `edgefleet.converters`, `edgefleet.runtime` and `edgefleet.fleet`.
"""

from __future__ import annotations

from ._bundle import Bundle, open_bundle, sign_bundle, write_bundle
from ._drift import bin_counts, compute_baseline, input_features, output_features
from ._errors import BundleError, EdgefleetError, InputError, MissingDependencyError, SignatureError
from ._manifest import FORMAT_VERSION, FileEntry, Manifest, ModelEntry, TensorSpec
from ._signing import PublicKey, SigningKey, generate_keypair, load_public_key, load_signing_key

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "BundleError",
    "EdgefleetError",
    "FileEntry",
    "InputError",
    "Manifest",
    "MissingDependencyError",
    "ModelEntry",
    "PublicKey",
    "SignatureError",
    "SigningKey",
    "TensorSpec",
    "__version__",
    "bin_counts",
    "compute_baseline",
    "generate_keypair",
    "input_features",
    "load_public_key",
    "load_signing_key",
    "open_bundle",
    "output_features",
    "sign_bundle",
    "write_bundle",
]
