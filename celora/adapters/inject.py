"""Wire tri-matrix adapters into any HF model and expose named views of A, B, C and the head.

Parameter names in a view are the model's own: ``<module>.lora_A``, ``<module>.lora_C``,
``<module>.lora_B`` for adapted linears and ``<head module>.<param>`` for the task head.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from celora.adapters.trilora import Basis, ClientFactors, Init, TriLoraLinear, module_seed
from celora.errors import CeloraError

HEAD = "head"
ALL_FACTORS = frozenset({"A", "B", "C", HEAD})


@dataclass(frozen=True)
class AdapterSpec:
    """Where and how adapters are placed: rank r, α (s = α/r), target module names, init."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ("query", "value")
    dropout: float = 0.0
    init: Init = "kaiming"
    basis: Basis = "random"
    seed: int = 0
    heads: int = 1


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def inject_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Replace every ``nn.Linear`` whose name ends with a target by a TriLoraLinear; return names.

    Each module's A, B, C come from ``module_seed(spec.seed, name)``: identical on every client.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not _matches(name, spec.targets):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = TriLoraLinear(
            module,
            rank=spec.rank,
            alpha=spec.alpha,
            dropout=spec.dropout,
            init=spec.init,
            basis=spec.basis,
            seed=module_seed(spec.seed, name),
            heads=spec.heads,
        )
        setattr(parent, child, layer)
        wrapped.append(name)
    if not wrapped:
        linears = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise CeloraError(f"model.targets {list(spec.targets)} match no linear layer (available: {', '.join(linears)})")
    return wrapped


def adapter_layers(model: nn.Module) -> dict[str, TriLoraLinear]:
    """All tri-matrix layers of a model, by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, TriLoraLinear)}


def factor_of(param_name: str) -> str:
    """'A' | 'B' | 'C' for adapter factors, 'head' for anything else in a view."""
    for f in ("A", "B", "C"):
        if param_name.endswith(".lora_" + f):
            return f
    return HEAD


def view_names(model: nn.Module, factors: Iterable[str], head_modules: Sequence[str]) -> list[str]:
    """Ordered parameter names of the given factors ('A', 'B', 'C', 'head')."""
    wanted = set(factors)
    unknown = wanted - ALL_FACTORS
    if unknown:
        raise ValueError(f"unknown factors {sorted(unknown)}")
    names: list[str] = []
    for mod in adapter_layers(model):
        names += [f"{mod}.lora_{f}" for f in ("A", "C", "B") if f in wanted]
    if HEAD in wanted:
        for head in head_modules:
            names += [f"{head}.{p}" for p, _ in model.get_submodule(head).named_parameters()]
    return names


def get_tensors(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Detached CPU float32 copies of the named parameters."""
    params = dict(model.named_parameters())
    return {n: params[n].detach().to("cpu", torch.float32).clone() for n in names}


@torch.no_grad()
def set_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into the model's parameters (shapes must match)."""
    params = dict(model.named_parameters())
    for n, t in tensors.items():
        p = params[n]
        if p.shape != t.shape:
            raise ValueError(f"{n}: shape {tuple(t.shape)} != {tuple(p.shape)}")
        p.copy_(t.to(p))


def set_trainable(model: nn.Module, factors: Iterable[str], head_modules: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the given factors; return the trainable parameters.

    A layer's per-head scales (``lora_S``, heads > 1) train with its C; they never travel (they are folded
    into C after local training, :func:`fold_head_scales`)."""
    train = set(view_names(model, factors, head_modules))
    train |= {
        f"{n}.lora_S" for n, m in adapter_layers(model).items() if m.lora_S is not None and f"{n}.lora_C" in train
    }
    out: list[nn.Parameter] = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in train)
        if n in train:
            out.append(p)
    return out


def fold_head_scales(model: nn.Module) -> None:
    """Fold every layer's per-head scales into its C (C ← diag(s) C, s ← 1): ΔW unchanged."""
    for layer in adapter_layers(model).values():
        layer.fold_head_scales()


class SegmentedModule(nn.Module):
    """A module run with a different set of parameters on each client's rows (dim 0 of its first input):
    client k's ``sizes[k]`` consecutive rows see ``params[k]`` (names relative to the module)."""

    def __init__(self, inner: nn.Module, sizes: list[int], params: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.inner, self.sizes, self.params = inner, sizes, params

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] != sum(self.sizes):
            raise ValueError(f"stacked batch has {x.shape[0]} rows, the clients {sum(self.sizes)}")
        parts = [
            functional_call(self.inner, p, (x_k, *args), kwargs)
            for x_k, p in zip(x.split(self.sizes), self.params, strict=True)
        ]
        return torch.cat(parts)


@contextmanager
def clients_forward(
    model: nn.Module, sizes: list[int], views: Sequence[dict[str, torch.Tensor]], head_modules: Sequence[str]
) -> Iterator[None]:
    """Inside, one forward pass of ``model`` serves several clients: the batch's rows are ``sizes[k]``
    consecutive examples of client k, and each adapter layer and task head applies client k's tensors
    ``views[k]`` (the model's parameter names: ``<module>.lora_A`` …, ``<module>.lora_S`` with heads > 1,
    ``<head>.<param>``) to them. The frozen base runs once; the model's own adapter parameters are unused."""
    layers = adapter_layers(model)
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for n, layer in layers.items():
            layer.clients = ClientFactors(
                sizes,
                [v[f"{n}.lora_A"] for v in views],
                [v[f"{n}.lora_C"] for v in views],
                [v[f"{n}.lora_B"] for v in views],
                [v[f"{n}.lora_S"] for v in views] if layer.lora_S is not None else None,
            )
        for head in head_modules:
            parent_name, _, child = head.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            inner = model.get_submodule(head)
            own = [{p: v[f"{head}.{p}"] for p, _ in inner.named_parameters()} for v in views]
            setattr(parent, child, SegmentedModule(inner, sizes, own))
            swapped.append((parent, child, inner))
        yield
    finally:
        for layer in layers.values():
            layer.clients = None
        for parent, child, inner in swapped:
            setattr(parent, child, inner)
