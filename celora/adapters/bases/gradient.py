"""`gradient` (LoRA-SB-style): A, B from the rank-r SVD of one estimated full-fine-tuning step, frozen.

G = −η · sign(Σ_b ∇_{W0} L_b) is the first Adam step of full fine-tuning (η = the run's learning rate),
estimated once before round 1 on a public proxy set the server holds (no client data). With
G = U S Vᵀ: A = V_r (in×r), B = U_rᵀ (r×out), C₀ = diag(S_r) / s, so ΔW₀ = s·(A C₀ B)ᵀ = G_r, the
best rank-r approximation of that step. At injection A = B = C = 0 (ΔW = 0: the gradient is taken at
the pretrained weights); :func:`apply_gradient_basis` writes the basis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from celora.adapters.bases.base import AdapterBasis, register_basis

if TYPE_CHECKING:
    from celora.adapters.trilora import TriLoraLinear


@register_basis
class GradientBasis(AdapterBasis):
    name = "gradient"
    frozen = True
    description = "LoRA-SB: A, B from the SVD of −η·sign(Σ∇W0) on a public proxy set, frozen; C₀ = diag(S_r)"

    def init_layer(self, layer: TriLoraLinear, *, seed: int, init: str) -> None:
        layer.lora_A.zero_()
        layer.lora_B.zero_()
        layer.lora_C.zero_()


def sum_weight_gradients(
    layers: dict[str, TriLoraLinear], loss_fn: Callable[[Any], torch.Tensor], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """Σ_b ∇_{W0} L_b (out × in, float32 on the CPU) for the frozen weight of every layer in ``layers``.

    Only these weights get a gradient; they are frozen again afterwards. Run it with the model in the
    mode the caller chose (eval: no dropout, the same estimate on every machine).
    """
    weights = {name: layer.base.weight for name, layer in layers.items()}
    sums = {name: torch.zeros(w.shape, dtype=torch.float32) for name, w in weights.items()}
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            for w in weights.values():
                w.grad = None
            loss_fn(batch).backward()
            for name, w in weights.items():
                if w.grad is not None:
                    sums[name] += w.grad.detach().to("cpu", torch.float32)
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)
    return sums


@torch.no_grad()
def apply_gradient_basis(layers: dict[str, TriLoraLinear], grads: dict[str, torch.Tensor], lr: float) -> None:
    """G = −lr·sign(Σ∇W0) = U S Vᵀ per layer; A = V_r, B = U_rᵀ, C = diag(S_r)/s (ΔW₀ = G_r)."""
    for name, layer in layers.items():
        g = -lr * torch.sign(grads[name].double())
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        r = layer.rank
        if r > s.numel():
            raise ValueError(f"rank {r} exceeds min(in, out) = {s.numel()} for a gradient basis")
        layer.lora_A.copy_(vh[:r].T.to(layer.lora_A))
        layer.lora_B.copy_(u[:, :r].T.to(layer.lora_B))
        layer.lora_C.copy_(torch.diag(s[:r] / layer.scaling).to(layer.lora_C))
