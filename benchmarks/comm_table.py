"""Bytes per client-round (each way) of every method for MiniLM, SmolLM2-135M and LLaMA-7B shapes.

Counts the real serialized payload (celora's safetensors framing included) built from the model's
shapes on the meta device. Prints a Markdown table and writes benchmarks/results/comm_table.md.

    .venv/bin/python benchmarks/comm_table.py [--rank 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from celora.fl.comm import comm_context, comm_table

MODELS = ("minilm", "smollm2-135m", "llama-7b")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    lines = [
        f"Targets q, v; rank r = {args.rank}; fp32; bytes per client-round in each direction (tensor data + framing).",
        "",
        "| model (d, L) | method | travels | numbers | bytes | framing | FedIT ÷ this |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in MODELS:
        ctx = comm_context(name, args.rank, None)
        for r in comm_table(name, args.rank):
            ratio = f"{r['vs_fedit']:,.0f}×" if r["vs_fedit"] else "–"
            lines.append(
                f"| {name} ({ctx['hidden']}, {ctx['layers']}) | {r['method']} | {r['travels']} | {r['params']:,} "
                f"| {r['bytes_up']:,} | {r['framing_bytes']} | {ratio} |"
            )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(__file__).parent / "results" / "comm_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
