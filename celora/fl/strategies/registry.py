"""Name → strategy class. Each method file registers itself with ``@register_strategy``."""

from __future__ import annotations

from typing import TypeVar

from celora.config import AggregationConfig, ExperimentConfig
from celora.fl.strategies.base import Strategy
from celora.registry import Registry

STRATEGIES: Registry[type[Strategy]] = Registry("strategy", "method")
S = TypeVar("S", bound=type[Strategy])


def register_strategy(cls: S) -> S:
    """Class decorator: make ``cls`` available under ``cls.name`` (a name registered twice is an error)."""
    STRATEGIES.add(cls.name, cls)
    return cls


def get_strategy(name: str, cfg: AggregationConfig | None = None) -> Strategy:
    """Instantiate a registered strategy (CeloraError naming ``method`` if unknown)."""
    return STRATEGIES.lookup(name)(cfg)


def key_users() -> dict[str, list[str]]:
    """Method-specific config key → the registered methods that read it (e.g. aggregation.lam → [celora])."""
    users: dict[str, list[str]] = {}
    for name in sorted(STRATEGIES):
        for key in STRATEGIES[name].hyperparameters:
            users.setdefault(key, []).append(name)
    return users


def unused_keys(cfg: ExperimentConfig, methods: list[str] | None = None) -> list[str]:
    """One warning line per method-specific key the config sets but its method (and warm-up method) ignores;
    with ``methods`` (a comparison), the keys none of them reads."""
    names = methods or [cfg.method]
    used = set().union(*(get_strategy(m).hyperparameters for m in names))
    if cfg.aggregation.warmup_rounds:
        used |= get_strategy(cfg.aggregation.warmup_method).hyperparameters
    what = ("methods " if len(names) > 1 else "method ") + ", ".join(names)
    what += f" (warm-up {cfg.aggregation.warmup_method})" if cfg.aggregation.warmup_rounds else ""
    out = []
    for key, users in sorted(key_users().items()):
        section, leaf = key.split(".")
        if key not in used and leaf in getattr(cfg, section).model_fields_set:
            verb = "do not use" if len(names) > 1 else "does not use"
            out.append(f"{key} is set but {what} {verb} it (used by: {', '.join(users)})")
    return out
