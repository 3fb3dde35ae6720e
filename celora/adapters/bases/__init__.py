"""Adapter bases, one file each behind a registry (``get_basis(name)``): how A, B, C start and whether
A, B stay frozen and shared (then only C travels and averaging C is exact)."""

from celora.adapters.bases import gradient, orthogonal, random, svd  # noqa: F401  (registration)
from celora.adapters.bases.base import BASES, AdapterBasis, get_basis, register_basis
from celora.adapters.bases.gradient import apply_gradient_basis, sum_weight_gradients

__all__ = ["BASES", "AdapterBasis", "apply_gradient_basis", "get_basis", "register_basis", "sum_weight_gradients"]
