"""Several sampled clients trained and evaluated together (``engine.parallel_clients = K``).

The in-process engine (``celora.fl.simulation``) hands the sampled clients of a round to ``ParallelClients`` in
groups of up to K. A group's clients open and close their round exactly as one client does
(``ClientRuntime.start_fit`` / ``finish_fit``: the same record, upload and state); in between they train side by
side:

- each client keeps its own adapter view (A, C, B, head; s_h with heads > 1) as its own tensors and its own
  ``LocalTraining`` (``celora.fl.client``): AdamW over the same parameter groups, the LR schedule, gradient
  clipping, the seeded order of rows and the step count of ``train_local``. A client that has run out of steps
  simply is not in the next stacked step;
- each step stacks the current batch of every client that still trains (consecutive rows per client, padded to
  the longest row), runs the frozen base once and gives every example the delta of its own client's factors
  (``celora.adapters.inject.clients_forward``); the loss backpropagated is Σ_k L_k, with L_k client k's mean
  loss over its own rows, so each client's gradient is its gradient alone (the base is frozen, the clients'
  tensors are disjoint).

Dropout (the base's, e.g. MiniLM's 0.1, and the adapters' ``model.dropout``) draws each client's masks on its own
rows from its own torch stream, seeded as when it trains alone (``celora.models.segments.own_draws``). So fp32 on
a CPU every client ends with the adapters, metrics and upload bytes of the sequential engine (K = 1) up to float
rounding (tests/test_parallel.py); only an attention dropout outside transformers' ``AttentionInterface`` (the
"eager" attention) is drawn once for the stacked batch (said once: the same distribution, not the same numbers).

Tasks: classification (text or image) and the causal-LM tasks ``prompt`` and ``generate`` train together (their
per-client loss is read from the stacked pass: logits or answer-token log-probabilities); a task whose loss
cannot be split per client (the VLM tasks, which bind images per batch) trains one client at a time, said
once. Evaluation is batched the same way for classification (``score`` = accuracy and loss from the stacked
logits); the causal-LM tasks evaluate one client at a time (their scoring runs candidate rows and generation).
Clients must read one shared dataset (the partitioned default; ``data.sites`` trains one at a time).

``engine.parallel_clients = "auto"``: on a GPU, K from the free memory and the measured memory of one and two
clients' steps; on a CPU, K from the run's own work (``SpeedSearch``): the round's groups are timed while K
doubles from 1, and K settles on the fastest in training rows per second once doubling stops gaining 5 %
(no probe steps are spent: the results are the same at every K). A group that runs out of memory is halved and
retried (nothing of it was kept), and later groups use the halved K.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from celora.adapters.inject import adapter_layers, clients_forward
from celora.adapters.trilora import TriLoraLinear, c_grad_mask
from celora.config import ExperimentConfig
from celora.data.generate import GenerateTask
from celora.data.tasks import IGNORE, Batch, ClassifyTask, PromptTask, Task
from celora.fl.backbone import Backbone, Phase, seeded
from celora.fl.client import ClientRuntime, LocalTraining, TrainResult, batch_on
from celora.fl.records import ClientRound
from celora.fl.strategies import Tensors
from celora.models.device import is_out_of_memory, model_device, release_cached_memory
from celora.models.segments import RandomStream, own_draws, unsplit_attention_dropout

__all__ = ["ParallelClients", "evaluate_together", "train_together"]

AUTO_CAP = 64  # the most clients "auto" stacks
AUTO_SECONDS = 1.0  # on a CPU, the least time of full groups "auto" times per K
AUTO_ROWS = 256  # on a CPU, the most rows of one stacked step "auto" tries (16 clients of batch 16: ~4.5 GB, MiniLM)
UNTRIMMED = 2**62  # a client length no row reaches


# --------------------------------------------------------------------------- per-client losses of a stacked pass
@contextmanager
def captured(module: nn.Module) -> Iterator[list[Any]]:
    """The outputs of ``module``'s forward calls inside the block."""
    out: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _a, o: out.append(o))
    try:
        yield out
    finally:
        handle.remove()


def loss_kind(task: Task) -> str | None:
    """How the per-client losses of a stacked batch are read: 'logits' (cross-entropy of the model's logits,
    as ``classify``), 'tokens' (mean NLL of the answer tokens, as ``prompt``), None (not split per client)."""
    if type(task).loss is ClassifyTask.loss:
        return "logits"
    if type(task).loss in (PromptTask.loss, GenerateTask.loss):
        return "tokens"
    return None


