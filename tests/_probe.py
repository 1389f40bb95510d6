"""Run every model of the given bundles on given inputs and save the outputs; executed by the host
Python and by the aarch64 Python under qemu, so both sides run exactly the same code.

    python tests/_probe.py OUT.npz KEY.pub INPUTS.npy BUNDLE...
"""

from __future__ import annotations

import platform
import sys

import numpy as np

import edgefleet.runtime as rt


def main(out: str, key: str, inputs: str, *bundles: str) -> None:
    x = np.load(inputs)
    results: dict[str, np.ndarray] = {}
    for b in bundles:
        for fmt in ("onnx", "tflite"):
            try:
                # The same kernels on both machines: bit-exactness is a property of a kernel, not a backend
                m = rt.load(
                    b, [key], backend=fmt, accelerators=["CPUExecutionProvider" if fmt == "onnx" else "reference"]
                )
            except rt.BundleError as exc:
                if "has no" in str(exc):
                    continue
                raise
            assert m.check_golden().ok, (b, fmt)
            auto = rt.load(b, [key], backend=fmt)  # the default choice must pass its golden check too
            assert auto.check_golden().ok, (b, fmt)
            for note in auto.info.fallbacks:
                print(platform.machine(), "fallback:", note)
            key_name = f"{m.info.bundle}-{m.info.version}-{m.info.model_id}"
            results[key_name] = m.predict(x)
            print(platform.machine(), key_name, m.info.backend, m.info.backend_version, m.info.accelerator)
    np.savez(out, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
