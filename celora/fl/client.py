"""The client runtime: one client's own data and private state; train → evaluate → upload; receive → evaluate.

The same ``ClientRuntime`` runs in-process (``celora.fl.simulation``: one runtime per client, all on one
shared frozen model) and under Flower (``celora.fl.flower.client_app``: one per SuperNode). A site's raw
rows never leave it: what travels is the encoded upload (``encode_upload``), the one-time data summary
(``summary_blob``) and a few counts (``info``).

**The data seam.** A client's rows reach it as a ``ClientData``: a ``TaskData`` (inputs encoded by the task)
with the row indices of its train and test split (and of a global test set, if any), the class index of
every row and the label names. A ``DataProvider`` hands out one ``ClientData`` per client id:
- ``PartitionedData`` (today's default): one dataset, partitioned by seed (``celora.data.partition``);
  in-process every client indexes the one shared ``TaskData``.
- a provider in which each client loads its own file (``data.sites``) plugs in here: it returns, for
  client ``i``, a ``ClientData`` over that client's own encoded rows; nothing else changes.

**Hooks** (for features built on top):
- ``ClientRuntime.transform_upload``: the shared tensors after local training, before encoding
  (client-level clipping + noise for DP go here; ``round_start`` holds what the client started from).
- ``ClientRuntime.train``: one call of ``train_local`` per round; with ``train.keep_optimizer`` the client's
  AdamW moments live on the runtime next to ``state`` (``optimizer_state``) and resume the next round.
- ``ClientRuntime.state``: the private adapter view (A, B, C, head), read and written only through this
  property; in-process it lives in a ``StateStore`` (``engine.state``: memory, or one file per client on disk).
- ``ClientRuntime.fit`` evaluates the local step and ``receive`` the aggregated model, both only in the rounds
  ``evaluates(rnd)`` names (every ``eval.every`` rounds and the last); ``receive(..., evaluate=False)``
  applies a message without evaluating.

Training, evaluation and pooling are tasks' (``celora.data.tasks``); the default is text classification.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from celora.adapters.inject import fold_head_scales
from celora.config import ExperimentConfig
from celora.data.tasks import TASKS, Batch, Encoded, Task, TaskData, encode_texts
from celora.eval import majority_baseline
from celora.fl.backbone import Backbone, Phase, Phases, seeded
from celora.fl.payload import decode, encode, encode_named
from celora.fl.records import ClientRound
from celora.fl.similarity import (
    ClientSummary,
    clip_features,
    fit_class_gmms,
    privatize_summary,
    summary_to_tensors,
)
from celora.fl.states import StateStore
from celora.fl.strategies import Tensors
from celora.models.device import CPU, BatchFit, Placement, model_device, to_device
from celora.privacy.dp import clip_and_noise_update, update_dp_from_config, update_generator

__all__ = [
    "ClientData",
    "ClientRuntime",
    "DataProvider",
    "Encoded",
    "LocalTraining",
    "PartitionedData",
    "lr_factor",
    "TrainResult",
    "encode_texts",
    "evaluate",
    "evaluate_metrics",
    "pooled_features",
    "train_local",
]
CLASSIFY = TASKS["classify"]
SAMPLES_PER_CLIENT = 3  # test prompts per client in samples.jsonl


def batch_on(model: nn.Module, data: TaskData, idx: np.ndarray) -> Batch:
    """Rows ``idx`` of the task data, moved to the model's device once."""
    return to_device(data.batch(idx), model_device(model))


@dataclass
class TrainResult:
    loss: float
    steps: int
    optimizer_state: dict[str, Any] | None = None  # AdamW moments after training (train.keep_optimizer)


