"""The strategy interface: which factors train and travel, and how the server combines them.

Strategies never touch models: they receive and return named tensors, so the same objects serve
the in-process engine and Flower.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from celora.adapters.inject import HEAD
from celora.config import AggregationConfig

Tensors = dict[str, torch.Tensor]


@dataclass
class RoundContext:
    """What the server knows when it aggregates round ``rnd``."""

    rnd: int
    num_clients: int
    n_train: np.ndarray  # training-set size of every client (index = client id)
    sent: Mapping[int, Tensors] = field(default_factory=dict)  # what each participant last received


class Strategy(ABC):
    """A federated method. Subclasses set the class attributes and implement ``aggregate``."""

    name: ClassVar[str]
    trains: ClassVar[frozenset[str]]  # factors a client trains: subset of {"A", "B", "C"}
    shares: ClassVar[frozenset[str]]  # adapter factors that travel (the head is added by policy)
    default_head: ClassVar[str] = "local"
    uses_data_summaries: ClassVar[bool] = False
    basis: ClassVar[str | None] = None  # an adapter basis the method requires (e.g. "svd"), else the config's
    pooled: ClassVar[bool] = False  # trains one model on the union of the clients' data (centralized reference)
    description: ClassVar[str] = ""
    # config keys (dotted) this method reads; a key some other method reads but this one does not gets a warning
    hyperparameters: ClassVar[frozenset[str]] = frozenset({"aggregation.head"})

    def __init__(self, cfg: AggregationConfig | None = None) -> None:
        self.cfg = cfg or AggregationConfig()
        self.head = self.cfg.head or self.default_head
        self.diagnostics: dict[str, Any] = {}

    @property
    def trained_factors(self) -> frozenset[str]:
        return self.trains | {HEAD}

    @property
    def shared_factors(self) -> frozenset[str]:
        return self.shares | ({HEAD} if self.head == "shared" and self.shares else frozenset())

    def setup(self, n_train: np.ndarray, data_summaries: Sequence[Any] | None = None) -> None:
        """Called once before round 1 (data summaries only for methods that use them)."""
        return None

    @abstractmethod
    def aggregate(self, ctx: RoundContext, updates: Mapping[int, Tensors]) -> dict[int, Tensors]:
        """Combine the participants' uploads; return the new message for each client it addresses."""


def weighted_mean(updates: Mapping[int, Tensors], weights: Mapping[int, float]) -> Tensors:
    """x̄ = Σ_j w_j x_j / Σ_j w_j per tensor name."""
    ids = list(updates)
    w = torch.tensor([float(weights[i]) for i in ids], dtype=torch.float64)
    w = w / w.sum()
    names = list(updates[ids[0]])
    return {
        n: torch.einsum("j,j...->...", w, torch.stack([updates[i][n].double() for i in ids])).float() for n in names
    }


class FedAvgStrategy(Strategy, ABC):
    """Sample-weighted mean of what travels, sent to every client (a global model)."""

    def aggregate(self, ctx: RoundContext, updates: Mapping[int, Tensors]) -> dict[int, Tensors]:
        if not updates:
            return {}
        mean = weighted_mean(updates, {i: float(ctx.n_train[i]) for i in updates})
        ids = sorted(updates)
        p = ctx.n_train[ids].astype(float) / ctx.n_train[ids].sum()
        weights = np.zeros((ctx.num_clients, ctx.num_clients))
        weights[np.ix_(ids, ids)] = np.broadcast_to(p, (len(ids), len(ids)))
        eff = 1.0 / float((p**2).sum())
        self.diagnostics.update(weights=weights, participants=ids, effective_collaborators=dict.fromkeys(ids, eff))
        return {i: mean for i in range(ctx.num_clients)}
