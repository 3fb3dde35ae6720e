"""What the client runtime and the server core share: the frozen model with adapters, and the round protocol's
phases (which strategy runs in round t, what trains, what travels, in which layout).

``Backbone``: the loaded model with injected adapters and its initial adapter view (A, B, C, head), identical
on every client and on the server because A, B are drawn from the shared seed. The server uses it only for
names and shapes (layouts); clients train on it.

``Phases``: rounds 1..``aggregation.warmup_rounds`` run the warm-up method, later rounds the configured one.
``Phase``: for one strategy, the upload/download layouts (``celora.fl.payload.Layout``), the FedAvg modules
(a VLM's projector when it trains; a pre-aligned one, ``model.projector = "pretrained"``, is frozen and is none)
and the factors that train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from celora.adapters.bases import get_basis
from celora.adapters.inject import AdapterSpec, get_tensors, inject_adapters, set_tensors, set_trainable, view_names
from celora.config import ExperimentConfig
from celora.data.tasks import Task, get_task
from celora.errors import CeloraError
from celora.fl.payload import Layout, WireDtype, expected_size
from celora.fl.projector_setup import pretrain_projector
from celora.fl.strategies import Strategy, Tensors, get_strategy
from celora.models.device import CPU, Placement, resolve_placement
from celora.models.vlm import VisionLanguageModel
from celora.models.zoo import ALL_LINEAR, LoadedModel, all_linear_targets, bf16_on_cpu, load_model


def frozen_factors(cfg: ExperimentConfig) -> set[str]:
    """Adapter factors the config freezes for every method (model.train_ab, model.train_c, and A, B for a
    frozen basis: orthogonal, gradient)."""
    frozen = (set() if cfg.model.train_ab else {"A", "B"}) | (set() if cfg.model.train_c else {"C"})
    return frozen | ({"A", "B"} if get_basis(cfg.model.basis).frozen else set())


@dataclass
class Backbone:
    """The frozen base with adapters, its adapter parameter names and their initial values."""

    loaded: LoadedModel
    spec: AdapterSpec
    init_state: Tensors
    all_names: list[str]
    task: Task
    placement: Placement = CPU  # train.device / train.precision: where the model lives, autocast

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def load(self, state: Tensors) -> None:
        """Copy a client's adapter view into the shared model."""
        set_tensors(self.loaded.model, state)

    def zero_delta_state(self) -> Tensors:
        """The initial view with every C at 0: ΔW = s·A·C·B = 0 in every basis (the gradient basis starts at
        C₀ = diag(S_r), so its initial view is already one estimated fine-tuning step, not the base model)."""
        return {k: torch.zeros_like(v) if k.endswith(".lora_C") else v for k, v in self.init_state.items()}

    def snapshot(self) -> Tensors:
        """The model's current adapter view (CPU float32 copies)."""
        return get_tensors(self.loaded.model, self.all_names)

    def fresh_state(self) -> Tensors:
        """The initial adapter view every client starts from. Its tensors are the shared ``init_state``'s (a
        state is replaced, never changed in place), so an untouched client costs nothing to keep or checkpoint."""
        return dict(self.init_state)

    @property
    def feature_dim(self) -> int | None:
        """Width of the pooled features the data summaries are fitted on (None when unknown)."""
        model = self.loaded.model
        config = getattr(model, "config", None)
        return int(getattr(model, "feature_dim", 0) or getattr(config, "hidden_size", 0)) or None


@dataclass
class Phase:
    """One strategy's protocol: what trains, what travels and in which layout."""

    strategy: Strategy
    up_layout: Layout
    down_layout: Layout
    fedavg_names: list[str]
    trained: frozenset[str]
    dtype: WireDtype
    max_up: int  # uploads larger than this are rejected (payload.max_bytes_factor × expected)

    @property
    def shares(self) -> bool:
        return bool(self.up_layout.entries)

    def trainable(self, bench: Backbone) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """Set the freeze masks on the shared model; (trainable params, of which the head's)."""
        model, heads = bench.loaded.model, bench.loaded.head_modules
        params = set_trainable(model, self.trained, heads)
        head_params = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in heads]
        return params, head_params


