"""Image reconstruction (Inverting Gradients, Geiping et al. 2020): cosine gradient matching + total variation.

Optimises grayscale images x = sigmoid(θ) ∈ [0, 1]^{B×1×S×S} (the ViT sees them through the task's pixel
normalisation) to minimise ``match_loss(g'(x), g) + λ_TV · TV(x)`` with
``TV(x) = mean |x_{i+1,j} − x_{i,j}| + mean |x_{i,j+1} − x_{i,j}|``; Adam with a cosine learning-rate decay.
Labels come from the head's gradient when it is observed (iDLG), else they are given to the attacker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from celora.privacy.attacks.matching import match_loss, minimise_keeping_best, simulated_grads

__all__ = ["ImageOptResult", "optimise_image", "total_variation"]


@dataclass
class ImageOptResult:
    images: torch.Tensor  # B × 1 × S × S in [0, 1]
    start: torch.Tensor  # the random start
    loss: float
    start_loss: float


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV: mean absolute difference of vertical plus horizontal neighbours."""
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


def optimise_image(
    model: nn.Module,
    names: Sequence[str],
    observed: Sequence[torch.Tensor],
    labels: torch.Tensor,
    shape: tuple[int, int, int, int],
    normalise: Callable[[torch.Tensor], torch.Tensor],
    *,
    iterations: int = 200,
    lr: float = 0.1,
    tv: float = 0.02,
    l2: float = 0.0,
    seed: int = 0,
) -> ImageOptResult:
    """Optimise ``shape`` = (B, 1, S, S) images in [0, 1] so the simulated gradient matches ``observed``."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    theta = (torch.randn(shape, generator=gen) * 0.5).to(device).requires_grad_(True)
    obs = [o.detach().to(device) for o in observed]
    y = labels.to(device)

    def loss_at(t: torch.Tensor) -> torch.Tensor:
        x = torch.sigmoid(t)
        logits = model(pixel_values=normalise(x)).logits
        sim = simulated_grads(model, names, nn.functional.cross_entropy(logits, y))
        return match_loss(sim, obs, l2) + tv * total_variation(x)

    start = torch.sigmoid(theta.detach()).clone()
    best_t, best, start_loss = minimise_keeping_best(theta, loss_at, lr, iterations)
    return ImageOptResult(torch.sigmoid(best_t), start, best, start_loss)
