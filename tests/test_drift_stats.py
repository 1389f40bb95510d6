"""Drift statistics on binned data, checked against scipy on the same bins (PSI, JS, chi-square
exactly; KS within the documented bin error of the statistic on the raw values)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon

from edgefleet import InputError
from edgefleet._drift import (
    _quantile_edges,
    bin_counts,
    chi2_goodness,
    chi2_sf,
    chi2_two_sample,
    js_distance,
    ks_binned,
    psi,
)

CASES = [(0.0, 1.0), (0.3, 1.0), (1.0, 1.5), (0.0, 0.5)]


def _binned(shift: float, scale: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.normal(0, 1, 5000)
    cur = rng.normal(shift, scale, 3000)
    edges = _quantile_edges(ref, 10)
    return ref, cur, bin_counts(ref, edges), bin_counts(cur, edges)


@pytest.mark.parametrize(("shift", "scale"), CASES)
def test_psi_and_js_exact(shift: float, scale: float) -> None:
    _, _, rc, cc = _binned(shift, scale)
    r, c = rc / rc.sum(), cc / cc.sum()
    rr, ccl = np.maximum(r, 1e-4), np.maximum(c, 1e-4)
    assert psi(rc, cc) == pytest.approx(float(np.sum((ccl - rr) * np.log(ccl / rr))), rel=1e-12)
    # PSI is the symmetrised KL divergence: scipy's entropy gives both halves
    assert psi(rc, cc) == pytest.approx(float(stats.entropy(ccl, rr) + stats.entropy(rr, ccl)), rel=1e-9)
    assert js_distance(rc, cc) == pytest.approx(float(jensenshannon(r, c, base=2)), abs=1e-12)


@pytest.mark.parametrize(("shift", "scale"), CASES)
def test_ks_within_bin_error_of_raw_ks(shift: float, scale: float) -> None:
    ref, cur, rc, cc = _binned(shift, scale)
    raw = stats.ks_2samp(ref, cur).statistic
    binned = ks_binned(rc, cc)
    bin_error = max((rc / rc.sum()).max(), (cc / cc.sum()).max())
    assert binned <= raw + 1e-12
    assert raw - binned <= bin_error


@pytest.mark.parametrize(("shift", "scale"), CASES)
def test_chi_square_exact(shift: float, scale: float) -> None:
    _, _, rc, cc = _binned(shift, scale)
    stat, p = chi2_goodness(rc / rc.sum(), cc)
    ref = stats.chisquare(cc, f_exp=rc / rc.sum() * cc.sum())
    assert stat == pytest.approx(ref.statistic, rel=1e-10)
    assert p == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-300)
    stat2, p2 = chi2_two_sample(rc, cc)
    ref2 = stats.chi2_contingency(np.vstack([rc, cc]), correction=False)
    assert stat2 == pytest.approx(ref2.statistic, rel=1e-10)
    assert p2 == pytest.approx(ref2.pvalue, rel=1e-8, abs=1e-300)


@pytest.mark.parametrize("dof", [1, 2, 5, 9, 30, 99])
@pytest.mark.parametrize("x", [0.01, 0.5, 3.0, 9.0, 40.0, 150.0])
def test_chi2_survival_function(dof: int, x: float) -> None:
    assert chi2_sf(x, dof) == pytest.approx(float(stats.chi2.sf(x, dof)), rel=1e-9, abs=1e-300)


def test_no_drift_is_small_and_drift_is_large() -> None:
    _, _, rc, same = _binned(0.0, 1.0, seed=0)
    _, _, _, moved = _binned(1.0, 1.0, seed=0)
    assert psi(rc, same) < 0.02 and psi(rc, moved) > 0.25
    assert chi2_goodness(rc / rc.sum(), same)[1] > 0.01 and chi2_goodness(rc / rc.sum(), moved)[1] < 1e-6


def test_bad_input() -> None:
    with pytest.raises(InputError, match="same bins"):
        psi([0.5, 0.5], [1, 2, 3])
    with pytest.raises(InputError, match="non-negative"):
        js_distance([0.5, -0.5], [1, 1])


def test_output_features_match_the_full_softmax() -> None:
    """Class and confidence come from the logits without a probability matrix: same as softmax, then max."""
    from edgefleet._drift import output_features

    rng = np.random.default_rng(3)
    for dtype in (np.float32, np.float64):
        for scale in (0.1, 3.0, 40.0):
            y = (rng.standard_normal((300, 1000)) * scale).astype(dtype)
            z = y.astype(np.float64) - y.max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            cls, conf = output_features(y, logits=True)
            assert np.array_equal(cls, p.argmax(axis=1)) and conf.dtype == np.float64
            assert np.allclose(conf, p.max(axis=1), rtol=1e-6, atol=0)
    probs = rng.dirichlet(np.ones(10), 50)
    cls, conf = output_features(probs, logits=False)
    assert np.array_equal(cls, probs.argmax(axis=1)) and np.array_equal(conf, probs.max(axis=1))
