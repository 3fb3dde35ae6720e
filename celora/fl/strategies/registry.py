"""Name → strategy class. Each method file registers itself with ``@register_strategy``."""

from __future__ import annotations

from typing import TypeVar

from celora.config import AggregationConfig
from celora.errors import CeloraError
from celora.fl.strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}
S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    if cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} registered twice")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(name: str, cfg: AggregationConfig | None = None) -> Strategy:
    """Instantiate a registered strategy (CeloraError naming ``method`` if unknown)."""
    if name not in STRATEGIES:
        raise CeloraError(f"unknown method '{name}' (known: {', '.join(sorted(STRATEGIES))})")
    return STRATEGIES[name](cfg)
