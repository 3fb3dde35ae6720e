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

from celora.adapters.inject import HEAD
from celora.config import AggregationConfig
from celora.tensors import Tensors, weighted_mean


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

    def state_dict(self) -> dict[str, Any]:
        """What the strategy carries from round to round (checkpointed): its diagnostics by default."""
        return {"diagnostics": dict(self.diagnostics)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s content (resume)."""
        self.diagnostics = dict(state.get("diagnostics", {}))


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
