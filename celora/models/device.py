"""Where the frozen base runs and in what precision: ``train.device`` and ``train.precision``.

- device: ``auto`` (CUDA if available, else CPU) | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps``.
- precision: ``fp32`` | ``bf16`` | ``fp16`` | ``auto``. With bf16/fp16 the frozen base is stored in that
  dtype and every forward pass runs under ``torch.autocast(device, dtype)``; adapters (A, B, C), the task
  head, FedAvg modules and the optimizer state stay fp32. fp16 adds a GradScaler: the loss is multiplied
  by S before ``backward``, gradients are divided by S before the step, a step with inf/nan gradients is
  skipped and S halved. ``auto``: on the CPU today's behaviour (no autocast; a model that opts in, e.g.
  SmolLM2, is stored in bf16 only where the CPU has native bf16 arithmetic), on CUDA bf16 where the GPU
  supports it (else fp32), on MPS fp32.

The model is placed once (``place_model``); batches are moved to the model's device once per batch
(``to_device``); every tensor the task code creates takes its device from the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import torch
from torch import nn

from celora.config import check_device_name
from celora.errors import CeloraError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
T = TypeVar("T")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """A resolved (device, precision): ``weights`` = storage dtype of the frozen base (None: the model's
    default), ``compute`` = the autocast dtype (None: no autocast)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    weights: torch.dtype | None = None
    compute: torch.dtype | None = None

    def autocast(self) -> AbstractContextManager[object]:
        """``torch.autocast`` in the compute dtype on this device (a no-op in full precision)."""
        if self.compute is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16 compute (bf16 and fp32 need none)."""
        return torch.amp.GradScaler(self.device.type) if self.compute == torch.float16 else None

    def describe(self) -> str:
        """e.g. ``cuda:0, bf16 autocast`` or ``cpu, fp32``."""
        if self.compute is not None:
            return f"{self.device}, {str(self.compute).removeprefix('torch.')} autocast"
        weights = str(self.weights or torch.float32).removeprefix("torch.")
        return f"{self.device}, {weights}"


CPU = Placement()


def resolve_device(name: str) -> torch.device:
    """``train.device`` → a torch device that exists here (CeloraError naming train.device otherwise)."""
    try:
        check_device_name(name)
    except ValueError as err:
        raise CeloraError(f"train.device: {err}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise CeloraError("train.device = 'mps': Apple MPS is not available on this machine (use 'cpu' or 'auto')")
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise CeloraError(f"train.device = '{name}': CUDA is not available ({why}); use train.device = 'cpu' or 'auto'")
    index = int(name.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise CeloraError(f"train.device = '{name}': this machine has {count} CUDA device(s) (cuda:0…cuda:{count - 1})")
    return torch.device("cuda", index)


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX512-BF16 or AMX)."""
    capability = str(torch.backends.cpu.get_cpu_capability()).upper()
    return "AMX" in capability or "BF16" in capability


def resolve_placement(device: str, precision: Precision, *, bf16_on_cpu: bool = False) -> Placement:
    """``train.device`` + ``train.precision`` → a :class:`Placement`.

    ``bf16_on_cpu``: the model asks to be stored in bf16 on a CPU with native bf16 (precision ``auto``).
    """
    dev = resolve_device(device)
    if precision == "auto":
        if dev.type == "cpu":
            return Placement(dev, torch.bfloat16 if bf16_on_cpu and cpu_has_native_bf16() else torch.float32)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
            return Placement(dev, torch.bfloat16, torch.bfloat16)
        return Placement(dev, torch.float32)
    if precision not in DTYPES:
        raise CeloraError(f"train.precision = '{precision}': expected auto, fp32, bf16 or fp16")
    dtype = DTYPES[precision]
    return Placement(dev, dtype, None if dtype == torch.float32 else dtype)


def place_model(model: nn.Module, placement: Placement, keep_fp32: Iterable[str] = ()) -> nn.Module:
    """Move the model to the placement's device once; under autocast, the submodules named in ``keep_fp32``
    (task head, FedAvg modules) and every adapter factor are kept in fp32 (they train)."""
    model.to(placement.device)
    if placement.compute is None:
        return model
    for name in keep_fp32:
        model.get_submodule(name).float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if ".lora_" in pname and p.dtype != torch.float32:
                p.data = p.data.float()
    return model


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor of a batch on ``device`` (one copy per tensor; a no-op where it already is)."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}


def is_out_of_memory(err: BaseException) -> bool:
    """Whether an exception means a batch did not fit (CUDA/MPS/CPU allocators)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class BatchFit:
    """The largest evaluation batch that fits: starts at ``size`` and halves whenever a batch runs out of memory
    (remembered for later calls); a batch of one that does not fit re-raises."""

    def __init__(self, size: int) -> None:
        self.size = max(1, int(size))
        self.halvings = 0

    def map(self, fn: Callable[[int, int], T], n: int) -> list[T]:
        """``[fn(start, stop) for consecutive slices of range(n)]``, each slice at most ``size`` long."""
        out: list[T] = []
        start = 0
        while start < n:
            stop = min(n, start + self.size)
            try:
                out.append(fn(start, stop))
            except Exception as err:
                if self.size == 1 or not is_out_of_memory(err):
                    raise
                self.size = max(1, self.size // 2)
                self.halvings += 1
                release_cached_memory()
                continue
            start = stop
        return out


def release_cached_memory() -> None:
    """Return the allocator's cached blocks to the device (after an out-of-memory batch)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available():
        torch.mps.empty_cache()
