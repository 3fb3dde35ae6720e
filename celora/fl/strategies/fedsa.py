"""`fedsa` (FedSA-LoRA): A and B train; only A travels and is averaged (Ā = Σ_j p_j A_j); B stays local."""

from __future__ import annotations

from celora.fl.strategies.base import FedAvgStrategy
from celora.fl.strategies.registry import register_strategy


@register_strategy
class FedSALoRA(FedAvgStrategy):
    name = "fedsa"
    trains = frozenset({"A", "B"})
    shares = frozenset({"A"})
    default_head = "local"
    description = "FedSA-LoRA: A shared (averaged), B local"
