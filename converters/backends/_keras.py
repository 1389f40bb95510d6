"""Keras backends: tf_keras (Keras 2: distillation, magnitude pruning and QAT with tensorflow-model-optimization,
TFLite export with TFLiteConverter, ONNX export with tf2onnx) and Keras 3 (what `import keras` gives beside
TensorFlow 2.16+: TFLite export with TFLiteConverter, ONNX export with Keras 3's own `model.export`)."""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet import InputError
from edgefleet._errors import require

from .._data import Dataset
from . import FrameworkBackend, Gate, Progress

# tensorflow-model-optimization works with Keras 2 only; this must be set before TensorFlow loads.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = require("tensorflow", "convert", "Keras models")
keras = require("tf_keras", "convert", "Keras models")


def saved_by_keras3(path: Path) -> str | None:
    """The Keras version that wrote a `.keras` file, when it was Keras 3 (its metadata.json says so)."""
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read("metadata.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    v = str(meta.get("keras_version", "")) if isinstance(meta, dict) else ""
    return v if v.split(".")[0].isdigit() and int(v.split(".")[0]) >= 3 else None


def _keras3() -> Any:
    return require("keras", "convert", "Keras 3 models")


def load_keras(path: Path) -> tuple[Any, FrameworkBackend]:
    """Load a `.keras` / `.h5` file with the Keras that wrote it: Keras 3 files need Keras 3 (tf_keras
    cannot read their config), tf_keras files need tf_keras (for the tensorflow-model-optimization passes)."""
    k3 = saved_by_keras3(path) if path.suffix.lower() == ".keras" else None
    lib, backend = (_keras3(), Keras3Backend()) if k3 else (keras, KerasBackend())
    try:
        try:
            model = lib.models.load_model(str(path), compile=False, safe_mode=True)
        except TypeError as exc:
            if "safe_mode" not in str(exc):
                raise
            model = lib.models.load_model(str(path), compile=False)  # .h5 files take no safe_mode
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        who = f"Keras {k3}" if k3 else "tf_keras"
        raise InputError(f"{path.name} is not a readable Keras model ({who}): {type(exc).__name__}: {first}") from exc
    return model, backend


def _tfmot() -> Any:
    return require("tensorflow_model_optimization", "convert", "Keras pruning / quantization-aware training")


class _Progress(keras.callbacks.Callback):  # type: ignore[misc,name-defined,unused-ignore]
    def __init__(self, label: str, epochs: int, progress: Progress) -> None:
        super().__init__()
        self.label, self.epochs, self.progress = label, epochs, progress

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        self.progress(
            f"{self.label}: epoch {epoch + 1}/{self.epochs} loss {logs.get('loss', 0):.4f} "
            f"train acc {logs.get('accuracy', 0):.4f}"
        )


class KerasBackend(FrameworkBackend):
    name = "keras"

    def predict(self, model: Any, x: np.ndarray) -> np.ndarray:
        outs = [np.asarray(model(x[i : i + 256], training=False)) for i in range(0, len(x), 256)]
        return np.concatenate(outs).astype(np.float32)

    def input_shape(self, model: Any, sample: np.ndarray) -> tuple[int | None, ...]:
        shape = model.input_shape
        return tuple(shape[0] if isinstance(shape, list) else shape)

    def param_bytes(self, model: Any) -> int:
        return int(sum(np.asarray(w).nbytes for w in model.get_weights()))

    def _compile_fit(
        self,
        model: Any,
        train: Dataset,
        epochs: int,
        lr: float,
        bs: int,
        label: str,
        progress: Progress,
        callbacks: list[Any] | None = None,
    ) -> None:
        if train.y is None:
            raise InputError(f"{label} needs labelled training data (an .npz with 'x' and 'y')")
        tf.random.set_seed(0)
        model.compile(
            optimizer=keras.optimizers.Adam(lr),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(
            train.x,
            train.y,
            epochs=epochs,
            batch_size=bs,
            verbose=0,
            shuffle=True,
            callbacks=[*(callbacks or []), _Progress(label, epochs, progress)],
        )

    def distill(self, teacher: Any, student: Any, train: Dataset, p: Any, progress: Progress) -> Any:
        if not isinstance(student, keras.Model):
            raise InputError(
                f"distill.student must be a tf_keras model for a Keras teacher, got {type(student).__name__}"
            )
        if train.y is None:
            raise InputError("distill needs labelled training data (an .npz with 'x' and 'y')")
        t_logits = self.predict(teacher, train.x)
        opt = keras.optimizers.Adam(p.learning_rate)
        temp, alpha = p.temperature, p.alpha
        ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        kl = keras.losses.KLDivergence()
        rng = np.random.default_rng(0)
        tf.random.set_seed(0)
        for epoch in range(p.epochs):
            order = rng.permutation(len(train))
            total = 0.0
            for i in range(0, len(order), p.batch_size):
                idx = order[i : i + p.batch_size]
                xb, yb, tb = train.x[idx], train.y[idx], t_logits[idx]
                with tf.GradientTape() as tape:
                    s = student(xb, training=True)
                    soft = kl(tf.nn.softmax(tb / temp), tf.nn.softmax(s / temp))
                    loss = alpha * temp * temp * soft + (1 - alpha) * ce(yb, s)
                grads = tape.gradient(loss, student.trainable_variables)
                opt.apply_gradients(zip(grads, student.trainable_variables, strict=True))
                total += float(loss) * len(idx)
            acc = float((self.predict(student, train.x).argmax(1) == train.y).mean())
            progress(f"distill: epoch {epoch + 1}/{p.epochs} loss {total / len(train):.4f} student train acc {acc:.4f}")
        return student

    def prune_magnitude(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        tfmot = _tfmot()
        steps_per_epoch = int(np.ceil(len(train) / p.batch_size))
        end = max(1, steps_per_epoch * max(1, p.epochs - 1))
        sched = tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=0.0,
            final_sparsity=p.sparsity,
            begin_step=0,
            end_step=end,
            frequency=max(1, end // max(1, p.steps)),
        )
        try:
            pruned = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=sched)
        except ValueError as exc:
            raise InputError(f"prune_magnitude cannot wrap this Keras model: {exc}") from exc
        self._compile_fit(
            pruned,
            train,
            max(1, p.epochs),
            p.learning_rate,
            p.batch_size,
            "prune_magnitude",
            progress,
            [tfmot.sparsity.keras.UpdatePruningStep()],
        )
        model = tfmot.sparsity.keras.strip_pruning(pruned)
        ws = [w for layer in model.layers for w in layer.get_weights() if np.asarray(w).ndim >= 2]
        sparsity = sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.size for w in ws))
        return model, {"sparsity": round(float(sparsity), 4)}

    def qat(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        tfmot = _tfmot()
        try:
            q_model = tfmot.quantization.keras.quantize_model(model)
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"qat cannot quantize this Keras model: {str(exc)[:300]}") from exc
        self._compile_fit(q_model, train, p.epochs, p.learning_rate, p.batch_size, "qat", progress)
        return q_model, {}

    def export_onnx(self, model: Any, sample: np.ndarray, path: Path) -> None:
        try:
            tf2onnx = require("tf2onnx", "convert", "Keras -> ONNX export")
            spec = (tf.TensorSpec((None, *sample.shape[1:]), tf.float32, name="input"),)
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=17, output_path=str(path))
        except Exception as exc:
            raise InputError(
                f"Keras -> ONNX export with tf2onnx failed with TensorFlow {tf.__version__}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            ) from exc

    def export_tflite(
        self,
        model: Any,
        sample: np.ndarray,
        path: Path,
        mode: str,
        calib: Dataset | None,
        io: str,
        bias_correction: bool = True,
        gate: Gate | None = None,
    ) -> dict[str, Any]:
        # TFLiteConverter calibrates on its own and keeps no op in float on request: bias_correction and
        # gate apply to the other routes; the build checks the gate afterwards.
        conv = tf.lite.TFLiteConverter.from_keras_model(model)
        precision = "fp32"
        if mode != "none":
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
        if mode == "fp16":
            conv.target_spec.supported_types = [tf.float16]
            precision = "fp16"
        elif mode == "dynamic":
            precision = "int8"
        elif mode == "int8":
            precision = "int8"
            is_qat = any("quant" in type(layer).__name__.lower() for layer in model.layers)
            if not is_qat:
                if calib is None or len(calib) == 0:
                    raise InputError("TFLite int8 quantization needs a representative dataset (--calibration)")
                data = calib.x

                def rep() -> Any:
                    for i in range(min(len(data), 256)):
                        yield [data[i : i + 1].astype(np.float32)]

                conv.representative_dataset = rep
                conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            if io == "int8":
                conv.inference_input_type = tf.int8
                conv.inference_output_type = tf.int8
        try:
            # The converter prints the SavedModel it writes on the way (Keras 3); keep stdout for the report.
            with contextlib.redirect_stdout(StringIO()):
                data_bytes = conv.convert()
        except Exception as exc:
            msg = str(exc)
            ops = [ln.strip() for ln in msg.splitlines() if "op" in ln.lower() and ("not" in ln.lower())]
            raise InputError(
                f"Keras -> TFLite conversion failed: {(ops[0] if ops else msg.splitlines()[0])[:300]}"
            ) from exc
        path.write_bytes(data_bytes)
        return {"precision": precision}


_KERAS3_NO_TRAINING = (
    "{what} is not available for Keras 3 models: it runs on tensorflow-model-optimization, which works with "
    "tf_keras (Keras 2) only. Save the model with tf_keras (`import tf_keras as keras`) to use it, or build "
    "this file without training passes (quantize, export to TFLite / ONNX)"
)


class Keras3Backend(KerasBackend):
    """Keras 3 models: export and post-training quantization; the training passes need tf_keras."""

    name = "keras3"

    def source_format(self) -> str:
        return "keras"

    def distill(self, teacher: Any, student: Any, train: Dataset, p: Any, progress: Progress) -> Any:
        raise InputError(_KERAS3_NO_TRAINING.format(what="distill"))

    def prune_magnitude(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        raise InputError(_KERAS3_NO_TRAINING.format(what="prune_magnitude"))

    def qat(self, model: Any, train: Dataset, p: Any, progress: Progress) -> tuple[Any, dict[str, Any]]:
        raise InputError(_KERAS3_NO_TRAINING.format(what="qat"))

    def export_onnx(self, model: Any, sample: np.ndarray, path: Path) -> None:
        # Keras 3's own ONNX export (tf2onnx underneath, on a traced serving function); tf2onnx's
        # from_keras reads tf_keras models only.
        try:
            with contextlib.redirect_stdout(StringIO()):
                model.export(str(path), format="onnx", verbose=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            raise InputError(
                f"Keras 3 -> ONNX export (model.export(format='onnx')) failed: {type(exc).__name__}: {first}"
            ) from exc