def segment_losses(task: Task, model: nn.Module, batch: Batch, sizes: list[int]) -> list[torch.Tensor]:
    """Each client's mean training loss over its own ``sizes[k]`` consecutive rows of ``batch``, from one run of
    the task's loss on the stacked batch (the same values ``task.loss`` gives each client's rows alone)."""
    if loss_kind(task) == "logits":
        with captured(model) as out:
            task.loss(model, batch)
        logits = out[-1].logits
        pairs = zip(logits.split(sizes), batch["labels"].split(sizes), strict=True)
        return [nn.functional.cross_entropy(z, y) for z, y in pairs]
    head = model.get_output_embeddings()  # type: ignore[operator]
    with captured(head) as out:
        task.loss(model, batch)
    target = batch["target"][:, 1:]
    pos = (target != IGNORE).nonzero(as_tuple=True)
    lp = out[-1].float().log_softmax(-1).gather(-1, target[pos].unsqueeze(-1)).squeeze(-1)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=lp.device), torch.tensor(sizes, device=lp.device))
    counts = torch.bincount(owner[pos[0]], minlength=len(sizes)).tolist()
    return [-part.mean() for part in lp.split(counts)]


def own_lengths(batch: Batch, sizes: list[int]) -> list[int]:
    """The width each client's rows of a stacked batch have alone (trimmed to its longest row, as
    ``data.batch``): from the attention mask; without one (images), rows are never trimmed."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return [UNTRIMMED] * len(sizes)
    return [max(1, int(n)) for n in torch.stack([m.sum(1).max() for m in mask.split(sizes)]).tolist()]


def scores_kind(task: Task) -> bool:
    """Whether evaluation can read each client's accuracy and loss from stacked logits (``classify`` and tasks
    that score, and derive metrics, as it does)."""
    t = type(task)
    return (
        loss_kind(task) == "logits"
        and t.score is ClassifyTask.score
        and t.evaluate is Task.evaluate
        and t.extra_metrics is Task.extra_metrics
        and t.finish_metrics is Task.finish_metrics
    )


# --------------------------------------------------------------------------- clients' views
@dataclass
class ModelIndex:
    """The shared model's parameters by name and its adapter layers (looked up once per group, not per client)."""

    params: dict[str, nn.Parameter]
    layers: dict[str, TriLoraLinear]

    @classmethod
    def of(cls, model: nn.Module) -> ModelIndex:
        return cls(dict(model.named_parameters()), adapter_layers(model))


def client_view(
    bench: Backbone, state: Tensors, trainable: Collection[str] = (), index: ModelIndex | None = None
) -> dict[str, torch.Tensor]:
    """One client's adapter and head tensors on the model's device, as the forward of ``clients_forward`` reads
    them: its state's (A, C, B, head), the per-head scales s_h (1 at the start of training, as the shared model's
    after every fold); ``trainable`` names become leaves of their own that require grad (C's gradient masked to
    the heads' blocks as the layer's own)."""
    index = index or ModelIndex.of(bench.model)
    view: dict[str, torch.Tensor] = {}
    for n in bench.all_names:
        p = index.params[n]
        t = state[n].to(p.device, p.dtype)
        view[n] = t.clone().requires_grad_(True) if n in trainable else t
    for n, layer in index.layers.items():
        if layer.lora_S is not None:
            s = layer.lora_S.detach().clone()
            view[f"{n}.lora_S"] = s.requires_grad_(True) if f"{n}.lora_S" in trainable else s
            if layer.c_mask is not None and f"{n}.lora_C" in trainable:
                view[f"{n}.lora_C"].register_hook(c_grad_mask(layer.c_mask))
    return view


