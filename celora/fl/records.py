"""What a run records: one ``ClientRound`` per client and round, the round row, the run summary.

Both runtimes (the in-process loop and the Flower strategy) build their metrics rows and summary here,
so ``metrics.jsonl`` and ``summary.json`` have the same keys whichever runtime wrote them.

Round row: personalized metrics (``celora.eval.personalized_metrics``) of the local-step accuracies
(``acc_*``) and of the accuracies after the server's message (``acc_*_agg``), bytes, participants,
rejected uploads, the ids of the clients that dropped out, wall time and one dict per client.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from celora.eval import personalized_metrics

log = logging.getLogger("celora")


@dataclass
class ClientRound:
    """One client's line in a round's metrics."""

    id: int
    n_train: int
    participated: bool
    acc: float  # after local training: the model the client deploys
    loss: float
    acc_agg: float  # after receiving its message from the server
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
            acc=prev.acc if prev else nan,
            loss=prev.loss if prev else nan,
            acc_agg=prev.acc_agg if prev else nan,
            loss_agg=prev.loss_agg if prev else nan,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClientRound:
        """Inverse of ``dataclasses.asdict`` (a row's ``clients`` entry)."""
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in names})


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


def round_row(method: str, rnd: int, records: list[ClientRound], wall: float) -> dict[str, Any]:
    """One line of metrics.jsonl from every client's record (ordered by client id)."""
    accs = np.array([r.acc for r in records])
    accs_agg = np.array([r.acc_agg for r in records])
    sizes = np.array([r.n_train for r in records])
    row: dict[str, Any] = {"round": rnd, "method": method}
    row.update(personalized_metrics(accs, sizes))
    row.update({k + "_agg": v for k, v in personalized_metrics(accs_agg, sizes).items()})
    row["bytes_up"] = int(sum(r.bytes_up for r in records))
    row["bytes_down"] = int(sum(r.bytes_down for r in records))
    row["participants"] = int(sum(r.participated for r in records))
    row["rejected"] = int(sum(r.rejected is not None for r in records))
    row["dropped"] = [r.id for r in records if r.dropped is not None]
    row["wall_s"] = round(wall, 3)
    for key in sorted({k for r in records for k in r.metrics}):
        row[f"{key}_mean"] = float(np.mean([r.metrics[key] for r in records if key in r.metrics]))
    row["clients"] = [asdict(r) for r in records]
    return row


def extra_keys(row: dict[str, Any]) -> set[str]:
    """Names of the task's extra metrics recorded in a round row (e.g. exact_match)."""
    return {k for c in row.get("clients", []) for k in c.get("metrics", {})}


def summary_dict(
    *,
    method: str,
    rounds: list[dict[str, Any]],
    totals: dict[str, int],
    acc_global: float,
    acc_majority: float,
    payload: dict[str, Any],
    num_clients: int,
    seed: int,
    task: str | None,
    model_note: str | None,
    wall: float,
) -> dict[str, Any]:
    """summary.json: the final round's accuracies, global accuracy, bytes (totals and per client-round)."""
    final = rounds[-1]
    client_rounds = sum(r["participants"] for r in rounds)
    return {
        "method": method,
        "acc_mean": final["acc_mean"],
        "acc_weighted": final["acc_weighted"],
        "acc_worst10": final["acc_worst10"],
        "acc_mean_agg": final["acc_mean_agg"],
        "acc_global": acc_global,
        "acc_majority": acc_majority,
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
        "evaluated": "acc_* = after local training (local step); acc_*_agg = after receiving the server's message",
        "task": task,
        **{f"{k}_mean": final[f"{k}_mean"] for k in sorted(extra_keys(final))},
        **({"model_note": model_note} if model_note else {}),
        "wall_s": round(wall, 2),
    }
