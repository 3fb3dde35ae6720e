"""`fedit` (FedIT): plain LoRA (C frozen at I), A and B travel and are averaged (FedAvg).

A̅ = Σ_j p_j A_j, B̅ = Σ_j p_j B_j; the head is shared too by default.
"""

from __future__ import annotations

from celora.fl.strategies.base import FedAvgStrategy
from celora.fl.strategies.registry import register_strategy


@register_strategy
class FedIT(FedAvgStrategy):
    name = "fedit"
    trains = frozenset({"A", "B"})
    shares = frozenset({"A", "B"})
    default_head = "shared"
    description = "LoRA (A, B) trained and averaged with FedAvg"
