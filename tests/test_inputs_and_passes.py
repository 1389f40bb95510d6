"""Data sets, typed pass parameters and recipes: bad input gets a clear error."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from edgefleet import InputError, bin_counts, compute_baseline
from edgefleet.converters import PASSES, Dataset, PruneMagnitude, Quantize, load_npz, load_recipe, pass_from_dict


def test_load_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", y=np.arange(3))
    with pytest.raises(InputError, match="no array named 'x'"):
        load_npz(tmp_path / "nox.npz")
    np.savez(tmp_path / "noy.npz", x=np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match="no array named 'y'"):
        load_npz(tmp_path / "noy.npz", need_labels=True)
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="pickled"):
        load_npz(tmp_path / "obj.npz")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((5, 4), np.float32))
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:40])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_npz(tmp_path / "trunc.npz")
    with pytest.raises(InputError, match="too few"):
        load_npz(good, min_samples=10)
    np.savez(tmp_path / "nan.npz", x=np.full((2, 2), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        load_npz(tmp_path / "nan.npz")
    assert len(load_npz(good)) == 5


def test_dataset_shape_and_label_checks() -> None:
    ds = Dataset(np.zeros((4, 1, 8, 8), np.float32), name="calib.npz")
    with pytest.raises(InputError, match=r"per-sample shape \(1, 8, 8\), but the model expects \(3, 8, 8\)"):
        ds.check_input((None, 3, 8, 8))
    ds.check_input((None, 1, 8, 8))
    with pytest.raises(InputError, match="one label per sample"):
        Dataset(np.zeros((4, 2), np.float32), np.zeros(3, np.int64))
    with pytest.raises(InputError, match="must be integers"):
        Dataset(np.zeros((2, 2), np.float32), np.zeros(2, np.float32))
    with pytest.raises(InputError, match="must be floating point"):
        Dataset(np.zeros((2, 2), np.int32)).check_input((None, 2))


def test_passes_are_registered_with_typed_parameters() -> None:
    assert {"distill", "prune_magnitude", "prune_structured", "qat", "quantize"} <= set(PASSES)
    p = pass_from_dict({"pass": "prune_magnitude", "sparsity": 0.6, "epochs": 2})
    assert isinstance(p, PruneMagnitude) and p.sparsity == 0.6
    q = pass_from_dict({"pass": "quantize", "mode": "int8", "max_accuracy_drop": 0})
    assert isinstance(q, Quantize) and q.max_accuracy_drop == 0.0
    with pytest.raises(InputError, match="unknown pass 'shrink'"):
        pass_from_dict({"pass": "shrink"})
    with pytest.raises(InputError, match="unknown parameter 'sparsty'"):
        pass_from_dict({"pass": "prune_magnitude", "sparsty": 0.5})
    with pytest.raises(InputError, match="must be float, got str"):
        pass_from_dict({"pass": "prune_magnitude", "sparsity": "half"})
    with pytest.raises(InputError, match="expected one of"):
        pass_from_dict({"pass": "quantize", "mode": "int4"})
    with pytest.raises(InputError, match=r"sparsity must be in \[0, 1\)"):
        pass_from_dict({"pass": "prune_magnitude", "sparsity": 1.5})
    with pytest.raises(InputError, match="distill needs a student"):
        pass_from_dict({"pass": "distill"})


def test_recipe_file(tmp_path: Path) -> None:
    r = tmp_path / "r.toml"
    r.write_text(
        'name = "digits"\nversion = "2.0.0"\nformats = ["onnx"]\n'
        '[[steps]]\npass = "prune_magnitude"\nsparsity = 0.4\n'
        '[[steps]]\npass = "quantize"\nmode = "dynamic"\n'
    )
    cfg = load_recipe(r)
    assert cfg.name == "digits" and cfg.version == "2.0.0"
    assert [s.name for s in cfg.steps] == ["prune_magnitude"] and cfg.quantize.mode == "dynamic"
    r.write_text('nmae = "x"\n')
    with pytest.raises(InputError, match="unknown key"):
        load_recipe(r)
    r.write_text("[[steps]\n")
    with pytest.raises(InputError, match="not valid TOML"):
        load_recipe(r)


def test_refuses_pickled_torch_files(tmp_path: Path) -> None:
    from edgefleet.converters.backends import load_model

    p = tmp_path / "model.pth"
    p.write_bytes(pickle.dumps({"weights": [1, 2]}))
    with pytest.raises(InputError, match=r"pickled PyTorch file.*torch\.export"):
        load_model(p)


def test_bins_cover_everything_and_baseline_sums_to_one() -> None:
    assert bin_counts(np.array([-100.0, 0.0, 0.5, 1.0, 100.0]), [0.0, 1.0]).tolist() == [1, 2, 2]
    rng = np.random.default_rng(0)
    x = rng.random((50, 3, 4, 4)).astype(np.float32)
    y = rng.normal(size=(50, 5))
    base = compute_baseline(x, y, "NCHW")
    names = [f["name"] for f in base["inputs"]]
    assert names == ["channel_0_intensity", "channel_1_intensity", "channel_2_intensity", "brightness", "contrast"]
    for f in base["inputs"]:
        assert len(f["proportions"]) == len(f["edges"]) + 1
        assert abs(sum(f["proportions"]) - 1) < 1e-6
    assert base["outputs"]["apply_softmax"] is True
    assert abs(sum(base["outputs"]["predicted_class"]["proportions"]) - 1) < 1e-6


def test_the_gate_counts_samples_not_float_differences() -> None:
    from edgefleet.converters._gate import Budget

    b = Budget(ref=1.0, n=100, max_drop=0.02)
    assert 1.0 - 0.98 > 0.02  # what the old comparison tripped on
    assert b.allowed == 2 and b.lost(0.98) == 2 and not b.exceeded(0.98)
    assert b.exceeded(0.97) and b.lost(0.97) == 3
    b = Budget(ref=0.9718, n=497, max_drop=0.01)
    assert b.allowed == 4
    assert not Budget(ref=0.5, n=10).exceeded(0.0)  # no gate: nothing is exceeded
    assert Budget(ref=483 / 497, n=497, max_drop=0.0).exceeded(482 / 497)
    assert not Budget(ref=483 / 497, n=497, max_drop=0.0).exceeded(484 / 497)  # gaining is not losing


def test_padded_batches_feed_fixed_batch_files_real_rows_only() -> None:
    from edgefleet.converters._data import padded_batches, run_batched

    x = np.arange(7, dtype=np.float32)[:, None]
    got = list(padded_batches(x, 4))
    assert [len(b) for b, _ in got] == [4, 4] and [n for _, n in got] == [4, 3]
    assert got[1][0][:, 0].tolist() == [4.0, 5.0, 6.0, 4.0]  # padded with its own rows, never zeros
    calls = []

    def double(b: np.ndarray) -> np.ndarray:
        assert len(b) == 4
        calls.append(len(b))
        return b * 2

    np.testing.assert_array_equal(run_batched(double, x, 4), x * 2)
    assert calls == [4, 4]


def test_a_recipe_student_can_be_a_file_beside_the_recipe(tmp_path: Path) -> None:
    """A newcomer's own student model: `file.py:factory` relative to the recipe; a missing file or a name
    it lacks is one line naming it."""
    (tmp_path / "my_models.py").write_text(
        "import torch\n\nclass Tiny(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n\n    def forward(self, x):\n        return self.fc(x.flatten(1))\n"
    )
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "m"\n[[steps]]\npass = "distill"\nstudent = "my_models.py:Tiny"\n')
    cfg = load_recipe(recipe)
    assert type(cfg.steps[0].student).__name__ == "Tiny"
    # a file that uses dataclasses under postponed annotations, and imports a neighbour of its own
    (tmp_path / "helper.py").write_text("WIDTH = 10\n")
    (tmp_path / "dc_models.py").write_text(
        "from __future__ import annotations\nfrom dataclasses import dataclass\nimport torch\nimport helper\n\n"
        "@dataclass\nclass Spec:\n    width: int = helper.WIDTH\n\n"
        "def make():\n    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, Spec().width))\n"
    )
    recipe.write_text('name = "m"\n[[steps]]\npass = "distill"\nstudent = "dc_models.py:make"\n')
    assert type(load_recipe(recipe).steps[0].student).__name__ == "Sequential"
    (tmp_path / "broken.py").write_text("raise RuntimeError('no GPU here')\n")
    for spec, why in (("nope.py:Tiny", "does not exist"), ("my_models.py:Huge", "has no attribute 'Huge'"),
                      ("no_such_pkg.mod:X", "No module named 'no_such_pkg'"),
                      ("broken.py:X", "RuntimeError: no GPU here")):  # fmt: skip
        recipe.write_text(f'name = "m"\n[[steps]]\npass = "distill"\nstudent = "{spec}"\n')
        with pytest.raises(InputError, match=why):
            load_recipe(recipe)
