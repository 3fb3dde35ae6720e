"""Results per mixture component, and whether the learned weights find the clients worth pooling.

For a task mixture (``[[data.mixture]]``) every client holds one component k(i). Per round:

- per component: the mean of the primary metric over its clients (local step and after aggregation);
- same-component share of client i's weights, s_i = Σ_{j ∈ S_t, k(j) = k(i)} w_ij, against FedAvg's share
  f_i = Σ_{j ∈ S_t, k(j) = k(i)} n_j / Σ_{j ∈ S_t} n_j, for the weights the method used and for the weights
  from S^data alone (β = 1) and from S^param alone (β = 0), w_i = Proj_simplex(p + λ s_i). A method whose
  share exceeds FedAvg's pools more with its own component than sample-weighted averaging does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from celora.fl.weights import learned_weights


def component_means(clients: Sequence[dict[str, Any]], components: Sequence[str], primary: str) -> dict[str, Any]:
    """{component: {<primary>_mean, <primary>_mean_agg, clients}} over a round row's ``clients`` entries."""
    out: dict[str, Any] = {}
    for comp in dict.fromkeys(components):
        mine = [c for c, k in zip(clients, components, strict=True) if k == comp]
        vals = np.array([c[primary] for c in mine], dtype=float)
        agg = np.array([c[f"{primary}_agg"] for c in mine], dtype=float)
        out[comp] = {
            f"{primary}_mean": float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"),
            f"{primary}_mean_agg": float(np.nanmean(agg)) if np.isfinite(agg).any() else float("nan"),
            "clients": [int(c["id"]) for c in mine],
        }
    return out


def same_component_share(w: np.ndarray, components: Sequence[str]) -> float:
    """Mean over rows i of Σ_{j: k(j) = k(i)} w_ij (``w``: participants × participants, ``components`` theirs)."""
    k = np.asarray(components, dtype=object)
    same = k[:, None] == k[None, :]
    return float((np.asarray(w, dtype=float) * same).sum(1).mean())


def weight_shares(
    diag: dict[str, Any], components: Sequence[str], n_train: np.ndarray, *, lam: float
) -> dict[str, float]:
    """The round's same-component shares: of the weights used, from S^data alone, from S^param alone, and FedAvg's
    (empty when the strategy reports no weights)."""
    ids = diag.get("participants")
    if ids is None or "weights" not in diag or len(ids) < 2:
        return {}
    ids = list(ids)
    comp = [components[i] for i in ids]
    p = n_train[ids].astype(float)
    out = {
        "same_component_share": same_component_share(np.asarray(diag["weights"])[np.ix_(ids, ids)], comp),
        "fedavg_same_component_share": same_component_share(np.tile(p / p.sum(), (len(ids), 1)), comp),
    }
    s_data, s_param = diag.get("similarity_data"), diag.get("similarity_param")
    if s_data is not None:
        sd = np.asarray(s_data)[np.ix_(ids, ids)]
        out["same_component_share_data"] = same_component_share(learned_weights(p, sd, None, beta=1.0, lam=lam), comp)
    if s_param is not None:
        w = learned_weights(p, None, np.asarray(s_param), beta=0.0, lam=lam)
        out["same_component_share_param"] = same_component_share(w, comp)
    return out
