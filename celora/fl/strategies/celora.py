"""`celora` (default): A, B, C train on the client; C and (by default) the head travel; each gets its own C̄_i.

s_ij = β S^data_ij + (1 − β) S^param_ij,  w_i = Proj_simplex(p + λ s_i),  C̄_i = Σ_{j∈S_t} w_ij C_j.
S^data comes once from the clients' per-class GMM summaries (hierarchical OT), S^param every round
from the cosine of the C updates u_j = C_j − C_j^{sent}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from celora.fl.similarity import ClientSummary, data_distance_matrix, data_similarity, param_similarity
from celora.fl.strategies.base import RoundContext, Strategy, Tensors
from celora.fl.strategies.registry import register_strategy
from celora.fl.weights import combine, effective_collaborators, learned_weights


def _flatten(tensors: Tensors, names: Sequence[str]) -> np.ndarray:
    return torch.cat([tensors[n].reshape(-1).double() for n in names]).numpy()


@register_strategy
class Celora(Strategy):
    name = "celora"
    trains = frozenset({"A", "B", "C"})
    shares = frozenset({"C"})
    default_head = "shared"  # measured (issue 5): the personalized head carries the gain; C alone does not
    uses_data_summaries = True
    hyperparameters = frozenset(
        {
            "aggregation.head",
            "aggregation.beta",
            "aggregation.lam",
            "aggregation.distance_method",
            "privacy.summary_epsilon",
            "privacy.summary_delta",
            "privacy.summary_clip",
        }
    )
    description = "A, B, C train; C and the head travel (head local: C only); personalized by data+param similarity"

    s_data: np.ndarray | None = None

    def setup(self, n_train: np.ndarray, data_summaries: Sequence[Any] | None = None) -> None:
        """S^data_ij = exp(−D_ij / median_{i≠j} D) from the clients' summaries (None: parameter space only)."""
        if data_summaries is None or self.cfg.beta == 0.0:
            self.s_data = None
            return
        summaries: list[ClientSummary] = list(data_summaries)
        distance = data_distance_matrix(summaries, method=self.cfg.distance_method)
        self.s_data = data_similarity(distance)
        self.diagnostics["distance_data"] = distance
        self.diagnostics["similarity_data"] = self.s_data

    def state_dict(self) -> dict[str, Any]:
        """Diagnostics (last w_ij, similarities) and S^data, computed once at setup."""
        return {**super().state_dict(), "s_data": self.s_data}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.s_data = state.get("s_data")

    def aggregate(self, ctx: RoundContext, updates: Mapping[int, Tensors]) -> dict[int, Tensors]:
        ids = sorted(updates)
        if not ids:
            return {}
        names = list(updates[ids[0]])
        x = np.stack([_flatten(updates[i], names) for i in ids])
        start = np.stack([_flatten(ctx.sent[i], names) if i in ctx.sent else x[k] for k, i in enumerate(ids)])
        s_param = param_similarity(x - start)
        s_data = self.s_data[np.ix_(ids, ids)] if self.s_data is not None else None
        p = ctx.n_train[ids].astype(float)
        beta = self.cfg.beta if s_data is not None else 0.0
        w = learned_weights(p, s_data, s_param, beta=beta, lam=self.cfg.lam)
        mixed = combine(w, x)
        full = np.zeros((ctx.num_clients, ctx.num_clients))
        full[np.ix_(ids, ids)] = w
        self.diagnostics.update(
            weights=full,
            similarity_param=s_param,
            participants=ids,
            effective_collaborators={int(i): float(e) for i, e in zip(ids, effective_collaborators(w), strict=True)},
        )
        out: dict[int, Tensors] = {}
        shapes = [updates[ids[0]][n].shape for n in names]
        for k, i in enumerate(ids):
            vec = torch.from_numpy(mixed[k]).float()
            parts, pos = {}, 0
            for n, shape in zip(names, shapes, strict=True):
                size = int(np.prod(shape))
                parts[n] = vec[pos : pos + size].reshape(shape).clone()
                pos += size
            out[i] = parts
        return out