class Phases:
    """The strategy (and its ``Phase``) of every round: the warm-up method first, then the configured one.

    The server keeps one ``Phases`` for the run (its strategies carry the aggregation state); every client
    has its own, used only for what trains and travels.
    """

    def __init__(self, cfg: ExperimentConfig, bench: Backbone) -> None:
        agg = cfg.aggregation
        self.cfg = cfg
        self.bench = bench
        self.main: Strategy = get_strategy(cfg.method, agg)
        self.warmup: Strategy | None = get_strategy(agg.warmup_method, agg) if agg.warmup_rounds else None
        self._phases: dict[int, Phase] = {}

    def strategy_for(self, rnd: int) -> Strategy:
        """The warm-up method for rounds 1..warmup_rounds, the configured method afterwards."""
        if self.warmup is not None and rnd <= self.cfg.aggregation.warmup_rounds:
            return self.warmup
        return self.main

    def strategies(self) -> list[Strategy]:
        return [s for s in (self.warmup, self.main) if s is not None]

    def phase(self, rnd: int) -> Phase:
        """The protocol of round ``rnd`` (round 0 = round 1's)."""
        strategy = self.strategy_for(max(1, rnd))
        key = id(strategy)
        if key not in self._phases:
            self._phases[key] = self._build(strategy)
        return self._phases[key]

    def _build(self, strategy: Strategy) -> Phase:
        bench, cfg = self.bench, self.cfg
        model, heads = bench.loaded.model, bench.loaded.head_modules
        shared = view_names(model, strategy.shared_factors, heads)
        # modules every sharing method federates by FedAvg beside its own factors (a VLM's projector)
        fedavg_names = view_names(model, {"head"}, bench.loaded.fedavg_modules) if shared else []
        shared = [n for n in shared if n not in set(fedavg_names)] + fedavg_names
        up = Layout.of(bench.init_state, shared)
        dtype: WireDtype = cfg.payload.dtype
        max_up = int(expected_size(up, dtype) * cfg.payload.max_bytes_factor) + 1024
        trained = frozenset(set(strategy.trained_factors) - frozen_factors(cfg))
        return Phase(strategy, up, up, fedavg_names, trained, dtype, max_up)


def seeded(seed: int, rnd: int, salt: int) -> None:
    """Seed torch for client ``salt``'s local work in round ``rnd`` (identical in every runtime)."""
    torch.manual_seed(seed * 100_003 + rnd * 1_009 + salt)


def placement_of(cfg: ExperimentConfig) -> Placement:
    """train.device / train.precision resolved on this machine."""
    return resolve_placement(cfg.train.device, cfg.train.precision, bf16_on_cpu=bf16_on_cpu(cfg.model.name))


def targets_of(loaded: LoadedModel, targets: list[str] | str | None) -> tuple[str, ...]:
    """The modules to adapt: ``model.targets`` as given, every linear layer of the blocks (``"all-linear"``,
    the task head and FedAvg modules left out), or the model's default."""
    if targets == ALL_LINEAR:
        return all_linear_targets(loaded.model, (*loaded.head_modules, *loaded.fedavg_modules))
    return tuple(targets or loaded.default_targets)


def load_backbone(
    cfg: ExperimentConfig, num_labels: int, placement: Placement = CPU
) -> tuple[LoadedModel, AdapterSpec, Task]:
    """The frozen base for ``num_labels`` classes with adapters injected (no data needed), in the placement's
    weight dtype (``place_model`` moves it to its device)."""
    task = get_task(cfg.data.task or "classify").configured(cfg)
    loaded = load_model(
        cfg.model.name,
        num_labels=num_labels,
        seed=cfg.seed,
        head=task.head,  # type: ignore[arg-type]
        dtype=placement.weights,
    )
    m = cfg.model
    if m.projector_hidden is not None:
        if not isinstance(loaded.model, VisionLanguageModel):
            raise CeloraError(f"model.projector_hidden: only for a vision-language model, not '{m.name}'")
        loaded.model.set_projector_width(m.projector_hidden, cfg.seed)
    if m.projector == "pretrained":  # pre-aligned on public images, frozen: it neither trains nor travels
        loaded = pretrain_projector(loaded, task, cfg, placement)
    spec = AdapterSpec(
        rank=m.rank,
        alpha=m.alpha if m.alpha is not None else float(m.rank),
        targets=targets_of(loaded, m.targets),
        dropout=m.dropout,
        init=m.init,
        basis=m.basis,
        seed=cfg.seed,
        heads=m.heads,
    )
    try:
        inject_adapters(loaded.model, spec)
    except ValueError as err:
        raise CeloraError(f"model.rank: {err}") from None
    return loaded, spec, task


def backbone_of(loaded: LoadedModel, spec: AdapterSpec, task: Task, placement: Placement = CPU) -> Backbone:
    """Freeze the adapter view as it is now (the initial state every client starts from)."""
    all_names = view_names(loaded.model, {"A", "B", "C", "head"}, loaded.head_modules)
    return Backbone(loaded, spec, get_tensors(loaded.model, all_names), all_names, task, placement)
