"""`centralized` (upper reference): one LoRA (A, B, head) trained on the pooled training data of all
clients, evaluated on every client's test split. Nothing travels (it is not a federated method)."""

from __future__ import annotations

from collections.abc import Mapping

from celora.fl.strategies.base import RoundContext, Strategy, Tensors
from celora.fl.strategies.registry import register_strategy


@register_strategy
class Centralized(Strategy):
    name = "centralized"
    trains = frozenset({"A", "B"})
    shares = frozenset()
    default_head = "local"
    hyperparameters = frozenset()  # nothing travels: no head policy, no aggregation
    pooled = True
    description = "pooled data, one LoRA model (ceiling)"

    def aggregate(self, ctx: RoundContext, updates: Mapping[int, Tensors]) -> dict[int, Tensors]:
        return {}
