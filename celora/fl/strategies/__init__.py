"""Federated methods, one file each, behind a registry (``get_strategy(name)``)."""

from celora.fl.strategies import (  # noqa: F401  (registration)
    celora,
    celora_global,
    centralized,
    fedit,
    fedsa,
    fedsb,
    ffa,
    local,
)
from celora.fl.strategies.base import RoundContext, Strategy, Tensors
from celora.fl.strategies.registry import STRATEGIES, get_strategy, key_users, register_strategy, unused_keys

__all__ = [
    "STRATEGIES",
    "RoundContext",
    "Strategy",
    "Tensors",
    "get_strategy",
    "key_users",
    "register_strategy",
    "unused_keys",
]