class LocalTraining:
    """One client's local training as :func:`train_local` runs it: AdamW on ``params`` (head at ``head_lr``), the
    LR schedule over this call's steps, the seeded order of rows per epoch, gradient clipping, the step count.

    ``batches()`` yields the rows of each step; for each, the caller computes the loss, calls ``zero_grad()``,
    backpropagates ``scaled(loss)`` and calls ``step(loss)``. Several of these advance side by side when clients
    train together (``celora.fl.batched``): each keeps its own optimizer, schedule and steps."""

    def __init__(
        self,
        params: list[nn.Parameter] | list[torch.Tensor],
        idx: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        head_params: Sequence[nn.Parameter] | Sequence[torch.Tensor] = (),
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        max_steps: int | None = None,
        schedule: str = "constant",
        warmup_steps: int = 0,
        grad_clip: float | None = None,
        seed: int = 0,
        placement: Placement = CPU,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        head_ids = {id(p) for p in head_params}
        groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr}]
        if head_params:
            groups.append({"params": list(head_params), "lr": head_lr or lr})
        self.opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
        if optimizer_state is not None:
            resume_optimizer(self.opt, optimizer_state)
        total = epochs * -(-len(idx) // batch_size)
        total = min(total, max_steps) if max_steps is not None else total
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda t: lr_factor(t, total, schedule, warmup_steps))
        self.trained = list({id(p): p for p in [*params, *head_params]}.values())
        self.scaler = placement.grad_scaler()
        self.idx, self.epochs, self.batch_size, self.max_steps = idx, epochs, batch_size, max_steps
        self.grad_clip, self.seed = grad_clip, seed
        self.losses: list[float] = []
        self.steps = 0

    def done(self) -> bool:
        return self.max_steps is not None and self.steps >= self.max_steps

    def batches(self) -> Iterator[np.ndarray]:
        """The rows of each step: a seeded permutation of the client's rows per epoch, cut into batches,
        until ``max_steps`` steps are done."""
        gen = np.random.default_rng(self.seed)
        for _ in range(self.epochs):
            order = gen.permutation(self.idx)
            for start in range(0, len(order), self.batch_size):
                yield order[start : start + self.batch_size]
                if self.done():
                    return

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """What to backpropagate: the loss, × the GradScaler's scale with fp16."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(self, loss: torch.Tensor) -> None:
        """After backward: clip (unscaled) gradients, step AdamW and the schedule, record the loss."""
        if self.scaler is None:
            if self.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
            self.opt.step()
        else:
            if self.grad_clip is not None:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.trained, self.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        self.sched.step()
        self.losses.append(float(loss.detach()))
        self.steps += 1

    def result(self) -> TrainResult:
        return TrainResult(
            float(np.mean(self.losses)) if self.losses else float("nan"), self.steps, self.opt.state_dict()
        )


def train_local(
    model: nn.Module,
    data: TaskData,
    idx: np.ndarray,
    params: list[nn.Parameter],
    *,
    task: Task = CLASSIFY,
    placement: Placement = CPU,
    **settings: Any,
) -> TrainResult:
    """AdamW on ``params`` (head at ``head_lr``) for ``epochs`` passes over the client's rows.

    Minimises the task's batch loss (classification: L = −(1/|b|) Σ log softmax(f(x))_y), forward passes
    under the placement's autocast; with fp16 the loss is scaled by a GradScaler. The learning rate follows
    :func:`lr_factor` over this call's steps; with ``grad_clip`` the global gradient norm (unscaled) is
    clipped to it. Per-head scales of the adapters are folded into C at the end (ΔW unchanged). With
    ``optimizer_state`` (a previous result's) AdamW resumes from those moments (learning rates reset to lr,
    head_lr); a state of other parameter shapes is ignored and the optimizer starts fresh. ``settings``: the
    keyword arguments of :class:`LocalTraining` (epochs, batch_size, lr, head_params, head_lr, weight_decay,
    max_steps, schedule, warmup_steps, grad_clip, seed, optimizer_state).
    """
    run = LocalTraining(params, idx, placement=placement, **settings)
    model.train()
    for rows in run.batches():
        with placement.autocast():
            loss = task.loss(model, batch_on(model, data, rows))
        run.zero_grad()
        run.scaled(loss).backward()
        run.step(loss)
    model.eval()
    fold_head_scales(model)
    return run.result()


def resume_optimizer(opt: torch.optim.Optimizer, state: dict[str, Any]) -> bool:
    """Load AdamW moments saved after an earlier round, keeping this round's learning rates; False (fresh
    optimizer) when the saved state belongs to other parameters (e.g. after a warm-up phase)."""
    lrs = [g["lr"] for g in opt.param_groups]
    shapes = [[tuple(p.shape) for p in g["params"]] for g in opt.param_groups]
    saved = state.get("state", {})
    ids = [g["params"] for g in state.get("param_groups", [])]
    if [len(i) for i in ids] != [len(s) for s in shapes]:
        return False
    for group_ids, group_shapes in zip(ids, shapes, strict=True):
        for i, shape in zip(group_ids, group_shapes, strict=True):
            if i in saved and tuple(saved[i]["exp_avg"].shape) != shape:
                return False
    opt.load_state_dict(state)
    for g, lr in zip(opt.param_groups, lrs, strict=True):
        g["lr"] = g["initial_lr"] = lr
    return True


def lr_factor(step: int, total: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the learning rate at ``step`` (0-based) of ``total``: linear warm-up (step+1)/w over the
    first w steps, then 1 (constant) or ½(1 + cos(π·(step − w)/(total − w))) (cosine, to 0 at the end)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total <= warmup_steps:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / (total - warmup_steps)))


def _fit(batch_size: int | BatchFit) -> BatchFit:
    return batch_size if isinstance(batch_size, BatchFit) else BatchFit(batch_size)


@torch.no_grad()
def evaluate_metrics(
    model: nn.Module,
    data: TaskData,
    idx: np.ndarray,
    batch_size: int | BatchFit = 64,
    *,
    task: Task = CLASSIFY,
    extras: bool = False,
) -> dict[str, float]:
    """``score`` = Σ per-example primary metric / n (accuracy: correct / n), ``loss`` = Σ per-example loss / n
    on rows ``idx``; with ``extras`` also the task's extra metrics (each Σ / n, e.g. exact_match), then the
    task's derived metrics (``finish_metrics``). Batches of ``batch_size`` rows (a ``BatchFit``: halved when one
    runs out of memory). Run it under ``Placement.autocast()`` for bf16/fp16."""
    if len(idx) == 0:
        return {"score": float("nan"), "loss": float("nan")}
    model.eval()

    def one(start: int, stop: int) -> tuple[float, float, dict[str, float]]:
        batch = batch_on(model, data, idx[start:stop])
        return task.evaluate(model, data, batch, extras)

    correct, loss_sum = 0.0, 0.0
    more: dict[str, float] = {}
    for c, s, extra in _fit(batch_size).map(one, len(idx)):
        correct, loss_sum = correct + c, loss_sum + s
        for k, v in extra.items():
            more[k] = more.get(k, 0.0) + v
    n = len(idx)
    return task.finish_metrics({"score": correct / n, "loss": loss_sum / n, **{k: v / n for k, v in more.items()}})


def evaluate(
    model: nn.Module, data: TaskData, idx: np.ndarray, batch_size: int | BatchFit = 64, *, task: Task = CLASSIFY
) -> tuple[float, float]:
    """(primary metric — accuracy for classification —, mean per-example loss) of the model on rows ``idx``."""
    m = evaluate_metrics(model, data, idx, batch_size, task=task)
    return m["score"], m["loss"]


@torch.no_grad()
def pooled_features(
    model: nn.Module,
    data: TaskData,
    idx: np.ndarray,
    batch_size: int | BatchFit = 64,
    *,
    task: Task = CLASSIFY,
    view: str = "input",
) -> np.ndarray:
    """One vector per example from the task (encoder: masked mean of the last hidden states; ``view``:
    ``data.summary_features``), (n, hidden)."""
    model.eval()
    out = _fit(batch_size).map(
        lambda a, b: task.summary_features(model, batch_on(model, data, idx[a:b]), view), len(idx)
    )
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


# --------------------------------------------------------------------------- the data seam
@dataclass
class ClientData:
    """One client's rows: encoded inputs with its train/test (and global-test) row indices."""

    client_id: int
    data: TaskData  # encoded rows this client reads (in-process: possibly shared, indexed by the splits)
    labels: np.ndarray  # class index of every row of ``data``
    label_names: list[str]
    train_idx: np.ndarray
    test_idx: np.ndarray
    global_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # a held-out global test
    meta: dict[str, Any] = field(default_factory=dict)  # where the rows came from (partition.json's header)

    def info(self) -> dict[str, Any]:
        """Counts the client reports at setup (never rows): sizes, train label histogram, majority baseline."""
        counts = np.bincount(self.labels[self.train_idx], minlength=len(self.label_names))
        return {
            "id": int(self.client_id),
            "n_train": int(len(self.train_idx)),
            "n_test": int(len(self.test_idx)),
            "label_hist": {name: int(counts[k]) for k, name in enumerate(self.label_names)},
            "majority": majority_baseline(self.labels, [self.train_idx], [self.test_idx]),
            "label_names": list(self.label_names),
            **({"component": self.meta["component"]} if "component" in self.meta else {}),
        }


