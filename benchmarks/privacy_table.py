"""Gradient-inversion table (issue 16): what an honest-but-curious server reconstructs, per shared tensors.

Resumable: every cell writes OUT/<cell>/attack.json (+ picture) only when it is complete, and is skipped when
that file already holds at least the cell's target number of sequences (or images); the table
(OUT/privacy_table.md) is rebuilt from whatever cells exist. Targets: ``--span-n`` where the span test is
decisive (cheap: tokens < the observed column dimension), ``--opt-n`` where an optimisation attack runs.
Batches are drawn from client 0, then clients 1, 2, ... (each warmed from the seeded init). Single thread.

    python benchmarks/privacy_table.py                        # every cell: text (MiniLM, BBC), image (DINOv2-S)
    python benchmarks/privacy_table.py --match r128-b1 --match full   # run only these cells (table: all)
    python benchmarks/privacy_table.py --table-only                   # print the table of the stored cells
    python benchmarks/privacy_table.py --lm-prior smollm2 --match text-fedit-r32-b1 --opt-n 4   # with an LM prior

With ``--lm-prior NAME`` the optimisation cells (text, span test not decisive) run again as separate cells
``<cell>-lm-NAME``: the same attack read off through the language-model prior (``celora attack --lm-prior``);
their attack.json also holds the nearest-token read-off of the same optimisation (``nearest_*``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from celora.attack import COLUMNS, attack_experiment, markdown_row, markdown_table, write_outputs
from celora.config import load_config
from celora.fl.prepare import prepare

ADAPTER_THREATS = ("fedit", "ffa", "c-known", "c-private", "c+head")

# (kind, config, threat, rank, batch, protocol): full and head do not depend on the rank (run at the config's)
TEXT = (
    [("text", "configs/bench_small.toml", "full", 8, b, "fedsgd") for b in (1, 4)]
    + [("text", "configs/bench_small.toml", "head", 8, b, "fedsgd") for b in (1, 4)]
    + [("text", "configs/bench_small.toml", t, r, 1, "fedsgd") for r in (8, 32, 128) for t in ADAPTER_THREATS]
)
IMAGE = [("image", "configs/vit_digits.toml", t, 8, 1, "fedsgd") for t in ("full", "head")] + [
    ("image", "configs/vit_digits.toml", t, r, 1, "fedsgd") for r in (32, 8, 128) for t in ADAPTER_THREATS
]
LATER = (
    [("text", "configs/bench_small.toml", t, r, 4, "fedsgd") for r in (8, 32, 128) for t in ADAPTER_THREATS]
    + [("text", "configs/bench_small.toml", t, r, 1, "fedavg") for r in (8, 32, 128) for t in ("fedit", "c+head")]
    + [("text", "configs/bench_small.toml", "head", 128, 1, "fedavg")]
)
TOKENS = {"text": 64, "image": 17}  # per example: max_length (BBC articles fill it); CLS + 4×4 patches
HIDDEN = 384  # MiniLM and DINOv2-S


def span_decisive(kind: str, threat: str, rank: int, batch: int) -> bool:
    """Whether the span test decides the cell (tokens < the observed tensor's column dimension): cheap cells."""
    if threat == "head":
        return False
    return TOKENS[kind] * batch < (HIDDEN if threat == "full" else rank)


def _shape(cell: tuple[str, str, str, int, int, str]) -> tuple[str, str, int, int]:
    kind, _config, threat, rank, batch, _protocol = cell
    return kind, threat, rank, batch


def cell_name(kind: str, threat: str, rank: int, batch: int, protocol: str) -> str:
    return f"{kind}-{threat.replace('+', '-')}-r{rank}-b{batch}-{protocol}"


def _progress(name: str, j: int, t0: float) -> None:
    print(f"  {name}: batch {j + 1} of its client, {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy"))
    ap.add_argument("--only", choices=("text", "image"), default=None)
    ap.add_argument("--span-n", type=int, default=100, help="sequences (images) per span-decided cell")
    ap.add_argument("--opt-n", type=int, default=8, help="sequences per optimisation cell")
    ap.add_argument("--match", action="append", default=[], help="run only cells whose name contains this")
    ap.add_argument("--table-only", action="store_true", help="run nothing; rebuild the table from the cells")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--warm-steps", type=int, default=10)
    ap.add_argument("--lm-prior", default=None, help="also run the text optimisation cells with this LM prior")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cells = [c for c in TEXT + IMAGE + LATER if args.only in (None, c[0])]
    prepared: dict[tuple[str, int], object] = {}
    warmed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # per client of the prepared model
    runs = [(c, None) for c in cells]
    if args.lm_prior:
        runs += [(c, args.lm_prior) for c in cells if c[0] == "text" and not span_decisive(*_shape(c))]
    for (kind, config, threat, rank, batch, protocol), prior in runs:
        name = cell_name(kind, threat, rank, batch, protocol) + (f"-lm-{prior}" if prior else "")
        out = args.out / name
        target = args.span_n if span_decisive(kind, threat, rank, batch) else args.opt_n
        if args.table_only or (args.match and not any(m in name for m in args.match)):
            continue
        if (out / "attack.json").is_file():
            done = json.loads((out / "attack.json").read_text())
            if max(done["summary"]["examples"], done["settings"].get("target", 0)) >= target:
                continue  # complete (or every client's batches were used: target recorded)
        cfg = load_config(config, [f"model.rank={rank}", "train.threads=1"])
        key = (config, rank)
        if key not in prepared:
            prepared.clear()  # one model in memory at a time
            warmed.clear()
            prepared[key] = prepare(cfg)
        t0 = time.perf_counter()
        result, meta = attack_experiment(
            cfg,
            threat,
            batch_size=batch,
            fedavg=protocol == "fedavg",
            samples=-(-target // batch),
            iterations=args.iterations,
            warm_steps=args.warm_steps,
            prepared=prepared[key],
            warmed=warmed,
            lm_prior=prior,
            progress=lambda j, _row, name=name, t0=t0: _progress(name, j, t0),
        )
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        meta["target"] = target
        write_outputs(result, meta, out)
        print(
            f"{name}: {json.dumps({k: round(v['mean'], 3) for k, v in result.summary['metrics'].items()})} "
            f"({meta['wall_s']} s)",
            flush=True,
        )
    rows = []
    for kind, _config, threat, rank, batch, protocol in cells:
        base = args.out / cell_name(kind, threat, rank, batch, protocol)
        for f in [base / "attack.json", *sorted(args.out.glob(f"{base.name}-lm-*/attack.json"))]:
            if not f.is_file():
                continue
            data = json.loads(f.read_text())
            row = markdown_row(data["summary"], data["settings"]["rank"])
            row[1] = "any" if threat in ("full", "head") else row[1]
            rows.append([kind, *row])
    table = markdown_table(rows, ("data", *COLUMNS))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "privacy_table.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
