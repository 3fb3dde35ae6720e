"""`celora-global`: tri-matrix adapters; C and (by default) the head travel; everyone gets the weighted mean.

C̄ = Σ_j p_j C_j with p_j = n_j / Σ_{k∈S_t} n_k.
"""

from __future__ import annotations

from celora.fl.strategies.base import FedAvgStrategy
from celora.fl.strategies.registry import register_strategy


@register_strategy
class CeloraGlobal(FedAvgStrategy):
    name = "celora-global"
    trains = frozenset({"A", "B", "C"})
    shares = frozenset({"C"})
    default_head = "shared"  # measured (issue 5): the personalized head carries the gain; C alone does not
    description = "A, B, C train; C and the head travel (head local: C only); sample-weighted mean (ablation)"
