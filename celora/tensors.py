"""Named tensors (``dict[str, Tensor]``) and the one weighted mean every layer uses (FedAvg, set-up statistics)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TypeVar

import torch

Tensors = dict[str, torch.Tensor]
K = TypeVar("K", bound=Hashable)


def weighted_mean(
    parts: Mapping[K, Mapping[str, torch.Tensor]], weights: Mapping[K, float], dtype: torch.dtype = torch.float32
) -> Tensors:
    """x̄ = Σ_j w_j x_j / Σ_j w_j per tensor name (computed in float64, returned as ``dtype``)."""
    ids = list(parts)
    names = list(parts[ids[0]])
    device = parts[ids[0]][names[0]].device
    w = torch.tensor([float(weights[i]) for i in ids], dtype=torch.float64, device=device)
    w = w / w.sum()
    return {
        n: torch.einsum("j,j...->...", w, torch.stack([parts[i][n].double() for i in ids])).to(dtype) for n in names
    }
