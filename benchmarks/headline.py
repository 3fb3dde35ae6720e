"""The docs' headline numbers, regenerated from committed results under benchmarks/results/.

Each block lives in README.md or a docs/ page between ``<!-- headline:NAME -->`` and ``<!-- /headline:NAME -->``:

    .venv/bin/python benchmarks/headline.py            # print every block
    .venv/bin/python benchmarks/headline.py --write    # rewrite the blocks in README.md and docs/*.md
    .venv/bin/python benchmarks/headline.py --check    # exit 1 naming each stale block (tests/test_docs.py)

Blocks: ``alpha`` (every method at Dirichlet α ∈ {0.1, 0.5, 1.0}, from the cells of benchmarks/small_clients.sh),
``quickstart`` and ``vit-digits`` (the per-round table of a committed run folder: `celora run` on the shipped
config, copied to benchmarks/results/<name>/).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from celora.compare import aggregate_rows, read_cells
from celora.report import fmt_bytes, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ALPHAS = ("0.1", "0.5", "1.0")
ALPHA_METHODS = (
    "local",
    "centralized",
    "fedit",
    "ffa-lr1e-2",
    "fedsa",
    "fedsb",
    "celora-global",
    "celora",
    "celora-C-only",
)
COMMAND = ".venv/bin/python benchmarks/headline.py --write"


def alpha_block() -> str:
    """Personalized accuracy per method and α: after local training / after aggregation (paired Δ vs local)."""
    by = {
        al: {a["method"]: a for a in aggregate_rows(read_cells(RESULTS / f"small-alpha{al}"), ALPHA_METHODS)}
        for al in ALPHAS
    }
    lines = ["| method | " + " | ".join(f"α = {al}" for al in ALPHAS) + " | bytes per client-round (each way) |"]
    lines.append("|---|" + "---:|" * (len(ALPHAS) + 1))
    for m in ALPHA_METHODS:
        cells = []
        for al in ALPHAS:
            a = by[al].get(m)
            if a is None:
                cells.append("not run")
                continue
            delta = "" if math.isnan(a["delta_local_agg"]) else f" ({a['delta_local_agg']:+.3f})"
            cells.append(f"{a['acc_mean']:.3f} / {a['acc_mean_agg']:.3f}{delta}")
        b = next(by[al][m]["bytes_up_per_client_round"] for al in ALPHAS if m in by[al])
        lines.append(f"| `{m}` | " + " | ".join(cells) + f" | {b:,.0f} |")
    return "\n".join(lines)


def run_block(name: str) -> Callable[[], str]:
    """The per-round table and final line of the committed run folder benchmarks/results/<name>/."""

    def block() -> str:
        d = RESULTS / name
        rows = read_metrics(d)
        s = json.loads((d / "summary.json").read_text(encoding="utf-8"))
        lines = [
            "| round | acc mean (local step) | acc weighted | worst 10 % | after agg. "
            "| up (all clients) | down (all clients) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            cells = [r["acc_mean"], r["acc_weighted"], r["acc_worst10"], r["acc_mean_agg"]]
            lines.append(
                f"| {r['round']} | "
                + " | ".join(f"{x:.3f}" for x in cells)
                + f" | {fmt_bytes(r['bytes_up'])} | {fmt_bytes(r['bytes_down'])} |"
            )
        b = s["bytes_per_client_round"]
        lines += [
            "",
            f"Final: global accuracy {s['acc_global']:.3f}; every client answering its own most frequent training "
            f"label would score {s['acc_majority']:.3f}; **{b['up']:,.0f} B up / {b['down']:,.0f} B down per "
            f"client-round**; run folder `benchmarks/results/{name}/`.",
        ]
        return "\n".join(lines)

    return block


BLOCKS: dict[str, Callable[[], str]] = {
    "alpha": alpha_block,
    "quickstart": run_block("quickstart"),
    "vit-digits": run_block("vit-digits"),
}
PATTERN = re.compile(r"(<!-- headline:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /headline:(?P=name) -->)", re.S)


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def stale_blocks(write: bool = False) -> list[str]:
    """'file: block' for every block whose text differs from the committed results (rewritten when ``write``)."""
    stale: list[str] = []
    seen: set[str] = set()
    for path in doc_files():
        text = path.read_text(encoding="utf-8")

        def fill(m: re.Match[str], path: Path = path) -> str:
            name = m["name"]
            if name not in BLOCKS:
                raise SystemExit(
                    f"{path.relative_to(ROOT)}: unknown headline block {name!r} (known: {', '.join(BLOCKS)})"
                )
            seen.add(name)
            fresh = BLOCKS[name]() + "\n"
            if m["body"] != fresh:
                stale.append(f"{path.relative_to(ROOT)}: {name}")
            return m.group(1) + fresh + m.group(4)

        new = PATTERN.sub(fill, text)
        if text.count("<!-- headline:") != len(PATTERN.findall(text)):
            stale.append(f"{path.relative_to(ROOT)}: a headline block without its closing marker")
        if write and new != text:
            path.write_text(new, encoding="utf-8")
    stale += [f"block {name} is in no doc" for name in BLOCKS if name not in seen]
    return stale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the blocks in README.md and docs/*.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when a block differs from the results")
    args = ap.parse_args()
    if args.write or args.check:
        stale = stale_blocks(write=args.write)
        for s in stale:
            print(("rewrote " if args.write else "stale: ") + s)
        if args.check and stale:
            print(f"regenerate with: {COMMAND}")
            sys.exit(1)
        return
    for name, block in BLOCKS.items():
        print(f"<!-- headline:{name} -->\n{block()}\n<!-- /headline:{name} -->\n")


if __name__ == "__main__":
    main()
