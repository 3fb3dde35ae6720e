"""Loading a run: name checks, the frozen model with adapters (``prepare_model``), and today's data provider
(one dataset partitioned by seed, ``prepare``).

``prepare(cfg)`` loads the whole dataset once, partitions it into clients, tokenizes once and builds the
model: the in-process default, where every client's ``ClientData`` indexes one shared ``TaskData``.
The server core needs only ``prepare_model`` (names and shapes, never rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celora.adapters.inject import AdapterSpec
from celora.config import ExperimentConfig
from celora.data.formats import generative_reader
from celora.data.mixture import MIXTURE_CLIENT, load_mixture
from celora.data.partition import FederatedSplit, make_federated_split
from celora.data.sources import Dataset, load_dataset
from celora.data.tasks import Task, TaskData, get_task
from celora.errors import CeloraError
from celora.fl.backbone import Backbone, backbone_of, frozen_factors, load_backbone, placement_of
from celora.fl.basis_setup import check_basis, setup_gradient_basis
from celora.fl.client import PartitionedData
from celora.fl.strategies import Tensors, get_strategy
from celora.models.device import CPU, Placement, place_model, resolve_device
from celora.models.zoo import LoadedModel

if TYPE_CHECKING:
    from celora.fl.sites import SitesPrepared

__all__ = ["Prepared", "check_names", "frozen_factors", "prepare", "prepare_model"]


@dataclass
class Prepared:
    """Everything loaded once per run: data, split, tokenized inputs, model with adapters."""

    dataset: Dataset
    split: FederatedSplit
    encoded: TaskData
    loaded: LoadedModel
    spec: AdapterSpec
    init_state: Tensors
    all_names: list[str]
    task: Task
    task_setup_bytes: int = 0  # per client, once (Task.setup)
    placement: Placement = CPU  # train.device / train.precision, resolved
    basis_setup: dict[str, Any] = field(default_factory=dict)  # the gradient basis's proxy estimate (a note)

    @property
    def bench(self) -> Backbone:
        return Backbone(self.loaded, self.spec, self.init_state, self.all_names, self.task, self.placement)

    @property
    def setup_bytes_up(self) -> int:
        """One-time bytes all clients uploaded for the task's set-up."""
        return self.task_setup_bytes * len(self.split.clients)

    def provider(self) -> PartitionedData:
        """Today's data provider: every client indexes the one encoded dataset."""
        return PartitionedData(self.dataset, self.split, self.encoded)


def check_names(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fail fast (CeloraError naming the field) on an unknown method, model or dataset; return the config
    with method-imposed settings applied (e.g. Fed-SB's SVD basis)."""
    from celora.data.sources import DATASETS
    from celora.models.zoo import ZOO, default_task, has_lm

    strategy = get_strategy(cfg.method)
    if strategy.basis is not None and cfg.model.basis != strategy.basis:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"basis": strategy.basis})})
    phases = [("method", strategy)]
    if cfg.aggregation.warmup_rounds:
        phases.append(("aggregation.warmup_method", get_strategy(cfg.aggregation.warmup_method)))
    for field_name, strat in phases:
        check_basis(cfg, field_name, strat.name, strat.trains)
        trains = set(strat.trains) - frozen_factors(cfg)
        if not trains:
            raise CeloraError(
                f"model.train_ab/train_c/basis ('{cfg.model.basis}') leave {field_name} '{strat.name}' nothing to train"
            )
    if cfg.model.name not in ZOO and not (Path(cfg.model.name) / "config.json").is_file():
        known = ", ".join(sorted(ZOO))
        raise CeloraError(f"unknown model.name '{cfg.model.name}' (known: {known}, or a local HF folder)")
    task = get_task(cfg.data.task or default_task(cfg.model.name))
    kind = ZOO[cfg.model.name].kind if cfg.model.name in ZOO else None
    if (kind is not None and kind not in task.model_kinds) or (task.head == "lm" and not has_lm(cfg.model.name)):
        raise CeloraError(
            f"data.task '{task.name}' needs a {' or '.join(sorted(task.model_kinds))} model"
            + (" with a causal-LM form" if task.head == "lm" else "")
            + f"; model.name '{cfg.model.name}' is {kind or 'a local folder'}"
        )
    if cfg.data.summary_features not in task.summary_views:
        raise CeloraError(
            f"data.summary_features = '{cfg.data.summary_features}' needs data.task = 'generate' "
            f"(this run's task: '{task.name}')"
        )
    if cfg.data.task != task.name:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"task": task.name})})
    for comp in cfg.data.mixture or []:
        if comp.name is not None and comp.name not in DATASETS:
            raise CeloraError(f"data.mixture: unknown dataset '{comp.name}' (known: {', '.join(sorted(DATASETS))})")
    no_rows = cfg.data.sites is None and cfg.data.path is None and cfg.data.mixture is None
    if no_rows and cfg.data.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise CeloraError(f"unknown data.name '{cfg.data.name}' (known: {known}; or set data.path)")
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise CeloraError(f"data.path: file not found: {cfg.data.path}")
    resolve_device(cfg.train.device)  # one line naming train.device when it is not on this machine
    return cfg


