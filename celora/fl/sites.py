"""Site-local data in the federation (``data.sites``): every client runtime loads only its own file.

The set-up before round 1 is the same calls in-process (:func:`prepare_sites`) and under Flower
(``celora.fl.flower``: one node loads one site, :func:`prepare_site`); only the transport differs:

1. **labels** (site → server → site; skipped when ``data.labels`` is declared): site i reads its own file
   and sends its label names (:meth:`SiteLoader.label_message`); the server fixes the run's label space
   (:func:`agree_label_space`) and sends it back in the config (``data.labels``, :func:`with_labels`).
2. **rows** (on the site): site i maps its rows into that space, splits its own test set and encodes them
   (:meth:`SiteLoader.client_data`: the ``ClientData`` of the client runtime); the shared global test file
   (``data.global_test_path``), if any, is appended as the site's global rows.
3. **task set-up** (site → server → site; only tasks that have one, e.g. the VLM projector's μ, σ): site i
   uploads statistics of its own training rows (:func:`statistics_blob`), the server combines them
   (:func:`combine_setup`) and every site installs the result (:func:`apply_setup_blob`).

Every message is a blob whose length is counted (:class:`SetupBytes`). The server side never opens a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from celora.adapters.inject import AdapterSpec
from celora.config import ExperimentConfig
from celora.data.sites import (
    agree_labels,
    label_message,
    load_global_test,
    load_site,
    parse_label_message,
    read_site,
    site_path,
)
from celora.data.sources import Dataset
from celora.data.tasks import TASKS, Task
from celora.errors import CeloraError
from celora.fl.backbone import Backbone, backbone_of, load_backbone, placement_of
from celora.fl.client import ClientData
from celora.fl.payload import PayloadError, decode_named, encode_named
from celora.fl.strategies import Tensors
from celora.models.device import Placement, place_model
from celora.models.zoo import LoadedModel

SETUP_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class SetupBytes:
    """Bytes of the one-time site set-up per client: up (label names, task statistics) and down."""

    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)

    def add(self, side: str, i: int, nbytes: int) -> None:
        book = self.up if side == "up" else self.down
        book[i] = book.get(i, 0) + int(nbytes)

    def totals(self) -> dict[str, int]:
        return {"up": int(sum(self.up.values())), "down": int(sum(self.down.values()))}


def concat_rows(a: Dataset, b: Dataset) -> Dataset:
    """The rows of ``a`` followed by those of ``b`` (same label space; extra columns dropped)."""
    images = None if a.images is None or b.images is None else np.concatenate([a.images, b.images])

    def cat(x: list[Any] | None, y: list[Any] | None) -> list[Any] | None:
        return None if x is None or y is None else x + y

    return replace(
        a,
        texts=a.texts + b.texts,
        labels=np.concatenate([a.labels, b.labels]),
        columns={},
        images=images,
        responses=cat(a.responses, b.responses),
        systems=cat(a.systems, b.systems),
        histories=cat(a.histories, b.histories),
    )


def with_labels(cfg: ExperimentConfig, labels: list[str]) -> ExperimentConfig:
    """The config with the run's label space declared (what the server sends the sites after step 1)."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"labels": list(labels)})})


