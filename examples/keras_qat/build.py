"""Keras with quantization-aware training: train a small CNN on digits, fine-tune it with QAT
(tensorflow-model-optimization), and write a signed TFLite int8 bundle with int8 inputs/outputs.

    python -m examples.keras_qat.build --out build/keras_qat
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tfmot needs Keras 2 (tf_keras)

import numpy as np

from edgefleet.converters import BuildConfig, Dataset, QuantAwareTraining, Quantize, build

from .._common import run, signing_key
from ..digits.data import load_splits


def make_model(width: int = 16):
    import tf_keras as keras

    return keras.Sequential(
        [
            keras.layers.Input((8, 8, 1)),
            keras.layers.Conv2D(width, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(2 * width, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def nhwc(split: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    x, y = split
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)), y


def train(model, x: np.ndarray, y: np.ndarray, epochs: int) -> None:
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    model.compile(
        optimizer=keras.optimizers.Adam(2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/keras_qat", type=Path)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=3)
    args = ap.parse_args(argv)
    s = {k: nhwc(v) for k, v in load_splits().items()}
    model = make_model()
    train(model, *s["train"], epochs=args.epochs)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save(args.out / "model.keras")  # the file a pipeline hands to `edgefleet build`
    key_path = args.out / "signing.key"
    key = signing_key(key_path)
    cfg = BuildConfig(
        name="digits-keras-qat",
        version="1.0.0",
        formats=["tflite"],
        layout="NHWC",
        labels=[str(i) for i in range(10)],
        steps=[QuantAwareTraining(epochs=args.qat_epochs, learning_rate=1e-4)],
        quantize=Quantize(mode="int8", io="int8"),
    )
    build(
        args.out / "model.keras",
        args.out / "digits-keras-qat.efb",
        cfg,
        calibration=Dataset(*s["calib"], name="calib"),
        evaluation=Dataset(*s["eval"], name="eval"),
        train=Dataset(*s["train"], name="train"),
        signing_key=key,
        report_path=args.out / "report.json",
        echo_table=True,
    )
    return 0


if __name__ == "__main__":
    run(main)
