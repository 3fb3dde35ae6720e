"""Random draws of a stacked forward pass taken per client, as each client alone would take them.

A batch that stacks several clients' rows (``sizes[k]`` consecutive rows of client k, each client's rows
right-padded to its own longest row ``lengths[k]`` when it runs alone, to the longest of all when stacked) would
draw one dropout mask for all of them: other numbers than each client alone draws. Inside ``own_draws`` every
dropout of the model (``nn.Dropout`` modules with p > 0, and the attention dropout of an attention function of
transformers' ``AttentionInterface``, e.g. SDPA) runs once per client on that client's rows, trimmed to its
own length, with that client's ``RandomStream`` as the device's generator: client k draws the masks of the same
shapes, in the same order, from the same stream as one client at a time, so its rows get the same numbers.
Positions past a client's own length are padding (masked as keys, not in any loss): they pass undropped.

An attention function outside the interface (transformers' "eager" attention, whose dropout is functional)
cannot be split: ``unsplit_attention_dropout`` says when a model has such a dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

__all__ = ["RandomStream", "own_draws", "unsplit_attention_dropout"]

ATTENTION_DROPOUT = ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop")


class RandomStream:
    """A saved state of the generator of ``device`` (CPU, CUDA or MPS): taken from the current one, made current
    for a block of draws (``drawing``), saved again after it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state = self._get()

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        if self.device.type == "mps":
            return torch.mps.get_rng_state()
        return torch.get_rng_state()

    def make_current(self) -> None:
        """The device's generator continues from this stream."""
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(self.state, self.device)
        elif self.device.type == "mps":
            torch.mps.set_rng_state(self.state)
        else:
            torch.set_rng_state(self.state)

    @contextmanager
    def drawing(self) -> Iterator[None]:
        """Inside, the device's generator is this stream; after, the stream keeps what was drawn."""
        self.make_current()
        try:
            yield
        finally:
            self.state = self._get()


class Segments:
    """Client k's rows ``[start_k, start_k + sizes[k])`` of a stacked batch, their own length and stream."""

    def __init__(self, sizes: Sequence[int], lengths: Sequence[int], streams: Sequence[RandomStream]) -> None:
        self.sizes, self.lengths, self.streams = list(sizes), list(lengths), list(streams)
        self.starts = [sum(self.sizes[:k]) for k in range(len(self.sizes))]

    def each(self, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], seq_dim: int | None) -> torch.Tensor:
        """``fn`` applied to every client's rows of ``x`` (dim 0), trimmed on ``seq_dim`` to the client's own length
        where ``x`` is wider, each under the client's stream; the trimmed-off positions pass unchanged."""
        parts = []
        for start, size, length, stream in zip(self.starts, self.sizes, self.lengths, self.streams, strict=True):
            piece = x[start : start + size]
            trim = seq_dim is not None and piece.dim() > seq_dim and piece.shape[seq_dim] > length
            with stream.drawing():
                if not trim:
                    parts.append(fn(piece))
                    continue
                assert seq_dim is not None
                own, rest = piece.split([length, piece.shape[seq_dim] - length], dim=seq_dim)
                parts.append(torch.cat([fn(own.contiguous()), rest], dim=seq_dim))
        return torch.cat(parts)


def _dropout_forward(module: nn.Dropout, seg: Segments) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module``'s forward with each client's mask drawn from its own stream (dim 1 of a ≥ 3-d input: the
    sequence)."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return x

        def drop(t: torch.Tensor) -> torch.Tensor:
            return nn.functional.dropout(t, module.p, True)

        return seg.each(x, drop, 1 if x.dim() >= 3 else None)

    return forward


def _attention(original: Callable[..., Any], seg: Segments) -> Callable[..., Any]:
    """An ``AttentionInterface`` function that, with dropout, attends each client's rows alone (queries and keys
    trimmed to its own length, mask likewise) under its own stream; output (N, L, heads, d) padded back with 0."""

    def attend(
        module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, *args: Any, **kw: Any
    ) -> tuple[torch.Tensor, None]:
        dropout = kw.get("dropout", args[0] if args else 0.0)
        if not dropout or query.shape[0] != sum(seg.sizes) or query.shape[2] != key.shape[2]:
            return original(module, query, key, value, mask, *args, **kw)  # type: ignore[no-any-return]
        width, parts = query.shape[2], []
        for start, size, length, stream in zip(seg.starts, seg.sizes, seg.lengths, seg.streams, strict=True):
            rows, own = slice(start, start + size), slice(0, length)
            m = None if mask is None else mask[rows if mask.shape[0] > 1 else slice(None), ..., :length, :length]
            with stream.drawing():
                out, _ = original(module, query[rows, :, own], key[rows, :, own], value[rows, :, own], m, *args, **kw)
            parts.append(nn.functional.pad(out, (0, 0, 0, 0, 0, width - out.shape[1])))
        return torch.cat(parts), None

    return attend


def unsplit_attention_dropout(model: nn.Module) -> float:
    """The attention dropout of ``model`` that ``own_draws`` cannot split per client (0 where there is none or
    its attention function is one of ``AttentionInterface``'s)."""
    config = getattr(model, "config", None)
    p = max((float(getattr(config, a, 0.0) or 0.0) for a in ATTENTION_DROPOUT), default=0.0)
    implementation = getattr(config, "_attn_implementation", None) or "eager"  # transformers' name of the function
    return 0.0 if implementation in ALL_ATTENTION_FUNCTIONS else p


@contextmanager
def own_draws(
    model: nn.Module, sizes: Sequence[int], lengths: Sequence[int], streams: Sequence[RandomStream]
) -> Iterator[None]:
    """Inside, the dropouts of ``model`` draw each client's masks from ``streams[k]`` on its own rows (see the
    module docstring); the device's generator is left as it was."""
    seg = Segments(sizes, lengths, streams)
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p > 0]
    functions = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ALL_ATTENTION_FUNCTIONS}
    outer = RandomStream(streams[0].device) if streams else None
    try:
        for m in dropouts:
            m.forward = _dropout_forward(m, seg)  # type: ignore[method-assign,assignment]
        for name, fn in functions.items():
            ALL_ATTENTION_FUNCTIONS[name] = _attention(fn, seg)
        yield
    finally:
        for m in dropouts:
            del m.forward
        for name, fn in functions.items():
            del ALL_ATTENTION_FUNCTIONS[name]  # the override; where one was there before, it is set again
            if ALL_ATTENTION_FUNCTIONS[name] is not fn:
                ALL_ATTENTION_FUNCTIONS[name] = fn
        if outer is not None:
            outer.make_current()
