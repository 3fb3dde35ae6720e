"""A language-model prior for the text attack (LAMP-style), across tokenizers.

The victim model's tokens are read off the optimised embeddings X̃ by beam search instead of nearest rows:
at position t each beam is extended by the ``top_k`` tokens v nearest to x̃_t, scored

    S(v_1..v_t) = Σ_s cos(x̃_s, E_{v_s}) + λ · Σ_s [log p_LM(w_s ⊕ v_s) − log p_LM(w_s)]

where w_s is the decoded text of the beam's last ``window`` victim tokens and p_LM is the prior's likelihood of
its *own* tokenization of that text (so the prior need not share the victim's tokenizer: SmolLM2 for MiniLM).
The special tokens the victim's tokenizer adds at both ends are known to the attacker (lengths are too) and are
fixed. The final beams are re-ranked by the gradient-matching loss of their exact embeddings (in
``text.optimise_text``), with the nearest-token read-off kept as a candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from celora.errors import CeloraError

__all__ = ["LMPrior", "TextPrior", "beam_decode", "special_frame"]


class LMPrior:
    """log p_LM(text) of a causal LM for a batch of texts, each conditioned on the LM's BOS (else EOS, CLS) token."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"
        starts = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id]
        start = next((t for t in starts if t is not None), None)
        if start is None:
            raise CeloraError("--lm-prior: the prior's tokenizer has no BOS, EOS or CLS token to condition on")
        self.start = int(start)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """Σ_i log p(u_i | start, u_<i) over the prior's tokens u of each text (0 for an empty text), on CPU."""
        enc = self.tokenizer(list(texts), add_special_tokens=False, padding=True, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        if ids.shape[1] == 0:
            return torch.zeros(len(texts))
        start = torch.full((ids.shape[0], 1), self.start, dtype=ids.dtype, device=self.device)
        full = torch.cat([start, ids], dim=1)
        full_mask = torch.cat([torch.ones_like(start), mask], dim=1)
        logits = self.model(input_ids=full, attention_mask=full_mask).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        return (logp * mask).sum(1).cpu()


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The token ids the victim's tokenizer puts before and after any text (BERT: [CLS] and [SEP])."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    framed = tokenizer("a")["input_ids"]
    for i in range(len(framed) - len(bare) + 1):
        if framed[i : i + len(bare)] == bare:
            return list(framed[:i]), list(framed[i + len(bare) :])
    return [], []


@dataclass(frozen=True)
class _Beam:
    ids: tuple[int, ...]
    score: float


def beam_decode(
    x: torch.Tensor,
    table: torch.Tensor,
    decode: Callable[[Sequence[int]], str],
    prior: Callable[[Sequence[str]], torch.Tensor],
    *,
    frame: tuple[Sequence[int], Sequence[int]] = ((), ()),
    banned: Sequence[int] = (),
    top_k: int = 5,
    beam: int = 4,
    weight: float = 0.1,
    window: int = 6,
) -> list[list[int]]:
    """Beam search over the ``top_k`` nearest tokens of each row of ``x`` (L × d) maximising S above; returns
    the final beams (best first), each with the frame's tokens at its ends; ``banned`` never fill the middle."""
    if top_k < 1 or beam < 1 or window < 1:
        raise CeloraError("lm prior: top_k, beam and window must be >= 1")
    head, tail = list(frame[0]), list(frame[1])
    length = x.shape[0]
    if len(head) + len(tail) > length:
        head, tail = [], []
    sim = nn.functional.normalize(x.float(), dim=-1) @ nn.functional.normalize(table.float(), dim=-1).T
    if banned:
        sim[:, torch.as_tensor(list(banned), device=sim.device)] = -2.0
    cos, cand = sim.topk(min(top_k, sim.shape[1]), dim=-1)
    cos, cand = cos.cpu(), cand.cpu()
    beams = [_Beam(tuple(head), 0.0)]
    for t in range(len(head), length - len(tail)):
        contexts = [decode(b.ids[-window:]) for b in beams]
        texts = [decode(b.ids[-window:] + (int(v),)) for b in beams for v in cand[t]]
        lm = prior(contexts + texts)
        base, ext = lm[: len(beams)], lm[len(beams) :].view(len(beams), -1)
        scores = torch.tensor([b.score for b in beams]).unsqueeze(1) + cos[t] + weight * (ext - base.unsqueeze(1))
        order = scores.flatten().argsort(descending=True)[:beam]
        k = cand.shape[1]
        beams = [_Beam(beams[i // k].ids + (int(cand[t, i % k]),), float(scores.flatten()[i])) for i in order.tolist()]
    return [list(b.ids) + tail for b in beams]


@dataclass
class TextPrior:
    """What ``optimise_text`` needs to read tokens off with a prior: the LM score, the victim's decoder, the
    fixed frame, the tokens never in the middle, and the beam-search settings of ``beam_decode``."""

    lm: Callable[[Sequence[str]], torch.Tensor]
    decode: Callable[[Sequence[int]], str]
    frame: tuple[Sequence[int], Sequence[int]] = ((), ())
    banned: Sequence[int] = ()
    top_k: int = 5
    beam: int = 4
    weight: float = 0.1
    window: int = 6

    def candidates(self, x: torch.Tensor, table: torch.Tensor) -> list[list[int]]:
        """The final beams for one sequence's optimised embeddings ``x`` (L × d), best first."""
        return beam_decode(
            x,
            table,
            self.decode,
            self.lm,
            frame=self.frame,
            banned=self.banned,
            top_k=self.top_k,
            beam=self.beam,
            weight=self.weight,
            window=self.window,
        )
