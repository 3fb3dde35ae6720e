"""A small LLaVA-style vision-language model: frozen ViT → trainable projector → causal LM (with adapters).

For an image x and text tokens t_1..t_L the LM reads the sequence

    [e(t_1), …, e(t_a), P(v_0), …, P(v_T), e(t_a+1), …, e(t_L)],
    v = ViT(x) (CLS + patch tokens),  P(v) = W₂·GELU(W₁·LN(v) + b₁) + b₂

with the image tokens at text position a (the user turn of the chat prompt, as in LLaVA; never at
position 0, which decoder LMs use as an attention sink), and every text position is scored as usual.
The ViT is frozen; the projector P trains and is federated
by FedAvg, or is pre-aligned once on public images and frozen (``celora.fl.projector_setup``); the LM carries
the method's tri-matrix adapters.

Tasks written for a plain causal LM (``get_decoder()(input_ids, attention_mask)`` and
``get_output_embeddings()``) run unchanged inside ``with model.seeing(pixel_values, at=a):`` — the
decoder then inserts the image tokens and returns hidden states for the text positions only. A batch of
m·B text rows with B images repeats each image m times (row r uses image r // m).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput


class Projector(nn.Module):
    """P(v) = W₂·GELU(W₁·LN((v − μ)/σ) + b₁) + b₂: ViT hidden → (``hidden``, default LM hidden) → LM hidden.

    μ, σ (per ViT feature) standardise the frozen ViT's tokens: digit images share most of their
    feature vector (CLS cosine ≈ 0.9), and without removing that common part the LM did not even
    memorise 16 examples in 24 steps (with it: 100 % after 18). The image-prompt task sets them once
    from the clients' feature statistics (FedAvg of per-client means and second moments).

    W₂ starts as N(0, σ²) with σ chosen so that P's outputs have about ``out_std`` per coordinate
    (the LM's token-embedding std): image tokens then enter the LM at the scale of its own tokens
    instead of swamping them (ViT features have norms ~10× a token embedding).
    """

    input_mean: torch.Tensor
    input_std: torch.Tensor

    def __init__(self, vision_hidden: int, lm_hidden: int, out_std: float = 0.02, hidden: int | None = None) -> None:
        super().__init__()
        width = hidden or lm_hidden  # W₁: vision → width, W₂: width → LM hidden (a bottleneck when width is small)
        # per-feature standardisation (v − μ)/σ of the ViT tokens; μ, σ set once by set_input_stats
        self.register_buffer("input_mean", torch.zeros(vision_hidden))
        self.register_buffer("input_std", torch.ones(vision_hidden))
        self.norm = nn.LayerNorm(vision_hidden)
        self.fc1 = nn.Linear(vision_hidden, width)
        self.fc2 = nn.Linear(width, lm_hidden)
        with torch.no_grad():  # E[a²] of the hidden activation for unit-variance (layer-normed) inputs
            a = nn.functional.gelu(self.fc1(torch.randn(256, vision_hidden, device=self.fc1.weight.device)))
            sigma = out_std / (float(a.pow(2).mean().sqrt()) * width**0.5)
            self.fc2.weight.normal_(0.0, sigma)
            self.fc2.bias.zero_()

    @torch.no_grad()
    def set_input_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Fix μ, σ of the input standardisation (shared by every client: not trained, not sent each round)."""
        self.input_mean.copy_(mean)
        self.input_std.copy_(std.clamp_min(1e-5))

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm((v - self.input_mean) / self.input_std))))


