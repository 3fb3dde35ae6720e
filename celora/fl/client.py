"""Client-side work on the shared frozen model: local training, evaluation, feature pooling.

Inputs are encoded once for the whole dataset by a task (``celora.data.tasks``: ``TaskData``); a
client is a set of row indices. The task says how a batch is trained, scored and pooled; the
default is text classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from celora.data.tasks import TASKS, Batch, Encoded, Task, TaskData, encode_texts
from celora.models.device import CPU, Placement, model_device, to_device

__all__ = ["Encoded", "TrainResult", "encode_texts", "evaluate", "evaluate_metrics", "pooled_features", "train_local"]
CLASSIFY = TASKS["classify"]


def batch_on(model: nn.Module, data: TaskData, idx: np.ndarray) -> Batch:
    """Rows ``idx`` of the task data, moved to the model's device once."""
    return to_device(data.batch(idx), model_device(model))


@dataclass
class TrainResult:
    loss: float
    steps: int


def train_local(
    model: nn.Module,
    data: TaskData,
    idx: np.ndarray,
    params: list[nn.Parameter],
    *,
    task: Task = CLASSIFY,
    epochs: int,
    batch_size: int,
    lr: float,
    head_params: Sequence[nn.Parameter] = (),
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    seed: int = 0,
    placement: Placement = CPU,
) -> TrainResult:
    """AdamW on ``params`` (head at ``head_lr``) for ``epochs`` passes over the client's rows.

    Minimises the task's batch loss (classification: L = −(1/|b|) Σ log softmax(f(x))_y), forward passes
    under the placement's autocast; with fp16 the loss is scaled by a GradScaler.
    """
    head_ids = {id(p) for p in head_params}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr}]
    if head_params:
        groups.append({"params": list(head_params), "lr": head_lr or lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    scaler = placement.grad_scaler()
    gen = np.random.default_rng(seed)
    model.train()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        order = gen.permutation(idx)
        for start in range(0, len(order), batch_size):
            with placement.autocast():
                loss = task.loss(model, batch_on(model, data, order[start : start + batch_size]))
            opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            losses.append(float(loss.detach()))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), steps)


@torch.no_grad()
def evaluate_metrics(
    model: nn.Module,
    data: TaskData,
    idx: np.ndarray,
    batch_size: int = 64,
    *,
    task: Task = CLASSIFY,
    extras: bool = False,
) -> dict[str, float]:
    """``acc`` = correct / n, ``loss`` = Σ per-example loss / n on rows ``idx``; with ``extras`` also the
    task's extra metrics (each Σ / n, e.g. exact_match). Run it under ``Placement.autocast()`` for bf16/fp16."""
    if len(idx) == 0:
        return {"acc": float("nan"), "loss": float("nan")}
    model.eval()
    correct, loss_sum = 0, 0.0
    more: dict[str, float] = {}
    for start in range(0, len(idx), batch_size):
        batch = batch_on(model, data, idx[start : start + batch_size])
        c, s = task.score(model, batch)
        correct, loss_sum = correct + c, loss_sum + s
        if extras:
            for k, v in task.extra_metrics(model, batch).items():
                more[k] = more.get(k, 0.0) + v
    return {"acc": correct / len(idx), "loss": loss_sum / len(idx), **{k: v / len(idx) for k, v in more.items()}}


def evaluate(
    model: nn.Module, data: TaskData, idx: np.ndarray, batch_size: int = 64, *, task: Task = CLASSIFY
) -> tuple[float, float]:
    """(accuracy, mean per-example loss) of the model on rows ``idx``."""
    m = evaluate_metrics(model, data, idx, batch_size, task=task)
    return m["acc"], m["loss"]


@torch.no_grad()
def pooled_features(
    model: nn.Module, data: TaskData, idx: np.ndarray, batch_size: int = 64, *, task: Task = CLASSIFY
) -> np.ndarray:
    """One vector per example from the task (encoder: masked mean of the last hidden states), (n, hidden)."""
    model.eval()
    out = [
        task.features(model, batch_on(model, data, idx[start : start + batch_size]))
        for start in range(0, len(idx), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
