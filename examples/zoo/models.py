"""A conversion zoo: architectures the other examples do not use, each trained briefly on data from a
package, to build every format and precision from (tests/test_zoo.py, benchmarks/zoo.py).

Every entry gives a trained PyTorch module (or a `.pt2` program for the fixed-batch entry, or a Keras 3
model) and its data split into train / calibration / evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ZOO", "Entry", "make", "train_torch"]

Split = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Entry:
    name: str
    covers: str  # what the architecture exercises
    layout: str
    data: Callable[[], Split]
    make: Callable[[Split, Path], Any]  # trained model object, or a path to a model file


def _split(x: np.ndarray, y: np.ndarray, seed: int = 0) -> Split:
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int64)
    n = len(x)
    a, b = int(n * 0.6), int(n * 0.6) + min(200, n // 5)
    return {"train": (x[:a], y[:a]), "calib": (x[a:b], y[a:b]), "eval": (x[b:], y[b:])}


def _digits_images() -> Split:
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split((d.images / 16.0)[:, None], d.target)


def _digits_rows() -> Split:
    """Digits as sequences: 8 time steps of 8 features (for attention and recurrent models)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split(d.images / 16.0, d.target)


def _digits_signal() -> Split:
    """Digits as a 1-channel signal of 64 samples, scanned row by row (audio-like, for Conv1d)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return _split((d.images / 16.0).reshape(-1, 1, 64), d.target)


def _tabular() -> Split:
    """Breast-cancer features, standardised, with one column binned into 8 category codes (0..7)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = (d.data - d.data.mean(0)) / d.data.std(0)
    codes = np.digitize(x[:, 0], np.quantile(x[:, 0], np.linspace(0, 1, 9)[1:-1]))
    return _split(np.concatenate([codes[:, None].astype(np.float64), x[:, 1:]], axis=1), d.target)


def _digits_nhwc() -> Split:
    return {k: (np.transpose(x, (0, 2, 3, 1)), y) for k, (x, y) in _digits_images().items()}


def _torch() -> Any:
    import torch

    return torch


def train_torch(model: Any, data: Split, epochs: int = 8, lr: float = 3e-3) -> Any:
    """A few epochs of Adam on DATA's training split (cross-entropy, batches of 32); the model in eval mode."""
    torch = _torch()
    torch.manual_seed(0)
    x, y = (torch.from_numpy(a) for a in data["train"])
    opt = torch.optim.Adam(model.parameters(), lr)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 32):
            j = order[i : i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[j]), y[j]).backward()
            opt.step()
    return model.eval()


