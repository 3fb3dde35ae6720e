"""DAGER-style span test on the first adapted layer (Petrov et al. 2024).

For a linear layer y = x Wᵀ on inputs X (T × in) with output gradients Δ, every observed tensor is a product
with Xᵀ on the left: ∇W = Δᵀ X (use its transpose), ∇A = s Xᵀ Δ (CB)ᵀ, ∇B = s (X A C)ᵀ Δ, ∇C = s (X A)ᵀ Δ Bᵀ.
So the column space of M ∈ {∇Wᵀ, ∇A, ∇C, ∇B} lies in span{Pᵀ x_t} with P = I (∇W, ∇A), A (∇C) or A C (∇B).
A candidate (token v at position p) is in the batch iff its first-layer input x_{v,p} = LN(E_v + P_p + T_0)
(BERT-style embeddings) satisfies ``||(I − U Uᵀ) Pᵀ x_{v,p}|| / ||Pᵀ x_{v,p}|| ≈ 0`` with U the top-T left singular
vectors of M (T = tokens in the batch). The test is decisive only when T < the column dimension of M (for the
adapters: T < r); otherwise it is reported as not decisive and another attack must be used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["SpanResult", "first_layer_embeddings", "span_reconstruct"]


@dataclass
class SpanResult:
    ids: list[list[int]]  # one reconstructed id sequence per example (batch order is not recovered)
    residuals: list[list[float]]  # relative residual of each chosen token
    rank: int  # T, the dimension of the span used


def first_layer_embeddings(model: nn.Module) -> nn.Module | None:
    """The module mapping input ids to the first layer's inputs (BERT-style ``embeddings``), or None."""
    base = getattr(model, "base_model", model)
    emb = getattr(base, "embeddings", None)
    if emb is None or not hasattr(emb, "word_embeddings") or not hasattr(emb, "position_embeddings"):
        return None
    return emb


_CACHE: dict[tuple[Any, ...], tuple[torch.Tensor, ...]] = {}  # one entry: the batch-independent terms


def _projected_terms(emb: nn.Module, proj: torch.Tensor | None, length: int) -> tuple[torch.Tensor, ...]:
    """(σ, M a_v, M c_p, M β, ||M y_{v,p}||²) for M = Pᵀ (see ``candidate_residuals``); they depend only on the
    embedding, P and the length, so the last ones are kept (the same client's batches share them)."""
    f64 = torch.float64
    ln: Any = emb.LayerNorm
    word: Any = emb.word_embeddings
    positions: Any = emb.position_embeddings
    types: Any = getattr(emb, "token_type_embeddings", None)
    key = (
        id(emb),
        float(word.weight.detach().double().sum()),
        length,
        None if proj is None else (tuple(proj.shape), hash(proj.detach().cpu().numpy().tobytes())),
    )
    if key in _CACHE:
        return _CACHE[key]
    e = word.weight.detach().to(f64)
    pos = positions.weight.detach()[:length].to(f64)
    q = pos + (types.weight.detach()[0].to(f64) if types is not None else 0.0)
    gamma = ln.weight.detach().to(f64) if ln.weight is not None else torch.ones(e.shape[1], dtype=f64)
    beta = ln.bias.detach().to(f64) if ln.bias is not None else torch.zeros(e.shape[1], dtype=f64)
    d = e.shape[1]
    ec, qc = e - e.mean(1, keepdim=True), q - q.mean(1, keepdim=True)
    sigma = ((ec.pow(2).sum(1)[None, :] + qc.pow(2).sum(1)[:, None] + 2 * qc @ ec.T) / d + float(ln.eps)).sqrt()
    pt = torch.eye(d, dtype=f64) if proj is None else proj.detach().to(f64)  # in × k
    pa, pc, pb = (gamma * ec) @ pt, (gamma * qc) @ pt, beta @ pt
    total = _sq_norm(sigma, pa, pc, pb).clamp_min(1e-300)
    _CACHE.clear()
    _CACHE[key] = (sigma, pa, pc, pb, total)
    return _CACHE[key]


