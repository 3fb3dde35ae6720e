"""The server core: one round protocol for both runtimes (in-process loop and Flower strategy).

It owns the layouts (``Phases``), validates uploads (``accept``), combines them with the method's strategy
(plus FedAvg for shared modules such as a VLM's projector), keeps a per-client outbox with message versions
(a client not sampled keeps its last C̄_i and picks up what it missed when next sampled; at the end of a
warm-up every pending message is flushed), sets the strategy up from the clients' data summaries, and turns
the round's client records into metrics rows and the run summary (``celora.fl.records``).

It never touches raw data: what it knows about a client is its setup ``info`` (counts), its data summary
(per-class GMM statistics) and its uploads. ``held[i]`` is what the server knows client i holds of every
shared tensor (the shared seed makes the initial view identical everywhere): the reference for the update
u_i = x_i − x_i^{sent} of parameter similarity and diagnostics.

A round, as both runtimes drive it::

    rs = core.new_round(t)                       # samples S_t
    core.fit_started(rs, i); core.add_record(rs, i, rec); core.accept(rs, i, blob)   # per participant
    core.aggregate(rs)                           # fills the outbox
    blob = core.message_blob(i); core.delivered(i, blob)                            # per delivery
    row = core.close_round(rs)                   # metrics row written
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from celora.config import ExperimentConfig
from celora.errors import CeloraError
from celora.fl.backbone import Backbone, Phase, Phases
from celora.fl.components import component_means, weight_shares
from celora.fl.payload import Layout, PayloadError, decode, decode_named, encode, expected_size
from celora.fl.records import ClientRound, Observer, Silent, round_row, summary_dict
from celora.fl.run_folder import RunFolder
from celora.fl.similarity import ClientSummary, summary_from_tensors, update_cosine
from celora.fl.strategies import RoundContext, Strategy, Tensors
from celora.fl.strategies.fedavg_modules import aggregate_with_fedavg
from celora.privacy.dp import privacy_report

log = logging.getLogger("celora")

SUMMARY_MAX_BYTES = 64 * 1024 * 1024


@dataclass
class RoundState:
    """One round in progress on the server."""

    rnd: int
    sampled: list[int]
    records: dict[int, ClientRound] = field(default_factory=dict)
    uploads: dict[int, Tensors] = field(default_factory=dict)
    sent: dict[int, Tensors] = field(default_factory=dict)  # what each participant held when it started
    flushed: dict[int, int] = field(default_factory=dict)  # bytes of messages flushed to non-participants
    fails: dict[int, str] = field(default_factory=dict)  # simulated dropouts: client → "before" | "after"
    diag: dict[str, Any] = field(default_factory=dict)  # the strategy's diagnostics right after aggregation
    t0: float = field(default_factory=time.perf_counter)
    wall: float | None = None


def update_norm(upload: Tensors, sent: Tensors) -> float:
    """‖x − x^{sent}‖₂ over every tensor of an upload."""
    squares = [((v - sent[k]).double() ** 2).sum() for k, v in upload.items()]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


class ServerCore:
    """The server half of the round protocol (see the module docstring)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        bench: Backbone,
        infos: list[dict[str, Any]],
        *,
        observer: Observer | None = None,
        folder: RunFolder | None = None,
    ) -> None:
        if len(infos) != cfg.num_clients:
            raise CeloraError(f"num_clients = {cfg.num_clients} but {len(infos)} clients reported")
        self.cfg = cfg
        self.bench = bench
        self.spec = bench.task.spec  # the task's metrics: rows and the summary are keyed by its primary metric
        self.infos = infos
        comps = [info.get("component") for info in infos]
        self.components: list[str] | None = [str(c) for c in comps] if all(c is not None for c in comps) else None
        self.n = cfg.num_clients
        self.n_train = np.array([int(info["n_train"]) for info in infos])
        self.phases = Phases(cfg, bench)
        self.main_strategy = self.phases.main
        self.phase: Phase = self.phases.phase(1)
        self.obs: Observer = observer or Silent()
        self.folder = folder or RunFolder(None)
        self.held: dict[int, Tensors] = {i: dict(bench.init_state) for i in range(self.n)}
        self.outbox: dict[int, Tensors] = {}
        self.out_version = dict.fromkeys(range(self.n), 0)
        self.recv_version = dict.fromkeys(range(self.n), 0)
        self.rng = np.random.default_rng(cfg.seed)
        self.fail_rng = np.random.default_rng([cfg.seed, 0xD5])  # dropout draws: a stream of their own
        self.last: dict[int, ClientRound] = {}
        self.rows: list[dict[str, Any]] = []
        self.totals = {"up": 0, "down": 0}
        self.setup_up: dict[int, int] = {}
        self.summary_blobs: dict[int, bytes] = {}

    @property
    def strategy(self) -> Strategy:
        return self.phase.strategy

    # ----------------------------------------------------------------- setup (once)
    def setup(self, blobs: dict[int, bytes] | None) -> dict[int, int]:
        """Validate the clients' data summaries and set the strategies up; bytes per client. Summaries may
        arrive in parts (clients joining late): S^data is computed once every client's is in."""
        if self.phases.warmup is not None:
            self.phases.warmup.setup(self.n_train)
        if blobs is None:
            self.main_strategy.setup(self.n_train)
            return {}
        for i, blob in blobs.items():
            try:
                tensors = decode_named(blob, max_bytes=SUMMARY_MAX_BYTES)
                summary_from_tensors(tensors, feature_dim=self.bench.feature_dim)
            except CeloraError as err:
                raise CeloraError(f"client {i}: data summary rejected: {err}") from None
            self.summary_blobs[i] = blob
            self.setup_up[i] = len(blob)
        if len(self.summary_blobs) < self.n:
            self.main_strategy.setup(self.n_train)
            self.obs.on_message(f"data summaries from {len(self.summary_blobs)} of {self.n} clients: S^data waits")
            return {i: len(b) for i, b in blobs.items()}
        summaries: list[ClientSummary] = [
            summary_from_tensors(decode_named(self.summary_blobs[i], max_bytes=SUMMARY_MAX_BYTES))
            for i in range(self.n)
        ]
        self.main_strategy.setup(self.n_train, summaries)
        sim = self.main_strategy.diagnostics.get("similarity_data")
        if sim is not None:
            self.folder.save_npy("similarity_data.npy", sim)
        total = sum(self.setup_up.values())
        self.obs.on_message(f"data summaries: {total} B uploaded once ({total // self.n} B/client)")
        return {i: len(b) for i, b in blobs.items()}

    def join(self, i: int, info: dict[str, Any], summary: bytes | None) -> None:
        """Client i connected after the setup (late, or restarted): its counts, and its data summary if the
        strategy still waits for it."""
        self.infos[i] = info
        self.n_train[i] = int(info["n_train"])
        if summary is not None and i not in self.summary_blobs and self.main_strategy.uses_data_summaries:
            self.setup({i: summary})

    # ----------------------------------------------------------------- outbox
    def switches(self, rnd: int) -> bool:
        """Does round ``rnd`` run another strategy than the last one (end of a warm-up)?"""
        return self.phases.strategy_for(rnd) is not self.phase.strategy

    def enter_phase(self, rnd: int) -> None:
        """Switch to round ``rnd``'s strategy; messages of the old layout are dropped (flush them first)."""
        self.outbox.clear()
        self.phase = self.phases.phase(rnd)

    def pending(self, i: int) -> bool:
        """Has client i a message it has not received yet?"""
        return i in self.outbox and self.out_version[i] > self.recv_version[i]

    def pending_clients(self) -> list[int]:
        return sorted(i for i in self.outbox if self.pending(i))

    def message_blob(self, i: int) -> bytes:
        """Serialize client i's message (the current phase's layout)."""
        return encode(self.outbox[i], self.phase.down_layout, self.phase.dtype)

    def decode_message(self, blob: bytes) -> Tensors:
        """Exactly what a client holds after applying ``blob``."""
        return decode(blob, self.phase.down_layout, self.phase.dtype)

    def delivered(self, i: int, blob: bytes, tensors: Tensors | None = None) -> None:
        """Client i confirmed (or, in-process, applied) its pending message ``blob`` (``tensors``: its decoded
        content, when it was made in an earlier phase's layout)."""
        self.held[i] = {**self.held[i], **(tensors if tensors is not None else self.decode_message(blob))}
        self.recv_version[i] = self.out_version[i]

    # ----------------------------------------------------------------- one round
    def new_round(self, rnd: int) -> RoundState:
        """Sample S_t (the run's seeded RNG), draw the simulated dropouts, open round ``rnd``."""
        size = self.cfg.sampled_per_round
        sampled = sorted(int(i) for i in self.rng.choice(self.n, size=size, replace=False))
        self.obs.on_round_start(rnd, sampled)
        return RoundState(rnd, sampled, fails=self.failures(sampled))

    def failures(self, sampled: list[int]) -> dict[int, str]:
        """Which sampled clients fail this round (``dropout_before``: before training; ``dropout``: after it,
        the upload lost). Two draws per client whatever the settings, so the stream is the same for all."""
        out: dict[int, str] = {}
        for i in sampled:
            before, after = self.fail_rng.random(2)
            if before < self.cfg.dropout_before:
                out[i] = "before"
            elif after < self.cfg.dropout:
                out[i] = "after"
        return out

    def dropped(self, rs: RoundState, i: int, missed: int = 0) -> ClientRound:
        """The record of a sampled client that failed (``rs.fails[i]``): it keeps its last metrics, uploads
        nothing; ``missed`` = bytes of a message it had picked up before failing."""
        rec = ClientRound.absent(i, int(self.n_train[i]), self.last.get(i))
        rec.dropped, rec.bytes_down = rs.fails[i], missed
        rs.records[i] = rec
        return rec

    def fit_started(self, rs: RoundState, i: int) -> None:
        """Client i starts local training from what the server last knew it to hold."""
        rs.sent[i] = {k: self.held[i][k] for k in self.phase.up_layout.names}

    def add_record(self, rs: RoundState, i: int, rec: ClientRound) -> None:
        rs.records[i] = rec

    def accept(self, rs: RoundState, i: int, blob: bytes) -> bool:
        """Decode and validate client i's upload; a rejection is logged with its reason on the record."""
        rec = rs.records[i]
        rec.bytes_up = len(blob)
        try:
            tensors = decode(blob, self.phase.up_layout, self.phase.dtype, max_bytes=self.phase.max_up)
        except PayloadError as err:
            self.reject(rs, i, str(err))
            return False
        rs.uploads[i] = tensors
        return True

    def reject(self, rs: RoundState, i: int, reason: str) -> None:
        """Leave client i's upload out of round ``rs.rnd`` (logged, counted as rejected)."""
        rs.records[i].rejected = reason
        rs.uploads.pop(i, None)
        self.obs.on_message(f"round {rs.rnd}: rejected the update of client {i}: {reason}")
        log.warning("round %d: rejected the update of client %d: %s", rs.rnd, i, reason)

    def screen(self, rs: RoundState) -> dict[int, Tensors]:
        """Outlier updates, for every method: with u_i = x_i − x_i^{sent} over everything uploaded,
        reject i if ‖u_i‖ > k · median_j ‖u_j‖ (``aggregation.max_norm_ratio`` = k), then clip the rest to
        x_i^{sent} + u_i · min(1, c / ‖u_i‖) (``aggregation.clip_norm`` = c). Returns what gets combined."""
        agg = self.cfg.aggregation
        if not rs.uploads or (agg.max_norm_ratio is None and agg.clip_norm is None):
            return rs.uploads
        norms = {i: update_norm(up, rs.sent[i]) for i, up in rs.uploads.items()}
        if agg.max_norm_ratio is not None and len(norms) > 1:
            median = float(np.median(list(norms.values())))
            for i, norm in norms.items():
                if norm > agg.max_norm_ratio * median:
                    self.reject(
                        rs,
                        i,
                        f"outlier: update norm {norm:.4g} > {agg.max_norm_ratio:g} × the round's median {median:.4g} "
                        "(aggregation.max_norm_ratio)",
                    )
        if agg.clip_norm is None:
            return rs.uploads
        out: dict[int, Tensors] = {}
        for i, up in rs.uploads.items():
            scale = min(1.0, agg.clip_norm / norms[i]) if norms[i] > 0 else 1.0
            out[i] = {k: rs.sent[i][k] + (v - rs.sent[i][k]) * scale for k, v in up.items()} if scale < 1 else up
        return out

    def aggregate(self, rs: RoundState) -> dict[int, Tensors]:
        """Screen and combine the accepted uploads; each addressed client's message goes to its outbox
        (version t)."""
        combined = self.screen(rs)
        for i, up in rs.uploads.items():  # what the client holds until a message replaces it
            self.held[i] = {**self.held[i], **up}
        if not rs.uploads:
            return {}
        ctx = RoundContext(rnd=rs.rnd, num_clients=self.n, n_train=self.n_train, sent=rs.sent)
        messages = aggregate_with_fedavg(self.strategy, ctx, combined, self.phase.fedavg_names)
        for i, msg in messages.items():
            self.outbox[i] = msg
            self.out_version[i] = rs.rnd
        live = self.strategy.diagnostics
        rs.diag = dict(live)  # snapshot: the next aggregation overwrites it
        live["participants"] = None
        return messages

    def close_round(self, rs: RoundState, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Complete round ``rs.rnd``'s metrics row (non-participants repeat their last metrics) and write it."""
        records = rs.records
        for i in rs.sampled:
            rec = records.get(i)
            if rec is not None and rec.participated and np.isnan(rec.score_agg):  # no message to apply
                rec.score_agg, rec.loss_agg = rec.score, rec.loss
        for i in range(self.n):
            if i not in records:
                records[i] = ClientRound.absent(i, int(self.n_train[i]), self.last.get(i))
        for i, nbytes in rs.flushed.items():
            records[i].bytes_down += nbytes
        self.last.update({i: r for i, r in records.items() if r.participated})
        wall = rs.wall if rs.wall is not None else time.perf_counter() - rs.t0
        row = round_row(self.cfg.method, rs.rnd, [records[i] for i in range(self.n)], wall, self.spec)
        if self.components is not None:  # a task mixture: results per component
            row["components"] = component_means(row["clients"], self.components, self.spec.primary)
        self.record_diagnostics(rs, row)
        row.update(extra or {})
        self.totals["up"] += row["bytes_up"]
        self.totals["down"] += row["bytes_down"]
        self.rows.append(row)
        self.folder.append_row(row)
        self.obs.on_round_end(rs.rnd, row)
        return row

    def record_diagnostics(self, rs: RoundState, row: dict[str, Any]) -> None:
        """Does sharing do anything? Per round: mean pairwise cosine of the shared updates u_i = x_i − x_i^{sent},
        the weight matrix (weights_round_<t>.npy) and effective collaborators 1/Σ_j w_ij² where the strategy
        has weights. The primary metric's change in the aggregation step itself: <p>_mean_agg − <p>_mean."""
        p = self.spec.primary
        out: dict[str, Any] = {"aggregation_delta": row[f"{p}_mean_agg"] - row[f"{p}_mean"]}
        uploads, sent = rs.uploads, rs.sent
        ids = sorted(i for i in uploads if i in sent)
        if len(ids) > 1:
            names = list(uploads[ids[0]])
            u = torch.stack([torch.cat([(uploads[i][n] - sent[i][n]).reshape(-1) for n in names]) for i in ids])
            cos = update_cosine(u.double().cpu().numpy())
            out["update_cosine_mean"] = float(cos[~np.eye(len(ids), dtype=bool)].mean())
        diag = rs.diag
        if self.components is not None:  # does the weighting pool a client with its own component?
            out.update(weight_shares(diag, self.components, self.n_train, lam=self.cfg.aggregation.lam))
        if "weights" in diag and diag.get("participants") is not None:
            self.folder.save_npy(f"weights_round_{rs.rnd}.npy", diag["weights"])
            eff = diag.get("effective_collaborators", {})
            out["effective_collaborators"] = eff
            out["effective_collaborators_mean"] = float(np.mean(list(eff.values()))) if eff else float("nan")
        row["diag"] = out

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything the server carries between rounds: what each client holds (where it differs from the
        shared init), the outbox and its versions (personalized C̄_i), the strategies' state (S^data, last
        w_ij), the sampling RNG, the rows and totals so far."""
        init = self.bench.init_state
        return {
            "held": {i: {k: v for k, v in h.items() if v is not init.get(k)} for i, h in self.held.items()},
            "outbox": self.outbox,
            "out_version": self.out_version,
            "recv_version": self.recv_version,
            "last": {i: asdict(r) for i, r in self.last.items()},
            "rows": self.rows,
            "totals": self.totals,
            "setup_up": self.setup_up,
            "summary_blobs": {i: np.frombuffer(b, dtype=np.uint8) for i, b in self.summary_blobs.items()},
            "n_train": self.n_train,
            "rng": self.rng.bit_generator.state,
            "fail_rng": self.fail_rng.bit_generator.state,
            "strategies": [s.state_dict() for s in self.phases.strategies()],
        }

    def load_state_dict(self, state: dict[str, Any], rnd: int) -> None:
        """Restore ``state_dict`` taken after round ``rnd``."""
        init = self.bench.init_state
        self.held = {i: {**init, **state["held"].get(i, {})} for i in range(self.n)}
        self.outbox = dict(state["outbox"])
        self.out_version = dict(state["out_version"])
        self.recv_version = dict(state["recv_version"])
        self.last = {i: ClientRound.from_dict(r) for i, r in state["last"].items()}
        self.rows = list(state["rows"])
        self.totals = dict(state["totals"])
        self.setup_up = dict(state["setup_up"])
        self.summary_blobs = {i: np.asarray(a, dtype=np.uint8).tobytes() for i, a in state["summary_blobs"].items()}
        self.n_train = np.asarray(state["n_train"]).copy()
        self.rng.bit_generator.state = state["rng"]
        self.fail_rng.bit_generator.state = state["fail_rng"]
        for strategy, st in zip(self.phases.strategies(), state["strategies"], strict=True):
            strategy.load_state_dict(st)
        self.phase = self.phases.phase(rnd)

    # ----------------------------------------------------------------- summary
    def acc_majority(self) -> float | None:
        """Mean over clients of the own-majority-label baseline (clients without train or test left out); None
        when the task's primary metric is not accuracy."""
        if self.spec.primary != "acc":
            return None
        accs = [float(info["majority"]) for info in self.infos if not np.isnan(float(info["majority"]))]
        return float(np.mean(accs)) if accs else float("nan")

    def summary(self, score_global: float, wall: float, extra_setup_bytes: int = 0) -> dict[str, Any]:
        """summary.json's content (the records' keys, payload description, one-time setup bytes)."""
        s = summary_dict(
            method=self.cfg.method,
            rounds=self.rows,
            totals=self.totals,
            score_global=score_global,
            acc_majority=self.acc_majority(),
            payload={
                "shared_factors": self.shared_factor_names(),
                "tensors": len(self.phase.up_layout.entries),
                "params": self.phase.up_layout.numel(),
                "dtype": self.phase.dtype,
                **self.payload_split(),
            },
            num_clients=self.n,
            seed=self.cfg.seed,
            task=self.cfg.data.task,
            model_note=self.bench.loaded.note,
            wall=wall,
            spec=self.spec,
        )
        if self.components is not None and self.rows:
            s["components"] = self.rows[-1]["components"]
            shares = {k: v for k, v in self.rows[-1].get("diag", {}).items() if "component_share" in k}
            s.update({f"final_{k}": v for k, v in shares.items()})
        # one-time data summaries and task set-up, not per round
        s["bytes_setup_up"] = int(sum(self.setup_up.values())) + int(extra_setup_bytes)
        s["bytes_up_total"] += s["bytes_setup_up"]
        privacy = privacy_report(self.cfg.privacy, self.cfg.rounds)
        if privacy:
            s["privacy"] = privacy
        return s

    def shared_factor_names(self) -> list[str]:
        """What the method sends, by factor; "head" only when the model has a head of its own (a VLM's
        projector is a FedAvg module, reported as bytes_fedavg_modules)."""
        loaded = self.bench.loaded
        factors = set(self.main_strategy.shared_factors)
        if set(loaded.head_modules) <= set(loaded.fedavg_modules):
            factors.discard("head")
        return sorted(factors)

    def payload_split(self) -> dict[str, int]:
        """Bytes of one message by part: adapter factors (+ head if shared), FedAvg modules, safetensors framing."""
        phase = self.phase
        fedavg = set(phase.fedavg_names)
        own = Layout(tuple(e for e in phase.up_layout.entries if e[0] not in fedavg))
        side = Layout(tuple(e for e in phase.up_layout.entries if e[0] in fedavg))
        total = expected_size(phase.up_layout, phase.dtype) if phase.up_layout.entries else 0
        parts = {"bytes_message": total, "bytes_adapters": own.tensor_bytes(phase.dtype)}
        if side.entries:
            parts["bytes_fedavg_modules"] = side.tensor_bytes(phase.dtype)
        parts["bytes_framing"] = total - sum(v for k, v in parts.items() if k != "bytes_message") if total else 0
        return parts