class _ImageConditionedDecoder(nn.Module):
    """The LM body with the bound image tokens prepended; hidden states of the text positions only."""

    def __init__(self, owner: VisionLanguageModel) -> None:
        super().__init__()
        self._owner = [owner]  # a list: not registered as a submodule (no parameter duplication)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> BaseModelOutput:
        vlm = self._owner[0]
        text = vlm.lm.get_input_embeddings()(input_ids)
        image = vlm.image_tokens(input_ids.shape[0]).to(text.dtype)
        at, n = vlm.image_position, image.shape[1]
        embeds = torch.cat([text[:, :at], image, text[:, at:]], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        ones = torch.ones(image.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        mask = torch.cat([attention_mask[:, :at], ones, attention_mask[:, at:]], dim=1)
        hidden = vlm.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=torch.cat([hidden[:, :at], hidden[:, at + n :]], dim=1))


class VisionLanguageModel(nn.Module):
    """Frozen ``vision`` (a Dinov2Model) → ``projector`` → ``lm`` (a causal LM)."""

    base_model_prefix = "lm"  # read by PEFT/transformers when exporting adapters
    projector: Projector
    vision: Any  # a Dinov2Model
    lm: Any  # a causal LM (PreTrainedModel)

    def __init__(self, vision: Any, lm: Any) -> None:
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.config = lm.config
        self.projector = self._new_projector()
        self._decoder = _ImageConditionedDecoder(self)
        self._pixels: torch.Tensor | None = None
        self.image_position = 0  # text position the image tokens are inserted before (bound per batch)
        self._vision_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self.projector_frozen = False  # pre-aligned on public data: frozen, its μ, σ fixed with it
        self.projector_note: dict[str, Any] | None = None  # how it was pre-aligned (the run's summary)
        for p in self.vision.parameters():
            p.requires_grad_(False)

    def set_projector_width(self, hidden: int, seed: int = 0) -> None:
        """Replace the projector by a fresh one whose hidden layer has ``hidden`` units (fewer bytes to federate:
        d_v·h + h + h·d_lm + d_lm + 2·d_v numbers instead of d_v·d_lm + d_lm² + …), seeded like the original."""
        torch.manual_seed(seed)
        self.projector = self._new_projector(hidden)

    def _new_projector(self, hidden: int | None = None) -> Projector:
        """A projector ViT hidden → LM hidden whose outputs start at the std of the LM's token embeddings."""
        embed_std = float(self.lm.get_input_embeddings().weight.detach().float().std())
        return Projector(int(self.vision.config.hidden_size), int(self.lm.config.hidden_size), embed_std, hidden)

    @property
    def feature_dim(self) -> int:
        """Width of :meth:`features` (the ViT's CLS token)."""
        return int(self.vision.config.hidden_size)

    @torch.no_grad()
    def _vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT(x): (B, T, vision hidden), computed once per bound batch (the ViT is frozen)."""
        if self._vision_cache is None or self._vision_cache[0] is not pixel_values:
            self._vision_cache = (pixel_values, self.vision(pixel_values=pixel_values).last_hidden_state)
        return self._vision_cache[1]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's CLS token, (B, vision hidden): the pooled feature of the data summaries."""
        return self._vision_tokens(pixel_values)[:, 0]

    def image_tokens(self, rows: int) -> torch.Tensor:
        """P(ViT(x)) for the bound images, each repeated to cover ``rows`` text rows: (rows, T, LM hidden)."""
        if self._pixels is None:
            raise RuntimeError("VisionLanguageModel: no image bound; use `with model.seeing(pixel_values):`")
        tokens = self.projector(self._vision_tokens(self._pixels))
        if rows % tokens.shape[0]:
            raise ValueError(f"{rows} text rows do not divide into {tokens.shape[0]} images")
        return tokens.repeat_interleave(rows // tokens.shape[0], dim=0)

    @contextmanager
    def seeing(self, pixel_values: torch.Tensor, at: int = 0) -> Iterator[VisionLanguageModel]:
        """Bind the images of the current batch for every decoder call inside the block."""
        previous = self._pixels, self.image_position
        self._pixels, self.image_position = pixel_values, at
        try:
            yield self
        finally:
            self._pixels, self.image_position = previous
            self._vision_cache = None

    def get_decoder(self) -> nn.Module:
        return self._decoder

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> Any:
        """Logits of the text positions, (B, L, vocab), given ``pixel_values`` (or the bound images)."""
        if pixel_values is None:
            hidden = self._decoder(input_ids, attention_mask).last_hidden_state
        else:
            with self.seeing(pixel_values):
                hidden = self._decoder(input_ids, attention_mask).last_hidden_state
        return self.lm.get_output_embeddings()(hidden)


class VlmProcessor:
    """What a VLM task needs to encode examples: the LM's ``tokenizer`` and the ViT's ``pixels`` processor."""

    def __init__(self, tokenizer: Any, pixels: Any) -> None:
        self.tokenizer = tokenizer
        self.pixels = pixels