def _sq_norm(sigma: torch.Tensor, m_a: torch.Tensor, m_c: torch.Tensor, m_b: torch.Tensor) -> torch.Tensor:
    """``||M a_v + M c_p||² / σ² + 2 (M a_v + M c_p)·M β / σ + ||M β||²`` for every (p, v): L × V."""
    ab = m_a.pow(2).sum(1)[None, :] + m_c.pow(2).sum(1)[:, None] + 2 * m_c @ m_a.T  # ||Ma + Mc||²
    cross = (m_a @ m_b)[None, :] + (m_c @ m_b)[:, None]
    return ab / sigma.pow(2) + 2 * cross / sigma + m_b.pow(2).sum()


@torch.no_grad()
def candidate_residuals(emb: nn.Module, basis: torch.Tensor, proj: torch.Tensor | None, length: int) -> torch.Tensor:
    """Relative residual ``||(I − U Uᵀ) Pᵀ y_{v,p}|| / ||Pᵀ y_{v,p}||`` for every position p < length and token v.

    Exact and in closed form for BERT-style embeddings ``y = LN(E_v + q_p)`` with ``q_p = P_p + T_0``:
    with centred ẽ_v, q̃_p, ``y = (γ ∘ (ẽ_v + q̃_p)) / σ_vp + β`` and ``σ_vp² = ||ẽ_v + q̃_p||² / d + eps``, so for a
    linear map M, ``||M y||² = ||M a_v + M c_p||² / σ² + 2 (M a_v + M c_p)·M β / σ + ||M β||²`` with
    ``a_v = γ ∘ ẽ_v``, ``c_p = γ ∘ q̃_p``: a few (V × k)(k × L) products instead of V·L layer norms. (L × V).
    """
    sigma, pa, pc, pb, total = _projected_terms(emb, proj, length)
    u = basis.detach().to(torch.float64)
    qa, qcp, qb = pa - (pa @ u) @ u.T, pc - (pc @ u) @ u.T, pb - (pb @ u) @ u.T
    return (_sq_norm(sigma, qa, qcp, qb).clamp_min(0) / total).sqrt().to(torch.float32)


@torch.no_grad()
def span_reconstruct(
    model: nn.Module,
    observed: torch.Tensor,
    proj: torch.Tensor | None,
    lengths: list[int],
    *,
    rel_tol: float = 1e-6,
) -> SpanResult | None:
    """Token at each position of each sequence from the span test, or None when not decisive / not supported.

    ``observed``: M (dim × k) whose columns lie in span{projᵀ x_t}; ``proj``: in × dim (None = identity);
    ``lengths``: the number of tokens of each sequence (assumed known to the attacker, as in TAG/LAMP/DAGER).
    At position p the ``m_p`` = #{j: lengths[j] > p} candidates with the smallest residual are kept.
    """
    emb = first_layer_embeddings(model)
    total = int(sum(lengths))
    if emb is None or total >= min(observed.shape):
        return None
    u, sv, _ = torch.linalg.svd(observed.detach().to(torch.float64).cpu(), full_matrices=False)
    # numerical rank (float32 gradients: a noise floor near 1e-7 σ_max), at most T (repeated tokens lower it)
    rank = max(1, min(total, int((sv > rel_tol * sv[0]).sum())))
    longest = max(lengths)
    res = candidate_residuals(emb, u[:, :rank], None if proj is None else proj.cpu(), longest)
    ids_out: list[list[int]] = [[] for _ in lengths]
    res_out: list[list[float]] = [[] for _ in lengths]
    for p in range(longest):
        rows = [j for j, n in enumerate(lengths) if n > p]
        vals, idx = torch.topk(res[p], k=len(rows), largest=False)
        for j, v, i in zip(rows, vals.tolist(), idx.tolist(), strict=True):
            ids_out[j].append(int(i))
            res_out[j].append(float(v))
    return SpanResult(ids_out, res_out, rank)
