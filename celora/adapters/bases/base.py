"""The basis interface: how a tri-matrix layer's A, B, C start, and whether A, B stay frozen.

A basis never trains anything itself: it writes A (in×r), C (r×r) and B (r×out) of one layer from a
per-module seed, so that every client that uses the same seed holds the same A and B.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar, TypeVar

from celora.registry import Registry

if TYPE_CHECKING:
    from celora.adapters.trilora import TriLoraLinear


class AdapterBasis(ABC):
    """One way to initialise A, B, C. Subclasses set the class attributes and implement ``init_layer``."""

    name: ClassVar[str]
    frozen: ClassVar[bool] = False  # A, B frozen and identical on every client: only C (+ head) train
    c_starts_zero: ClassVar[bool] = False  # C₀ = 0: a method that freezes C would leave the adapter off
    multi_head: ClassVar[bool] = False  # supports heads > 1 (independent blocks with a trainable scale each)
    description: ClassVar[str] = ""

    @abstractmethod
    def init_layer(self, layer: TriLoraLinear, *, seed: int, init: str) -> None:
        """Write ``layer.lora_A``, ``lora_C``, ``lora_B`` from ``seed`` (called under ``torch.no_grad``)."""


BASES: Registry[AdapterBasis] = Registry("basis", "model.basis")
B = TypeVar("B", bound=type[AdapterBasis])


def register_basis(cls: B) -> B:
    """Class decorator: make an instance of ``cls`` available under ``cls.name`` (a name registered twice is an
    error)."""
    BASES.add(cls.name, cls())
    return cls


def get_basis(name: str) -> AdapterBasis:
    """The registered basis ``name`` (CeloraError naming ``model.basis`` if unknown)."""
    return BASES.lookup(name)
