"""The in-process engine (the embedded default): one frozen base, clients trained one after another.

Per round t: sample S_t; each sampled client loads its private state (A, B, C, head), picks up any
message it missed, trains locally, is evaluated ("local step"), and uploads what its method shares
as one serialized blob. The server decodes and validates every blob (a bad one is logged and left
out of this round), the strategy combines the accepted ones, and each participant receives its
message (bytes counted on the blob) and is evaluated again ("aggregated").
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from celora.adapters.inject import AdapterSpec, get_tensors, inject_adapters, set_tensors, set_trainable, view_names
from celora.config import ExperimentConfig, dump_config
from celora.data.partition import FederatedSplit, make_federated_split, partition_summary
from celora.data.sources import Dataset, load_dataset
from celora.data.tasks import Task, TaskData, get_task
from celora.errors import CeloraError
from celora.eval import majority_baseline, personalized_metrics
from celora.fl.client import TrainResult, evaluate, evaluate_metrics, pooled_features, train_local
from celora.fl.payload import (
    Layout,
    PayloadError,
    WireDtype,
    decode,
    decode_named,
    encode,
    encode_named,
    expected_size,
)
from celora.fl.similarity import (
    ClientSummary,
    clip_features,
    fit_class_gmms,
    privatize_summary,
    summary_from_tensors,
    summary_to_tensors,
)
from celora.fl.strategies import RoundContext, Strategy, Tensors, get_strategy
from celora.fl.strategies.fedavg_modules import aggregate_with_fedavg
from celora.models.device import CPU, Placement, place_model, resolve_device, resolve_placement
from celora.models.vlm import VisionLanguageModel
from celora.models.zoo import LoadedModel, bf16_on_cpu, load_model

log = logging.getLogger("celora")

SUMMARY_MAX_BYTES = 64 * 1024 * 1024
WireHook = Callable[[int, int, bytes], bytes]  # (round, client, blob) -> blob: fault injection on uploads


class Observer(Protocol):
    """Progress callbacks (the CLI renders them with rich; tests ignore them)."""

    def on_round_start(self, rnd: int, clients: list[int]) -> None: ...
    def on_client_done(self, rnd: int, client: int, record: ClientRound) -> None: ...
    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None: ...
    def on_message(self, text: str) -> None: ...


class _Silent:
    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        pass

    def on_client_done(self, rnd: int, client: int, record: ClientRound) -> None:
        pass

    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None:
        pass

    def on_message(self, text: str) -> None:
        log.info(text)


@dataclass
class ClientRound:
    """One client's line in a round's metrics."""

    id: int
    n_train: int
    participated: bool
    acc: float  # after local training: the model the client deploys
    loss: float
    acc_agg: float  # after receiving its message from the server
    loss_agg: float
    train_loss: float = float("nan")
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # task extras (e.g. exact_match), final round only


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


@dataclass
class RunResult:
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    states: dict[int, Tensors] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)


def frozen_factors(cfg: ExperimentConfig) -> set[str]:
    """Adapter factors the config freezes for every method (model.train_ab, model.train_c)."""
    return (set() if cfg.model.train_ab else {"A", "B"}) | (set() if cfg.model.train_c else {"C"})


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
        if cfg.model.basis == "svd" and "C" not in strat.trains:
            raise CeloraError(f"{field_name} '{strat.name}' keeps C frozen, but model.basis = 'svd' starts C at 0")
        trains = set(strat.trains) - frozen_factors(cfg)
        if not trains:
            raise CeloraError(f"model.train_ab/train_c leave {field_name} '{strat.name}' nothing to train")
        if cfg.model.basis == "svd" and not cfg.model.train_c:
            raise CeloraError("model.train_c = false with model.basis = 'svd' keeps C at 0: the adapter is off")
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
    if cfg.data.task != task.name:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"task": task.name})})
    if cfg.data.path is None and cfg.data.name not in DATASETS:
        known = ", ".join(sorted(DATASETS))
        raise CeloraError(f"unknown data.name '{cfg.data.name}' (known: {known}; or set data.path)")
    if cfg.data.path is not None and not Path(cfg.data.path).is_file():
        raise CeloraError(f"data.path: file not found: {cfg.data.path}")
    resolve_device(cfg.train.device)  # one line naming train.device when it is not on this machine
    return cfg


def prepare(cfg: ExperimentConfig) -> Prepared:
    """Load data, partition it, tokenize once, build the frozen model and inject adapters."""
    cfg = check_names(cfg)
    placement = resolve_placement(cfg.train.device, cfg.train.precision, bf16_on_cpu=bf16_on_cpu(cfg.model.name))
    d = cfg.data
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
    )
    column_values = dataset.columns.get(d.column) if d.column else None
    split = make_federated_split(
        dataset.labels,
        cfg.num_clients,
        d.partition,
        alpha=d.alpha,
        classes_per_client=d.classes_per_client,
        column_values=column_values,
        seed=cfg.seed,
        test_fraction=d.test_fraction,
        global_test_fraction=d.global_test_fraction,
        train_per_client=d.train_per_client,
        test_per_client=d.test_per_client,
    )
    task = get_task(cfg.data.task or "classify")
    if d.instruction is not None or d.verbalizers is not None:
        dataset = replace(
            dataset, instruction=d.instruction or dataset.instruction, verbalizers=d.verbalizers or dataset.verbalizers
        )
    loaded = load_model(
        cfg.model.name,
        num_labels=len(dataset.label_names),
        seed=cfg.seed,
        head=task.head,  # type: ignore[arg-type]
        dtype=placement.weights,
    )
    m = cfg.model
    if m.projector_hidden is not None:
        if not isinstance(loaded.model, VisionLanguageModel):
            raise CeloraError(f"model.projector_hidden: only for a vision-language model, not '{m.name}'")
        loaded.model.set_projector_width(m.projector_hidden, cfg.seed)
    spec = AdapterSpec(
        rank=m.rank,
        alpha=m.alpha if m.alpha is not None else float(m.rank),
        targets=tuple(m.targets or loaded.default_targets),
        dropout=m.dropout,
        init=m.init,
        basis=m.basis,
        seed=cfg.seed,
    )
    try:
        inject_adapters(loaded.model, spec)
    except ValueError as err:
        raise CeloraError(f"model.rank: {err}") from None
    place_model(loaded.model, placement, (*loaded.head_modules, *loaded.fedavg_modules))  # once: the base stays there
    encoded = task.build(dataset, loaded.tokenizer, m.max_length)
    with placement.autocast():
        setup_bytes = task.setup(loaded.model, encoded, [c.train_idx for c in split.clients])
    all_names = view_names(loaded.model, {"A", "B", "C", "head"}, loaded.head_modules)
    init_state = get_tensors(loaded.model, all_names)
    return Prepared(dataset, split, encoded, loaded, spec, init_state, all_names, task, setup_bytes, placement)


class Simulation:
    """Runs one experiment in this process and (optionally) writes its run folder."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path | None = None,
        *,
        observer: Observer | None = None,
        wire_hook: WireHook | None = None,
        prepared: Prepared | None = None,
        export_adapters: bool = True,
    ) -> None:
        cfg = check_names(cfg)
        self.cfg = cfg
        self.main_strategy: Strategy = get_strategy(cfg.method, cfg.aggregation)
        agg = cfg.aggregation
        self.warmup_strategy = get_strategy(agg.warmup_method, agg) if agg.warmup_rounds else None
        self.out = Path(out_dir) if out_dir is not None else None
        self.obs: Observer = observer or _Silent()
        self.wire_hook = wire_hook
        self.export_adapters = export_adapters
        self.p = prepared or prepare(cfg)
        self.dtype: WireDtype = cfg.payload.dtype
        self.activate(self.strategy_for(1))
        self.n_train = np.array([len(c.train_idx) for c in self.p.split.clients])

    def strategy_for(self, rnd: int) -> Strategy:
        """The warm-up method for rounds 1..warmup_rounds, the configured method afterwards."""
        if self.warmup_strategy is not None and rnd <= self.cfg.aggregation.warmup_rounds:
            return self.warmup_strategy
        return self.main_strategy

    def activate(self, strategy: Strategy) -> None:
        """Set what trains (freeze masks) and what travels (layouts) for ``strategy``."""
        self.strategy = strategy
        model, heads = self.p.loaded.model, self.p.loaded.head_modules
        shared = view_names(model, strategy.shared_factors, heads)
        # modules every sharing method federates by FedAvg beside its own factors (a VLM's projector)
        self.fedavg_names = view_names(model, {"head"}, self.p.loaded.fedavg_modules) if shared else []
        shared = [n for n in shared if n not in set(self.fedavg_names)] + self.fedavg_names
        self.up_layout = Layout.of(self.p.init_state, shared)
        self.down_layout = self.up_layout  # every method sends back tensors of the shared layout
        trained = set(strategy.trained_factors) - frozen_factors(self.cfg)
        self.params = set_trainable(model, trained, heads)
        self.head_params = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in heads]
        self.max_up = int(expected_size(self.up_layout, self.dtype) * self.cfg.payload.max_bytes_factor) + 1024

    # ----------------------------------------------------------------- helpers
    def _load(self, state: Tensors) -> None:
        set_tensors(self.p.loaded.model, state)

    def _eval(self, idx: np.ndarray) -> tuple[float, float]:
        p = self.p
        with p.placement.autocast():
            return evaluate(p.loaded.model, p.encoded, idx, self.cfg.eval.batch_size, task=p.task)

    def _eval_metrics(self, idx: np.ndarray, extras: bool) -> dict[str, float]:
        """acc, loss and (with ``extras``) the task's extra metrics, e.g. exact_match, on rows ``idx``."""
        p, bs = self.p, self.cfg.eval.batch_size
        with p.placement.autocast():
            return evaluate_metrics(p.loaded.model, p.encoded, idx, bs, task=p.task, extras=extras)

    def zero_shot(self) -> dict[str, Any]:
        """The un-adapted model (ΔW = 0) on every client's test split, before round 1 (zero_shot.json)."""
        p = self.p
        self._load(p.init_state)
        clients = []
        for c in p.split.clients:
            clients.append({"id": c.client_id, "n_train": len(c.train_idx), **self._eval_metrics(c.test_idx, True)})
        out: dict[str, Any] = personalized_metrics(
            np.array([c["acc"] for c in clients]), np.array([c["n_train"] for c in clients])
        )
        for key in sorted(set(clients[0]) - {"id", "n_train", "acc", "loss"}):
            out[f"{key}_mean"] = float(np.mean([c[key] for c in clients]))
        out["clients"] = clients
        self.obs.on_message(
            "zero-shot (no adapter): "
            + ", ".join(f"{k.removesuffix('_mean')} {v:.3f}" for k, v in out.items() if k.endswith("_mean"))
        )
        return out

    def _write(self, name: str, text: str) -> None:
        if self.out is not None:
            (self.out / name).write_text(text, encoding="utf-8")

    # ----------------------------------------------------------------- main loop
    def run(self) -> RunResult:
        cfg, p = self.cfg, self.p
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
        self._write("config.toml", dump_config(cfg))
        part = partition_summary(p.split, p.dataset.labels, p.dataset.label_names)
        part["dataset"] = p.dataset.name
        part["skipped_rows"] = p.dataset.skipped_rows
        self._write("partition.json", json.dumps(part, indent=2))
        n = cfg.num_clients
        states = {i: {k: v.clone() for k, v in p.init_state.items()} for i in range(n)}
        zero_shot = self.zero_shot() if p.task.zero_shot else None
        if zero_shot is not None:
            self._write("zero_shot.json", json.dumps(zero_shot, indent=2))
        setup_up = self._setup_strategy()
        outbox: dict[int, Tensors] = {}
        out_version = dict.fromkeys(range(n), 0)
        recv_version = dict.fromkeys(range(n), 0)
        last: dict[int, ClientRound] = {}
        rng = np.random.default_rng(cfg.seed)
        totals = {"up": 0, "down": 0}
        rounds: list[dict[str, Any]] = []
        t_run = time.perf_counter()
        for rnd in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            flushed: dict[int, int] = {}
            if self.strategy_for(rnd) is not self.strategy:  # end of warm-up: deliver what is pending
                for i, msg in outbox.items():
                    if out_version[i] > recv_version[i]:
                        blob = self.server_message(msg)
                        states[i] = {**states[i], **decode(blob, self.down_layout, self.dtype)}
                        recv_version[i] = out_version[i]
                        flushed[i] = len(blob)
                outbox.clear()
                self.activate(self.strategy_for(rnd))
            sampled = sorted(int(i) for i in rng.choice(n, size=cfg.sampled_per_round, replace=False))
            self.obs.on_round_start(rnd, sampled)
            records: dict[int, ClientRound] = {}
            uploads: dict[int, Tensors] = {}
            sent: dict[int, Tensors] = {}
            if self.strategy.pooled:
                records.update(self._pooled_round(rnd, sampled, states))
            for i in [] if self.strategy.pooled else sampled:
                rec = self._client_round(rnd, i, states, outbox, out_version, recv_version, uploads, sent)
                records[i] = rec
                self.obs.on_client_done(rnd, i, rec)
            ctx = RoundContext(rnd=rnd, num_clients=n, n_train=self.n_train, sent=sent)
            messages = self.server_aggregate(ctx, uploads) if uploads else {}
            for i, msg in messages.items():
                outbox[i] = msg
                out_version[i] = rnd
            for i in sampled:  # participants are online: deliver now and evaluate what they hold
                rec = records[i]
                if i in outbox and out_version[i] > recv_version[i]:
                    blob = self.server_message(outbox[i])
                    states[i], rec.acc_agg, rec.loss_agg = self.client_receive(i, states[i], blob)
                    recv_version[i] = out_version[i]
                    rec.bytes_down += len(blob)
                else:
                    rec.acc_agg, rec.loss_agg = rec.acc, rec.loss
            for i in range(n):
                if i not in records:
                    prev = last.get(i)
                    records[i] = ClientRound(
                        id=i,
                        n_train=int(self.n_train[i]),
                        participated=False,
                        acc=prev.acc if prev else float("nan"),
                        loss=prev.loss if prev else float("nan"),
                        acc_agg=prev.acc_agg if prev else float("nan"),
                        loss_agg=prev.loss_agg if prev else float("nan"),
                    )
            for i, nbytes in flushed.items():
                records[i].bytes_down += nbytes
            last.update({i: r for i, r in records.items() if r.participated})
            row = self.round_row(rnd, [records[i] for i in range(n)], time.perf_counter() - t0)
            self.record_diagnostics(rnd, row, uploads, sent)
            totals["up"] += row["bytes_up"]
            totals["down"] += row["bytes_down"]
            rounds.append(row)
            if self.out is not None:
                with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
            self.obs.on_round_end(rnd, row)
        summary = self._finish(states, rounds, totals, time.perf_counter() - t_run)
        # one-time data summaries and task set-up, not per round
        summary["bytes_setup_up"] = int(sum(setup_up.values())) + p.task_setup_bytes * cfg.num_clients
        summary["bytes_up_total"] += summary["bytes_setup_up"]
        if zero_shot is not None:
            summary["zero_shot"] = {k: v for k, v in zero_shot.items() if k != "clients"}
        if self.out is not None:
            self._write("summary.json", json.dumps(summary, indent=2))
        return RunResult(summary, rounds, states, dict(self.main_strategy.diagnostics))

    # ----------------------------------------------------------------- data summaries (once)
    def _client_summary(self, i: int) -> ClientSummary:
        """Client side: pooled frozen-backbone features → per-class diagonal GMMs (optionally DP)."""
        cfg, p = self.cfg, self.p
        idx = p.split.clients[i].train_idx
        self._load(p.init_state)  # ΔW = 0 at init: the frozen backbone's features
        with p.placement.autocast():
            feats = pooled_features(p.loaded.model, p.encoded, idx, cfg.eval.batch_size, task=p.task)
        labels = p.dataset.labels[idx]
        pr = cfg.privacy
        if pr.summary_epsilon is None:
            return fit_class_gmms(feats, labels, seed=cfg.seed)
        feats = clip_features(feats, pr.summary_clip)
        summary = fit_class_gmms(feats, labels, seed=cfg.seed)
        rng = np.random.default_rng(cfg.seed * 65_537 + i)
        return privatize_summary(
            summary, epsilon=pr.summary_epsilon, delta=pr.summary_delta, clip=pr.summary_clip, rng=rng
        )

    def client_summary_blob(self, i: int) -> bytes:
        """Client side, once: the serialized per-class GMM summary of client i's training features."""
        return encode_named(summary_to_tensors(self._client_summary(i)))

    def server_setup(self, blobs: dict[int, bytes] | None) -> dict[int, int]:
        """Server side, once: validate the clients' summaries and set the strategy up; bytes per client."""
        if self.warmup_strategy is not None:
            self.warmup_strategy.setup(self.n_train)
        if blobs is None:
            self.main_strategy.setup(self.n_train)
            return {}
        model = self.p.loaded.model
        hidden = int(getattr(model, "feature_dim", 0) or getattr(model.config, "hidden_size", 0)) or None
        summaries: list[ClientSummary] = []
        for i in range(self.cfg.num_clients):
            try:
                tensors = decode_named(blobs[i], max_bytes=SUMMARY_MAX_BYTES)
                summaries.append(summary_from_tensors(tensors, feature_dim=hidden))
            except CeloraError as err:
                raise CeloraError(f"client {i}: data summary rejected: {err}") from None
        self.main_strategy.setup(self.n_train, summaries)
        sim = self.main_strategy.diagnostics.get("similarity_data")
        if self.out is not None and sim is not None:
            np.save(self.out / "similarity_data.npy", sim)
        nbytes = {i: len(b) for i, b in blobs.items()}
        self.obs.on_message(
            f"data summaries: {sum(nbytes.values())} B uploaded once ({sum(nbytes.values()) // len(nbytes)} B/client)"
        )
        return nbytes

    def _setup_strategy(self) -> dict[int, int]:
        """Collect data summaries (one upload per client, counted) if the method uses them."""
        if not self.main_strategy.uses_data_summaries:
            return self.server_setup(None)
        return self.server_setup({i: self.client_summary_blob(i) for i in range(self.cfg.num_clients)})

    def record_diagnostics(
        self,
        rnd: int,
        row: dict[str, Any],
        uploads: dict[int, Tensors] | None = None,
        sent: dict[int, Tensors] | None = None,
    ) -> None:
        """Does sharing do anything? Per round: mean pairwise cosine of the shared updates u_i = x_i − x_i^{sent},
        the weight matrix (weights_round_<t>.npy) and effective collaborators 1/Σ_j w_ij² where the strategy
        has weights. The accuracy change of the aggregation step itself is acc_mean_agg − acc_mean."""
        out: dict[str, Any] = {"aggregation_delta": row["acc_mean_agg"] - row["acc_mean"]}
        uploads, sent = uploads or {}, sent or {}
        ids = sorted(i for i in uploads if i in sent)
        if len(ids) > 1:
            names = list(uploads[ids[0]])
            u = torch.stack([torch.cat([(uploads[i][n] - sent[i][n]).reshape(-1) for n in names]) for i in ids])
            unit = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
            cos = unit @ unit.T
            out["update_cosine_mean"] = float(cos[~torch.eye(len(ids), dtype=torch.bool)].mean())
        diag = self.strategy.diagnostics
        if "weights" in diag and diag.get("participants") is not None:
            if self.out is not None:
                np.save(self.out / f"weights_round_{rnd}.npy", diag["weights"])
            eff = diag.get("effective_collaborators", {})
            out["effective_collaborators"] = eff
            out["effective_collaborators_mean"] = float(np.mean(list(eff.values()))) if eff else float("nan")
            diag["participants"] = None
        row["diag"] = out

    def _train(self, idx: np.ndarray, rnd: int, salt: int) -> TrainResult:
        """Local training of the currently loaded state on rows ``idx`` (seeded per round and client)."""
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(cfg.seed * 100_003 + rnd * 1_009 + salt)
        return train_local(
            self.p.loaded.model,
            self.p.encoded,
            idx,
            self.params,
            task=self.p.task,
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            head_params=self.head_params,
            head_lr=t.head_lr,
            weight_decay=t.weight_decay,
            max_steps=t.max_steps,
            seed=cfg.seed * 7919 + rnd * 31 + salt,
            placement=self.p.placement,
        )

    def _pooled_round(self, rnd: int, sampled: list[int], states: dict[int, Tensors]) -> dict[int, ClientRound]:
        """Centralized reference: one model trained on the union of the sampled clients' data."""
        cfg, p = self.cfg, self.p
        pool = np.concatenate([p.split.clients[i].train_idx for i in sampled])
        self._load(states[sampled[0]])
        res = self._train(pool, rnd, 0)
        shared = get_tensors(p.loaded.model, p.all_names)
        records = {}
        for i in range(cfg.num_clients):
            states[i] = {k: v.clone() for k, v in shared.items()}
            acc, loss = self._eval(p.split.clients[i].test_idx)
            records[i] = ClientRound(i, len(p.split.clients[i].train_idx), True, acc, loss, acc, loss, res.loss)
            self.obs.on_client_done(rnd, i, records[i])
        return records

    # ----------------------------------------------------------------- client side (also used by Flower)
    def client_fit(self, rnd: int, i: int, state: Tensors) -> tuple[Tensors, bytes | None, ClientRound]:
        """Train client i from ``state``, evaluate it (local step), and serialize what its method shares.

        Returns the client's new full state (A, B, C, head), the upload blob (None if nothing travels)
        and its metrics record.
        """
        p = self.p
        client = p.split.clients[i]
        rec = ClientRound(i, len(client.train_idx), True, float("nan"), float("nan"), float("nan"), float("nan"))
        self._load(state)
        res = self._train(client.train_idx, rnd, i)
        rec.train_loss = res.loss
        rec.metrics = self._eval_metrics(client.test_idx, extras=rnd == self.cfg.rounds)
        rec.acc, rec.loss = rec.metrics.pop("acc"), rec.metrics.pop("loss")
        new_state = get_tensors(p.loaded.model, p.all_names)
        if not self.up_layout.entries:
            return new_state, None, rec
        blob = encode({k: new_state[k] for k in self.up_layout.names}, self.up_layout, self.dtype)
        rec.bytes_up = len(blob)
        return new_state, blob, rec

    def client_receive(self, i: int, state: Tensors, blob: bytes) -> tuple[Tensors, float, float]:
        """Client i decodes a server message, updates its state and is evaluated ("aggregated")."""
        got = decode(blob, self.down_layout, self.dtype)
        new_state = {**state, **got}
        self._load(new_state)
        acc, loss = self._eval(self.p.split.clients[i].test_idx)
        return new_state, acc, loss

    # ----------------------------------------------------------------- server side (also used by Flower)
    def server_accept(self, rnd: int, i: int, blob: bytes) -> Tensors | str:
        """Decode and validate client i's upload: its tensors, or the rejection reason (logged)."""
        try:
            return decode(blob, self.up_layout, self.dtype, max_bytes=self.max_up)
        except PayloadError as err:
            self.obs.on_message(f"round {rnd}: rejected the update of client {i}: {err}")
            log.warning("round %d: rejected the update of client %d: %s", rnd, i, err)
            return str(err)

    def server_aggregate(self, ctx: RoundContext, uploads: dict[int, Tensors]) -> dict[int, Tensors]:
        """The method combines its factors; FedAvg modules (a VLM's projector) get the sample-weighted mean."""
        return aggregate_with_fedavg(self.strategy, ctx, uploads, self.fedavg_names)

    def server_message(self, msg: Tensors) -> bytes:
        """Serialize a server → client message (its layout is the method's shared layout)."""
        return encode(msg, self.down_layout, self.dtype)

    def _client_round(
        self,
        rnd: int,
        i: int,
        states: dict[int, Tensors],
        outbox: dict[int, Tensors],
        out_version: dict[int, int],
        recv_version: dict[int, int],
        uploads: dict[int, Tensors],
        sent: dict[int, Tensors],
    ) -> ClientRound:
        missed = 0
        if i in outbox and out_version[i] > recv_version[i]:  # a message it missed while not sampled
            blob = self.server_message(outbox[i])
            states[i] = {**states[i], **decode(blob, self.down_layout, self.dtype)}
            recv_version[i] = out_version[i]
            missed = len(blob)
        sent[i] = {k: states[i][k] for k in self.up_layout.names}
        states[i], up, rec = self.client_fit(rnd, i, states[i])
        rec.bytes_down += missed
        if up is None:
            return rec
        if self.wire_hook is not None:
            up = self.wire_hook(rnd, i, up)
            rec.bytes_up = len(up)
        accepted = self.server_accept(rnd, i, up)
        if isinstance(accepted, str):
            rec.rejected = accepted
        else:
            uploads[i] = accepted
        return rec

    def round_row(self, rnd: int, records: list[ClientRound], wall: float) -> dict[str, Any]:
        accs = np.array([r.acc for r in records])
        accs_agg = np.array([r.acc_agg for r in records])
        sizes = np.array([r.n_train for r in records])
        row: dict[str, Any] = {"round": rnd, "method": self.cfg.method}
        row.update(personalized_metrics(accs, sizes))
        row.update({k + "_agg": v for k, v in personalized_metrics(accs_agg, sizes).items()})
        row["bytes_up"] = int(sum(r.bytes_up for r in records))
        row["bytes_down"] = int(sum(r.bytes_down for r in records))
        row["participants"] = int(sum(r.participated for r in records))
        row["rejected"] = int(sum(r.rejected is not None for r in records))
        row["wall_s"] = round(wall, 3)
        for key in sorted({k for r in records for k in r.metrics}):
            row[f"{key}_mean"] = float(np.mean([r.metrics[key] for r in records if key in r.metrics]))
        row["clients"] = [asdict(r) for r in records]
        return row

    def summary_dict(
        self, rounds: list[dict[str, Any]], totals: dict[str, int], acc_global: float, wall: float
    ) -> dict[str, Any]:
        """summary.json: the final round's accuracies, global accuracy, bytes (totals and per client-round)."""
        final = rounds[-1]
        client_rounds = sum(r["participants"] for r in rounds)
        return {
            "method": self.cfg.method,
            "acc_mean": final["acc_mean"],
            "acc_weighted": final["acc_weighted"],
            "acc_worst10": final["acc_worst10"],
            "acc_mean_agg": final["acc_mean_agg"],
            "acc_global": acc_global,
            "acc_majority": majority_baseline(
                self.p.dataset.labels,
                [c.train_idx for c in self.p.split.clients],
                [c.test_idx for c in self.p.split.clients],
            ),
            "bytes_up_total": totals["up"],
            "bytes_down_total": totals["down"],
            "bytes_per_client_round": {
                "up": totals["up"] / max(1, client_rounds),
                "down": totals["down"] / max(1, client_rounds),
            },
            "payload": {
                "shared_factors": self.shared_factor_names(),
                "tensors": len(self.up_layout.entries),
                "params": self.up_layout.numel(),
                "dtype": self.dtype,
                **self.payload_split(),
            },
            "rounds": len(rounds),
            "num_clients": self.cfg.num_clients,
            "seed": self.cfg.seed,
            "evaluated": "acc_* = after local training (local step); acc_*_agg = after receiving the server's message",
            "task": self.cfg.data.task,
            **{f"{k}_mean": final[f"{k}_mean"] for k in sorted(self.extra_keys(final))},
            **({"model_note": self.p.loaded.note} if self.p.loaded.note else {}),
            "wall_s": round(wall, 2),
        }

    def shared_factor_names(self) -> list[str]:
        """What the method sends, by factor; "head" only when the model has a head of its own (a VLM's
        projector is a FedAvg module, reported as bytes_fedavg_modules)."""
        loaded = self.p.loaded
        factors = set(self.main_strategy.shared_factors)
        if set(loaded.head_modules) <= set(loaded.fedavg_modules):
            factors.discard("head")
        return sorted(factors)

    @staticmethod
    def extra_keys(row: dict[str, Any]) -> set[str]:
        """Names of the task's extra metrics recorded in a round row (e.g. exact_match)."""
        return {k for c in row.get("clients", []) for k in c.get("metrics", {})}

    def payload_split(self) -> dict[str, int]:
        """Bytes of one message by part: adapter factors (+ head if shared), FedAvg modules, safetensors framing."""
        fedavg = set(self.fedavg_names)
        own = Layout(tuple(e for e in self.up_layout.entries if e[0] not in fedavg))
        side = Layout(tuple(e for e in self.up_layout.entries if e[0] in fedavg))
        total = expected_size(self.up_layout, self.dtype) if self.up_layout.entries else 0
        parts = {"bytes_message": total, "bytes_adapters": own.tensor_bytes(self.dtype)}
        if side.entries:
            parts["bytes_fedavg_modules"] = side.tensor_bytes(self.dtype)
        parts["bytes_framing"] = total - sum(v for k, v in parts.items() if k != "bytes_message") if total else 0
        return parts

    def _finish(
        self, states: dict[int, Tensors], rounds: list[dict[str, Any]], totals: dict[str, int], wall: float
    ) -> dict[str, Any]:
        p = self.p
        gidx = p.split.global_test_idx
        g_accs = []
        for i in range(self.cfg.num_clients):
            self._load(states[i])
            g_accs.append(self._eval(gidx)[0])
        summary = self.summary_dict(rounds, totals, float(np.mean(g_accs)) if len(gidx) else float("nan"), wall)
        if self.out is not None and self.export_adapters:
            from celora.adapters.export import PeftExporter  # peft is heavy: imported only to export

            exporter = PeftExporter(p.loaded.model, p.spec, p.loaded.head_modules, p.loaded.source)
            for i, st in states.items():
                exporter.save(st, self.out / "adapters" / f"client_{i}")
        return summary


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, **kwargs: Any) -> RunResult:
    """Convenience: build a Simulation and run it."""
    return Simulation(cfg, out_dir, **kwargs).run()
