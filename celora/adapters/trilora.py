"""The tri-matrix LoRA layer: y = x W0ᵀ + b + s · ((dropout(x) A) diag(s_h) C) B, with s = α / r.

A: in×r, C: r×r (dense), B: r×out. Plain LoRA is this layer with C frozen at I. s_h (per-head scales,
one per rank entry) exists only with ``heads > 1`` and is folded into C before anything travels.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch
from torch import nn

from celora.adapters.bases import get_basis

Init = Literal["kaiming", "paper"]
Basis = str  # a name registered in celora.adapters.bases (random, svd, orthogonal, gradient)

FACTORS = ("A", "B", "C")


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that depends only on the shared seed and the module name (not on order)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


class TriLoraLinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` W0 with the adapter ΔW = s · (A C B)ᵀ."""

    def __init__(
        self,
        base: nn.Linear,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: Init = "kaiming",
        basis: Basis = "random",
        seed: int = 0,
        heads: int = 1,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be >= 1")
        if heads < 1 or rank % heads:
            raise ValueError(f"heads ({heads}) must divide rank ({rank})")
        if heads > 1 and not get_basis(basis).multi_head:
            raise ValueError(f"heads > 1 needs a multi-head basis (orthogonal), not '{basis}'")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scaling = self.alpha / rank
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_f, out_f = base.in_features, base.out_features
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(in_f, rank, device=dev))
        self.lora_C = nn.Parameter(torch.eye(rank, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(rank, out_f, device=dev))
        self.heads = heads
        # heads > 1: a trainable scale per head and a block-diagonal C (off-block gradients masked)
        self.lora_S: nn.Parameter | None = None
        if heads > 1:
            self.lora_S = nn.Parameter(torch.ones(heads, device=dev))
            k = rank // heads
            mask = torch.block_diag(*[torch.ones(k, k) for _ in range(heads)]).to(dev)
            self.lora_C.register_hook(lambda g: g * mask.to(g))
        self.reset_adapter(init=init, basis=basis, seed=seed)

    @torch.no_grad()
    def reset_adapter(self, *, init: Init, basis: Basis, seed: int) -> None:
        """Initialise A, B, C from ``seed`` with the registered basis (``celora.adapters.bases``), so that
        every client gets the same basis; head scales start at 1."""
        get_basis(basis).init_layer(self, seed=seed, init=init)
        if self.lora_S is not None:
            self.lora_S.fill_(1.0)

    def head_scale(self) -> torch.Tensor | None:
        """The per-head scales expanded to one per rank (r,), or None with a single head."""
        if self.lora_S is None:
            return None
        return self.lora_S.repeat_interleave(self.rank // self.heads)

    @torch.no_grad()
    def fold_head_scales(self) -> None:
        """C ← diag(s) C, s ← 1: the same ΔW, with everything that travels in C."""
        scale = self.head_scale()
        if scale is not None and self.lora_S is not None:
            self.lora_C.mul_(scale[:, None].to(self.lora_C))
            self.lora_S.fill_(1.0)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · (A C B)ᵀ, shaped like W0 (out × in)."""
        scale = self.head_scale()
        a: torch.Tensor = self.lora_A if scale is None else self.lora_A * scale
        return self.scaling * (a @ self.lora_C @ self.lora_B).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)
        z = h @ self.lora_A
        scale = self.head_scale()
        if scale is not None:
            z = z * scale
        delta = (z @ self.lora_C) @ self.lora_B
        return self.base(x) + (self.scaling * delta).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}" + (f", heads={self.heads}" if self.heads > 1 else "")
