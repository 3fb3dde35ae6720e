"""What a run records: one ``ClientRound`` per client and round, the round row, the run summary.

Both runtimes (the in-process loop and the Flower strategy) build their metrics rows and summary here,
so ``metrics.jsonl`` and ``summary.json`` have the same keys whichever runtime wrote them.

Round row: personalized metrics (``celora.eval.personalized_metrics``) of the task's primary metric after
local training (``<primary>_*``, e.g. ``acc_mean`` or ``rougeL_mean``) and after the server's message
(``<primary>_*_agg``), bytes, participants, rejected uploads, the ids of the clients that dropped out, wall
time and one dict per client (``score`` written under the primary metric's name).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from celora.eval import ACCURACY, MetricSpec, personalized_metrics

log = logging.getLogger("celora")


@dataclass
class ClientRound:
    """One client's line in a round's metrics."""

    id: int
    n_train: int
    participated: bool
    score: float  # the task's primary metric after local training: the model the client deploys
    loss: float
    score_agg: float  # after receiving its message from the server
    loss_agg: float
    train_loss: float = float("nan")
    bytes_up: int = 0
    bytes_down: int = 0
    rejected: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # task extras (e.g. exact_match), final round only
    dropped: str | None = None  # "before" (failed before training) | "after" (upload lost); None = did not drop

    @classmethod
    def started(cls, i: int, n_train: int) -> ClientRound:
        """The record of a sampled client before it has any metric."""
        nan = float("nan")
        return cls(i, n_train, True, nan, nan, nan, nan)

    @classmethod
    def absent(cls, i: int, n_train: int, prev: ClientRound | None) -> ClientRound:
        """A client that did not take part this round: it still holds (and reports) its last metrics."""
        nan = float("nan")
        return cls(
            id=i,
            n_train=n_train,
            participated=False,
            score=prev.score if prev else nan,
            loss=prev.loss if prev else nan,
            score_agg=prev.score_agg if prev else nan,
            loss_agg=prev.loss_agg if prev else nan,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any], primary: str = "acc") -> ClientRound:
        """Inverse of :meth:`as_row` (a row's ``clients`` entry) and of ``dataclasses.asdict``."""
        d = {{primary: "score", f"{primary}_agg": "score_agg"}.get(k, k): v for k, v in d.items()}
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})

    def as_row(self, primary: str = "acc") -> dict[str, Any]:
        """The ``clients`` entry of a round row: the fields, ``score`` under the primary metric's name."""
        d = asdict(self)
        return {{"score": primary, "score_agg": f"{primary}_agg"}.get(k, k): v for k, v in d.items()}


class Observer(Protocol):
    """Progress callbacks (the CLI renders them with rich; tests ignore them)."""

    def on_round_start(self, rnd: int, clients: list[int]) -> None: ...
    def on_client_done(self, rnd: int, client: int, record: ClientRound) -> None: ...
    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None: ...
    def on_message(self, text: str) -> None: ...


class Silent:
    """An observer that only logs messages."""

    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        pass

    def on_client_done(self, rnd: int, client: int, record: ClientRound) -> None:
        pass

    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None:
        pass

    def on_message(self, text: str) -> None:
        log.info(text)


def round_row(
    method: str, rnd: int, records: list[ClientRound], wall: float, spec: MetricSpec = ACCURACY
) -> dict[str, Any]:
    """One line of metrics.jsonl from every client's record (ordered by client id)."""
    scores = np.array([r.score for r in records])
    scores_agg = np.array([r.score_agg for r in records])
    sizes = np.array([r.n_train for r in records])
    name, up = spec.primary, spec.higher_is_better
    row: dict[str, Any] = {"round": rnd, "method": method, "primary_metric": spec.as_dict()}
    row.update(personalized_metrics(scores, sizes, name, up))
    row.update({k + "_agg": v for k, v in personalized_metrics(scores_agg, sizes, name, up).items()})
    row["bytes_up"] = int(sum(r.bytes_up for r in records))
    row["bytes_down"] = int(sum(r.bytes_down for r in records))
    row["participants"] = int(sum(r.participated for r in records))
    row["rejected"] = int(sum(r.rejected is not None for r in records))
    row["dropped"] = [r.id for r in records if r.dropped is not None]
    row["wall_s"] = round(wall, 3)
    for key in sorted({k for r in records for k in r.metrics}):
        row[f"{key}_mean"] = float(np.mean([r.metrics[key] for r in records if key in r.metrics]))
    row["clients"] = [r.as_row(name) for r in records]
    return row


def extra_keys(row: dict[str, Any]) -> set[str]:
    """Names of the task's extra metrics recorded in a round row (e.g. exact_match)."""
    return {k for c in row.get("clients", []) for k in c.get("metrics", {})}


def summary_dict(
    *,
    method: str,
    rounds: list[dict[str, Any]],
    totals: dict[str, int],
    score_global: float,
    acc_majority: float | None,
    payload: dict[str, Any],
    num_clients: int,
    seed: int,
    task: str | None,
    model_note: str | None,
    wall: float,
    spec: MetricSpec = ACCURACY,
) -> dict[str, Any]:
    """summary.json: the final round's primary metric (mean, weighted, worst-10 %, after aggregation), its
    global-test mean, the majority-label baseline (classification), bytes (totals and per client-round)."""
    final = rounds[-1]
    client_rounds = sum(r["participants"] for r in rounds)
    p = spec.primary
    return {
        "method": method,
        "primary_metric": spec.as_dict(),
        **{f"{p}_{k}": final[f"{p}_{k}"] for k in ("mean", "weighted", "worst10", "mean_agg")},
        f"{p}_global": score_global,
        **({"acc_majority": acc_majority} if acc_majority is not None else {}),
        "bytes_up_total": totals["up"],
        "bytes_down_total": totals["down"],
        "bytes_per_client_round": {
            "up": totals["up"] / max(1, client_rounds),
            "down": totals["down"] / max(1, client_rounds),
        },
        "payload": payload,
        "rounds": len(rounds),
        "num_clients": num_clients,
        "seed": seed,
        "evaluated": f"{p}_* = after local training (local step); {p}_*_agg = after receiving the server's message",
        "task": task,
        **{f"{k}_mean": final[f"{k}_mean"] for k in sorted(extra_keys(final))},
        **({"model_note": model_note} if model_note else {}),
        "wall_s": round(wall, 2),
    }
