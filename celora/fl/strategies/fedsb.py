"""`fedsb` (Fed-SB style): A, B frozen from the truncated SVD of W0 (LoRA-SB/LoRA-XS basis), only C
trains and travels; C̄ = Σ_j p_j C_j.

Aggregation is exact: with A, B shared and frozen, Σ_j p_j (A C_j B) = A (Σ_j p_j C_j) B.
"""

from __future__ import annotations

from celora.fl.strategies.base import FedAvgStrategy
from celora.fl.strategies.registry import register_strategy


@register_strategy
class FedSB(FedAvgStrategy):
    name = "fedsb"
    trains = frozenset({"C"})
    shares = frozenset({"C"})
    default_head = "local"
    basis = "svd"
    description = "Fed-SB: SVD basis A, B frozen; C trained and averaged (exact)"
