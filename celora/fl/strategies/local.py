"""`local`: every client trains its own adapter (A, B, C) and head; nothing travels."""

from __future__ import annotations

from collections.abc import Mapping

from celora.fl.strategies.base import RoundContext, Strategy, Tensors
from celora.fl.strategies.registry import register_strategy


@register_strategy
class Local(Strategy):
    name = "local"
    trains = frozenset({"A", "B", "C"})
    shares = frozenset()
    default_head = "local"
    hyperparameters = frozenset()  # nothing travels: no head policy, no aggregation
    description = "local training only, no communication (floor)"

    def aggregate(self, ctx: RoundContext, updates: Mapping[int, Tensors]) -> dict[int, Tensors]:
        return {}
