"""Gradient matching (TAG / Inverting Gradients): the loss between simulated and observed shared tensors.

    L(g', g) = (1/K) Σ_k [ 1 − <g'_k, g_k> / (||g'_k|| ||g_k||) + λ · ||g'_k − g_k||² / ||g_k||² ]

averaged over the K observed tensors (per-tensor cosine as Inverting Gradients / LAMP, the L2 term as TAG), so
that a large tensor (the head) does not drown a small one (C); all-zero observed tensors are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["match_loss", "minimise_keeping_best", "simulated_grads"]


def simulated_grads(model: nn.Module, names: Sequence[str], loss: torch.Tensor) -> list[torch.Tensor]:
    """∂loss/∂θ for the named parameters, differentiable w.r.t. the inputs (create_graph)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names], create_graph=True, allow_unused=True)
    return [torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, grads, strict=True)]


def match_loss(sim: Sequence[torch.Tensor], obs: Sequence[torch.Tensor], l2: float = 0.1) -> torch.Tensor:
    """Mean over tensors of ``1 − cos(g'_k, g_k) + l2 · ||g'_k − g_k||² / ||g_k||²``."""
    terms = []
    for s, o in zip(sim, obs, strict=True):
        no2 = o.pow(2).sum()
        if float(no2) == 0.0:
            continue
        cos = (s * o).sum() / (torch.sqrt(s.pow(2).sum() + 1e-30) * torch.sqrt(no2))
        terms.append(1.0 - cos + l2 * (s - o).pow(2).sum() / no2)
    if not terms:
        return sim[0].sum() * 0.0 + 1.0
    return torch.stack(terms).mean()


def minimise_keeping_best(
    param: torch.Tensor, loss_at: Callable[[torch.Tensor], torch.Tensor], lr: float, iterations: int
) -> tuple[torch.Tensor, float, float]:
    """Adam with cosine decay on ``param`` for ``iterations`` steps; returns (best point, its loss, start loss),
    best = argmin over the visited points of ``loss_at``."""
    opt = torch.optim.Adam([param], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, iterations))
    start_loss = float(loss_at(param).detach())
    best, best_p = start_loss, param.detach().clone()
    for _ in range(iterations):
        loss = loss_at(param)
        if loss.item() < best:  # the loss of the point before this step
            best, best_p = loss.item(), param.detach().clone()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return best_p, best, start_loss
