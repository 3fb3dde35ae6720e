"""Text reconstruction by optimising continuous input embeddings (TAG / LAMP style).

Minimises the gradient-matching loss (``matching.match_loss``) between the attacker's simulated shared tensors
for inputs_embeds X̃ (B × L × d, lengths known) and the observed ones, with Adam and a cosine learning-rate
decay; tokens are read off as the nearest rows of the word-embedding table by cosine similarity, or, with a
language-model prior (``lm_prior.TextPrior``), as the beam of ``lm_prior.beam_decode`` whose exact embeddings
give the lowest matching loss (sequence by sequence, the nearest read-off kept as a candidate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from celora.privacy.attacks.lm_prior import TextPrior
from celora.privacy.attacks.matching import match_loss, minimise_keeping_best, simulated_grads

__all__ = ["TextOptResult", "optimise_text"]


@dataclass
class TextOptResult:
    ids: list[list[int]]  # nearest tokens after optimisation
    start_ids: list[list[int]]  # nearest tokens of the random start (the baseline it must beat)
    loss: float  # final matching loss
    start_loss: float
    nearest_ids: list[list[int]] | None = None  # the nearest read-off, when a prior chose ``ids``
    nearest_token_loss: float | None = None  # matching loss of the nearest read-off's exact embeddings (prior)
    token_loss: float | None = None  # ... and of the tokens the prior chose (never higher)


def _nearest(x: torch.Tensor, table: torch.Tensor, lengths: Sequence[int]) -> list[list[int]]:
    sim = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(table, dim=-1).T
    best = sim.argmax(-1)
    return [best[j, :n].tolist() for j, n in enumerate(lengths)]


def optimise_text(
    model: nn.Module,
    names: Sequence[str],
    observed: Sequence[torch.Tensor],
    labels: torch.Tensor,
    lengths: Sequence[int],
    *,
    iterations: int = 200,
    lr: float = 0.05,
    l2: float = 0.1,
    seed: int = 0,
    prior: TextPrior | None = None,
) -> TextOptResult:
    """Optimise B × L × d input embeddings so the simulated gradient matches ``observed``."""
    table = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    device = table.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (len(lengths), max(lengths), table.shape[1])
    x = (torch.randn(shape, generator=gen) * float(table.std())).to(device).requires_grad_(True)
    mask = torch.zeros(shape[:2], dtype=torch.long, device=device)
    for j, n in enumerate(lengths):
        mask[j, :n] = 1
    obs = [o.detach().to(device) for o in observed]
    y = labels.to(device)
    start_ids = _nearest(x.detach(), table, lengths)

    def loss_at(inp: torch.Tensor) -> torch.Tensor:
        logits = model(inputs_embeds=inp, attention_mask=mask).logits
        sim = simulated_grads(model, names, nn.functional.cross_entropy(logits, y))
        return match_loss(sim, obs, l2)

    best_x, best, start_loss = minimise_keeping_best(x, loss_at, lr, iterations)
    nearest = _nearest(best_x, table, lengths)
    if prior is None:
        return TextOptResult(nearest, start_ids, best, start_loss)
    ids, nearest_loss, loss = _rerank(best_x, table, lengths, nearest, prior, loss_at)
    return TextOptResult(ids, start_ids, best, start_loss, nearest, nearest_loss, loss)


def _rerank(
    best_x: torch.Tensor,
    table: torch.Tensor,
    lengths: Sequence[int],
    nearest: list[list[int]],
    prior: TextPrior,
    loss_at: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[list[list[int]], float, float]:
    """Sequence by sequence, the candidate (prior's beams, nearest read-off) whose exact token embeddings give the
    lowest matching loss, the other sequences held at their current choice; (choice, nearest's loss, its loss)."""
    chosen = [list(ids) for ids in nearest]

    def loss_of(ids: list[list[int]]) -> float:
        emb = best_x.detach().clone()
        for j, seq in enumerate(ids):
            emb[j, : len(seq)] = table[torch.as_tensor(seq, device=table.device)]
        return float(loss_at(emb).detach())

    best_loss = start = loss_of(chosen)
    for j, n in enumerate(lengths):
        for cand in prior.candidates(best_x[j, :n].detach(), table):
            trial = [*chosen[:j], cand, *chosen[j + 1 :]]
            trial_loss = loss_of(trial)
            if trial_loss < best_loss:
                chosen, best_loss = trial, trial_loss
    return chosen, start, best_loss
