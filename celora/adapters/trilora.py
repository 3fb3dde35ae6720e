"""The tri-matrix LoRA layer: y = x W0ᵀ + b + s · ((dropout(x) A) C) B, with s = α / r.

A: in×r, C: r×r (dense), B: r×out. Plain LoRA is this layer with C frozen at I.
"""

from __future__ import annotations

import math
import zlib
from typing import Literal

import torch
from torch import nn

Init = Literal["kaiming", "paper"]
Basis = Literal["random", "svd"]

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
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError("rank must be >= 1")
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
        self.reset_adapter(init=init, basis=basis, seed=seed)

    @torch.no_grad()
    def reset_adapter(self, *, init: Init, basis: Basis, seed: int) -> None:
        """Initialise A, B, C from ``seed`` so that every client gets the same basis.

        random: A kaiming-uniform (as PEFT) or N(0, 1e-3²) ("paper"), C = I, B = 0.
        svd (LoRA-XS): W0 = U S Vᵀ, A = V_r S_r^{1/2}, B = S_r^{1/2} U_rᵀ, C = 0, so that ΔW = 0
        at start and C moves inside the principal subspace of W0.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        if basis == "svd":
            w = self.base.weight.detach().float().cpu()  # out × in
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = self.rank
            if r > s.numel():
                raise ValueError(f"rank {r} exceeds min(in, out) = {s.numel()} for an svd basis")
            root = s[:r].sqrt()
            self.lora_A.copy_((vh[:r].T * root).to(self.lora_A))
            self.lora_B.copy_((root[:, None] * u[:, :r].T).to(self.lora_B))
            self.lora_C.zero_()
            return
        a = torch.empty(self.lora_A.shape)
        if init == "paper":
            a.normal_(0.0, 1e-3, generator=gen)
        else:
            # kaiming_uniform_(a=sqrt(5)) on PEFT's (r × in) weight: bound = 1/sqrt(in)
            bound = 1.0 / math.sqrt(self.lora_A.shape[0])
            a.uniform_(-bound, bound, generator=gen)
        self.lora_A.copy_(a.to(self.lora_A))
        self.lora_C.copy_(torch.eye(self.rank))
        self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · (A C B)ᵀ, shaped like W0 (out × in)."""
        return self.scaling * (self.lora_A @ self.lora_C @ self.lora_B).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)
        delta = ((h @ self.lora_A) @ self.lora_C) @ self.lora_B
        return self.base(x) + (self.scaling * delta).to(x.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"
