"""`ffa` (FFA-LoRA): A frozen at its shared random init, only B trains and travels; B̄ = Σ_j p_j B_j.

With A fixed and identical on every client, averaging B is exact: mean_j (A B_j) = A · mean_j B_j.
"""

from __future__ import annotations

from celora.fl.strategies.base import FedAvgStrategy
from celora.fl.strategies.registry import register_strategy


@register_strategy
class FFALoRA(FedAvgStrategy):
    name = "ffa"
    trains = frozenset({"B"})
    shares = frozenset({"B"})
    default_head = "shared"
    description = "FFA-LoRA: A frozen, B trained and averaged"
