"""The tri-matrix LoRA layer: y = x W0ᵀ + b + s · ((dropout(x) A) diag(s_h) C) B, with s = α / r.

A: in×r, C: r×r (dense), B: r×out. Plain LoRA is this layer with C frozen at I. s_h (per-head scales,
one per rank entry) exists only with ``heads > 1`` and is folded into C before anything travels.

Several clients in one forward pass (``engine.parallel_clients``): with ``layer.clients`` set to a
:class:`ClientFactors`, the stacked batch's rows are consecutive segments, one per client; the frozen
W0 runs once over all of them and each segment's delta uses its own client's A, C, B (and s_h).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from celora.adapters.bases import get_basis

Init = Literal["kaiming", "paper"]
Basis = str  # a name registered in celora.adapters.bases (random, svd, orthogonal, gradient)

FACTORS = ("A", "B", "C")


def c_grad_mask(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook keeping only the block-diagonal entries of C (heads > 1)."""
    return lambda g: g * mask.to(g)


@dataclass
class ClientFactors:
    """One layer's factors of several clients sharing a forward pass: client k owns ``sizes[k]`` consecutive
    rows (dim 0) of the stacked input; ``S`` holds per-head scales (heads,) when the layer has heads > 1."""

    sizes: list[int]
    A: list[torch.Tensor]
    C: list[torch.Tensor]
    B: list[torch.Tensor]
    S: list[torch.Tensor] | None = None

    def delta(self, h: torch.Tensor, per_head: int) -> torch.Tensor:
        """((h_k A_k) diag(s_k) C_k) B_k for every client's rows h_k of ``h``, stacked back in row order.
        Equal segment sizes run as one batched matmul, others segment by segment."""
        if h.shape[0] != sum(self.sizes):
            raise ValueError(f"stacked batch has {h.shape[0]} rows, the clients {sum(self.sizes)}")
        scales = None if self.S is None else [s.repeat_interleave(per_head) for s in self.S]
        if len(set(self.sizes)) == 1:
            k = len(self.sizes)
            z = h.reshape(k, -1, h.shape[-1]) @ torch.stack(self.A)
            if scales is not None:
                z = z * torch.stack(scales).unsqueeze(1)
            out = (z @ torch.stack(self.C)) @ torch.stack(self.B)
            return out.reshape(*h.shape[:-1], out.shape[-1])
        parts = []
        for i, h_k in enumerate(h.split(self.sizes)):
            z = h_k @ self.A[i]
            if scales is not None:
                z = z * scales[i]
            parts.append((z @ self.C[i]) @ self.B[i])
        return torch.cat(parts)


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
        self.c_mask: torch.Tensor | None = None  # block-diagonal mask of C's gradient (heads > 1)
        if heads > 1:
            self.lora_S = nn.Parameter(torch.ones(heads, device=dev))
            k = rank // heads
            self.c_mask = torch.block_diag(*[torch.ones(k, k) for _ in range(heads)]).to(dev)
            self.lora_C.register_hook(c_grad_mask(self.c_mask))
        self.clients: ClientFactors | None = None  # several clients' factors for one stacked forward
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
        if self.clients is not None:
            h = self.dropout(x).to(self.clients.A[0].dtype)
            delta = self.clients.delta(h, self.rank // self.heads)
            return self.base(x) + (self.scaling * delta).to(x.dtype)
        h = self.dropout(x).to(self.lora_A.dtype)
        z = h @ self.lora_A
        scale = self.head_scale()
        if scale is not None:
            z = z * scale
        delta = (z @ self.lora_C) @ self.lora_B
        return self.base(x) + (self.scaling * delta).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}" + (f", heads={self.heads}" if self.heads > 1 else "")
