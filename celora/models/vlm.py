"""A small LLaVA-style vision-language model: frozen ViT → trainable projector → causal LM (with adapters).

For an image x and text tokens t_1..t_L the LM reads the sequence

    [P(v_0), …, P(v_T), e(t_1), …, e(t_L)],    v = ViT(x) (CLS + patch tokens),  P(v) = W₂·GELU(W₁v + b₁) + b₂

and every text position is scored as usual. The ViT is frozen; the projector P trains and is federated
by FedAvg; the LM carries the method's tri-matrix adapters.

Tasks written for a plain causal LM (``get_decoder()(input_ids, attention_mask)`` and
``get_output_embeddings()``) run unchanged inside ``with model.seeing(pixel_values):`` — the decoder
then prepends the image tokens and returns hidden states for the text positions only. A batch of
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
    """P(v) = W₂·GELU(W₁v + b₁) + b₂: ViT hidden → LM hidden."""

    def __init__(self, vision_hidden: int, lm_hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_hidden, lm_hidden)
        self.fc2 = nn.Linear(lm_hidden, lm_hidden)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(v)))


class _ImageConditionedDecoder(nn.Module):
    """The LM body with the bound image tokens prepended; hidden states of the text positions only."""

    def __init__(self, owner: VisionLanguageModel) -> None:
        super().__init__()
        self._owner = [owner]  # a list: not registered as a submodule (no parameter duplication)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> BaseModelOutput:
        vlm = self._owner[0]
        text = vlm.lm.get_input_embeddings()(input_ids)
        image = vlm.image_tokens(input_ids.shape[0]).to(text.dtype)
        embeds = torch.cat([image, text], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long)
        mask = torch.cat([torch.ones(image.shape[:2], dtype=attention_mask.dtype), attention_mask], dim=1)
        hidden = vlm.lm.get_decoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=hidden[:, image.shape[1] :])


class VisionLanguageModel(nn.Module):
    """Frozen ``vision`` (a Dinov2Model) → ``projector`` → ``lm`` (a causal LM)."""

    base_model_prefix = "lm"  # read by PEFT/transformers when exporting adapters
    vision: Any  # a Dinov2Model
    lm: Any  # a causal LM (PreTrainedModel)

    def __init__(self, vision: Any, lm: Any) -> None:
        super().__init__()
        self.vision = vision
        self.lm = lm
        self.config = lm.config
        self.projector = Projector(int(vision.config.hidden_size), int(lm.config.hidden_size))
        self._decoder = _ImageConditionedDecoder(self)
        self._pixels: torch.Tensor | None = None
        self._vision_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        for p in self.vision.parameters():
            p.requires_grad_(False)

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
    def seeing(self, pixel_values: torch.Tensor) -> Iterator[VisionLanguageModel]:
        """Bind the images of the current batch for every decoder call inside the block."""
        previous = self._pixels
        self._pixels = pixel_values
        try:
            yield self
        finally:
            self._pixels = previous
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
