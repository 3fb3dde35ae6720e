"""Run-level side of the adapter bases: config checks, and the gradient basis's one-time estimate.

The gradient basis (``model.basis = "gradient"``) needs Σ∇W0 before round 1. It is estimated by the
server on a **public proxy set**: ``model.gradient_samples`` labelled rows of the task's corpus that no
client holds (rows outside every client's train and test split; when too few are left, rows of the
global test set, which are then dropped from the global evaluation). No client data is touched, nothing
travels: every party can recompute the same basis from the public rows (eval mode, fixed order). The
alternative, clients' summed gradient sketches in a setup message, would leak an r×r sketch of each
client's weight gradient (a privacy cost) and is not built.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from celora.adapters.bases import apply_gradient_basis, get_basis, sum_weight_gradients
from celora.adapters.inject import adapter_layers
from celora.config import ExperimentConfig
from celora.data.partition import FederatedSplit
from celora.data.tasks import Task, TaskData
from celora.errors import CeloraError
from celora.fl.client import batch_on


def check_basis(cfg: ExperimentConfig, field_name: str, method: str, trains: frozenset[str]) -> None:
    """One-line errors for a basis a method or the config cannot use."""
    m = cfg.model
    basis = get_basis(m.basis)
    if m.heads > 1 and not basis.multi_head:
        raise CeloraError(f"model.heads = {m.heads} needs model.basis = 'orthogonal' (not '{m.basis}')")
    if basis.c_starts_zero and "C" not in trains:
        raise CeloraError(f"{field_name} '{method}' keeps C frozen, but model.basis = '{m.basis}' starts C at 0")
    if basis.c_starts_zero and not m.train_c:
        raise CeloraError(f"model.train_c = false with model.basis = '{m.basis}' keeps C at 0: the adapter is off")


def proxy_rows(split: FederatedSplit, n_rows: int, samples: int, seed: int) -> tuple[np.ndarray, FederatedSplit]:
    """The server's public proxy rows (no client holds them) and the split with them out of the global test."""
    held = [split.global_test_idx] + [c.train_idx for c in split.clients] + [c.test_idx for c in split.clients]
    free = np.setdiff1d(np.arange(n_rows), np.concatenate(held))
    rng = np.random.default_rng(seed * 7_919 + 17)
    if len(free) >= samples:
        return np.sort(rng.choice(free, size=samples, replace=False)), split
    need = samples - len(free)
    if need >= len(split.global_test_idx):
        raise CeloraError(
            f"model.gradient_samples = {samples}: only {len(free)} rows outside the clients' splits and "
            f"{len(split.global_test_idx)} global test rows; lower it"
        )
    taken = rng.choice(split.global_test_idx, size=need, replace=False)
    rest = np.setdiff1d(split.global_test_idx, taken)
    return np.sort(np.concatenate([free, taken])), replace(split, global_test_idx=rest)


def setup_gradient_basis(
    model: nn.Module, task: Task, encoded: TaskData, split: FederatedSplit, n_rows: int, cfg: ExperimentConfig
) -> tuple[FederatedSplit, dict[str, Any]]:
    """Estimate Σ∇W0 on the public proxy rows (eval mode, batches of train.batch_size) and write the
    gradient basis into every adapted layer. Returns the split (global test possibly reduced) and a note."""
    t0 = time.perf_counter()
    rows, new_split = proxy_rows(split, n_rows, cfg.model.gradient_samples, cfg.seed)
    bs = cfg.train.batch_size
    layers = adapter_layers(model)
    was_training = model.training
    model.eval()
    batches = [rows[i : i + bs] for i in range(0, len(rows), bs)]
    grads = sum_weight_gradients(layers, lambda idx: task.loss(model, batch_on(model, encoded, idx)), batches)
    model.train(was_training)
    apply_gradient_basis(layers, grads, cfg.train.lr)
    dropped = len(split.global_test_idx) - len(new_split.global_test_idx)
    return new_split, {
        "basis": "gradient",
        "proxy_rows": len(rows),
        "proxy_rows_from_global_test": dropped,
        "estimate_s": round(time.perf_counter() - t0, 2),
        "weight_entries": int(sum(torch.numel(g) for g in grads.values())),
    }
