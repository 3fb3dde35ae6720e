"""Federated methods, one file each, behind a registry (``get_strategy(name)``)."""

from celora.fl.strategies import celora, celora_global, fedit, local  # noqa: F401  (registration)
from celora.fl.strategies.base import RoundContext, Strategy, Tensors
from celora.fl.strategies.registry import STRATEGIES, get_strategy, register_strategy

__all__ = ["STRATEGIES", "RoundContext", "Strategy", "Tensors", "get_strategy", "register_strategy"]
