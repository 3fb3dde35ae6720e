"""The server side under Flower: a Flower ``Strategy`` that wraps any celora strategy from the registry.

Round t mirrors the in-process engine (``Simulation.run``) message for message:

1. ``configure_train(t)`` samples S_t with the engine's RNG and builds **one fresh message per node**:
   the sampled clients train; every participant of round t−1 first receives the C̄_i (or whatever
   the method sends back) aggregated for it in round t−1 and is evaluated on it ("aggregated"
   accuracy of round t−1); a sampled client that missed a message while not sampled gets it too.
2. ``aggregate_train(t)`` validates every upload (``Simulation.server_accept``) and hands the
   accepted tensors to the celora strategy; round t−1's metrics row is complete and written.
3. After the last round, ``configure_evaluate`` delivers the last messages; clients report their
   global-test accuracy and export their adapters locally; the run summary is written.

The data summaries of ``celora`` travel once, in the dedicated setup message before round 1.
A node that does not answer within the round timeout (or answers with an error) is reported as
lost in the metrics row (``rejected`` reason ``lost: …``) and in the summary, and is not contacted again.
Bytes: celora's own count (the blob) and Flower's (``ArrayRecord.count_bytes()``) side by side.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from celora.config import ExperimentConfig, dump_config
from celora.data.partition import partition_summary
from celora.errors import CeloraError
from celora.fl.flower.wire import (
    arrays_of,
    blob_record,
    config_of,
    describe,
    digest,
    message_bytes,
    metrics_of,
    number,
    record_blob,
)
from celora.fl.payload import decode
from celora.fl.simulation import ClientRound, Simulation, prepare
from celora.fl.strategies import RoundContext, Tensors

log = logging.getLogger("celora")


@dataclass
class _Delivery:
    """A server → client message in flight: which round it belongs to and how the client applies it."""

    how: str  # "eval" (participant of the previous round) | "missed" (picked up when sampled) | "none"
    round: int
    blob: bytes = b""
    tensors: Tensors = field(default_factory=dict)


class CeloraFlowerStrategy(FlowerStrategy):
    """Flower Message-API strategy over a celora strategy: personalized messages, celora's metrics.

    The celora strategy (``self.sim.strategy``) only ever sees named tensors, exactly as in the
    in-process engine; this class turns them into per-node Flower messages and back.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path | None,
        *,
        round_timeout: float = 600.0,
        node_wait: float = 120.0,
        export: bool = True,
    ) -> None:
        self.sim = Simulation(cfg, out_dir, prepared=prepare(cfg), export_adapters=False)
        self.cfg = self.sim.cfg
        if self.sim.main_strategy.pooled or self.sim.strategy.pooled:
            raise CeloraError(f"method '{self.cfg.method}' pools the clients' data: it runs only in-process")
        self.out = Path(out_dir) if out_dir is not None else None
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.export = export
        n = self.cfg.num_clients
        self.n = n
        # what each client holds of every factor, as far as the server knows (shared seed ⇒ identical init)
        self.held: dict[int, Tensors] = {i: dict(self.sim.p.init_state) for i in range(n)}
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.outbox: dict[int, Tensors] = {}
        self.out_version = dict.fromkeys(range(n), 0)
        self.recv_version = dict.fromkeys(range(n), 0)
        self.rng = np.random.default_rng(self.cfg.seed)
        self.lost: dict[int, str] = {}
        self.lost_round: dict[int, int] = {}
        self.records: dict[int, dict[int, ClientRound]] = {}
        self.sampled: dict[int, list[int]] = {}
        self.diag: dict[int, tuple[dict[str, Any], dict[int, Tensors], dict[int, Tensors]]] = {}
        self.extra_down: dict[int, dict[int, int]] = {}  # round → client → bytes of messages flushed then
        self.t0: dict[int, float] = {}
        self.wall: dict[int, float] = {}
        self.last: dict[int, ClientRound] = {}
        self.rows: list[dict[str, Any]] = []
        self.totals = {"up": 0, "down": 0}
        self.flower = {"arrays_up": 0, "arrays_down": 0, "control_up": 0, "control_down": 0, "setup_up": 0}
        self.sent_msgs: dict[int, Message] = {}  # client → the message of the current round
        self.switching = False  # this round ends a warm-up: every pending message is delivered now
        self.inflight: dict[int, _Delivery] = {}  # client → delivery carried by the current round's message
        self.pending_eval: set[int] = set()  # participants of the last aggregated round with a fresh message
        self.global_acc: dict[int, float] = {}
        self.adapters: dict[int, str] = {}
        self.setup_up: dict[int, int] = {}
        self.t_run = time.perf_counter()

    # ----------------------------------------------------------------- bookkeeping
    def _log_message(self, direction: str, rnd: int, kind: str, client: int | None, msg: Message, **extra: Any) -> None:
        """Append one line per Flower message to <out>/flower/messages.jsonl (and count Flower's bytes)."""
        nbytes = message_bytes(msg)
        side = "up" if direction == "up" else "down"
        self.flower[f"arrays_{side}"] += nbytes["arrays"]
        self.flower[f"control_{side}"] += nbytes["control"]
        if self.out is None:
            return
        line = {"t": round(time.perf_counter() - self.t_run, 2), "dir": direction, "round": rnd, "type": kind}
        line.update({"client": client, "bytes_flower": nbytes, **extra})
        line.update(describe(msg))
        path = self.out / "flower" / "messages.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")

    def _message(self, grid: Grid, i: int, kind: str, rnd: int, content: RecordDict) -> Message:
        return Message(content, dst_node_id=self.node_of[i], message_type=kind, group_id=str(rnd))

    def _replies(self, rnd: int, kind: str, sent: dict[int, Message], replies: Iterable[Message]) -> dict[int, Message]:
        """Map replies to clients; clients without a (good) reply are marked lost, with the reason."""
        got: dict[int, Message] = {}
        by_id = {m.metadata.message_id: i for i, m in sent.items() if m.metadata.message_id}
        for rep in replies:
            i = self.client_of.get(rep.metadata.src_node_id)
            if i is None or i not in sent:
                i = by_id.get(rep.metadata.reply_to_message_id)  # e.g. an error the SuperLink wrote for a dead node
            if i is None:
                continue
            if rep.has_error():
                self._lose(i, rnd, f"lost: node {self.node_of[i]}: {str(rep.error.reason)[:200]}")
                continue
            got[i] = rep
        for i in sent:
            if i not in got and i not in self.lost:
                self._lose(i, rnd, f"lost: no reply from node {self.node_of[i]} within {self.round_timeout:g}s")
        for i, rep in got.items():
            conf = rep.content.get("celora")
            received = conf.get("received") if isinstance(conf, ConfigRecord) else None
            self._log_message("up", rnd, kind, i, rep, received=received)
        return got

    def _lose(self, i: int, rnd: int, reason: str) -> None:
        if i in self.lost:
            return
        self.lost[i] = reason
        self.lost_round[i] = rnd
        self.sim.obs.on_message(f"round {rnd}: client {i} {reason}")
        log.warning("round %d: client %d %s", rnd, i, reason)

    def _delivery_for(self, i: int, rnd: int, sampled: bool) -> _Delivery:
        if i in self.pending_eval:
            how, owner = "eval", rnd - 1
        elif (sampled or self.switching) and i in self.outbox and self.out_version[i] > self.recv_version[i]:
            how, owner = "missed", rnd
        else:
            return _Delivery("none", rnd)
        blob = self.sim.server_message(self.outbox[i])
        tensors = decode(blob, self.sim.down_layout, self.sim.dtype)  # exactly what the client will hold
        return _Delivery(how, owner, blob, tensors)

    def _received(self, i: int, d: _Delivery, rep: Message | None) -> None:
        """Account a delivery the client confirmed (bytes on the record of the round it belongs to)."""
        if d.how == "none" or rep is None:
            return
        if config_of(rep.content).get("received") != digest(d.blob):
            raise CeloraError(f"client {i} confirmed a different message than the one sent")
        self.held[i] = {**self.held[i], **d.tensors}
        self.recv_version[i] = self.out_version[i]
        rec = self.records[d.round].get(i)
        if rec is None:  # a non-participant flushed at the end of a warm-up: counted on its row later
            self.extra_down.setdefault(d.round, {})[i] = len(d.blob)
            return
        rec.bytes_down += len(d.blob)
        if d.how == "eval":
            m = metrics_of(rep.content)
            rec.acc_agg, rec.loss_agg = number(m, "acc_agg"), number(m, "loss_agg")

    def _finalize(self, rnd: int) -> None:
        """Complete round ``rnd``'s metrics row (same keys as the in-process engine) and write it."""
        records = self.records[rnd]
        for i in self.sampled[rnd]:
            rec = records.get(i)
            if rec is not None and np.isnan(rec.acc_agg):  # no message to apply, or lost before delivery
                rec.acc_agg, rec.loss_agg = rec.acc, rec.loss
        for i in range(self.n):
            if i not in records:
                prev = self.last.get(i)
                records[i] = ClientRound(
                    id=i,
                    n_train=int(self.sim.n_train[i]),
                    participated=False,
                    acc=prev.acc if prev else float("nan"),
                    loss=prev.loss if prev else float("nan"),
                    acc_agg=prev.acc_agg if prev else float("nan"),
                    loss_agg=prev.loss_agg if prev else float("nan"),
                )
                if i in self.lost and i in self.sampled[rnd]:
                    records[i].rejected = self.lost[i]
        for i, nbytes in self.extra_down.pop(rnd, {}).items():
            records[i].bytes_down += nbytes
        self.last.update({i: r for i, r in records.items() if r.participated})
        row = self.sim.round_row(rnd, [records[i] for i in range(self.n)], self.wall.get(rnd, 0.0))
        self._diagnostics(rnd, row)
        row["lost"] = sorted(i for i, r in self.lost_round.items() if r <= rnd)
        self.totals["up"] += row["bytes_up"]
        self.totals["down"] += row["bytes_down"]
        self.rows.append(row)
        if self.out is not None:
            with (self.out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        self.sim.obs.on_round_end(rnd, row)

    def _diagnostics(self, rnd: int, row: dict[str, Any]) -> None:
        """The engine's per-round diagnostics, from the strategy state snapshotted right after aggregation."""
        snap, uploads, started = self.diag.pop(rnd, ({}, {}, {}))
        strategy = self.sim.strategy
        live = strategy.diagnostics
        strategy.diagnostics = snap
        try:
            self.sim.record_diagnostics(rnd, row, uploads, started)
        finally:
            strategy.diagnostics = live

    # ----------------------------------------------------------------- setup (before round 1)
    def setup(self, grid: Grid) -> None:
        """Write the run folder's static files, map nodes to clients, collect data summaries once."""
        cfg, p = self.cfg, self.sim.p
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
            (self.out / "flower").mkdir(exist_ok=True)
            (self.out / "flower" / "messages.jsonl").write_text("", encoding="utf-8")
            (self.out / "config.toml").write_text(dump_config(cfg), encoding="utf-8")
            part = partition_summary(p.split, p.dataset.labels, p.dataset.label_names)
            part["dataset"] = p.dataset.name
            part["skipped_rows"] = p.dataset.skipped_rows
            (self.out / "partition.json").write_text(json.dumps(part, indent=2), encoding="utf-8")
        deadline = time.monotonic() + self.node_wait
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.n and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < self.n:
            raise CeloraError(f"only {len(nodes)} of {self.n} SuperNodes connected within {self.node_wait:g}s")
        wants_summary = self.sim.main_strategy.uses_data_summaries
        toml_text = dump_config(cfg)
        msgs = {}
        for node in nodes:
            conf = ConfigRecord({"config": toml_text, "summary": wants_summary})
            content = RecordDict({"celora": conf})
            msgs[node] = Message(content, dst_node_id=node, message_type="query.setup", group_id="0")
        replies = list(grid.send_and_receive(list(msgs.values()), timeout=self.round_timeout))
        summaries: dict[int, bytes] = {}
        for rep in replies:
            if rep.has_error():
                raise CeloraError(f"node {rep.metadata.src_node_id} failed the setup: {str(rep.error.reason)[:300]}")
            i = int(number(config_of(rep.content), "partition-id"))
            if i in self.node_of:
                raise CeloraError(f"two SuperNodes claim partition-id {i}")
            self.node_of[i] = rep.metadata.src_node_id
            self.client_of[rep.metadata.src_node_id] = i
            if wants_summary:
                rec = arrays_of(rep.content, "summary")
                summaries[i] = record_blob(rec)
                self.flower["setup_up"] += rec.count_bytes()
            self._log_message("up", 0, "query.setup", i, rep)
        missing = sorted(set(range(self.n)) - set(self.node_of))
        if missing:
            raise CeloraError(f"no SuperNode answered for partition-id {missing} within {self.round_timeout:g}s")
        self.setup_up = self.sim.server_setup(summaries if wants_summary else None)

    # ----------------------------------------------------------------- Flower Strategy interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """One fresh message per node: its pending C̄_i (if any) and whether to train this round."""
        rnd = server_round
        self.t0[rnd] = time.perf_counter()
        self.switching = self.sim.strategy_for(rnd) is not self.sim.strategy
        pending = {i for i in self.outbox if self.out_version[i] > self.recv_version[i]} if self.switching else set()
        sampled = sorted(int(i) for i in self.rng.choice(self.n, size=self.cfg.sampled_per_round, replace=False))
        self.sampled[rnd] = sampled
        self.records[rnd] = {}
        self.sim.obs.on_round_start(rnd, sampled)
        self.inflight = {}
        self.sent_msgs = {}
        msgs: list[Message] = []
        layout_round = rnd - 1  # messages in flight were made by the strategy of the previous round
        for i in sorted(set(sampled) | self.pending_eval | pending):
            if i in self.lost:
                continue
            d = self._delivery_for(i, rnd, i in sampled)
            self.inflight[i] = d
            conf = ConfigRecord({"round": rnd, "fit": i in sampled, "deliver": d.how, "of_round": d.round})
            conf["layout"] = layout_round
            content = RecordDict({"celora": conf})
            if d.how != "none":
                content["down"] = blob_record(d.blob)
            msg = self._message(grid, i, "train", rnd, content)
            self._log_message("down", rnd, "train", i, msg, deliver=d.how, of_round=d.round, digest=digest(d.blob))
            msgs.append(msg)
            self.sent_msgs[i] = msg
        if self.switching:
            self.outbox.clear()
            self.sim.activate(self.sim.strategy_for(rnd))
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close round t−1 with the confirmed deliveries, then combine round t's uploads."""
        rnd = server_round
        got = self._replies(rnd, "train", self.sent_msgs, replies)
        # deliveries of round t−1's messages → its row is complete
        for i, d in self.inflight.items():
            if d.how == "eval":
                self._received(i, d, got.get(i))
        if rnd > 1:
            self._finalize(rnd - 1)
        uploads: dict[int, Tensors] = {}
        started: dict[int, Tensors] = {}
        for i in self.sampled[rnd]:
            rep = got.get(i)
            if rep is None:
                continue
            d = self.inflight[i]
            m = metrics_of(rep.content)
            nan = float("nan")
            rec = ClientRound(
                i,
                int(self.sim.n_train[i]),
                True,
                number(m, "acc"),
                number(m, "loss"),
                nan,
                nan,
                number(m, "train_loss"),
            )
            self.records[rnd][i] = rec
            if d.how == "missed":
                self._received(i, d, rep)
            started[i] = {k: self.held[i][k] for k in self.sim.up_layout.names}
            if "up" not in rep.content:
                continue
            blob = record_blob(arrays_of(rep.content, "up"))
            rec.bytes_up = len(blob)
            accepted = self.sim.server_accept(rnd, i, blob)
            if isinstance(accepted, str):
                rec.rejected = accepted
            else:
                uploads[i] = accepted
                self.held[i] = {**self.held[i], **accepted}  # what the client holds until a message replaces it
            self.sim.obs.on_client_done(rnd, i, rec)
        ctx = RoundContext(rnd=rnd, num_clients=self.n, n_train=self.sim.n_train, sent=started)
        messages = self.sim.server_aggregate(ctx, uploads) if uploads else {}
        for i, msg in messages.items():
            self.outbox[i] = msg
            self.out_version[i] = rnd
        live = self.sim.strategy.diagnostics  # snapshot now: the next aggregation overwrites it
        self.diag[rnd] = (dict(live), uploads, started)
        live["participants"] = None
        self.pending_eval = {
            i for i in self.records[rnd] if i in self.outbox and self.out_version[i] > self.recv_version[i]
        }
        self.wall[rnd] = time.perf_counter() - self.t0[rnd]
        metrics = MetricRecord({"uploads": len(uploads), "lost": len(self.lost)})
        return None, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Final message to every live client: the last C̄_i (participants), global test, export."""
        rnd = server_round
        self.inflight = {}
        self.sent_msgs = {}
        msgs: list[Message] = []
        adapters_dir = str(self.out / "adapters") if (self.out is not None and self.export) else ""
        for i in range(self.n):
            if i in self.lost:
                continue
            d = self._delivery_for(i, rnd + 1, False) if i in self.pending_eval else _Delivery("none", rnd)
            self.inflight[i] = d
            conf = ConfigRecord({"deliver": d.how, "of_round": d.round, "layout": rnd})
            if adapters_dir:  # (Flower cannot count an empty string in a ConfigRecord)
                conf["adapters-dir"] = adapters_dir
            content = RecordDict({"celora": conf})
            if d.how != "none":
                content["down"] = blob_record(d.blob)
            msg = self._message(grid, i, "evaluate", rnd + 1, content)
            extra = {"deliver": d.how, "of_round": d.round, "digest": digest(d.blob)}
            self._log_message("down", rnd + 1, "evaluate", i, msg, **extra)
            msgs.append(msg)
            self.sent_msgs[i] = msg
        return msgs

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Close the last round; collect global accuracies and adapter locations."""
        rnd = server_round
        got = self._replies(rnd + 1, "evaluate", self.sent_msgs, replies)
        for i, d in self.inflight.items():
            self._received(i, d, got.get(i))
        for i, rep in got.items():
            m, conf = metrics_of(rep.content), config_of(rep.content)
            self.global_acc[i] = number(m, "acc_global")
            if "adapter" in conf:
                self.adapters[i] = str(conf["adapter"])
        self._finalize(rnd)
        acc = float(np.mean(list(self.global_acc.values()))) if self.global_acc else float("nan")
        return MetricRecord({"acc_global": acc})

    def summary(self) -> None:
        """Log the strategy's configuration (Flower's hook)."""
        log.info(
            "celora strategy '%s' under Flower: %d clients, %d per round, %d rounds, timeout %.0fs",
            self.cfg.method,
            self.n,
            self.cfg.sampled_per_round,
            self.cfg.rounds,
            self.round_timeout,
        )

    # ----------------------------------------------------------------- driver
    def run(self, grid: Grid) -> dict[str, Any]:
        """Setup, ``cfg.rounds`` rounds, final delivery; write summary.json and return it."""
        if self.cfg.train.threads:
            torch.set_num_threads(self.cfg.train.threads)
        self.summary()
        self.setup(grid)
        for rnd in range(1, self.cfg.rounds + 1):
            msgs = self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_train(rnd, grid.send_and_receive(msgs, timeout=self.round_timeout))
        final = self.configure_evaluate(self.cfg.rounds, ArrayRecord(), ConfigRecord(), grid)
        self.aggregate_evaluate(self.cfg.rounds, grid.send_and_receive(final, timeout=self.round_timeout))
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The run summary: the in-process engine's keys, plus a ``flower`` section (bytes, lost clients)."""
        gidx = self.sim.p.split.global_test_idx
        acc_global = float(np.mean(list(self.global_acc.values()))) if (len(gidx) and self.global_acc) else float("nan")
        summary = self.sim.summary_dict(self.rows, self.totals, acc_global, time.perf_counter() - self.t_run)
        summary["bytes_setup_up"] = int(sum(self.setup_up.values()))
        summary["bytes_up_total"] += summary["bytes_setup_up"]
        f = self.flower
        summary["flower"] = {
            "runtime": "flower",
            "bytes_up_arrays": f["arrays_up"],  # ArrayRecord.count_bytes() of every reply (incl. setup)
            "bytes_down_arrays": f["arrays_down"],
            "bytes_up_control": f["control_up"],  # ConfigRecord + MetricRecord bytes
            "bytes_down_control": f["control_down"],
            "overhead_up": f["arrays_up"] - summary["bytes_up_total"],  # record keys on top of celora's blobs
            "overhead_down": f["arrays_down"] - summary["bytes_down_total"],
            "nodes": {str(i): node for i, node in sorted(self.node_of.items())},
            "lost_clients": {str(i): {"round": self.lost_round[i], "reason": r} for i, r in sorted(self.lost.items())},
            "acc_global_clients": len(self.global_acc),
            "adapters": {str(i): a for i, a in sorted(self.adapters.items())},
        }
        if self.out is not None:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        return summary
