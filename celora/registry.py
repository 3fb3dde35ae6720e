"""One registry for every named plug-in (methods, models, datasets, partitioners, tasks, bases, attacks).

A ``Registry`` is a ``dict`` from name to object that refuses to register a name twice, and whose
``lookup`` fails with one line naming the config key and the known names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from celora.errors import CeloraError

T = TypeVar("T")


class Registry(dict[str, T], Generic[T]):
    """Name → object. ``kind`` names what is registered ("dataset"), ``key`` the config key that picks it."""

    def __init__(self, kind: str, key: str) -> None:
        super().__init__()
        self.kind = kind
        self.key = key

    def __setitem__(self, name: str, value: T) -> None:
        if name in self:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        super().__setitem__(name, value)

    def update(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise TypeError(f"register each {self.kind} by name (Registry.add), not with update()")

    def add(self, name: str, value: T) -> T:
        """Register ``value`` under ``name`` (ValueError if the name is taken); return it."""
        self[name] = value
        return value

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@REGISTRY.decorator("name")`` registers the decorated object."""

        def deco(value: T) -> T:
            return self.add(name, value)

        return deco

    def lookup(self, name: str) -> T:
        """The object registered as ``name``; CeloraError naming the config key and the known names otherwise."""
        if name not in self:
            raise CeloraError(f"unknown {self.key} '{name}' (known: {', '.join(sorted(self))})")
        return self[name]
