"""Personalized, fairness and global metrics over clients."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def worst_fraction_mean(score: np.ndarray, fraction: float = 0.1, higher_is_better: bool = True) -> float:
    """Mean score of the worst ⌈fraction · N⌉ clients (at least one): the lowest scores, or the highest where
    lower is better (e.g. NLL)."""
    a = np.sort(score[~np.isnan(score)])
    if a.size == 0:
        return float("nan")
    k = max(1, math.ceil(fraction * a.size))
    return float((a[:k] if higher_is_better else a[-k:]).mean())


def personalized_metrics(
    score: np.ndarray, n_train: np.ndarray, name: str = "acc", higher_is_better: bool = True
) -> dict[str, float]:
    """For the task's primary metric ``name`` (accuracy: ``acc``): <name>_mean = (1/N) Σ s_i;
    <name>_weighted = Σ n_i s_i / Σ n_i; <name>_worst10 = worst-10 % mean (in the metric's direction).

    Clients not yet evaluated (NaN) are left out.
    """
    score = np.asarray(score, dtype=float)
    ok = ~np.isnan(score)
    keys = (f"{name}_mean", f"{name}_weighted", f"{name}_worst10")
    if not ok.any():
        return dict.fromkeys(keys, float("nan"))
    w = np.asarray(n_train, dtype=float)[ok]
    mean = float(score[ok].mean())
    weighted = float((score[ok] * w).sum() / w.sum()) if w.sum() > 0 else mean
    return dict(zip(keys, (mean, weighted, worst_fraction_mean(score, higher_is_better=higher_is_better)), strict=True))


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


@dataclass(frozen=True)
class MetricSpec:
    """What a task scores: its metrics, and the primary one (``primary``, with its direction) that round rows,
    worst-10 %, summaries, ``compare``, the report and headline tables read."""

    primary: str = "acc"
    higher_is_better: bool = True
    metrics: tuple[str, ...] = ("acc",)

    @property
    def direction(self) -> str:
        return "max" if self.higher_is_better else "min"

    def as_dict(self) -> dict[str, object]:
        """summary.json's ``primary_metric``."""
        return {"name": self.primary, "direction": self.direction, "metrics": list(self.metrics)}

    @classmethod
    def of(cls, summary: Mapping[str, object]) -> MetricSpec:
        """The spec a summary (or zero-shot / compare row) was written with; accuracy for folders written before
        tasks declared their metrics."""
        d = summary.get("primary_metric")
        if not isinstance(d, Mapping):
            return ACCURACY
        return cls(str(d["name"]), d.get("direction", "max") == "max", tuple(d.get("metrics", (d["name"],))))

    def better(self, a: float, b: float) -> bool:
        """Whether score ``a`` is better than ``b`` in this metric's direction."""
        return a > b if self.higher_is_better else a < b


ACCURACY = MetricSpec()


def score_headline(row: Mapping[str, Any]) -> str:
    """A round row's scores for its printed line: ``<primary> mean m (after agg. a), worst-10% w``, or
    ``<primary> not scored this round`` when the row holds no evaluation (rounds between ``eval.every``)."""
    p = MetricSpec.of(row).primary
    mean = float(row[f"{p}_mean"])
    if math.isnan(mean):
        return f"{p} not scored this round (eval.every)"
    agg, worst = float(row[f"{p}_mean_agg"]), float(row[f"{p}_worst10"])
    return f"{p} mean {mean:.3f} (after agg. {agg:.3f}), worst-10% {worst:.3f}"


_ROUGE: list[object] = []  # the rouge-score scorer, built on first use


def rouge_l(reference: str, hypothesis: str) -> float:
    """ROUGE-L F1 of a generated text against its reference (rouge-score: LCS of lower-cased alphanumeric
    tokens, Porter-stemmed); 0 when either is empty."""
    if not _ROUGE:
        from rouge_score import rouge_scorer

        _ROUGE.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return float(_ROUGE[0].score(reference, hypothesis)["rougeL"].fmeasure)  # type: ignore[attr-defined]