class SiteLoader:
    """One site's own file (client side): read once; then its label names, then its ``ClientData``."""

    def __init__(self, cfg: ExperimentConfig, index: int, path: str | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.path = site_path(cfg.data, index, path)
        self.raw = read_site(cfg.data, index, self.path, seed=cfg.seed)

    def label_message(self) -> bytes:
        """Step 1: this site's label names (the only thing about its rows it sends for the label space)."""
        return label_message(self.raw.label_names)

    def client_data(self, labels: list[str], task: Task, loaded: LoadedModel) -> ClientData:
        """Step 2: the site's rows in the label space ``labels``, its own split, encoded by ``task``."""
        cfg, d = self.cfg, self.cfg.data
        raw = task.prepare_rows(self.raw, loaded.tokenizer, cfg.model.max_length)  # before the split
        site = load_site(d, self.index, labels, seed=cfg.seed, path=self.path, dataset=raw)
        own = replace(
            site.dataset,
            instruction=d.instruction or site.dataset.instruction,
            verbalizers=d.verbalizers or site.dataset.verbalizers,
        )
        glob = load_global_test(d, labels)
        if glob is not None:
            glob = task.prepare_rows(glob, loaded.tokenizer, cfg.model.max_length)
        rows = own if glob is None else concat_rows(own, glob)
        encoded = task.build(rows, loaded.tokenizer, cfg.model.max_length)
        meta: dict[str, Any] = {
            "scheme": "sites",
            "dataset": "data.sites",
            "skipped_rows": own.skipped_rows,
            "global_test": 0 if glob is None else len(glob),
        }
        global_idx = np.arange(len(own), len(rows), dtype=np.int64)
        return ClientData(
            self.index, encoded, rows.labels, list(labels), site.train_idx, site.test_idx, global_idx, meta
        )


def agree_label_space(cfg: ExperimentConfig, messages: dict[int, bytes], *, partial: bool = False) -> list[str]:
    """Server side of step 1: the union of the sites' label names, from their messages (``partial``: of the sites
    that answered; a site that joins later must hold labels inside it, which it checks when it loads its file)."""
    sites = cfg.data.sites or []
    missing = sorted(set(range(len(sites))) - set(messages))
    if missing and not partial:
        raise CeloraError(f"no label names received from site(s) {missing}")
    present = sorted(messages)
    names = [parse_label_message(messages[i], i) for i in present]
    one_class = cfg.data.task in TASKS and TASKS[str(cfg.data.task)].rows == "generative"
    return agree_labels(names, [sites[i] for i in present], cfg.data.labels, min_classes=1 if one_class else 2)


def statistics_blob(task: Task, loaded: LoadedModel, data: ClientData) -> bytes:
    """Step 3, site side: the task's statistics of this site's training rows, serialized (b"" if none)."""
    stats = task.site_statistics(loaded.model, data.data, data.train_idx)
    return encode_named(stats) if stats else b""


def combine_setup(task: Task, blobs: dict[int, bytes]) -> bytes:
    """Step 3, server side: decode and check every site's statistics and combine them (b"" if none)."""
    stats: list[Tensors] = []
    for i, blob in sorted(blobs.items()):
        if not blob:
            continue
        try:
            stats.append(decode_named(blob, max_bytes=SETUP_MAX_BYTES))
        except PayloadError as err:
            raise CeloraError(f"client {i}: task statistics rejected: {err}") from None
    if not stats:
        return b""
    try:
        return encode_named(task.combine_statistics(stats))
    except (KeyError, RuntimeError, ValueError) as err:
        raise CeloraError(f"task statistics rejected: {type(err).__name__}: {err}") from None


def apply_setup_blob(task: Task, loaded: LoadedModel, blob: bytes) -> None:
    """Step 3, every site: install the combined set-up in its model."""
    if blob:
        task.apply_setup(loaded.model, decode_named(blob, max_bytes=SETUP_MAX_BYTES))


class SiteProvider:
    """The ``DataProvider`` of ``data.sites``: client i's ``ClientData`` from its own file (only the sites
    loaded in this process: all of them in-process, one on a SuperNode)."""

    def __init__(self, num_clients: int, datas: dict[int, ClientData]) -> None:
        self.num_clients = num_clients
        self.datas = datas

    def client(self, i: int) -> ClientData:
        if i not in self.datas:
            raise CeloraError(f"site {i}: its data is not loaded in this process (each site loads only its own)")
        return self.datas[i]


@dataclass
class SitesPrepared:
    """What ``prepare`` returns for ``data.sites``: the model and each loaded site's ``ClientData``."""

    cfg: ExperimentConfig  # with data.labels = the run's label space
    bench: Backbone
    datas: dict[int, ClientData]
    setup: SetupBytes = field(default_factory=SetupBytes)
    basis_setup: dict[str, Any] = field(default_factory=dict)  # (no server-side proxy rows with data.sites)

    @property
    def loaded(self) -> LoadedModel:
        return self.bench.loaded

    @property
    def spec(self) -> AdapterSpec:
        return self.bench.spec

    @property
    def task(self) -> Task:
        return self.bench.task

    @property
    def setup_bytes_up(self) -> int:
        """One-time bytes every site uploaded for the set-up (label names, task statistics)."""
        return self.setup.totals()["up"]

    def provider(self) -> SiteProvider:
        return SiteProvider(self.cfg.num_clients, self.datas)


def _site_model(cfg: ExperimentConfig, num_labels: int) -> tuple[LoadedModel, AdapterSpec, Task, Placement]:
    """The frozen base with adapters for ``num_labels`` classes, placed on ``train.device`` (every site alike)."""
    if cfg.model.basis == "gradient":
        raise CeloraError(
            "model.basis = 'gradient' estimates its basis on the server's public proxy rows; "
            "with data.sites the server holds no rows: use another basis"
        )
    placement = placement_of(cfg)
    loaded, spec, task = load_backbone(cfg, num_labels, placement)
    place_model(loaded.model, placement, (*loaded.head_modules, *loaded.fedavg_modules))
    return loaded, spec, task, placement


def prepare_sites(cfg: ExperimentConfig) -> SitesPrepared:
    """In-process: every site loads its own file with its own ``SiteLoader``; the server side only sees
    the label names and the task statistics (steps 1-3 of the module docstring, bytes counted)."""
    book = SetupBytes()
    loaders = {i: SiteLoader(cfg, i) for i in range(cfg.num_clients)}
    if cfg.data.labels is None:
        messages = {i: loader.label_message() for i, loader in loaders.items()}
        labels = agree_label_space(cfg, messages)
        for i, msg in messages.items():
            book.add("up", i, len(msg))
        cfg = with_labels(cfg, labels)
    labels = list(cfg.data.labels or [])
    loaded, spec, task, placement = _site_model(cfg, len(labels))
    datas = {i: loader.client_data(labels, task, loaded) for i, loader in loaders.items()}
    with placement.autocast():
        blobs = {i: statistics_blob(task, loaded, data) for i, data in datas.items()}
    combined = combine_setup(task, blobs)
    for i, blob in blobs.items():
        book.add("up", i, len(blob))
        book.add("down", i, len(combined))
    apply_setup_blob(task, loaded, combined)
    return SitesPrepared(cfg, backbone_of(loaded, spec, task, placement), datas, book)


def prepare_site(cfg: ExperimentConfig, index: int, path: str | None = None) -> SitesPrepared:
    """On a SuperNode: site ``index`` loads only its own file (``path``: the node's ``site-path``), in the
    label space the server sent (``data.labels``); the task set-up is applied later (:func:`apply_setup_blob`)."""
    labels = cfg.data.labels
    if labels is None:
        raise CeloraError("data.sites: the setup message carries no label space (data.labels)")
    loader = SiteLoader(cfg, index, path)
    loaded, spec, task, placement = _site_model(cfg, len(labels))
    data = loader.client_data(list(labels), task, loaded)
    return SitesPrepared(cfg, backbone_of(loaded, spec, task, placement), {index: data})