def _modules() -> dict[str, Callable[[], Any]]:
    """The PyTorch architectures, defined on first use so that importing this file needs no torch."""
    torch = _torch()
    nn = torch.nn

    class Grouped(nn.Module):
        """Depthwise and grouped convolutions with hard-swish (MobileNet / ShuffleNet style)."""

        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Hardswish(),
                nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.Hardswish(),
                nn.Conv2d(16, 32, 1, groups=4), nn.BatchNorm2d(32), nn.Hardswish(),
                nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=8), nn.BatchNorm2d(32), nn.ReLU6(),
                nn.Flatten(), nn.Linear(32 * 16, 10),
            )  # fmt: skip

        def forward(self, x: Any) -> Any:
            return self.f(x)

    class SqueezeExcite(nn.Module):
        """Squeeze-and-excite (global pool, sigmoid gate, multiply) with SiLU, EfficientNet style."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, padding=1), nn.BatchNorm2d(24), nn.SiLU())
            self.gate = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 6, 1), nn.SiLU(), nn.Conv2d(6, 24, 1), nn.Sigmoid()
            )
            self.head = nn.Sequential(nn.Conv2d(24, 32, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
                                      nn.Linear(32 * 16, 10))  # fmt: skip

        def forward(self, x: Any) -> Any:
            h = self.stem(x)
            return self.head(h * self.gate(h))

    class Encoder(nn.Module):
        """A small transformer encoder: multi-head self-attention, LayerNorm, GELU, learned positions."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 32)
            self.pos = nn.Parameter(torch.zeros(1, 8, 32))
            layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(32)
            self.out = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            return self.out(self.norm(self.enc(self.embed(x) + self.pos)).mean(dim=1))

    class Lstm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(8, 32, batch_first=True)
            self.out = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            return self.out(self.rnn(x)[0][:, -1])

    class Gru(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(8, 32, batch_first=True)
            self.out = nn.Linear(32, 10)

        def forward(self, x: Any) -> Any:
            return self.out(self.rnn(x)[0][:, -1])

    class KeywordSpotter(nn.Module):
        """Conv1d over a 1-channel signal, as keyword spotting runs over audio features."""

        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv1d(1, 16, 5, padding=2), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
                nn.Conv1d(16, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.MaxPool1d(2),
                nn.Conv1d(32, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10),
            )  # fmt: skip

        def forward(self, x: Any) -> Any:
            return self.f(x)

    class TinyUNet(nn.Module):
        """Encoder-decoder with a skip: max-pool down, bilinear upsample, concat; a classification head."""

        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
            self.mid = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.fuse = nn.Sequential(nn.Conv2d(48, 16, 3, padding=1), nn.ReLU())
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 64, 10))

        def forward(self, x: Any) -> Any:
            d = self.down(x)
            return self.head(self.fuse(torch.cat([self.up(self.mid(d)), d], dim=1)))

    class TabularMLP(nn.Module):
        """An MLP over numeric features plus an embedding of one categorical column (codes as floats)."""

        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(8, 4)
            self.mlp = nn.Sequential(nn.Linear(29 + 4, 32), nn.ReLU(), nn.Linear(32, 2))

        def forward(self, x: Any) -> Any:
            code = x[:, 0].round().clamp(0, 7).long()
            return self.mlp(torch.cat([self.emb(code), x[:, 1:]], dim=1))

    class ResidualCNN(nn.Module):
        """Residual blocks (add) with BatchNorm and max-pool."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.b1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                    nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))  # fmt: skip
            self.head = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 16, 10))

        def forward(self, x: Any) -> Any:
            h = torch.relu(self.stem(x))
            return self.head(torch.relu(h + self.b1(h)))

    return {
        "grouped": Grouped,
        "squeeze_excite": SqueezeExcite,
        "transformer": Encoder,
        "lstm": Lstm,
        "gru": Gru,
        "kws_conv1d": KeywordSpotter,
        "unet": TinyUNet,
        "tabular_embedding": TabularMLP,
        "residual": ResidualCNN,
    }


def _torch_entry(key: str) -> Callable[[Split, Path], Any]:
    def make_it(data: Split, work: Path) -> Any:
        return train_torch(_modules()[key](), data)

    return make_it


def _fixed_batch_program(data: Split, work: Path) -> Path:
    """The residual CNN exported exactly as the README says, with a concrete batch of 1."""
    torch = _torch()
    model = train_torch(_modules()["residual"](), data)
    path = work / "residual_b1.pt2"
    torch.export.save(torch.export.export(model, (torch.from_numpy(data["eval"][0][:1]),)), path)
    return path


def _dynamic_batch_program(data: Split, work: Path) -> Path:
    torch = _torch()
    model = train_torch(_modules()["squeeze_excite"](), data)
    path = work / "squeeze_excite_dyn.pt2"
    dyn = ({0: torch.export.Dim("batch")},)
    torch.export.save(torch.export.export(model, (torch.from_numpy(data["eval"][0][:2]),), dynamic_shapes=dyn), path)
    return path


def _keras3_se(data: Split, work: Path) -> Path:
    """A Keras 3 functional model with a squeeze-and-excite block and LayerNorm, saved as `.keras`."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(16, 3, padding="same", activation="swish")(inp)
    g = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    g = keras.layers.Conv2D(16, 1, activation="sigmoid")(keras.layers.Conv2D(4, 1, activation="relu")(g))
    h = keras.layers.Multiply()([h, g])
    h = keras.layers.LayerNormalization()(keras.layers.Flatten()(h))
    model = keras.Model(inp, keras.layers.Dense(10)(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(*data["train"], epochs=10, verbose=0)
    path = work / "keras3_se.keras"
    model.save(path)
    return path


ZOO: list[Entry] = [
    Entry("grouped", "depthwise + grouped conv, hard-swish, ReLU6", "NCHW", _digits_images, _torch_entry("grouped")),
    Entry("squeeze_excite", "squeeze-and-excite (sigmoid x mul), SiLU", "NCHW", _digits_images,
          _torch_entry("squeeze_excite")),
    Entry("transformer", "multi-head self-attention, LayerNorm, GELU", "NC", _digits_rows, _torch_entry("transformer")),
    Entry("lstm", "LSTM", "NC", _digits_rows, _torch_entry("lstm")),
    Entry("gru", "GRU", "NC", _digits_rows, _torch_entry("gru")),
    Entry("kws_conv1d", "Conv1d keyword spotting on a signal", "NC", _digits_signal, _torch_entry("kws_conv1d")),
    Entry("unet", "U-Net: max-pool, bilinear upsample, concat", "NCHW", _digits_images, _torch_entry("unet")),
    Entry("tabular_embedding", "tabular MLP with an embedding (Gather)", "NC", _tabular,
          _torch_entry("tabular_embedding")),
    Entry("residual_pt2_batch1", "residual add, BatchNorm; .pt2 with a fixed batch of 1", "NCHW", _digits_images,
          _fixed_batch_program),
    Entry("squeeze_excite_pt2_dynamic", "the SE net as a .pt2 with a dynamic batch", "NCHW", _digits_images,
          _dynamic_batch_program),
    Entry("keras3_se_layernorm", "Keras 3 .keras: SE block, LayerNorm, swish", "NHWC", _digits_nhwc, _keras3_se),
]  # fmt: skip


def make(entry: Entry, work: Path) -> tuple[Any, Split]:
    """The entry's trained model (object or file) and its data."""
    data = entry.data()
    return entry.make(data, work), data
