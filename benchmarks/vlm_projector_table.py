"""Print the issue-15 VLM projector table from benchmarks/results/vlm-projector/ (benchmarks/vlm_projector.sh).

One row per finished cell (task, column, seed), then the mean ± std over seeds per (task, column):
accuracy after local training and after aggregation (final round), the pre-aligned model before any federated
training (summary.json → zero_shot; only where the projector is pre-aligned), global accuracy, bytes per
client-round (each way) and the projector's part of them, wall time, and how the projector was pre-aligned.

Usage: python benchmarks/vlm_projector_table.py [RESULTS_DIR]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent / "results" / "vlm-projector"
KEYS = ("acc", "acc_agg", "aligned_only", "acc_global", "bytes", "projector_bytes", "wall_s")


def cells(root: Path) -> list[dict[str, Any]]:
    """Every finished cell (``cell.json`` written) as a flat row."""
    rows = []
    for cell in sorted(root.glob("*/*/seed_*/cell.json")):
        folder = cell.parent
        s = json.loads((folder / "summary.json").read_text())
        pay, note = s["payload"], s.get("projector") or {}
        rows.append(
            {
                "task": folder.parent.parent.name,
                "column": folder.parent.name,
                "projector": "pretrained" if note else "fedavg",
                "seed": int(folder.name.split("_")[1]),
                "acc": s["acc_mean"],
                "acc_agg": s.get("acc_mean_agg", float("nan")),
                "aligned_only": (s.get("zero_shot") or {}).get("acc_mean", float("nan")),
                "acc_global": s.get("acc_global", float("nan")),
                "bytes": int(s["bytes_per_client_round"]["up"]),
                "projector_bytes": int(pay.get("bytes_fedavg_modules", 0)),
                "wall_s": s["wall_s"],
                "note": note,
            }
        )
    return rows


def _fmt(key: str, v: float) -> str:
    if v != v:  # NaN
        return "–"
    return f"{int(v):,}" if key in ("bytes", "projector_bytes", "wall_s") else f"{v:.3f}"


def _pre(note: dict[str, Any]) -> str:
    if not note:
        return "trained by the clients, FedAvg'd"
    return (
        f"{note['public_set']} ({note['public_rows']:,} public rows), {note.get('steps', '?')} steps, "
        f"loss {note.get('loss_first', '?')} → {note.get('loss_last', '?')}, {note.get('train_s', '?')} s"
    )


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    rows = cells(root)
    if not rows:
        sys.exit(f"no finished cells under {root}")
    head = ["task", "column", "projector", "seed", "acc (local step)", "after agg.", "pre-aligned alone",
            "global", "bytes / client-round", "of which projector", "wall s"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        vals = [_fmt(k, r[k]) for k in KEYS]
        print(f"| {r['task']} | {r['column']} | {r['projector']} | {r['seed']} | " + " | ".join(vals) + " |")
    print()
    print("Mean ± std over seeds (std: sample std, n = number of seeds):")
    print()
    cols = ["task", "column", "n", "acc (local step)", "after agg.", "pre-aligned alone", "bytes / client-round"]
    print("| " + " | ".join([*cols, "projector"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["column"]), []).append(r)
    for (task, column), rs in groups.items():
        parts = []
        for k in ("acc", "acc_agg", "aligned_only"):
            v = [r[k] for r in rs if r[k] == r[k]]
            sd = statistics.stdev(v) if len(v) > 1 else float("nan")
            parts.append("–" if not v else f"{statistics.mean(v):.3f}" + (f" ± {sd:.3f}" if sd == sd else ""))
        line = f"| {task} | {column} | {len(rs)} | " + " | ".join(parts)
        print(line + f" | {_fmt('bytes', rs[0]['bytes'])} | {_pre(rs[0]['note'])} |")


if __name__ == "__main__":
    main()
