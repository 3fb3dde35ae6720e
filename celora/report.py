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
            _client_note(c),
        )
    return t


def _client_note(c: dict[str, Any]) -> str:
    """Why a client's line is special: a rejected upload, a dropout, or not sampled."""
    if c.get("rejected"):
        return "rejected: " + c["rejected"]
    if c.get("dropped"):
        return f"dropped ({c['dropped']} training)"
    return "" if c["participated"] else "not sampled"


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


# ------------------------------------------------------------------------------------------ HTML report
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
    "td:first-child,th:first-child{text-align:left}img{max-width:100%;border:1px solid #eee}"
)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    import base64

    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{path.name}" src="data:image/png;base64,{data}"></p>'


def _run_html(d: Path) -> str:
    summary = json.loads((d / "summary.json").read_text(encoding="utf-8"))
    rows = read_metrics(d)
    parts = [f"<h1>celora run: {summary['method']}</h1>"]
    keys = [
        "acc_mean",
        "acc_weighted",
        "acc_worst10",
        "acc_mean_agg",
        "acc_global",
        "bytes_up_total",
        "bytes_down_total",
        "rounds",
        "wall_s",
    ]
    parts.append(
        _html_table(
            ["metric", "value"],
            [[k, summary.get(k)] for k in keys]
            + [
                [
                    "bytes per client-round (up / down)",
                    f"{summary['bytes_per_client_round']['up']:.0f} / {summary['bytes_per_client_round']['down']:.0f}",
                ]
            ],
        )
    )
    parts.append("<h2>Rounds</h2>")
    parts.append(
        _html_table(
            ["round", "acc mean", "acc weighted", "worst 10%", "acc after agg.", "bytes up", "bytes down", "wall s"],
            [
                [
                    r["round"],
                    f"{r['acc_mean']:.3f}",
                    f"{r['acc_weighted']:.3f}",
                    f"{r['acc_worst10']:.3f}",
                    f"{r['acc_mean_agg']:.3f}",
                    r["bytes_up"],
                    r["bytes_down"],
                    r["wall_s"],
                ]
                for r in rows
            ],
        )
    )
    if rows:
        parts.append(f"<h2>Clients after round {rows[-1]['round']}</h2>")
        parts.append(
            _html_table(
                ["client", "n_train", "acc", "acc after agg.", "loss", "bytes up", "bytes down", "note"],
                [
                    [
                        c["id"],
                        c["n_train"],
                        f"{c['acc']:.3f}",
                        f"{c['acc_agg']:.3f}",
                        f"{c['loss']:.3f}",
                        c["bytes_up"],
                        c["bytes_down"],
                        c.get("rejected") or "",
                    ]
                    for c in rows[-1]["clients"]
                ],
            )
        )
    parts += [_img(d / "accuracy.png"), _img(d / "weights.png")]
    return "".join(parts)


def _compare_html(d: Path) -> str:
    import csv

    with (d / "compare.csv").open(encoding="utf-8") as fh:
        cells = list(csv.DictReader(fh))
    parts = [f"<h1>celora comparison: {d.name}</h1>", "<h2>Summary (mean ± std over seeds)</h2>"]
    md = (d / "compare.md").read_text(encoding="utf-8").splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:] if line.strip()]
    parts.append(_html_table(header, body))
    parts.append(_img(d / "compare.png"))
    parts.append("<h2>Cells</h2>")
    if cells:
        parts.append(_html_table(list(cells[0]), [list(c.values()) for c in cells]))
    return "".join(parts)


def write_html_report(run_or_compare_dir: str | Path) -> Path:
    """report.html: one self-contained page (tables + embedded PNGs) for a run or a comparison folder."""
    from celora.errors import CeloraError

    d = Path(run_or_compare_dir)
    if (d / "compare.csv").is_file() and (d / "compare.md").is_file():
        body = _compare_html(d)
    elif (d / "summary.json").is_file() and (d / "metrics.jsonl").is_file():
        body = _run_html(d)
    else:
        raise CeloraError(f"{d}: not a run folder (summary.json, metrics.jsonl) or a comparison (compare.csv)")
    out = d / "report.html"
    out.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>celora report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>",
        encoding="utf-8",
    )
    return out
