"""Learned aggregation weights: simplex projection, similarity mixing, personalised averaging."""

import numpy as np
import pytest
from scipy.optimize import minimize

from celora.errors import CeloraError
from celora.fl.weights import combine, effective_collaborators, learned_weights, project_simplex


def _qp_projection(v: np.ndarray) -> np.ndarray:
    """Brute force: argmin_{w >= 0, sum w = 1} 1/2 ||w - v||^2 with SLSQP."""
    n = v.shape[0]
    res = minimize(
        lambda w: 0.5 * np.sum((w - v) ** 2),
        np.full(n, 1.0 / n),
        jac=lambda w: w - v,
        bounds=[(0.0, None)] * n,
        constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}],
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 500},
    )
    assert res.success
    return res.x


def test_project_simplex_matches_qp():
    rng = np.random.default_rng(0)
    for trial in range(12):
        n = [2, 3, 5, 8, 13, 20][trial % 6]
        v = rng.normal(scale=[0.3, 1.0, 3.0][trial % 3], size=n)
        w = project_simplex(v)
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(w, _qp_projection(v), atol=1e-6)


def test_project_simplex_rows_and_fixed_points():
    rng = np.random.default_rng(1)
    v = rng.normal(size=(7, 6))
    w = project_simplex(v)
    assert w.shape == v.shape
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    for row_in, row_out in zip(v, w, strict=True):
        np.testing.assert_allclose(project_simplex(row_in), row_out, atol=1e-15)
    on_simplex = rng.dirichlet(np.ones(6), size=5)
    on_simplex[0] = np.eye(6)[2]
    np.testing.assert_allclose(project_simplex(on_simplex), on_simplex, atol=1e-12)
    np.testing.assert_allclose(project_simplex(np.array([5.0, 5.0])), [0.5, 0.5])  # shift-invariant
    with pytest.raises(CeloraError, match="NaN"):
        project_simplex(np.array([1.0, np.nan]))


def test_learned_weights_fedavg_and_self_dominant():
    rng = np.random.default_rng(2)
    n = 6
    p = rng.integers(10, 100, size=n).astype(float)
    s_data, s_param = rng.uniform(size=(n, n)), rng.uniform(size=(n, n))
    w0 = learned_weights(p, s_data, s_param, beta=0.5, lam=0.0)
    np.testing.assert_allclose(w0, np.tile(p / p.sum(), (n, 1)), atol=1e-12)
    np.testing.assert_allclose(learned_weights(p, None, None, beta=0.5, lam=0.0), w0)

    s_self = np.eye(n) + 0.01 * rng.uniform(size=(n, n))
    w = learned_weights(p, s_self, None, beta=0.3, lam=100.0)
    np.testing.assert_allclose(w, np.eye(n), atol=1e-12)
    assert effective_collaborators(w) == pytest.approx(np.ones(n))

    w_mix = learned_weights(p, s_data, s_param, beta=0.25, lam=0.7)
    expected = project_simplex(p / p.sum() + 0.7 * (0.25 * s_data + 0.75 * s_param))
    np.testing.assert_allclose(w_mix, expected, atol=1e-14)
    np.testing.assert_allclose(w_mix.sum(axis=1), 1.0, atol=1e-12)
    # one similarity missing: the other is used alone, beta ignored
    np.testing.assert_allclose(
        learned_weights(p, None, s_param, beta=0.9, lam=0.7), project_simplex(p / p.sum() + 0.7 * s_param)
    )


def test_learned_weights_validation():
    p, s = np.ones(3), np.eye(3)
    with pytest.raises(CeloraError, match="aggregation.beta"):
        learned_weights(p, s, s, beta=1.5, lam=1.0)
    with pytest.raises(CeloraError, match="aggregation.lam"):
        learned_weights(p, s, s, beta=0.5, lam=-0.1)
    with pytest.raises(CeloraError, match="aggregation.s_param"):
        learned_weights(p, s, np.eye(4), beta=0.5, lam=1.0)
    with pytest.raises(CeloraError, match="aggregation.lam"):
        learned_weights(p, None, None, beta=0.5, lam=1.0)
    with pytest.raises(CeloraError, match="aggregation.p"):
        learned_weights(-p, s, s, beta=0.5, lam=1.0)


def test_combine_and_effective_collaborators():
    rng = np.random.default_rng(3)
    n = 5
    w = rng.dirichlet(np.ones(n), size=n)
    stacked = rng.normal(size=(n, 4, 3, 3)).astype(np.float32)
    out = combine(w, stacked)
    assert out.shape == stacked.shape and out.dtype == np.float32
    ref = np.stack([sum(w[i, j] * stacked[j].astype(np.float64) for j in range(n)) for i in range(n)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(effective_collaborators(np.full((n, n), 1.0 / n)), n)
    with pytest.raises(CeloraError, match="aggregation.weights"):
        combine(w, stacked[:3])
