"""Learned aggregation weights: each client's row of weights is a simplex projection of its similarities.

For client i: ``w_i = argmin_{w in simplex} 1/2 ||w - p||^2 - lam sum_j w_j s_ij = Proj_simplex(p + lam s_i)`` with
``s_ij = beta S^data_ij + (1 - beta) S^param_ij`` and ``p_j = n_j / sum n``; ``lam = 0`` is FedAvg. The personalised
aggregate is ``C̄_i = sum_j w_ij C_j``.
"""

from __future__ import annotations

import math

import numpy as np

from celora.errors import CeloraError


def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto ``{w >= 0, sum w = 1}`` of a vector or of each row of a 2-D array.

    Sort-based (Held et al. 1974; Duchi et al. 2008): with ``u`` sorted decreasingly, ``rho = max{k : u_k >
    (sum_{r<=k} u_r - 1) / k}``, ``theta = (sum_{r<=rho} u_r - 1) / rho`` and ``w = max(v - theta, 0)``.
    """
    x = np.asarray(v, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[-1] == 0:
        raise CeloraError(f"aggregation.weights: expected a non-empty vector or 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CeloraError("aggregation.weights: input contains NaN or inf")
    rows = x.reshape(-1, x.shape[-1])
    u = -np.sort(-rows, axis=1)
    css = np.cumsum(u, axis=1) - 1.0
    k = np.arange(1, rows.shape[1] + 1, dtype=np.float64)
    cond = u - css / k > 0  # true for a prefix of k = 1..rho (k = 1 always holds)
    rho = cond.sum(axis=1)
    theta = css[np.arange(rows.shape[0]), rho - 1] / rho
    out = np.maximum(rows - theta[:, None], 0.0)
    return out.reshape(x.shape)


def learned_weights(
    p: np.ndarray,
    s_data: np.ndarray | None,
    s_param: np.ndarray | None,
    *,
    beta: float,
    lam: float,
) -> np.ndarray:
    """Rows ``w_i = Proj_simplex(p + lam (beta S^data_i + (1 - beta) S^param_i))``, (N, N).

    ``p`` (N,) is renormalised to sum 1. If one similarity is ``None`` the other is used alone (beta ignored);
    with both ``None`` only ``lam == 0`` (FedAvg: every row equals p) is allowed.
    """
    if not (math.isfinite(beta) and 0.0 <= beta <= 1.0):
        raise CeloraError(f"aggregation.beta must be in [0, 1], got {beta}")
    if not (math.isfinite(lam) and lam >= 0.0):
        raise CeloraError(f"aggregation.lam must be >= 0, got {lam}")
    pv = np.asarray(p, dtype=np.float64)
    if pv.ndim != 1 or pv.shape[0] == 0:
        raise CeloraError(f"aggregation.p must be a non-empty vector, got shape {pv.shape}")
    if not np.isfinite(pv).all() or (pv < 0).any() or pv.sum() <= 0:
        raise CeloraError("aggregation.p must be finite, >= 0, with a positive sum")
    pv = pv / pv.sum()
    n = pv.shape[0]

    def _check(s: np.ndarray | None, name: str) -> np.ndarray | None:
        if s is None:
            return None
        arr = np.asarray(s, dtype=np.float64)
        if arr.shape != (n, n):
            raise CeloraError(f"aggregation.{name}: expected shape ({n}, {n}), got {arr.shape}")
        if not np.isfinite(arr).all():
            raise CeloraError(f"aggregation.{name}: contains NaN or inf")
        return arr

    sd, sp = _check(s_data, "s_data"), _check(s_param, "s_param")
    if sd is not None and sp is not None:
        s = beta * sd + (1.0 - beta) * sp
    elif sd is not None:
        s = sd
    elif sp is not None:
        s = sp
    elif lam == 0.0:
        s = np.zeros((n, n))
    else:
        raise CeloraError("aggregation.lam > 0 needs a similarity (s_data or s_param)")
    return project_simplex(pv[None, :] + lam * s)


def combine(weights: np.ndarray, stacked: np.ndarray) -> np.ndarray:
    """``out_i = sum_j w_ij X_j`` for weights (N, N) and stacked (N, ...) -> (N, ...), in the dtype of ``stacked``."""
    w = np.asarray(weights)
    x = np.asarray(stacked)
    if w.ndim != 2 or x.ndim < 1 or w.shape[1] != x.shape[0]:
        raise CeloraError(f"aggregation.weights: shape {w.shape} does not match stacked {x.shape}")
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
    flat = x.reshape(x.shape[0], -1).astype(dtype, copy=False)
    return (w.astype(dtype, copy=False) @ flat).reshape((w.shape[0],) + x.shape[1:])


def effective_collaborators(weights: np.ndarray) -> np.ndarray:
    """Per row ``1 / sum_j w_ij^2`` (1 = local only, N = uniform average)."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise CeloraError(f"aggregation.weights: expected a 2-D array, got shape {w.shape}")
    return 1.0 / np.sum(w * w, axis=1)
