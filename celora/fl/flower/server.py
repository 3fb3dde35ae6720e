"""The server side under Flower: a Flower ``Strategy`` that wraps any celora strategy from the registry.

Round t mirrors the in-process loop (``celora.fl.simulation``) message for message; both drive the same
``ServerCore`` (outbox, validation, aggregation, rows) and, on the nodes, the same ``ClientRuntime``.
The server never loads raw data: clients report counts at setup, and the model is built for layouts only.

1. ``configure_train(t)`` samples S_t with the engine's RNG and builds **one fresh message per node**:
   the sampled clients train; every participant of round t−1 first receives the C̄_i (or whatever
   the method sends back) aggregated for it in round t−1 and is evaluated on it ("aggregated"
   accuracy of round t−1); a sampled client that missed a message while not sampled gets it too.
2. ``aggregate_train(t)`` validates every upload and hands the accepted tensors to the celora strategy
   (both through the server core, ``celora.fl.server.ServerCore``, as in-process); round t−1's metrics
   row is complete and written.
3. After the last round, ``configure_evaluate`` delivers the last messages; clients report their
   global-test accuracy and export their adapters locally; the run summary is written.

The data summaries of ``celora`` travel once, in the dedicated setup message before round 1.
A node that does not answer within the round timeout (or answers with an error) is reported as
lost in the metrics row (``rejected`` reason ``lost: …``) and in the summary, and is not contacted again
— until a SuperNode with its ``partition-id`` connects anew (a restarted node): it gets the setup message
with ``resume-round`` (restoring its on-disk state) and rejoins at the next round. The run starts once all
``num_clients`` nodes are connected, or after ``node-wait`` seconds with at least ``min_clients``: a
missing client joins the same way; its data summary completes S^data when it arrives.

Checkpoints: after every ``checkpoint_every`` rounds the server core's state and the open round (its
records, uploads, the deliveries still due) go to ``<out>/checkpoints`` atomically; ``resume=True``
restores the newest complete one and re-runs the setup with ``resume-round`` so that every node
restores its own private state from its disk (node config ``state-dir``).
Bytes: celora's own count (the blob) and Flower's (``ArrayRecord.count_bytes()``) side by side.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy

from celora.config import ExperimentConfig, dump_config
from celora.errors import CeloraError
from celora.eval import global_eval_note
from celora.fl.client import partition_report
from celora.fl.flower.wire import (
    EXTRA_AGG,
    arrays_of,
    blob_record,
    config_of,
    describe,
    digest,
    message_bytes,
    metrics_of,
    number,
    record_blob,
    task_extras,
)
from celora.fl.prepare import check_names, prepare_model
from celora.fl.records import ClientRound, Observer, Silent
from celora.fl.run_folder import RunFolder, load_checkpoint, save_checkpoint
from celora.fl.server import RoundState, ServerCore
from celora.fl.sites import SetupBytes, agree_label_space, combine_setup, with_labels
from celora.fl.strategies import Tensors, get_strategy

log = logging.getLogger("celora")


def node_failure(rep: Message) -> str:
    """One line for a node's error reply: a ClientApp's CeloraError as its own message (it names the site and
    its file for data.sites), anything else with the node id."""
    reason = str(rep.error.reason)
    head, sep, rest = reason.partition(":<'")
    if sep and "CeloraError" in head and rest.endswith("'>"):
        return " ".join(rest[:-2].split())
    return f"node {rep.metadata.src_node_id} failed the setup: {' '.join(reason.split())[:300]}"


@dataclass
class _Delivery:
    """A server → client message in flight: which round it belongs to and how the client applies it."""

    how: str  # "eval" (participant of the previous round) | "missed" (picked up when sampled) | "none"
    round: int
    blob: bytes = b""
    tensors: Tensors = field(default_factory=dict)


class CeloraFlowerStrategy(FlowerStrategy):
    """Flower Message-API strategy over the celora server core: personalized messages, celora's metrics.

    The celora strategy only ever sees named tensors, exactly as in the in-process loop; this class turns
    them into per-node Flower messages and back. The core (``self.core``) is built at setup, from the
    clients' reported counts and a model built for layouts.
    """

    def __init__(
        self,
        cfg: ExperimentConfig,
        out_dir: str | Path | None,
        *,
        round_timeout: float = 600.0,
        node_wait: float = 120.0,
        export: bool = True,
        observer: Observer | None = None,
        resume: bool = False,
    ) -> None:
        self.cfg = check_names(cfg)
        agg = self.cfg.aggregation
        if get_strategy(self.cfg.method).pooled or (agg.warmup_rounds and get_strategy(agg.warmup_method).pooled):
            raise CeloraError(f"method '{self.cfg.method}' pools the clients' data: it runs only in-process")
        self.out = Path(out_dir) if out_dir is not None else None
        self.folder = RunFolder(self.out)
        self.obs: Observer = observer or Silent()
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.export = export
        self.n = self.cfg.num_clients
        self._core: ServerCore | None = None
        self.node_of: dict[int, int] = {}
        self.client_of: dict[int, int] = {}
        self.lost: dict[int, str] = {}
        self.lost_round: dict[int, int] = {}
        self.joined: dict[int, int] = {}  # client → the round it (re)joined after the setup
        self.rounds: dict[int, RoundState] = {}
        self.lost_at: dict[int, dict[int, str]] = {}  # round → the lost clients (and why) when it was aggregated
        self.flower = {"arrays_up": 0, "arrays_down": 0, "control_up": 0, "control_down": 0, "setup_up": 0}
        self.sent_msgs: dict[int, Message] = {}  # client → the message of the current round
        self.inflight: dict[int, _Delivery] = {}  # client → delivery carried by the current round's message
        self.pending_eval: set[int] = set()  # participants of the last aggregated round with a fresh message
        self.global_score: dict[int, float] = {}
        self.adapters: dict[int, str] = {}
        self.site_bytes = SetupBytes()  # data.sites: label names and task statistics up, task set-up down
        self.site_stats: dict[int, bytes] = {}
        self.task_setup = b""  # data.sites: the combined task set-up every site gets (late joiners too)
        self.label_bytes = 0
        self.t_run = time.perf_counter()
        self.resume = resume
        self.done = 0  # last round whose uploads were aggregated
        self.wall_before = 0.0

    @property
    def core(self) -> ServerCore:
        if self._core is None:
            raise CeloraError("the Flower strategy has not been set up (no SuperNode answered the setup)")
        return self._core

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
        self.obs.on_message(f"round {rnd}: client {i} {reason}")
        log.warning("round %d: client %d %s", rnd, i, reason)

    def _delivery_for(self, i: int, rnd: int, sampled: bool, switching: bool = False) -> _Delivery:
        core = self.core
        if i in self.pending_eval:
            how, owner = "eval", rnd - 1
        elif (sampled or switching) and core.pending(i):
            how, owner = "missed", rnd
        else:
            return _Delivery("none", rnd)
        blob = core.message_blob(i)
        return _Delivery(how, owner, blob, core.decode_message(blob))  # exactly what the client will hold

    def _received(self, i: int, d: _Delivery, rep: Message | None) -> int:
        """A delivery the client confirmed: the server now knows what it holds; returns its bytes (0 if none)."""
        if d.how == "none" or rep is None:
            return 0
        if config_of(rep.content).get("received") != digest(d.blob):
            raise CeloraError(f"client {i} confirmed a different message than the one sent")
        self.core.delivered(i, d.blob, d.tensors)
        return len(d.blob)

    def _finalize(self, rnd: int) -> None:
        """Complete round ``rnd``'s metrics row (same keys as the in-process loop) and write it."""
        rs = self.rounds.pop(rnd)
        lost = self.lost_at.pop(rnd, dict(self.lost))  # as it stood when the round's uploads were in
        for i in rs.sampled:
            if i not in rs.records and i in lost:
                rec = ClientRound.absent(i, int(self.core.n_train[i]), self.core.last.get(i))
                rec.rejected = lost[i]
                rs.records[i] = rec
        self.core.close_round(rs, {"lost": sorted(lost)})

    # ----------------------------------------------------------------- setup (before round 1)
    def _query_all(self, grid: Grid, nodes: list[int], kind: str, records: dict[str, Any]) -> list[Message]:
        """One ``query.<kind>`` message per node with the same content; the replies (a failure: one line)."""
        msgs = []
        for node in nodes:
            content = RecordDict({k: (ConfigRecord(v) if isinstance(v, dict) else v) for k, v in records.items()})
            msgs.append(Message(content, dst_node_id=node, message_type=f"query.{kind}", group_id="0"))
        replies = list(grid.send_and_receive(msgs, timeout=self.round_timeout))
        for rep in replies:
            if rep.has_error():
                raise CeloraError(node_failure(rep))
        if len(replies) < len(nodes):
            raise CeloraError(f"only {len(replies)} of {len(nodes)} SuperNodes answered query.{kind}")
        return replies

    def _site_labels(self, grid: Grid, nodes: list[int]) -> ExperimentConfig:
        """``data.sites`` without declared labels: every site sends its label names (only those); the config
        sent on carries their union as ``data.labels``. The server opens no file."""
        cfg = self.cfg
        if cfg.data.sites is None or cfg.data.labels is not None:
            return cfg
        replies = self._query_all(grid, nodes, "labels", {"celora": {"config": dump_config(cfg)}})
        messages: dict[int, bytes] = {}
        for rep in replies:
            conf = config_of(rep.content)
            i = int(number(conf, "partition-id"))
            messages[i] = str(conf["labels"]).encode("utf-8")
            self.site_bytes.add("up", i, len(messages[i]))
            self.label_bytes += len(messages[i])
            self._log_message("up", 0, "query.labels", i, rep)
        missing = sorted(set(range(self.n)) - set(messages))
        if missing and len(messages) < (cfg.min_clients or self.n):
            raise CeloraError(f"data.sites: site(s) {missing} not connected for the label agreement")
        labels = agree_label_space(cfg, messages, partial=True)
        if missing:  # a late site checks its own labels against these when it joins (a conflict: one line)
            self.obs.on_message(f"labels agreed by sites {sorted(messages)}: {labels}; sites {missing} join later")
        return with_labels(cfg, labels)

    def _site_task_setup(self, grid: Grid, task: Any) -> None:
        """``data.sites``: combine the sites' task statistics and send the result to every site (counted)."""
        for i, blob in self.site_stats.items():
            self.site_bytes.add("up", i, len(blob))
        combined = combine_setup(task, self.site_stats)
        if not combined:
            return
        self.task_setup = combined
        nodes = [self.node_of[i] for i in sorted(self.node_of)]
        for rep in self._query_all(grid, nodes, "task_setup", {"setup": blob_record(combined)}):
            self._confirm_task_setup(rep)

    def _confirm_task_setup(self, rep: Message) -> int:
        """The client whose node confirmed the task set-up (counted); a different digest is an error."""
        i = self.client_of[rep.metadata.src_node_id]
        if config_of(rep.content).get("received") != digest(self.task_setup):
            raise CeloraError(f"client {i} confirmed a different task set-up than the one sent")
        self.site_bytes.add("down", i, len(self.task_setup))
        return i

    def _late_task_setup(self, grid: Grid, rnd: int, clients: list[int]) -> None:
        """Clients that joined after the setup (late, or restarted with a fresh context) get the combined task
        set-up the others got (e.g. the VLM projector's μ, σ); one that does not confirm it is lost."""
        nodes = [self.node_of[i] for i in clients]
        msgs = [
            Message(
                RecordDict({"setup": blob_record(self.task_setup)}),
                dst_node_id=n,
                message_type="query.task_setup",
                group_id=str(rnd),
            )
            for n in nodes
        ]
        confirmed: set[int] = set()
        for rep in grid.send_and_receive(msgs, timeout=self.round_timeout):
            if not rep.has_error() and rep.metadata.src_node_id in self.client_of:
                confirmed.add(self._confirm_task_setup(rep))
        for i in clients:
            if i not in confirmed:
                self._lose(i, rnd, "lost: did not confirm the task set-up when it joined")

    def _query_setup(self, grid: Grid, nodes: list[int], resume_round: int, summary: bool) -> list[Message]:
        """Send the setup message (config, whether to upload a data summary, the round to restore) to ``nodes``."""
        msgs = []
        toml_text = dump_config(self.cfg)
        for node in nodes:
            conf = ConfigRecord({"config": toml_text, "summary": summary, "resume-round": resume_round})
            content = RecordDict({"celora": conf})
            msgs.append(Message(content, dst_node_id=node, message_type="query.setup", group_id="0"))
        return list(grid.send_and_receive(msgs, timeout=self.round_timeout))

    def _claim(self, rep: Message, rnd: int) -> tuple[int, dict[str, Any], bytes | None]:
        """Map the node of a setup reply to its partition; (client id, its info, its data summary or None)."""
        conf = config_of(rep.content)
        i = int(number(conf, "partition-id"))
        node = rep.metadata.src_node_id
        self.node_of[i] = node
        self.client_of[node] = i
        summary = None
        if "summary" in rep.content:
            rec = arrays_of(rep.content, "summary")
            summary = record_blob(rec)
            self.flower["setup_up"] += rec.count_bytes()
        self._log_message("up", rnd, "query.setup", i, rep, state_round=conf.get("state-round"))
        return i, json.loads(str(conf["info"])), summary

    def setup(self, grid: Grid) -> None:
        """Map nodes to clients, collect their counts and data summaries once, build the server core
        (and, with ``resume``, restore the newest checkpoint: every node restores its own state)."""
        cfg = self.cfg
        ckpt = load_checkpoint(self.out) if (self.resume and self.out is not None) else None
        if self.resume and ckpt is None:
            raise CeloraError(f"{self.out}: no complete checkpoint to resume from (checkpoints/ckpt-*.json)")
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "flower").mkdir(exist_ok=True)
            if ckpt is None:
                (self.out / "metrics.jsonl").write_text("", encoding="utf-8")
                (self.out / "flower" / "messages.jsonl").write_text("", encoding="utf-8")
        need = cfg.min_clients or self.n
        deadline = time.monotonic() + self.node_wait
        nodes = list(grid.get_node_ids())
        while len(nodes) < self.n and time.monotonic() < deadline:
            time.sleep(1.0)
            nodes = list(grid.get_node_ids())
        if len(nodes) < need:
            raise CeloraError(f"only {len(nodes)} of {need} SuperNodes connected within {self.node_wait:g}s")
        wants_summary = get_strategy(cfg.method).uses_data_summaries and ckpt is None
        cfg = self.cfg = self._site_labels(grid, nodes)
        replies = self._query_setup(grid, nodes, ckpt.round if ckpt else 0, wants_summary)
        summaries: dict[int, bytes] = {}
        infos: dict[int, dict[str, Any]] = {}
        for rep in replies:
            if rep.has_error() and rep.error.code == ErrorCode.NODE_UNAVAILABLE:  # e.g. a node that died before
                log.warning("setup: node %s is unavailable (no heartbeat): skipped", rep.metadata.src_node_id)
                continue
            if rep.has_error():
                raise CeloraError(node_failure(rep))
            i = int(number(config_of(rep.content), "partition-id"))
            if "stats" in rep.content:  # a site's task statistics (data.sites)
                self.site_stats[i] = record_blob(arrays_of(rep.content, "stats"))
            if i in self.node_of:
                raise CeloraError(f"two SuperNodes claim partition-id {i}")
            i, infos[i], blob = self._claim(rep, 0)
            if blob is not None:
                summaries[i] = blob
        if len(infos) < need:
            raise CeloraError(f"only {len(infos)} of {need} SuperNodes answered the setup ({self.round_timeout:g}s)")
        missing = sorted(set(range(self.n)) - set(infos))
        known = next(iter(infos.values()))
        for i in missing:  # not connected yet: counts arrive when it joins
            infos[i] = {"id": i, "n_train": 0, "n_test": 0, "label_hist": {}, "majority": float("nan")}
            infos[i]["label_names"] = known["label_names"]
            self._lose(i, 0, "lost: not connected at start")
        ordered = [infos[i] for i in range(self.n)]
        bench = prepare_model(cfg, len(known["label_names"]))  # names and shapes only: no data
        self._site_task_setup(grid, bench.task)
        self._core = ServerCore(cfg, bench, ordered, observer=self.obs, folder=self.folder)
        self.folder.start(cfg, partition_report(ordered, known.get("meta", {})), fresh=ckpt is None)
        if ckpt is not None:
            self.core.setup(None)
            self._restore(ckpt.state, ckpt.round)
        else:
            self.core.setup(summaries if wants_summary else None)

    def _join(self, grid: Grid, rnd: int) -> None:
        """SuperNodes that connected since the setup (late, or restarted after being lost) join the run."""
        core = self.core
        lost_nodes = {self.node_of[i] for i in self.lost if i in self.node_of}
        # new node ids, and listed nodes of lost clients (a SuperNode restarted with the same authentication key
        # comes back under its old node id; a slow one that missed a deadline is asked again)
        fresh = [node for node in grid.get_node_ids() if node not in self.client_of or node in lost_nodes]
        if not fresh:
            return
        wants = core.main_strategy.uses_data_summaries
        joined: list[int] = []
        for rep in self._query_setup(grid, fresh, max(0, rnd - 1), wants):
            if rep.has_error() and rep.error.code == ErrorCode.NODE_UNAVAILABLE:  # still listed, but gone
                continue
            if rep.has_error():  # e.g. a late site whose labels lie outside the agreed label space
                why = node_failure(rep)
                log.warning("round %d: node %d could not join: %s", rnd, rep.metadata.src_node_id, why)
                self.obs.on_message(f"round {rnd}: a node could not join: {why}")
                continue
            i = int(number(config_of(rep.content), "partition-id"))
            if i in self.node_of and i not in self.lost:
                log.warning("node %d claims partition-id %d, which is live: ignored", rep.metadata.src_node_id, i)
                continue
            i, info, blob = self._claim(rep, rnd)
            core.join(i, info, blob)
            self.lost.pop(i, None)
            self.lost_round.pop(i, None)
            self.joined[i] = rnd
            joined.append(i)
            self.obs.on_message(f"round {rnd}: client {i} joined on node {self.node_of[i]}")
        if joined and self.task_setup:
            self._late_task_setup(grid, rnd, joined)

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """The server's state after ``self.done`` rounds (the open round's records, deliveries still due)."""
        open_rounds = {
            t: {
                "sampled": rs.sampled,
                "records": {i: asdict(r) for i, r in rs.records.items()},
                "uploads": rs.uploads,
                "sent": rs.sent,
                "flushed": rs.flushed,
                "diag": rs.diag,
                "wall": rs.wall,
            }
            for t, rs in self.rounds.items()
        }
        return {
            "core": self.core.state_dict(),
            "rounds": open_rounds,
            "pending_eval": sorted(self.pending_eval),
            "lost_at": self.lost_at,
            "flower": self.flower,
            "wall_s": self.wall_before + time.perf_counter() - self.t_run,
            "site_bytes": {"up": self.site_bytes.up, "down": self.site_bytes.down, "labels": self.label_bytes},
        }

    def _restore(self, st: dict[str, Any], rnd: int) -> None:
        self.core.load_state_dict(st["core"], rnd)
        for t, r in st["rounds"].items():
            rs = RoundState(int(t), list(r["sampled"]))
            rs.records = {i: ClientRound.from_dict(d) for i, d in r["records"].items()}
            rs.uploads, rs.sent, rs.flushed = dict(r["uploads"]), dict(r["sent"]), dict(r["flushed"])
            rs.diag, rs.wall = r["diag"], r["wall"]
            self.rounds[int(t)] = rs
        self.pending_eval = set(st["pending_eval"]) - set(self.lost)
        self.lost_at = {int(t): dict(v) for t, v in st["lost_at"].items()}
        self.flower.update(st["flower"])
        self.wall_before = float(st["wall_s"])
        if "site_bytes" in st:  # the set-up the run needed, counted once (not what a restart re-sends)
            sb = st["site_bytes"]
            self.site_bytes = SetupBytes(*({int(i): int(n) for i, n in sb[side].items()} for side in ("up", "down")))
            self.label_bytes = int(sb["labels"])
        self.done = rnd
        self.folder.rewrite_rows(self.core.rows)
        self.obs.on_message(f"resumed from checkpoint round {rnd} of {self.cfg.rounds}")

    # ----------------------------------------------------------------- Flower Strategy interface
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """One fresh message per node: its pending C̄_i (if any) and whether to train this round."""
        rnd, core = server_round, self.core
        self._join(grid, rnd)
        switching = core.switches(rnd)
        pending = set(core.pending_clients()) if switching else set()
        rs = core.new_round(rnd)
        self.rounds[rnd] = rs
        self.inflight = {}
        self.sent_msgs = {}
        msgs: list[Message] = []
        layout_round = rnd - 1  # messages in flight were made by the strategy of the previous round
        for i in sorted(set(rs.sampled) | self.pending_eval | pending):
            if i in self.lost:
                continue
            fit = i in rs.sampled and rs.fails.get(i) != "before"  # a client failing before training is offline
            d = self._delivery_for(i, rnd, fit, switching)
            if d.how == "none" and not fit:
                continue
            self.inflight[i] = d
            conf = ConfigRecord({"round": rnd, "fit": fit, "deliver": d.how, "of_round": d.round})
            conf["layout"] = layout_round
            content = RecordDict({"celora": conf})
            if d.how != "none":
                content["down"] = blob_record(d.blob)
            msg = self._message(grid, i, "train", rnd, content)
            self._log_message("down", rnd, "train", i, msg, deliver=d.how, of_round=d.round, digest=digest(d.blob))
            msgs.append(msg)
            self.sent_msgs[i] = msg
        if switching:
            core.enter_phase(rnd)
        return msgs

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close round t−1 with the confirmed deliveries, then combine round t's uploads."""
        rnd, core = server_round, self.core
        rs = self.rounds[rnd]
        got = self._replies(rnd, "train", self.sent_msgs, replies)
        # deliveries of round t−1's messages → its row is complete
        for i, d in self.inflight.items():
            if d.how == "eval":
                self._account_eval(i, d, got.get(i))
            elif d.how == "missed" and i not in rs.sampled:  # flushed at the end of a warm-up
                nbytes = self._received(i, d, got.get(i))
                if nbytes:
                    rs.flushed[i] = nbytes
        if rnd > 1:
            self._finalize(rnd - 1)
        for i in rs.sampled:
            rep = got.get(i)
            if rs.fails.get(i) == "before":
                core.dropped(rs, i)
                continue
            if rep is None:
                continue
            d = self.inflight[i]
            if rs.fails.get(i) == "after":  # trained on the node, upload discarded: a simulated dropout
                core.fit_started(rs, i)
                core.dropped(rs, i, self._received(i, d, rep) if d.how == "missed" else 0)
                continue
            m = metrics_of(rep.content)
            rec = ClientRound.started(i, int(core.n_train[i]))
            rec.score, rec.loss, rec.train_loss = number(m, "score"), number(m, "loss"), number(m, "train_loss")
            rec.metrics = task_extras(m)
            if d.how == "missed":
                rec.bytes_down += self._received(i, d, rep)
            core.fit_started(rs, i)
            core.add_record(rs, i, rec)
            if "up" in rep.content:
                core.accept(rs, i, record_blob(arrays_of(rep.content, "up")))
            self.obs.on_client_done(rnd, i, rec)
        core.aggregate(rs)
        self.pending_eval = {i for i in rs.records if core.pending(i)}
        rs.wall = time.perf_counter() - rs.t0
        self.lost_at[rnd] = dict(self.lost)
        self.done = rnd
        every = self.cfg.checkpoint_every
        if self.out is not None and every and (rnd % every == 0 or rnd == self.cfg.rounds):
            save_checkpoint(self.out, rnd, self.state_dict())
        metrics = MetricRecord({"uploads": len(rs.uploads), "lost": len(self.lost)})
        return None, metrics

    def _account_eval(self, i: int, d: _Delivery, rep: Message | None) -> None:
        """A participant of round d.round received its message: bytes and "aggregated" metrics on that row."""
        nbytes = self._received(i, d, rep)
        if not nbytes or rep is None:
            return
        rec = self.rounds[d.round].records[i]
        rec.bytes_down += nbytes
        m = metrics_of(rep.content)
        rec.score_agg, rec.loss_agg = number(m, "score_agg"), number(m, "loss_agg")
        rec.metrics.update(task_extras(m, EXTRA_AGG))

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
        """Close the last round; collect the global-test scores and adapter locations."""
        rnd = server_round
        got = self._replies(rnd + 1, "evaluate", self.sent_msgs, replies)
        for i, d in self.inflight.items():
            if d.how == "eval":
                self._account_eval(i, d, got.get(i))
        for i, rep in got.items():
            m, conf = metrics_of(rep.content), config_of(rep.content)
            if "score_global" in m:  # the clients of eval.global_clients' sample
                self.global_score[i] = number(m, "score_global")
            if "adapter" in conf:
                self.adapters[i] = str(conf["adapter"])
        self._finalize(rnd)
        score = float(np.mean(list(self.global_score.values()))) if self.global_score else float("nan")
        return MetricRecord({"score_global": score})

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
        for rnd in range(self.done + 1, self.cfg.rounds + 1):
            msgs = self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)
            self.aggregate_train(rnd, grid.send_and_receive(msgs, timeout=self.round_timeout))
        final = self.configure_evaluate(self.cfg.rounds, ArrayRecord(), ConfigRecord(), grid)
        self.aggregate_evaluate(self.cfg.rounds, grid.send_and_receive(final, timeout=self.round_timeout))
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The run summary: the in-process loop's keys, plus a ``flower`` section (bytes, lost clients)."""
        scores = list(self.global_score.values())
        score_global = float(np.mean(scores)) if scores else float("nan")
        wall = self.wall_before + time.perf_counter() - self.t_run
        summary = self.core.summary(score_global, wall, self.site_bytes.totals()["up"])
        summary["global_eval"] = global_eval_note(sorted(self.global_score), self.n)
        if self.cfg.data.sites is not None:
            summary["bytes_setup_down"] = self.site_bytes.totals()["down"]
        f = self.flower
        summary["flower"] = {
            "runtime": "flower",
            "bytes_up_arrays": f["arrays_up"],  # ArrayRecord.count_bytes() of every reply (incl. setup)
            "bytes_down_arrays": f["arrays_down"],
            "bytes_up_control": f["control_up"],  # ConfigRecord + MetricRecord bytes
            "bytes_down_control": f["control_down"],
            # record keys on top of celora's blobs (label names travel in a ConfigRecord: control bytes)
            "overhead_up": f["arrays_up"] - (summary["bytes_up_total"] - self.label_bytes),
            "overhead_down": f["arrays_down"] - summary["bytes_down_total"],
            "nodes": {str(i): node for i, node in sorted(self.node_of.items())},
            "lost_clients": {str(i): {"round": self.lost_round[i], "reason": r} for i, r in sorted(self.lost.items())},
            "joined_late": {str(i): rnd for i, rnd in sorted(self.joined.items())},
            "global_eval_clients": len(self.global_score),
            "adapters": {str(i): a for i, a in sorted(self.adapters.items())},
        }
        self.folder.write_summary(summary)
        self.folder.drop_checkpoints()
        return summary
