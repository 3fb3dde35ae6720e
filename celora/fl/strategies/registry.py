"""Name → strategy class. Each method file registers itself with ``@register_strategy``."""

from __future__ import annotations

from typing import TypeVar

from celora.config import AggregationConfig, ExperimentConfig
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


def key_users() -> dict[str, list[str]]:
    """Method-specific config key → the registered methods that read it (e.g. aggregation.lam → [celora])."""
    users: dict[str, list[str]] = {}
    for name in sorted(STRATEGIES):
        for key in STRATEGIES[name].hyperparameters:
            users.setdefault(key, []).append(name)
    return users


def unused_keys(cfg: ExperimentConfig) -> list[str]:
    """One warning line per method-specific key the config sets but its method (and warm-up method) ignores."""
    used = set(get_strategy(cfg.method).hyperparameters)
    if cfg.aggregation.warmup_rounds:
        used |= get_strategy(cfg.aggregation.warmup_method).hyperparameters
    methods = cfg.method + (f" (warm-up {cfg.aggregation.warmup_method})" if cfg.aggregation.warmup_rounds else "")
    out = []
    for key, names in sorted(key_users().items()):
        section, leaf = key.split(".")
        if key not in used and leaf in getattr(cfg, section).model_fields_set:
            out.append(f"{key} is set but method {methods} does not use it (used by: {', '.join(names)})")
    return out
