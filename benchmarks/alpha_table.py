"""Issue 4 table: every method on the small-client regime at Dirichlet α ∈ {0.1, 0.5, 1.0}, from the cells that
`benchmarks/small_clients.sh ALPHA` wrote (benchmarks/results/small-alpha<α>/<method>/seed_<s>/cell.json).

Prints one combined Markdown table (accuracy after local training ± std over seeds, accuracy after aggregation,
paired Δ vs local, bytes per client-round) and writes benchmarks/results/small-clients.md and
small-clients.png (accuracy vs total MB, one panel per α).

    .venv/bin/python benchmarks/alpha_table.py [--alphas 0.1,0.5,1.0] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from celora.compare import aggregate_rows, markdown_table, plot_panels, read_cells

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = "local,centralized,fedit,ffa,ffa-lr1e-2,fedsa,fedsb,celora-global,celora,celora-C-only"


def cell(a: dict | None) -> str:
    """'acc ± std / after agg. (Δ local-step, Δ after agg.)' for one method at one α."""
    if a is None:
        return "not run"
    text = f"{a['acc_mean']:.3f} ± {a['acc_mean_std']:.3f} / {a['acc_mean_agg']:.3f}"
    if not math.isnan(a["delta_local"]):
        text += f" ({a['delta_local']:+.3f}, {a['delta_local_agg']:+.3f})"
    return text + ("" if a["seeds"] >= 3 else f" [{a['seeds']} seed{'s' if a['seeds'] > 1 else ''}]")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--alphas", default="0.1,0.5,1.0")
    ap.add_argument("--methods", default=METHODS)
    args = ap.parse_args()
    alphas = [x.strip() for x in args.alphas.split(",")]
    methods = [x.strip() for x in args.methods.split(",")]
    aggs = {al: aggregate_rows(read_cells(RESULTS / f"small-alpha{al}"), methods) for al in alphas}
    by = {al: {a["method"]: a for a in agg} for al, agg in aggs.items()}
    head = "| method | " + " | ".join(f"α = {al}" for al in alphas) + " | B/client-round up (= down) |"
    lines = [head, "|---|" + "---|" * (len(alphas) + 1)]
    for m in methods:
        found = [by[al].get(m) for al in alphas]
        b = next((f"{a['bytes_up_per_client_round']:,.0f}" for a in found if a is not None), "–")
        lines.append(f"| {m} | " + " | ".join(cell(a) for a in found) + f" | {b} |")
    table = "\n".join(lines) + "\n"
    legend = (
        "\nEach cell: personalized accuracy after local training, mean ± std over seeds / after aggregation "
        "(paired Δ vs local per seed: after local training, after aggregation).\n"
    )
    per_alpha = "".join(f"\n### α = {al}\n\n{markdown_table(aggs[al])}" for al in alphas)
    print(table + legend)
    (RESULTS / "small-clients.md").write_text(table + legend + per_alpha, encoding="utf-8")
    plot_panels({f"Dirichlet α = {al}": aggs[al] for al in alphas}, RESULTS / "small-clients.png")
    print(f"wrote {RESULTS / 'small-clients.md'} and {RESULTS / 'small-clients.png'}")


if __name__ == "__main__":
    main()
