"""`svd` (LoRA-XS): W0 = U S Vᵀ, A = V_r S_r^{1/2}, B = S_r^{1/2} U_rᵀ, C = 0.

ΔW = 0 at start and C moves inside the principal subspace of W0. A, B train unless the method (``fedsb``)
or ``model.train_ab = false`` freezes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from celora.adapters.bases.base import AdapterBasis, register_basis

if TYPE_CHECKING:
    from celora.adapters.trilora import TriLoraLinear


@register_basis
class SvdBasis(AdapterBasis):
    name = "svd"
    c_starts_zero = True
    description = "LoRA-XS: A, B from the truncated SVD of W0, C = 0"

    def init_layer(self, layer: TriLoraLinear, *, seed: int, init: str) -> None:
        w = layer.base.weight.detach().float().cpu()  # out × in
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        r = layer.rank
        if r > s.numel():
            raise ValueError(f"rank {r} exceeds min(in, out) = {s.numel()} for an svd basis")
        root = s[:r].sqrt()
        layer.lora_A.copy_((vh[:r].T * root).to(layer.lora_A))
        layer.lora_B.copy_((root[:, None] * u[:, :r].T).to(layer.lora_B))
        layer.lora_C.zero_()
