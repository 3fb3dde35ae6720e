"""Gradient-inversion table (issue 16): what an honest-but-curious server reconstructs, per shared tensors.

Resumable: every cell writes OUT/<cell>/attack.json (+ picture) and is skipped when that file exists; the
table (OUT/privacy_table.md) is rebuilt from whatever cells exist. Single thread.

    python benchmarks/privacy_table.py                       # text (MiniLM, BBC) and image (DINOv2-S, digits)
    python benchmarks/privacy_table.py --only text --samples 4 --iterations 60
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
    ("image", "configs/vit_digits.toml", t, 32, 1, "fedsgd") for t in ADAPTER_THREATS
]
LATER = [("text", "configs/bench_small.toml", t, r, 4, "fedsgd") for r in (8, 32) for t in ADAPTER_THREATS] + [
    ("text", "configs/bench_small.toml", t, r, 1, "fedavg") for r in (8, 32) for t in ("fedit", "c+head")
]


def cell_name(kind: str, threat: str, rank: int, batch: int, protocol: str) -> str:
    return f"{kind}-{threat.replace('+', '-')}-r{rank}-b{batch}-{protocol}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/privacy"))
    ap.add_argument("--only", choices=("text", "image"), default=None)
    ap.add_argument("--samples", type=int, default=4, help="batches per cell at batch size 1")
    ap.add_argument("--samples-b4", type=int, default=1, help="batches per cell at batch size 4")
    ap.add_argument("--iterations", type=int, default=60)
    ap.add_argument("--warm-steps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cells = [c for c in TEXT + IMAGE + LATER if args.only in (None, c[0])]
    prepared: dict[tuple[str, int], object] = {}
    for kind, config, threat, rank, batch, protocol in cells:
        name = cell_name(kind, threat, rank, batch, protocol)
        out = args.out / name
        if (out / "attack.json").is_file():
            continue
        cfg = load_config(config, [f"model.rank={rank}", "train.threads=1"])
        key = (config, rank)
        if key not in prepared:
            prepared.clear()  # one model in memory at a time
            prepared[key] = prepare(cfg)
        t0 = time.perf_counter()
        result, meta = attack_experiment(
            cfg,
            threat,
            batch_size=batch,
            fedavg=protocol == "fedavg",
            samples=args.samples if batch == 1 else args.samples_b4,
            iterations=args.iterations,
            warm_steps=args.warm_steps,
            prepared=prepared[key],
        )
        meta["wall_s"] = round(time.perf_counter() - t0, 1)
        write_outputs(result, meta, out)
        print(
            f"{name}: {json.dumps({k: round(v['mean'], 3) for k, v in result.summary['metrics'].items()})} "
            f"({meta['wall_s']} s)",
            flush=True,
        )
    rows = []
    for kind, _config, threat, rank, batch, protocol in cells:
        f = args.out / cell_name(kind, threat, rank, batch, protocol) / "attack.json"
        if f.is_file():
            data = json.loads(f.read_text())
            row = markdown_row(data["summary"], data["settings"]["rank"])
            row[1] = "any" if threat in ("full", "head") else row[1]
            rows.append([kind, *row])
    table = markdown_table(rows, ("data", *COLUMNS))
    (args.out / "privacy_table.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
