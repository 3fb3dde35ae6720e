"""Personalized, fairness and global metrics over clients."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def worst_fraction_mean(acc: np.ndarray, fraction: float = 0.1) -> float:
    """Mean accuracy of the worst ⌈fraction · N⌉ clients (at least one)."""
    a = np.sort(acc[~np.isnan(acc)])
    if a.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * a.size))
    return float(a[:k].mean())


def personalized_metrics(acc: np.ndarray, n_train: np.ndarray) -> dict[str, float]:
    """acc_mean = (1/N) Σ acc_i; acc_weighted = Σ n_i acc_i / Σ n_i; acc_worst10 = worst-10 % mean.

    Clients not yet evaluated (NaN) are left out.
    """
    acc = np.asarray(acc, dtype=float)
    ok = ~np.isnan(acc)
    if not ok.any():
        return {"acc_mean": float("nan"), "acc_weighted": float("nan"), "acc_worst10": float("nan")}
    w = np.asarray(n_train, dtype=float)[ok]
    return {
        "acc_mean": float(acc[ok].mean()),
        "acc_weighted": float((acc[ok] * w).sum() / w.sum()) if w.sum() > 0 else float(acc[ok].mean()),
        "acc_worst10": worst_fraction_mean(acc),
    }


def majority_baseline(labels: np.ndarray, train: Sequence[np.ndarray], test: Sequence[np.ndarray]) -> float:
    """(1/N) Σ_i mean_{x∈test_i} [y_x = argmax_c |{train_i: y = c}|]: every client answering its own most
    frequent training label. A model below this learned less than the local label prior (clients with an
    empty train or test split are left out; NaN when none is left)."""
    accs = []
    for tr, te in zip(train, test, strict=True):
        if len(tr) == 0 or len(te) == 0:
            continue
        guess = np.bincount(labels[tr]).argmax()
        accs.append(float((labels[te] == guess).mean()))
    return float(np.mean(accs)) if accs else float("nan")


GLOBAL_EVAL_DEFAULT = 10  # eval.global_clients unset: min(num_clients, 10)


def global_eval_clients(num_clients: int, k: int | None, seed: int) -> list[int]:
    """Clients whose final model is evaluated on the global test set: every client when k ≥ N, else a sample of
    k without replacement, seeded by the run's seed (its own stream, so the round sampling is unchanged)."""
    k = min(num_clients, GLOBAL_EVAL_DEFAULT) if k is None else k
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, 0x6C0B])
    return sorted(int(i) for i in rng.choice(num_clients, size=k, replace=False))


def global_eval_note(ids: Sequence[int], num_clients: int) -> dict[str, object]:
    """summary.json's ``global_eval``: which clients' final models the global accuracy averages."""
    how = "every client" if len(ids) == num_clients else "a seeded sample (eval.global_clients)"
    return {"clients": len(ids), "of": num_clients, "ids": [int(i) for i in ids], "sampled": how}
