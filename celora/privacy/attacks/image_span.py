"""Span inversion for ViTs: the DAGER idea applied to image patches, solved as linear least squares.

The first adapted layer sees h_t = LN(z_t) with z = embed(x) affine in the pixels x (patch projection +
position embeddings; CLS constant). The observed tensor M (``span.py``: ∇Wᵀ, ∇A, ∇C or ∇B of that layer) has
its columns in span{Pᵀ h_t}; with Q = I − U Uᵀ (U: the top singular vectors of M, at most B·T of them),
``Q Pᵀ LN(z_t) = 0``. Since LN(z) = Γ K z / σ + β (K centres, Γ = diag γ) and a span is scale-invariant, this is
**linear** in (x, s_t = σ_t):

    Q Pᵀ (Γ K (J_t x + z0_t) + s_t β) = 0      for every token t,   with z_t = J_t x + z0_t,

solved in least squares together with a small smoothness prior ``λ ||D x||²`` (D: differences of neighbouring
pixels; λ relative to the system's scale). J, z0 are read off the model by probing its embedding with pixel
impulses (the forward pass stopped at the layer norm). Unique at batch size 1 when the system has full column
rank (full gradient: 16·367 equations for 56² pixels); at B > 1 every image gets the same solution (a blend of
the batch). Not decisive (None) when B·T >= the column dimension of M.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from celora.privacy.attacks.image import ImageOptResult

__all__ = ["first_norm", "invert_image_span", "norm_inputs"]


class _Stop(Exception):
    pass


def first_norm(model: nn.Module, first: nn.Module) -> nn.LayerNorm | None:
    """The last LayerNorm before module ``first`` in module order (the norm whose output it reads)."""
    last = None
    for m in model.modules():
        if m is first:
            return last
        if isinstance(m, nn.LayerNorm):
            last = m
    return None


def norm_inputs(model: nn.Module, norm: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The input z of ``norm`` for these pixels (B × T × d), the forward pass stopped right there."""
    store: list[torch.Tensor] = []

    def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        store.append(inp[0])
        raise _Stop

    handle = norm.register_forward_pre_hook(hook)
    try:
        model(pixel_values=pixel_values)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not store:
        raise RuntimeError("the layer norm before the first adapted layer was not reached")
    return store[0]


@torch.no_grad()
def invert_image_span(
    model: nn.Module,
    first: nn.Module,
    observed: torch.Tensor,
    proj: torch.Tensor | None,
    shape: tuple[int, int, int, int],
    normalise: Callable[[torch.Tensor], torch.Tensor],
    *,
    smooth: float = 1e-4,
    rel_tol: float = 1e-6,
    chunk: int = 256,
) -> ImageOptResult | None:
    """Images whose first-layer inputs lie in the observed span (least squares), or None when not decisive."""
    norm = first_norm(model, first)
    if norm is None:
        return None
    device = next(model.parameters()).device
    b, _, side, _ = shape
    npix = side * side
    zero = norm_inputs(model, norm, normalise(torch.zeros((1, 1, side, side), device=device)))[0].double()  # T × d
    tokens, d = zero.shape
    total = b * tokens
    if total >= min(observed.shape):
        return None
    probes: list[torch.Tensor] = []
    for first_pixel in range(0, npix, chunk):  # J[:, :, i] = z(e_i) − z(0): z is affine in the pixels
        n = min(chunk, npix - first_pixel)
        imp = torch.zeros((n, npix), device=device)
        imp[torch.arange(n), torch.arange(first_pixel, first_pixel + n)] = 1.0
        probes.append(norm_inputs(model, norm, normalise(imp.view(n, 1, side, side))).double() - zero)
    jac = torch.cat(probes).permute(1, 2, 0).cpu()  # T × d × npix
    u, sv, _ = torch.linalg.svd(observed.detach().double().cpu(), full_matrices=False)
    rank = max(1, min(total, int((sv > rel_tol * sv[0]).sum())))
    basis = u[:, :rank]
    gamma = norm.weight.detach().double().cpu() if norm.weight is not None else torch.ones(d, dtype=torch.float64)
    beta = norm.bias.detach().double().cpu() if norm.bias is not None else torch.zeros(d, dtype=torch.float64)
    pt = torch.eye(d, dtype=torch.float64) if proj is None else proj.detach().double().cpu()  # d × k
    op = pt.T - basis @ (basis.T @ pt.T)  # Q Pᵀ: k × d
    centre = torch.eye(d, dtype=torch.float64) - 1.0 / d
    gk = gamma[:, None] * centre  # Γ K
    grid = torch.arange(npix).view(side, side)
    pairs = torch.cat(
        [
            torch.stack([grid[:, 1:].flatten(), grid[:, :-1].flatten()], 1),
            torch.stack([grid[1:, :].flatten(), grid[:-1, :].flatten()], 1),
        ]
    )
    m_gk, m_beta = op @ gk, op @ beta
    x = torch.zeros(npix, dtype=torch.float64)
    hits = torch.zeros(npix, dtype=torch.float64)
    res_num, res_den, start_num = 0.0, 0.0, 0.0
    for t in range(tokens):  # a patch token depends only on its own pixels: one small system per token
        cols = (jac[t].abs().sum(0) > 0).nonzero().flatten()
        if cols.numel() == 0:
            continue  # CLS: no pixel reaches it
        a = torch.cat([m_gk @ jac[t][:, cols], m_beta[:, None]], dim=1)  # k × (n_t + 1)
        rhs = -(m_gk @ zero[t].cpu())
        local = {int(c): i for i, c in enumerate(cols.tolist())}
        inside = [(local[int(i)], local[int(j)]) for i, j in pairs.tolist() if int(i) in local and int(j) in local]
        diff = torch.zeros(len(inside), a.shape[1], dtype=torch.float64)
        for row, (i, j) in enumerate(inside):
            diff[row, i], diff[row, j] = 1.0, -1.0
        weight = smooth * float(a.norm()) / max(float(diff.norm()), 1e-30)
        sol = torch.linalg.lstsq(
            torch.cat([a, weight * diff]),
            torch.cat([rhs, torch.zeros(len(inside), dtype=torch.float64)]),
            driver="gelsd",
        ).solution
        x[cols] += sol[:-1]
        hits[cols] += 1
        res_num += float((a @ sol - rhs).pow(2).sum())
        res_den += float(rhs.pow(2).sum())
        start_num += float((a[:, :-1] @ torch.full((cols.numel(),), 0.5, dtype=torch.float64) - rhs).pow(2).sum())
    x = (x / hits.clamp_min(1)).view(1, 1, side, side).clamp(0, 1).float().expand(b, -1, -1, -1).clone()
    loss, start_loss = res_num / max(res_den, 1e-300), start_num / max(res_den, 1e-300)
    start = torch.full(shape, 0.5)
    return ImageOptResult(x.to(device), start, loss, start_loss)