def trained_state(state: Tensors, view: dict[str, torch.Tensor], trained: Sequence[str], index: ModelIndex) -> Tensors:
    """The client's state after training: its trained tensors (CPU fp32), per-head scales folded into C
    (C ← diag(s) C, as ``fold_head_scales``); the others unchanged."""
    out = dict(state)
    for n in trained:
        if n in state:
            out[n] = view[n].detach().to("cpu", torch.float32).clone()
    with torch.no_grad():
        for n, layer in index.layers.items():
            s = f"{n}.lora_S"
            if s in view and view[s].requires_grad:
                scale = view[s].repeat_interleave(layer.rank // layer.heads)
                c = view[f"{n}.lora_C"] * scale[:, None].to(view[f"{n}.lora_C"])
                out[f"{n}.lora_C"] = c.detach().to("cpu", torch.float32).clone()
    return out


# --------------------------------------------------------------------------- training and evaluation together
def train_together(
    bench: Backbone, clients: Sequence[ClientRuntime], rnd: int, phase: Phase
) -> tuple[list[TrainResult], list[Tensors]]:
    """Local training of round ``rnd`` for every client of ``clients`` from its held state, in stacked steps;
    returns each client's result and trained state (nothing of the clients is changed)."""
    model, task = bench.model, bench.task
    params, head_params = phase.trainable(bench)
    index = ModelIndex.of(model)
    names = {id(p): n for n, p in index.params.items()}
    trained = [names[id(p)] for p in params]
    trainable, head_names = set(trained), {names[id(p)] for p in head_params}
    device = model_device(model)
    draws = []  # each client's torch stream, seeded as it is when it trains alone
    for c in clients:
        seeded(c.cfg.seed, rnd, c.id)
        draws.append(RandomStream(device))
    held = [c.state for c in clients]  # read once (engine.state = disk: a file each)
    views, runs = [], []
    for c, state in zip(clients, held, strict=True):
        view = client_view(bench, state, trainable, index)
        rows, settings = c.train_settings(rnd)
        own = [view[n] for n in trained]
        runs.append(LocalTraining(own, rows, head_params=[view[n] for n in trained if n in head_names], **settings))
        views.append(view)
    data, heads, placement = clients[0].data.data, bench.loaded.head_modules, bench.placement
    streams = [r.batches() for r in runs]
    model.train()
    try:
        while True:
            nexts: list[tuple[int, np.ndarray | None]] = [(k, next(s, None)) for k, s in enumerate(streams)]
            step = [(k, rows) for k, rows in nexts if rows is not None]
            if not step:
                break
            ks, sizes = [k for k, _ in step], [len(rows) for _, rows in step]
            batch = batch_on(model, data, np.concatenate([rows for _, rows in step]))
            for k in ks:
                runs[k].zero_grad()
            masks = own_draws(model, sizes, own_lengths(batch, sizes), [draws[k] for k in ks])
            with clients_forward(model, sizes, [views[k] for k in ks], heads), masks, placement.autocast():
                losses = segment_losses(task, model, batch, sizes)
            torch.stack([runs[k].scaled(loss) for k, loss in zip(ks, losses, strict=True)]).sum().backward()
            for k, loss in zip(ks, losses, strict=True):
                runs[k].step(loss)
    finally:
        model.eval()
    draws[-1].make_current()  # the torch RNG as the group's last client leaves it
    states = [trained_state(st, v, trained, index) for st, v in zip(held, views, strict=True)]
    return [r.result() for r in runs], states


@torch.no_grad()
def evaluate_together(
    bench: Backbone, clients: Sequence[ClientRuntime], states: Sequence[Tensors]
) -> list[dict[str, float]]:
    """``score`` (accuracy) and ``loss`` of each client's ``states[k]`` on its own test rows, as
    ``evaluate_metrics`` gives them (Σ / n per client), from stacked batches of at most the evaluation batch size
    (halved when one runs out of memory)."""
    model, task, heads = bench.model, bench.task, bench.loaded.head_modules
    index = ModelIndex.of(model)
    views = [client_view(bench, st, (), index) for st in states]
    rows = [c.data.test_idx for c in clients]
    flat = np.concatenate(rows)
    owner = np.repeat(np.arange(len(clients)), [len(r) for r in rows])
    data = clients[0].data.data
    model.eval()

    def one(start: int, stop: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
        ks, sizes = np.unique(owner[start:stop], return_counts=True)
        batch = batch_on(model, data, flat[start:stop])
        seg = sizes.tolist()
        with clients_forward(model, seg, [views[k] for k in ks], heads), bench.placement.autocast():
            with captured(model) as out:
                task.score(model, batch)
            pairs = zip(out[-1].logits.split(seg), batch["labels"].split(seg), strict=True)
            sums = [
                torch.stack(
                    [(z.argmax(-1) == y).sum().double(), nn.functional.cross_entropy(z, y, reduction="sum").double()]
                )
                for z, y in pairs
            ]
        return ks, [(float(a), float(b)) for a, b in torch.stack(sums).tolist()]

    totals = np.zeros((len(clients), 2))
    for ks, sums in clients[0].eval_fit.map(one, len(flat)):
        totals[ks] += np.array(sums)
    out: list[dict[str, float]] = []
    for (correct, loss), r in zip(totals, rows, strict=True):
        n = len(r)
        out.append({"score": correct / n, "loss": loss / n} if n else {"score": float("nan"), "loss": float("nan")})
    return out


# --------------------------------------------------------------------------- the engine's side
@dataclass
class SpeedSearch:
    """K for "auto" on a CPU from timed groups of real work: K = 1, 2, 4, … each measured on full groups (at least
    ``min_seconds`` of them) as rate(K) = Σ training rows / Σ seconds; K doubles while rate(2K) ≥ ``gain`` ·
    max rate so far and 2K ≤ ``cap``, then settles on argmax rate."""

    cap: int
    gain: float = 1.05
    min_seconds: float = 1.0
    k: int = 1
    rates: dict[int, float] = field(default_factory=dict)
    rows: float = 0.0
    seconds: float = 0.0

    def observe(self, size: int, rows: float, seconds: float) -> int | None:
        """A group of ``size`` clients and ``rows`` training rows took ``seconds``: the settled K, or None."""
        if size < self.k:  # a partial group (the round's last) is not this K's rate
            return None
        self.rows, self.seconds = self.rows + rows, self.seconds + seconds
        if self.seconds < self.min_seconds:
            return None
        rate, best = self.rows / self.seconds, max(self.rates.values(), default=0.0)
        self.rates[self.k], self.rows, self.seconds = rate, 0.0, 0.0
        if rate < self.gain * best or 2 * self.k > self.cap:
            return max(self.rates, key=lambda k: self.rates[k])
        self.k *= 2
        return None


class ParallelClients:
    """How the in-process engine runs a round's clients: in groups of up to K (``engine.parallel_clients``),
    each group trained and evaluated together; K = 1 (or a task or data that cannot) runs each client's own
    ``fit`` and evaluation, one after another."""

    def __init__(
        self, cfg: ExperimentConfig, bench: Backbone, clients: Sequence[ClientRuntime], log: Callable[[str], None]
    ) -> None:
        self.cfg, self.bench, self.clients, self.log = cfg, bench, clients, log
        setting = cfg.engine.parallel_clients
        self.k: int | None = setting if isinstance(setting, int) else None  # None: "auto", decided on first use
        self.search: SpeedSearch | None = None  # "auto" on a CPU while it times K
        self.trains = self.k != 1 and self._can_train()
        self.evaluates = self.trains and scores_kind(bench.task)

    def _can_train(self) -> bool:
        task = self.bench.task
        if loss_kind(task) is None:
            self.log(
                f"engine.parallel_clients: task '{task.name}' trains one client at a time "
                "(its loss is not split per client)"
            )
            return False
        if any(c.data.data is not self.clients[0].data.data for c in self.clients):
            self.log("engine.parallel_clients: the clients read their own datasets (data.sites): one client at a time")
            return False
        p = unsplit_attention_dropout(self.bench.model)
        if p:
            self.log(
                f"engine.parallel_clients: the model's attention dropout (p = {p}) is not split per client: clients "
                "trained together draw other masks than one at a time (same distribution, not the same numbers)"
            )
        return True

    # ----------------------------------------------------------------- groups
    def groups(self, ids: Sequence[int], *, timed: bool = True) -> Iterator[list[int]]:
        """``ids`` in order, in groups of at most K. Under "auto" on a CPU each group is timed from when it is
        handed out to when the next is asked for (``timed``: the fit groups, whose rate chooses K)."""
        if not self.trains:
            yield from ([i] for i in ids)
            return
        if self.k is None and self.search is None:
            self._auto([self.clients[i] for i in ids])
        pos = 0
        while pos < len(ids):
            group = list(ids[pos : pos + (self.k or self._searching().k)])
            pos += len(group)
            start = time.perf_counter()
            yield group
            if self.k is None and timed:
                self._timed(group, time.perf_counter() - start)

    def _searching(self) -> SpeedSearch:
        assert self.search is not None, "auto: no K and no search"
        return self.search

    def _timed(self, group: list[int], seconds: float) -> None:
        search = self._searching()
        rows = sum(len(self.clients[i].data.train_idx) for i in group)
        k = search.observe(len(group), rows, seconds)
        if k is not None:
            self.k = k
            rates = ", ".join(f"{n}: {r:.0f}" for n, r in search.rates.items())
            self.log(f"engine.parallel_clients = auto: {k} clients together (CPU, training rows/s at K = {rates})")

    def fit(self, clients: Sequence[ClientRuntime], rnd: int) -> list[tuple[bytes | None, ClientRound]]:
        """Each client's ``fit`` of round ``rnd`` (upload blob, record), its group trained together. A group that
        runs out of memory is halved and retried; K stays halved for the rest of the run."""
        if len(clients) < 2 or not self.trains:
            return [c.fit(rnd) for c in clients]
        try:
            return self._fit_together(clients, rnd)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            release_cached_memory()
            half = len(clients) // 2
            self.k = min(self.k or half, half)
            self.log(f"engine.parallel_clients: {len(clients)} clients together ran out of memory; now {half}")
            return self.fit(clients[:half], rnd) + self.fit(clients[half:], rnd)

    def _fit_together(self, clients: Sequence[ClientRuntime], rnd: int) -> list[tuple[bytes | None, ClientRound]]:
        opened = [c.start_fit(rnd) for c in clients]
        results, states = train_together(self.bench, clients, rnd, opened[0][0])
        metrics: list[dict[str, float] | None] = [None] * len(clients)
        if clients[0].evaluates(rnd):
            metrics = list(self.evaluate(clients, extras=rnd == self.cfg.rounds, states=states))
        out = []
        for c, (phase, rec), res, state, m in zip(clients, opened, results, states, metrics, strict=True):
            c.trained(res)
            out.append(c.finish_fit(rnd, phase, rec, res, state, m))
        return out

    def evaluate(
        self, clients: Sequence[ClientRuntime], *, extras: bool, states: Sequence[Tensors] | None = None
    ) -> list[dict[str, float]]:
        """Test metrics of each client's held state (or of ``states``), together where the task allows."""
        states = [c.state for c in clients] if states is None else states
        if len(clients) < 2 or not self.evaluates:
            return [c.evaluate_test(extras, state=s) for c, s in zip(clients, states, strict=True)]
        return evaluate_together(self.bench, clients, states)

    # ----------------------------------------------------------------- "auto"
    def _auto(self, sample: Sequence[ClientRuntime]) -> None:
        """Start "auto" (see the module docstring), said in one line: on a GPU K now, on a CPU a ``SpeedSearch``."""
        cap = max(1, min(AUTO_CAP, self.cfg.sampled_per_round))
        device = model_device(self.bench.model)
        if cap == 1:
            self.k = 1
        elif device.type == "cuda":
            start = time.perf_counter()
            with torch.random.fork_rng(devices=[device]):
                self.k, why = self._auto_memory(sample, cap, device)
            self.log(
                f"engine.parallel_clients = auto: {self.k} clients together ({why}; measured in "
                f"{time.perf_counter() - start:.1f} s)"
            )
        else:
            rows = [min(len(c.data.train_idx), self.cfg.train.batch_size) for c in sample]
            per_client = max(1, int(np.median(rows)) if rows else 1)
            self.search = SpeedSearch(cap=max(1, min(cap, AUTO_ROWS // per_client)), min_seconds=AUTO_SECONDS)
            self.log(
                f"engine.parallel_clients = auto: timing K = 1, 2, 4, … up to {self.search.cap} on the run's own "
                "groups (CPU)"
            )

    def _probe(self, sample: Sequence[ClientRuntime], k: int) -> float:
        """Seconds of one stacked forward + backward of k clients' first batches (no optimizer step)."""
        clients = [sample[i % len(sample)] for i in range(k)]
        bench, model = self.bench, self.bench.model
        phase = clients[0].phases.phase(1)
        params, _ = phase.trainable(bench)
        index = ModelIndex.of(model)
        names = {id(p): n for n, p in index.params.items()}
        trainable = {names[id(p)] for p in params}
        views = [client_view(bench, c.state, trainable, index) for c in clients]
        batches = [c.data.train_idx[: self.cfg.train.batch_size] for c in clients]
        sizes = [len(b) for b in batches]
        batch = batch_on(model, clients[0].data.data, np.concatenate(batches))
        model.train()
        try:
            start = time.perf_counter()
            masks = own_draws(
                model, sizes, own_lengths(batch, sizes), [RandomStream(model_device(model)) for _ in sizes]
            )
            with clients_forward(model, sizes, views, bench.loaded.head_modules), masks, bench.placement.autocast():
                losses = segment_losses(bench.task, model, batch, sizes)
            torch.stack(losses).sum().backward()
            if model_device(model).type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            model.eval()

    def _auto_memory(self, sample: Sequence[ClientRuntime], cap: int, device: torch.device) -> tuple[int, str]:
        def peak(k: int) -> int:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            self._probe(sample, k)
            return int(torch.cuda.max_memory_allocated(device) - base)

        one, two = peak(1), peak(2)
        per_client = max(two - one, 1)
        free, _total = torch.cuda.mem_get_info(device)
        k = int(max(1, min(cap, (0.8 * free - one) // per_client + 1)))
        return k, f"GPU: {free / 2**30:.1f} GiB free, ~{per_client / 2**20:.0f} MiB per client's step"
