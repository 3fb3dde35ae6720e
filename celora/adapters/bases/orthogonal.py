"""`orthogonal` (RAVAN-style): A, B Gram-Schmidt-orthonormal from the shared seed, frozen; C = 0.

With ``heads = h`` the rank splits into h heads of r/h: A = [A_1 … A_h], B = [B_1; …; B_h], each block
drawn independently (orthonormal within the block), C block-diagonal, and each head has a trainable
scale s_i: ΔW = s · Σ_i s_i A_i C_ii B_i. The scales are folded into C after local training
(C_ii ← s_i C_ii, s_i ← 1), so only C travels and averaging C stays exact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from celora.adapters.bases.base import AdapterBasis, register_basis

if TYPE_CHECKING:
    from celora.adapters.trilora import TriLoraLinear


def orthonormal_columns(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Q (rows × cols) with QᵀQ = I: Gram-Schmidt (QR) of a Gaussian draw, signs fixed by diag(R) > 0."""
    if cols > rows:
        raise ValueError(f"a head of rank {cols} exceeds the layer's dimension {rows} for an orthogonal basis")
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))).float()


@register_basis
class OrthogonalBasis(AdapterBasis):
    name = "orthogonal"
    frozen = True
    c_starts_zero = True
    multi_head = True
    description = "A, B orthonormal from the shared seed, frozen; C = 0; heads with a trainable scale each"

    def init_layer(self, layer: TriLoraLinear, *, seed: int, init: str) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        in_f, out_f = layer.lora_A.shape[0], layer.lora_B.shape[1]
        k = layer.rank // layer.heads
        a = torch.cat([orthonormal_columns(in_f, k, gen) for _ in range(layer.heads)], dim=1)
        b = torch.cat([orthonormal_columns(out_f, k, gen).T for _ in range(layer.heads)], dim=0)
        layer.lora_A.copy_(a.to(layer.lora_A))
        layer.lora_B.copy_(b.to(layer.lora_B))
        layer.lora_C.zero_()
