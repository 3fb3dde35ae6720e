"""The in-process loop (the embedded default): one frozen base, clients run one after another.

It drives the same two halves Flower drives: one ``ClientRuntime`` per client (``celora.fl.client``: its
own data, private state, train → evaluate → upload, receive → evaluate) and one ``ServerCore``
(``celora.fl.server``: validate, aggregate, outbox, round rows), writing through a ``RunFolder``.

Per round t: the server samples S_t; each sampled client picks up any message it missed, trains locally,
is evaluated ("local step") and uploads what its method shares as one serialized blob. The server decodes
and validates every blob (a bad one is logged and left out of this round), the strategy combines the
accepted ones, and each participant receives its message (bytes counted on the blob) and is evaluated
again ("aggregated").

Faults: a sampled client fails before training with probability ``dropout_before`` or after training
(its upload lost) with probability ``dropout``, drawn from a seeded RNG of their own; it keeps its state and
picks up what it missed when next sampled. Every ``checkpoint_every`` rounds the whole run state (clients'
private states, the server core's, RNGs, rows) is checkpointed atomically (``celora.fl.run_folder``);
``Simulation(cfg, run_dir, resume=True)`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celora.config import ExperimentConfig
from celora.errors import CeloraError
from celora.eval import global_eval_clients, global_eval_note, personalized_metrics
from celora.fl.backbone import Phases
from celora.fl.batched import ParallelClients
from celora.fl.client import ClientRuntime, partition_report
from celora.fl.payload import Layout
from celora.fl.prepare import Prepared, check_names, frozen_factors, prepare
from celora.fl.records import ClientRound, Observer, Silent
from celora.fl.run_folder import Checkpoint, RunFolder, load_checkpoint, save_checkpoint
from celora.fl.server import RoundState, ServerCore
from celora.fl.sites import SitesPrepared
from celora.fl.states import StatesView, make_store
from celora.fl.strategies import Tensors
from celora.models.device import BatchFit

__all__ = [
    "ClientRound",
    "Observer",
    "Prepared",
    "RunResult",
    "Simulation",
    "check_names",
    "frozen_factors",
    "prepare",
    "run_experiment",
]

WireHook = Callable[[int, int, bytes], bytes]  # (round, client, blob) -> blob: fault injection on uploads


@dataclass
class RunResult:
    summary: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    states: Mapping[int, Tensors] = field(default_factory=dict)  # read on access (engine.state = disk: from files)
    diagnostics: dict[str, Any] = field(default_factory=dict)


class Simulation:
    """Runs one experiment in this process and (optionally) writes its run folder."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path | None = None,
        *,
        observer: Observer | None = None,
        wire_hook: WireHook | None = None,
        prepared: Prepared | SitesPrepared | None = None,
        export_adapters: bool = True,
        resume: bool = False,
    ) -> None:
        cfg = check_names(cfg)
        self.p = prepared or prepare(cfg)
        if isinstance(self.p, SitesPrepared):
            cfg = self.p.cfg  # data.sites: with the label space the sites agreed on (data.labels)
        self.cfg = cfg
        self.bench = self.p.bench
        self.folder = RunFolder(out_dir)
        self.out = self.folder.path
        self.obs: Observer = observer or Silent()
        self.wire_hook = wire_hook
        self.export_adapters = export_adapters
        provider = self.p.provider()
        phases = Phases(cfg, self.bench)  # the clients' view of the protocol (no aggregation state)
        self.store = make_store(cfg.engine.state, self.bench.fresh_state, self.out)  # the clients' private states
        fit = BatchFit(cfg.eval.batch_size)  # one model: one evaluation batch size that fits, for every client
        self.clients = [
            ClientRuntime(cfg, self.bench, provider.client(i), phases, store=self.store, eval_fit=fit)
            for i in range(cfg.num_clients)
        ]
        self.infos = [c.info() for c in self.clients]
        self.parallel = ParallelClients(cfg, self.bench, self.clients, self.obs.on_message)  # engine.parallel_clients
        self.server = ServerCore(cfg, self.bench, self.infos, observer=self.obs, folder=self.folder)
        self.zero_shot_summary: dict[str, Any] | None = None
        self.wall_before = 0.0  # seconds spent before a resume
        self.checkpoint: Checkpoint | None = None
        if resume:
            if self.out is None:
                raise CeloraError("resume needs a run folder")
            self.checkpoint = load_checkpoint(self.out)
            if self.checkpoint is None:
                raise CeloraError(f"{self.out}: no complete checkpoint to resume from (checkpoints/ckpt-*.json)")

    # ----------------------------------------------------------------- what travels (tests, benchmarks)
    @property
    def up_layout(self) -> Layout:
        return self.server.phase.up_layout

    @property
    def fedavg_names(self) -> list[str]:
        return self.server.phase.fedavg_names

    def payload_split(self) -> dict[str, int]:
        return self.server.payload_split()

    # ----------------------------------------------------------------- main loop
    def zero_shot(self) -> dict[str, Any]:
        """The un-adapted model (ΔW = 0) on every client's test split, before round 1 (zero_shot.json)."""
        clients = [c.zero_shot() for c in self.clients]
        spec = self.bench.task.spec
        out: dict[str, Any] = personalized_metrics(
            np.array([c[spec.primary] for c in clients]),
            np.array([c["n_train"] for c in clients]),
            spec.primary,
            spec.higher_is_better,
        )
        for key in sorted(set(clients[0]) - {"id", "n_train", spec.primary, "loss", "samples"}):
            out[f"{key}_mean"] = float(np.mean([c[key] for c in clients]))
        out["clients"] = clients
        self.obs.on_message(
            "zero-shot (no adapter): "
            + ", ".join(f"{k.removesuffix('_mean')} {v:.3f}" for k, v in out.items() if k.endswith("_mean"))
        )
        return out

    def run(self) -> RunResult:
        cfg, p, server = self.cfg, self.p, self.server
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        t_run = time.perf_counter()
        if self.checkpoint is not None:
            first = self.restore(self.checkpoint) + 1
        else:
            first = 1
            self.folder.start(cfg, partition_report(self.infos, self.clients[0].data.meta))
            zero_shot = self.zero_shot() if p.task.evaluates_zero_shot(p.loaded.model) else None
            if zero_shot is not None:
                self.folder.write_json("zero_shot.json", zero_shot)
                self.zero_shot_summary = {k: v for k, v in zero_shot.items() if k != "clients"}
            wants = server.main_strategy.uses_data_summaries
            server.setup({c.id: c.summary_blob() for c in self.clients} if wants else None)
        for rnd in range(first, cfg.rounds + 1):
            self.round(rnd)
            every = cfg.checkpoint_every
            if self.out is not None and every and (rnd % every == 0 or rnd == cfg.rounds):
                save_checkpoint(self.out, rnd, self.state_dict(self.wall_before + time.perf_counter() - t_run))
        summary = self._finish(self.wall_before + time.perf_counter() - t_run)
        if self.zero_shot_summary is not None:
            summary["zero_shot"] = self.zero_shot_summary
        if self.p.basis_setup:
            summary["basis_setup"] = self.p.basis_setup
        projector_note = getattr(self.p.loaded.model, "projector_note", None)
        if projector_note:
            summary["projector"] = projector_note
        self.folder.write_summary(summary)
        self.folder.drop_checkpoints()
        states = StatesView(self.store, [c.id for c in self.clients])
        return RunResult(summary, list(server.rows), states, dict(server.main_strategy.diagnostics))

    # ----------------------------------------------------------------- checkpoint / resume
    def state_dict(self, wall: float) -> dict[str, Any]:
        """The run's state between rounds: every client's private state (and AdamW moments, with
        train.keep_optimizer), the server core's, the RNGs."""
        return {
            "clients": {c.id: self.changed(c.state) for c in self.clients},
            "optimizers": {c.id: c.optimizer_state for c in self.clients if c.optimizer_state is not None},
            "server": self.server.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "zero_shot": self.zero_shot_summary,
            "wall_s": wall,
        }

    def changed(self, state: Tensors) -> Tensors:
        """The tensors of a client state that are not the shared initial ones (what a checkpoint stores)."""
        init = self.bench.init_state
        return {k: v for k, v in state.items() if v is not init.get(k)}

    def restore(self, ckpt: Checkpoint) -> int:
        """Load a checkpoint; metrics.jsonl is cut back to its rows. Returns the round it was taken after."""
        st = ckpt.state
        for c in self.clients:
            c.state = {**self.bench.init_state, **st["clients"].get(c.id, {})}
            c.optimizer_state = st["optimizers"].get(c.id)  # AdamW moments (train.keep_optimizer)
        self.server.load_state_dict(st["server"], ckpt.round)
        torch.set_rng_state(st["torch_rng"])
        self.zero_shot_summary = st["zero_shot"]
        self.wall_before = float(st["wall_s"])
        self.folder.rewrite_rows(self.server.rows)
        self.folder.open_log(fresh=False)
        self.obs.on_message(f"resumed from {ckpt.path.name}: round {ckpt.round} of {self.cfg.rounds} done")
        return ckpt.round

    def _deliver(self, rnd: int, i: int, *, evaluate: bool) -> tuple[int, float, float]:
        """Hand client i its pending message: (bytes, score, loss after it — NaN unless ``evaluate``)."""
        blob = self.server.message_blob(i)
        score, loss = self.clients[i].receive(blob, rnd, evaluate=evaluate)
        self.server.delivered(i, blob)
        return len(blob), score, loss

    def round(self, rnd: int) -> dict[str, Any]:
        """One round: sample, train, upload, aggregate, deliver; returns the metrics row."""
        server = self.server
        flushed: dict[int, int] = {}
        if server.switches(rnd):  # end of warm-up: deliver what is pending in the old layout
            for i in server.pending_clients():
                flushed[i] = self._deliver(rnd - 1, i, evaluate=False)[0]
            server.enter_phase(rnd)
        rs = server.new_round(rnd)
        rs.flushed = flushed
        if server.strategy.pooled:
            self._pooled_round(rs)
        else:
            for group in self.parallel.groups(rs.sampled):
                self._clients_round(rs, group)
        server.aggregate(rs)
        due = [i for i in rs.sampled if rs.records[i].participated and server.pending(i)]
        for group in self.parallel.groups(
            due, timed=False
        ):  # participants are online: deliver now and evaluate what they hold
            for i, (nbytes, score, loss) in zip(group, self._deliver_evaluated(rnd, group), strict=True):
                rec = rs.records[i]
                rec.score_agg, rec.loss_agg = score, loss
                rec.metrics.update(self.clients[i].agg_extras)
                rec.bytes_down += nbytes
        return server.close_round(rs)

    def _deliver_evaluated(self, rnd: int, group: list[int]) -> list[tuple[int, float, float]]:
        """Hand each client of ``group`` its message and evaluate what it holds then (together where
        ``engine.parallel_clients`` allows): (bytes, score, loss) per client, NaNs in rounds that do not evaluate."""
        sizes = []
        for i in group:
            blob = self.server.message_blob(i)
            self.clients[i].apply_message(blob, rnd)
            self.server.delivered(i, blob)
            sizes.append(len(blob))
        clients = [self.clients[i] for i in group]
        if not clients[0].evaluates(rnd):
            return [(n, float("nan"), float("nan")) for n in sizes]
        metrics = self.parallel.evaluate(clients, extras=rnd == self.cfg.rounds)
        return [(n, *c.aggregated(m)) for n, c, m in zip(sizes, clients, metrics, strict=True)]

    def _clients_round(self, rs: RoundState, group: list[int]) -> None:
        """A group of sampled clients (one, or up to ``engine.parallel_clients`` trained together): pick up missed
        messages, fit, upload; each client's drop-outs and bookkeeping as if it ran alone."""
        ready: dict[int, int] = {}  # client → bytes of a missed message it picked up
        for i in group:
            missed = self._before_fit(rs, i)
            if missed is not None:
                ready[i] = missed
        fits = self.parallel.fit([self.clients[i] for i in ready], rs.rnd)
        for (i, missed), (up, rec) in zip(ready.items(), fits, strict=True):
            self._after_fit(rs, i, up, rec, missed)

    def _before_fit(self, rs: RoundState, i: int) -> int | None:
        """Client i before training: None if it is offline this round, else the bytes of a missed message."""
        server = self.server
        if rs.fails.get(i) == "before":  # offline this round: no message, no training
            server.dropped(rs, i)
            return None
        missed = 0
        if server.pending(i):  # a message it missed while not sampled
            missed = self._deliver(rs.rnd, i, evaluate=False)[0]
        server.fit_started(rs, i)
        return missed

    def _after_fit(self, rs: RoundState, i: int, up: bytes | None, rec: ClientRound, missed: int) -> None:
        server, rnd = self.server, rs.rnd
        rec.bytes_down += missed
        if rs.fails.get(i) == "after":  # trained (and keeps its state), but the upload never arrives
            server.dropped(rs, i, missed)
            return
        server.add_record(rs, i, rec)
        if up is not None:
            if self.wire_hook is not None:
                up = self.wire_hook(rnd, i, up)
            server.accept(rs, i, up)
        self.obs.on_client_done(rnd, i, rec)

    def _pooled_round(self, rs: RoundState) -> None:
        """Centralized reference: one model trained on the union of the sampled clients' data."""
        first = self.clients[rs.sampled[0]]
        if any(c.data.data is not first.data.data for c in self.clients):
            raise CeloraError(f"method '{self.cfg.method}' pools the clients' data: it needs one shared dataset")
        pool = np.concatenate([self.clients[i].data.train_idx for i in rs.sampled])
        self.bench.load(first.state)
        res = first.train(rs.rnd, self.server.phase, idx=pool, salt=0)
        shared = self.bench.snapshot()
        for c in self.clients:
            c.state = {k: v.clone() for k, v in shared.items()}
            m = c.evaluate_test()
            rec = ClientRound(c.id, c.n_train, True, m["score"], m["loss"], m["score"], m["loss"], res.loss)
            rs.records[c.id] = rec
            self.obs.on_client_done(rs.rnd, c.id, rec)

    def _finish(self, wall: float) -> dict[str, Any]:
        cfg = self.cfg
        ids = global_eval_clients(cfg.num_clients, cfg.eval.global_clients, cfg.seed)
        g_scores = [self.clients[i].evaluate_global() for i in ids]
        score_global = float(np.mean(g_scores)) if len(self.clients[0].data.global_idx) else float("nan")
        summary = self.server.summary(score_global, wall, self.p.setup_bytes_up)
        summary["global_eval"] = global_eval_note(ids, cfg.num_clients)
        self.write_samples()
        if isinstance(self.p, SitesPrepared):  # the combined task set-up every site received
            summary["bytes_setup_down"] = self.p.setup.totals()["down"]
        if self.out is not None and self.export_adapters:
            from celora.adapters.export import PeftExporter  # peft is heavy: imported only to export

            p = self.p
            exporter = PeftExporter(p.loaded.model, p.spec, p.loaded.head_modules, p.loaded.source)
            self.folder.export_adapters(exporter, StatesView(self.store, [c.id for c in self.clients]))
        return summary

    def write_samples(self) -> None:
        """samples.jsonl: per client, its first test prompts with the reference, the zero-shot output and the final
        output (tasks that generate; in-process only — under Flower a site's rows stay at the site)."""
        if self.out is None:
            return
        zs_file = self.out / "zero_shot.json"
        zero = json.loads(zs_file.read_text(encoding="utf-8")).get("clients", []) if zs_file.is_file() else []
        before = {int(c["id"]): c.get("samples", []) for c in zero}
        lines = []
        for c in self.clients:
            for k, s in enumerate(c.samples()):
                old = before.get(c.id, [])
                zero_out = old[k]["output"] if k < len(old) else None
                lines.append(
                    {
                        "client": c.id,
                        **{k2: s[k2] for k2 in ("prompt", "reference")},
                        "zero_shot": zero_out,
                        "final": s["output"],
                    }
                )
        if lines:
            self.folder.write_text("samples.jsonl", "".join(json.dumps(x) + "\n" for x in lines))


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path | None = None, **kwargs: Any) -> RunResult:
    """Convenience: build a Simulation and run it."""
    return Simulation(cfg, out_dir, **kwargs).run()
