"""Issue-15 table and plots from a c_only_study.sh (or c_only_llm.sh) folder: accuracy vs bytes per client-round
(the equal-bytes view) and every column's mean training loss per round (has C's training flattened?). Prompt
tasks add the zero-shot accuracy (the un-adapted model before round 1); wall s/cell is the mean run wall time.

Usage: .venv/bin/python benchmarks/c_only_plot.py benchmarks/results/c-only-alpha1.0
       .venv/bin/python benchmarks/c_only_plot.py benchmarks/results/c-only-llm
Writes c_only.md (table) and c_only.png (two panels) into the folder and prints the table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from celora.compare import aggregate_rows, read_cells

FEDIT = "fedit"


def steps_per_client(cell_dir: Path) -> int:
    """Optimizer steps of the median client over the run: Σ_rounds epochs·⌈n/b⌉ (pooled: ⌈Σn/b⌉ per epoch)."""
    cfg = tomllib.loads((cell_dir / "config.toml").read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    epochs, bs = cfg["train"]["local_epochs"], cfg["train"]["batch_size"]
    if cfg["method"] == "centralized":
        n = sum(c["n_train"] for c in rows[0]["clients"])
        return len(rows) * epochs * math.ceil(n / bs)
    per = [
        sum(
            epochs * math.ceil(c["n_train"] / bs)
            for r in rows
            for c in r["clients"]
            if c["id"] == i and c["participated"]
        )
        for i in range(len(rows[0]["clients"]))
    ]
    return int(np.median(per))


def train_loss_curve(cell_dir: Path) -> list[float]:
    """Mean training loss of the participants, per round."""
    rows = [json.loads(line) for line in (cell_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [float(np.nanmean([c["train_loss"] for c in r["clients"] if c["participated"]])) for r in rows]


def control_of(label: str, labels: list[str]) -> str | None:
    """The no-exchange control of a C-only column: ``local-<basis-rank-lr>`` (``celora-grad-…`` → ``local-grad-…``)."""
    base = label.removeprefix("celora-")
    control = f"local-{base}"
    return control if control in labels and not label.startswith("local") else None


def paired_gain(rows: list[dict[str, Any]], label: str, control: str) -> tuple[float, float, int]:
    """Mean and sample std over the seeds both ran of acc_after_agg(label) − acc(control), and how many seeds."""
    mine = {r["seed"]: r["acc_mean_agg"] for r in rows if r["method"] == label}
    ref = {r["seed"]: r["acc_mean"] for r in rows if r["method"] == control}
    diffs = [mine[s] - ref[s] for s in sorted(mine.keys() & ref.keys())]
    if not diffs:
        return float("nan"), float("nan"), 0
    std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else float("nan")
    return float(np.mean(diffs)), std, len(diffs)


def main(folder: str) -> None:
    out = Path(folder)
    if not out.is_dir():
        raise SystemExit(f"c_only_plot: no study folder {folder} (run benchmarks/c_only_study.sh first)")
    rows = read_cells(out)
    labels = list(dict.fromkeys(r["method"] for r in rows))
    agg = {a["method"]: a for a in aggregate_rows(rows, labels)}
    fedit_bytes = agg[FEDIT]["bytes_up_per_client_round"] if FEDIT in agg else float("nan")
    zero_shot = {m: [r["acc_zero_shot"] for r in rows if r["method"] == m and "acc_zero_shot" in r] for m in agg}
    has_zs = any(zero_shot.values())  # prompt tasks: the un-adapted model before round 1
    lines = [
        "| column | seeds | steps/client |"
        + (" zero-shot acc |" if has_zs else "")
        + " acc after local training | acc after aggregation "
        "| Δ vs local (local / agg.) | Δ agg. vs own no-exchange control | up B/client-round | × FedIT bytes "
        "| final train loss | wall s/cell |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if has_zs else ""),
    ]
    curves: dict[str, list[float]] = {}
    for label, a in agg.items():
        dirs = sorted(d for d in out.glob(f"{label}/seed_*") if (d / "cell.json").exists())  # complete cells only
        steps = steps_per_client(dirs[0])
        curve = np.mean([train_loss_curve(d) for d in dirs], axis=0).tolist()
        curves[label] = curve
        delta = (
            "–"
            if math.isnan(a["delta_local"])
            else (
                f"{a['delta_local']:+.3f} ± {a['delta_local_std']:.3f} / "
                f"{a['delta_local_agg']:+.3f} ± {a['delta_local_agg_std']:.3f}"
            )
        )
        control = control_of(label, labels)
        gain, gain_std, n_paired = paired_gain(rows, label, control) if control else (math.nan, math.nan, 0)
        vs_control = "–" if not n_paired else f"{gain:+.3f} ± {gain_std:.3f} ({n_paired} seeds)"
        up = a["bytes_up_per_client_round"]
        frac = f"{up / fedit_bytes:.3f}" if fedit_bytes == fedit_bytes and up > 0 else "–"
        zs = f" {np.mean(zero_shot[label]):.3f} |" if has_zs else ""
        lines.append(
            f"| {label} | {a['seeds']} | {steps} |{zs} {a['acc_mean']:.3f} ± {a['acc_mean_std']:.3f} "
            f"| {a['acc_mean_agg']:.3f} ± {a['acc_mean_agg_std']:.3f} | {delta} | {vs_control} | {up:,.0f} | {frac} "
            f"| {curve[-1]:.2e} | {a['wall_s']:.0f} |"
        )
    table = "\n".join(lines) + "\n"
    (out / "c_only.md").write_text(table, encoding="utf-8")
    print(table)
    plot(agg, curves, out / "c_only.png")


def plot(agg: dict[str, dict[str, Any]], curves: dict[str, list[float]], path: Path) -> None:
    """Left: accuracy after aggregation (± std) vs upload bytes per client-round (log x; 0 B drawn at the left).
    Right: mean training loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.6))
    ups = {label: a["bytes_up_per_client_round"] for label, a in agg.items()}
    floor = min([u for u in ups.values() if u > 0], default=4.0) / 4  # 0 B drawn left of the smallest message
    for k, (label, a) in enumerate(agg.items()):
        mark = "os^Dv<>pPX*h"[k % 12]
        x, name = (ups[label], label) if ups[label] > 0 else (floor, f"{label} (0 B)")
        ax.errorbar(x, a["acc_mean_agg"], a["acc_mean_agg_std"], None, mark, capsize=3, label=name)
        bx.plot(range(1, len(curves[label]) + 1), curves[label], marker=mark, ms=3, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("upload bytes per client-round (equal-bytes view)")
    ax.set_ylabel("personalized accuracy after aggregation")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    bx.set_xlabel("round")
    bx.set_ylabel("mean training loss of the round's local training")
    bx.set_yscale("log")
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/c-only-alpha1.0")
