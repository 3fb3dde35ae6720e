"""Tables and plots from run logs (metrics.jsonl, summary.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fmt_bytes(n: float) -> str:
    """1536 → '1.5 KB' (decimal units, as on the wire)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def rounds_table(rows: list[dict[str, Any]], title: str = "Results per round") -> Table:
    """One line per round: personalized accuracy (local step and aggregated), bytes, time."""
    t = Table(title=title)
    for col in ("round", "acc mean", "acc weighted", "worst 10%", "acc after agg.", "up", "down", "time"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(
            str(r["round"]),
            f"{r['acc_mean']:.3f}",
            f"{r['acc_weighted']:.3f}",
            f"{r['acc_worst10']:.3f}",
            f"{r['acc_mean_agg']:.3f}",
            fmt_bytes(r["bytes_up"]),
            fmt_bytes(r["bytes_down"]),
            f"{r['wall_s']:.1f}s",
        )
    return t


def clients_table(row: dict[str, Any]) -> Table:
    """Per-client results of one round."""
    t = Table(title=f"Clients after round {row['round']}")
    for col in ("client", "n_train", "acc", "acc after agg.", "loss", "up", "down", "note"):
        t.add_column(col, justify="right")
    for c in row["clients"]:
        t.add_row(
            str(c["id"]),
            str(c["n_train"]),
            f"{c['acc']:.3f}",
            f"{c['acc_agg']:.3f}",
            f"{c['loss']:.3f}",
            fmt_bytes(c["bytes_up"]),
            fmt_bytes(c["bytes_down"]),
            ("rejected: " + c["rejected"]) if c.get("rejected") else ("" if c["participated"] else "not sampled"),
        )
    return t


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """accuracy.png: personalized accuracy (mean, worst-10 %, after aggregation) vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["acc_mean"] for r in rows], "o-", label="mean (after local training)")
    ax.plot(x, [r["acc_mean_agg"] for r in rows], "s--", label="mean (after aggregation)")
    ax.plot(x, [r["acc_worst10"] for r in rows], "^:", label="worst 10 % clients")
    ax.set_xlabel("round")
    ax.set_ylabel("personalized test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title or (rows[0]["method"] if rows else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def top_collaborators(weights: Any, k: int = 3) -> dict[int, list[tuple[int, float]]]:
    """For each client row i with weights, the k largest w_ij over j ≠ i, as (j, w_ij)."""
    import numpy as np

    w = np.asarray(weights, dtype=float)
    out: dict[int, list[tuple[int, float]]] = {}
    for i in range(w.shape[0]):
        if w[i].sum() <= 0:
            continue
        order = [int(j) for j in np.argsort(-w[i]) if j != i and w[i, j] > 0][:k]
        out[i] = [(j, float(w[i, j])) for j in order]
    return out


def plot_weights(weights: Any, path: str | Path, title: str = "aggregation weights w_ij") -> Path:
    """weights.png: heatmap of the learned weight matrix (row i = client i's mix of C_j)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2))
    im = ax.imshow(weights, cmap="viridis", vmin=0)
    ax.set_xlabel("client j (contributor)")
    ax.set_ylabel("client i (receiver)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