class DataProvider(Protocol):
    """Hands out each client's ``ClientData`` (a site calls it only for its own id)."""

    num_clients: int

    def client(self, i: int) -> ClientData: ...


class PartitionedData:
    """Today's provider: one dataset partitioned by seed; every client indexes the one encoded ``TaskData``."""

    def __init__(self, dataset: Any, split: Any, encoded: TaskData) -> None:
        self.dataset, self.split, self.encoded = dataset, split, encoded
        self.num_clients = len(split.clients)

    def client(self, i: int) -> ClientData:
        c = self.split.clients[i]
        meta = {
            "scheme": self.split.scheme,
            "dataset": self.dataset.name,
            "skipped_rows": self.dataset.skipped_rows,
            "global_test": int(len(self.split.global_test_idx)),
        }
        component = self.dataset.columns.get("component")
        if component is not None and len(c.train_idx):  # a task mixture: the component most of its rows are from
            values, counts = np.unique(component[c.train_idx].astype(str), return_counts=True)
            meta["component"] = str(values[np.argmax(counts)])
        return ClientData(
            c.client_id,
            self.encoded,
            self.dataset.labels,
            self.dataset.label_names,
            c.train_idx,
            c.test_idx,
            self.split.global_test_idx,
            meta,
        )


def partition_report(infos: Sequence[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """partition.json from the clients' setup ``info`` (counts only) and a provider's ``meta``."""
    keep = ("id", "n_train", "n_test", "label_hist", "component")
    return {
        "scheme": meta.get("scheme"),
        "num_clients": len(infos),
        "global_test": meta.get("global_test", 0),
        "clients": [{k: info[k] for k in keep if k in info} for info in infos],
        "dataset": meta.get("dataset"),
        "skipped_rows": meta.get("skipped_rows", 0),
    }


# --------------------------------------------------------------------------- the client runtime
class ClientRuntime:
    """One client: its data, its private adapter state, and the client half of the round protocol."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        bench: Backbone,
        data: ClientData,
        phases: Phases | None = None,
        state: Tensors | None = None,
        *,
        store: StateStore | None = None,
        eval_fit: BatchFit | None = None,
    ) -> None:
        self.cfg = cfg
        self.bench = bench
        self.data = data
        self.id = data.client_id
        self.phases = phases or Phases(cfg, bench)
        self.store = store
        self._state: Tensors = {}
        if store is None:
            self._state = state if state is not None else bench.fresh_state()
        elif state is not None:
            store.put(self.id, state)
        self.eval_fit = eval_fit or BatchFit(cfg.eval.batch_size)  # shared by the clients of one model
        self.round_start: Tensors = {}  # the shared tensors this client held when its last fit started
        self.optimizer_state: dict[str, Any] | None = None  # AdamW moments kept across rounds (train.keep_optimizer)
        self.agg_extras: dict[str, float] = {}  # task extras after the last receive (final round: <name>_agg)

    # ----------------------------------------------------------------- state
    @property
    def state(self) -> Tensors:
        """The private adapter view (A, B, C, head) this client holds."""
        return self._state if self.store is None else self.store.get(self.id)

    @state.setter
    def state(self, value: Tensors) -> None:
        if self.store is None:
            self._state = value
        else:
            self.store.put(self.id, value)

    def evaluates(self, rnd: int) -> bool:
        """Whether round ``rnd`` evaluates score / score_agg: every ``eval.every`` rounds, and the final round."""
        return rnd >= self.cfg.rounds or rnd % self.cfg.eval.every == 0

    @property
    def n_train(self) -> int:
        return int(len(self.data.train_idx))

    def info(self) -> dict[str, Any]:
        return self.data.info()

    # ----------------------------------------------------------------- local work
    def _metrics(self, idx: np.ndarray, extras: bool) -> dict[str, float]:
        bench = self.bench
        with bench.placement.autocast():
            return evaluate_metrics(bench.model, self.data.data, idx, self.eval_fit, task=bench.task, extras=extras)

    def evaluate_test(self, extras: bool = False, state: Tensors | None = None) -> dict[str, float]:
        """score, loss (and extras) of the state this client holds (or of ``state``), on its own test rows."""
        self.bench.load(self.state if state is None else state)
        return self._metrics(self.data.test_idx, extras)

    def evaluate_global(self) -> float:
        """Primary metric of this client's model on the global test rows (NaN when there are none)."""
        if len(self.data.global_idx) == 0:
            return float("nan")
        self.bench.load(self.state)
        return self._metrics(self.data.global_idx, False)["score"]

    def zero_shot(self) -> dict[str, Any]:
        """The un-adapted model (ΔW = 0, also for bases whose C does not start at 0) on this client's test rows."""
        self.bench.load(self.bench.zero_delta_state())
        m = self._metrics(self.data.test_idx, True)
        out = {"id": self.id, "n_train": self.n_train, self.bench.task.spec.primary: m.pop("score"), **m}
        samples = self._samples()
        return {**out, "samples": samples} if samples else out

    def _samples(self) -> list[dict[str, str]]:
        bench, idx = self.bench, self.data.test_idx[:SAMPLES_PER_CLIENT]
        if len(idx) == 0:
            return []
        bench.model.eval()
        with torch.no_grad(), bench.placement.autocast():
            return bench.task.samples(bench.model, self.data.data, batch_on(bench.model, self.data.data, idx))

    def samples(self) -> list[dict[str, str]]:
        """What a person reads: the held model's greedy answers to its first test prompts (with the references),
        for tasks that generate (none otherwise)."""
        self.bench.load(self.state)
        return self._samples()

    def train_settings(
        self, rnd: int, idx: np.ndarray | None = None, salt: int | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """The rows (default: this client's train rows) and settings of its local training in round ``rnd``
        (``LocalTraining``'s keyword arguments, the parameters left out), seeded by round and ``salt`` (default:
        the client id)."""
        cfg, t = self.cfg, self.cfg.train
        salt = self.id if salt is None else salt
        settings = {
            "epochs": t.local_epochs,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "head_lr": t.head_lr,
            "weight_decay": t.weight_decay,
            "max_steps": t.max_steps,
            "schedule": t.schedule,
            "warmup_steps": t.warmup_steps,
            "grad_clip": t.grad_clip,
            "seed": cfg.seed * 7919 + rnd * 31 + salt,
            "placement": self.bench.placement,
            "optimizer_state": self.optimizer_state,
        }
        return (self.data.train_idx if idx is None else idx), settings

    def train(self, rnd: int, phase: Phase, idx: np.ndarray | None = None, salt: int | None = None) -> TrainResult:
        """Local training of the loaded state on rows ``idx`` (default: this client's train rows), seeded by
        round and ``salt`` (default: the client id)."""
        params, head_params = phase.trainable(self.bench)
        seeded(self.cfg.seed, rnd, self.id if salt is None else salt)
        rows, settings = self.train_settings(rnd, idx, salt)
        res = train_local(
            self.bench.model, self.data.data, rows, params, task=self.bench.task, head_params=head_params, **settings
        )
        self.trained(res)
        return res

    def trained(self, res: TrainResult) -> None:
        """After local training: keep the AdamW moments for the next round (train.keep_optimizer)."""
        if self.cfg.train.keep_optimizer:
            self.optimizer_state = res.optimizer_state

    def transform_upload(self, rnd: int, shared: Tensors) -> Tensors:
        """The shared tensors about to be encoded: unchanged, or with ``privacy.update_clip`` the DP update
        ``round_start + clip(shared − round_start) + N(0, (z·clip)²)`` (``celora.privacy.dp``)."""
        dp = update_dp_from_config(self.cfg.privacy, self.cfg.rounds)
        if dp is None:
            return shared
        gen = update_generator(self.cfg.seed, rnd, self.id)
        return clip_and_noise_update(shared, self.round_start, clip=dp.clip, noise=dp.noise, generator=gen)

    def fit(self, rnd: int) -> tuple[bytes | None, ClientRound]:
        """Train from the held state, evaluate (local step), and encode what the round's method shares.

        Returns the upload blob (None if nothing travels) and the client's metrics record. Several clients
        training together (``celora.fl.batched``) run the same ``start_fit`` and ``finish_fit`` around one
        shared training and evaluation."""
        phase, rec = self.start_fit(rnd)
        self.bench.load(self.state)
        res = self.train(rnd, phase)
        metrics = self._metrics(self.data.test_idx, extras=rnd == self.cfg.rounds) if self.evaluates(rnd) else None
        return self.finish_fit(rnd, phase, rec, res, self.bench.snapshot(), metrics)

    def start_fit(self, rnd: int) -> tuple[Phase, ClientRound]:
        """Open this client's round: its phase, a fresh record, the shared tensors it starts from."""
        phase = self.phases.phase(rnd)
        rec = ClientRound.started(self.id, self.n_train)
        self.round_start = {k: self.state[k] for k in phase.up_layout.names}
        return phase, rec

    def finish_fit(
        self,
        rnd: int,
        phase: Phase,
        rec: ClientRound,
        res: TrainResult,
        state: Tensors,
        metrics: dict[str, float] | None,
    ) -> tuple[bytes | None, ClientRound]:
        """Close the round with the trained ``state`` and its local-step ``metrics`` (None: not evaluated):
        keep the state, encode the upload."""
        rec.train_loss = res.loss
        if metrics is not None:
            rec.metrics = metrics
            rec.score, rec.loss = rec.metrics.pop("score"), rec.metrics.pop("loss")
        self.state = state
        if not phase.shares:
            return None, rec
        shared = self.transform_upload(rnd, {k: self.state[k] for k in phase.up_layout.names})
        blob = encode(shared, phase.up_layout, phase.dtype)
        rec.bytes_up = len(blob)
        return blob, rec

    def receive(self, blob: bytes, layout_round: int, *, evaluate: bool = True) -> tuple[float, float]:
        """Decode a server message (in the layout of the round that made it) into the held state; with
        ``evaluate`` (and in a round that ``evaluates``), (score, loss) on the test rows afterwards ("aggregated"),
        else NaNs."""
        self.apply_message(blob, layout_round)
        if not evaluate or not self.evaluates(layout_round):
            return float("nan"), float("nan")
        return self.aggregated(self.evaluate_test(extras=layout_round == self.cfg.rounds))

    def apply_message(self, blob: bytes, layout_round: int) -> None:
        """Decode a server message (in the layout of round ``layout_round``) into the held state."""
        phase = self.phases.phase(layout_round)
        self.state = {**self.state, **decode(blob, phase.down_layout, phase.dtype)}
        self.agg_extras = {}

    def aggregated(self, m: dict[str, float]) -> tuple[float, float]:
        """(score, loss) of the metrics after a message; the final round's extras kept as ``<name>_agg``."""
        score, loss = m.pop("score"), m.pop("loss")
        self.agg_extras = {f"{k}_agg": v for k, v in m.items()}
        return score, loss

    # ----------------------------------------------------------------- setup (once)
    def summary(self) -> ClientSummary:
        """Pooled frozen-backbone features of the training rows → per-class diagonal GMMs (optionally DP)."""
        cfg, bench, d = self.cfg, self.bench, self.data
        bench.load(bench.init_state)  # ΔW = 0 at init: the frozen backbone's features
        with bench.placement.autocast():
            feats = pooled_features(
                bench.model, d.data, d.train_idx, self.eval_fit, task=bench.task, view=cfg.data.summary_features
            )
        labels = d.labels[d.train_idx]
        pr = cfg.privacy
        if pr.summary_epsilon is None:
            return fit_class_gmms(feats, labels, seed=cfg.seed)
        feats = clip_features(feats, pr.summary_clip)
        summary = fit_class_gmms(feats, labels, seed=cfg.seed)
        rng = np.random.default_rng(cfg.seed * 65_537 + self.id)
        return privatize_summary(
            summary, epsilon=pr.summary_epsilon, delta=pr.summary_delta, clip=pr.summary_clip, rng=rng
        )

    def summary_blob(self) -> bytes:
        """The serialized data summary (the only thing about its rows a client uploads)."""
        return encode_named(summary_to_tensors(self.summary()))