def prepare_model(cfg: ExperimentConfig, num_labels: int) -> Backbone:
    """The model side alone (what a server needs for layouts): base + adapters for ``num_labels`` classes.

    Tasks with a one-time federated set-up (``Task.setup``, e.g. a VLM's projector statistics) change the
    initial state; their server must apply the same set-up before taking this backbone's ``init_state``."""
    cfg = check_names(cfg)
    placement = placement_of(cfg)
    return backbone_of(*load_backbone(cfg, num_labels, placement), placement)


def prepare(cfg: ExperimentConfig) -> Prepared | SitesPrepared:
    """Load data, partition it, tokenize once, build the frozen model and inject adapters; with
    ``data.sites`` every site loads its own file instead (``celora.fl.sites.prepare_sites``)."""
    cfg = check_names(cfg)
    if cfg.data.sites is not None:
        from celora.fl.sites import prepare_sites

        return prepare_sites(cfg)
    placement = placement_of(cfg)
    d = cfg.data
    generative = get_task(str(d.task)).rows == "generative"
    if d.mixture is not None:
        dataset = load_mixture(d, generative=generative, seed=cfg.seed)
    else:
        dataset = load_dataset(
            None if d.path else d.name,
            path=d.path,
            text_column=d.text_column,
            label_column=d.label_column,
            column=d.column,
            max_samples=d.max_samples,
            seed=cfg.seed,
            image_column=d.image_column,
            image_size=d.image_size,
            reader=generative_reader(d) if generative else None,
        )
    if d.instruction is not None or d.verbalizers is not None:
        dataset = replace(
            dataset, instruction=d.instruction or dataset.instruction, verbalizers=d.verbalizers or dataset.verbalizers
        )
    loaded, spec, task = load_backbone(cfg, len(dataset.label_names), placement)
    place_model(loaded.model, placement, (*loaded.head_modules, *loaded.fedavg_modules))  # once: the base stays there
    dataset = task.prepare_rows(dataset, loaded.tokenizer, cfg.model.max_length)  # before the split
    column = MIXTURE_CLIENT if d.mixture is not None else d.column  # a mixture: its clients are given
    column_values = dataset.columns.get(column) if column else None
    split = make_federated_split(
        dataset.labels,
        cfg.num_clients,
        "natural" if d.mixture is not None else d.partition,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
        column_values=column_values,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        global_test_fraction=d.global_test_fraction,
        train_per_client=d.train_per_client,
        test_per_client=d.test_per_client,
    )
    encoded = task.build(dataset, loaded.tokenizer, cfg.model.max_length)
    basis_note: dict[str, Any] = {}
    if cfg.model.basis == "gradient":  # before round 1, on the server's public proxy rows
        split, basis_note = setup_gradient_basis(loaded.model, task, encoded, split, len(dataset), cfg)
    with placement.autocast():
        setup_bytes = task.setup(loaded.model, encoded, [c.train_idx for c in split.clients])
    bench = backbone_of(loaded, spec, task, placement)
    init, names = bench.init_state, bench.all_names
    return Prepared(dataset, split, encoded, loaded, spec, init, names, task, setup_bytes, placement, basis_note)
