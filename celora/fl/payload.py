"""What travels on the wire: named tensors packed into one safetensors blob, counted in bytes.

Both ends know the *layout* (ordered names and shapes, derived from the same model and config), so
tensors of one factor and shape are stacked into a single safetensors entry: the header stays a
few dozen bytes even for a few KB of C. Wire precision: fp32, fp16, or int8 with one float32 scale
per tensor (x ≈ q · scale, scale = max|x| / 127).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from celora.errors import CeloraError

WireDtype = Literal["fp32", "fp16", "int8"]
_TORCH = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}
_BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
SCALE = "#scale"


class PayloadError(CeloraError):
    """A payload that does not match its layout: malformed, oversize, wrong shape, unknown key, NaN/Inf."""


def _factor(name: str) -> str:
    for f in ("A", "B", "C"):
        if name.endswith(".lora_" + f):
            return f
    return "head"


@dataclass(frozen=True)
class Layout:
    """Ordered (name, shape) pairs of what one message carries."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], names: Sequence[str] | None = None) -> Layout:
        keys = list(names) if names is not None else list(tensors)
        return cls(tuple((n, tuple(tensors[n].shape)) for n in keys))

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    def groups(self) -> dict[str, list[str]]:
        """Stacking groups: key '<factor>:<d1>x<d2>' → names in layout order."""
        out: dict[str, list[str]] = {}
        for name, shape in self.entries:
            out.setdefault(f"{_factor(name)}:{'x'.join(map(str, shape)) or 'scalar'}", []).append(name)
        return out

    def numel(self) -> int:
        total = 0
        for _, shape in self.entries:
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def tensor_bytes(self, dtype: WireDtype) -> int:
        """Bytes of tensor data alone (no framing), incl. int8 scales."""
        scales = 4 * len(self.entries) if dtype == "int8" else 0
        return self.numel() * _BYTES[dtype] + scales


def encode(tensors: Mapping[str, torch.Tensor], layout: Layout, dtype: WireDtype = "fp32") -> bytes:
    """Serialize ``tensors`` (exactly the layout's names) to one safetensors blob."""
    missing = set(layout.names) - set(tensors)
    if missing:
        raise PayloadError(f"payload lacks {sorted(missing)[0]}")
    blob: dict[str, torch.Tensor] = {}
    for key, names in layout.groups().items():
        stacked = torch.stack([tensors[n].detach().to("cpu", torch.float32) for n in names])
        if dtype == "int8":
            flat = stacked.reshape(len(names), -1)
            scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
            blob[key] = q.reshape(stacked.shape).contiguous()
            blob[key + SCALE] = scale.contiguous()
        else:
            blob[key] = stacked.to(_TORCH[dtype]).contiguous()
    return st_save(blob, metadata={"wire": dtype})


def framing_bytes(blob: bytes) -> int:
    """Bytes of the safetensors header (8-byte length + JSON), i.e. everything but tensor data."""
    (n,) = struct.unpack("<Q", blob[:8])
    return 8 + int(n)


def expected_size(layout: Layout, dtype: WireDtype) -> int:
    """Size of a well-formed blob for this layout (encoded from zeros)."""
    zeros = {n: torch.zeros(s) for n, s in layout.entries}
    return len(encode(zeros, layout, dtype))


def decode(
    blob: bytes, layout: Layout, dtype: WireDtype = "fp32", *, max_bytes: int | None = None
) -> dict[str, torch.Tensor]:
    """Parse and validate a blob against the layout; return float32 tensors by name.

    Rejects (PayloadError, one line): oversize, unparseable, wrong wire dtype, unknown or missing
    entries, wrong shapes, NaN/Inf.
    """
    if max_bytes is not None and len(blob) > max_bytes:
        raise PayloadError(f"payload oversize: {len(blob)} bytes > limit {max_bytes}")
    try:
        raw = st_load(blob)
        header = json.loads(blob[8 : framing_bytes(blob)])
    except (SafetensorError, ValueError, struct.error) as err:
        raise PayloadError(f"payload malformed: {str(err).splitlines()[0][:120]}") from None
    wire = (header.get("__metadata__") or {}).get("wire")
    if wire != dtype:
        raise PayloadError(f"payload wire dtype {wire!r}, expected {dtype!r}")
    groups = layout.groups()
    expected_keys = set(groups) | ({k + SCALE for k in groups} if dtype == "int8" else set())
    unknown = set(raw) - expected_keys
    if unknown:
        raise PayloadError(f"payload has unknown tensor {sorted(unknown)[0]!r}")
    missing = expected_keys - set(raw)
    if missing:
        raise PayloadError(f"payload lacks tensor {sorted(missing)[0]!r}")
    shapes = dict(layout.entries)
    out: dict[str, torch.Tensor] = {}
    for key, names in groups.items():
        t = raw[key]
        want = (len(names), *shapes[names[0]])
        if tuple(t.shape) != want or t.dtype != _TORCH[dtype]:
            raise PayloadError(f"payload tensor {key!r}: {t.dtype} {tuple(t.shape)}, expected {dtype} {want}")
        x = t.to(torch.float32)
        if dtype == "int8":
            scale = raw[key + SCALE]
            if tuple(scale.shape) != (len(names),) or scale.dtype != torch.float32:
                raise PayloadError(f"payload tensor {key + SCALE!r} has the wrong shape or dtype")
            x = x * scale.reshape(-1, *([1] * (x.dim() - 1)))
        if not torch.isfinite(x).all():
            raise PayloadError(f"payload tensor {key!r} contains NaN or Inf")
        for i, n in enumerate(names):
            out[n] = x[i].clone()
    return out


def encode_named(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Self-describing fp32 blob (one safetensors entry per tensor), for one-time messages."""
    return st_save(
        {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, metadata={"wire": "fp32"}
    )


def decode_named(blob: bytes, *, max_bytes: int) -> dict[str, torch.Tensor]:
    """Parse a self-describing blob; reject oversize, malformed, non-fp32 or non-finite content.

    Names and shapes are checked by the consumer (e.g. ``summary_from_tensors``).
    """
    if len(blob) > max_bytes:
        raise PayloadError(f"payload oversize: {len(blob)} bytes > limit {max_bytes}")
    try:
        raw = st_load(blob)
    except (SafetensorError, ValueError) as err:
        raise PayloadError(f"payload malformed: {str(err).splitlines()[0][:120]}") from None
    for k, t in raw.items():
        if t.dtype != torch.float32:
            raise PayloadError(f"payload tensor {k!r} is {t.dtype}, expected float32")
        if not torch.isfinite(t).all():
            raise PayloadError(f"payload tensor {k!r} contains NaN or Inf")
    return raw
