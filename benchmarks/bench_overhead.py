"""The in-process engine's wall per round against the bare local-training steps it runs.

    python benchmarks/bench_overhead.py [--rounds 3] [--set num_clients=10 …]

Runs the quickstart (MiniLM, BBC News, 10 clients) for R rounds with eval.every = R, so rounds 1..R−1 hold
no evaluation: only local training, uploads, validation, aggregation and delivery. Then, in the same
process and on the same model, the bare loop: for every client of each of those rounds, ``train_local`` on
the same rows with the same seeds (the same batches, a fresh AdamW, forward, backward, step) and nothing
else. Overhead = engine round wall / bare wall − 1 (goal: ≤ 10 %). Each bare round is timed twice; the
faster counts (the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from measure import load_note

from celora.config import load_config
from celora.fl.backbone import seeded
from celora.fl.client import train_local
from celora.fl.simulation import Simulation

ROOT = Path(__file__).resolve().parents[1]


def bare_round(sim: Simulation, rnd: int, clients: list[int]) -> float:
    """Seconds of the plain local-training loop of round ``rnd`` for ``clients`` (what the engine trains)."""
    cfg, t, bench = sim.cfg, sim.cfg.train, sim.bench
    total = 0.0
    for i in clients:
        c = sim.clients[i]
        phase = c.phases.phase(rnd)
        params, head_params = phase.trainable(bench)
        seeded(cfg.seed, rnd, i)
        t0 = time.perf_counter()
        train_local(
            bench.model,
            c.data.data,
            c.data.train_idx,
            params,
            task=bench.task,
            epochs=t.local_epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            head_params=head_params,
            head_lr=t.head_lr,
            weight_decay=t.weight_decay,
            max_steps=t.max_steps,
            seed=cfg.seed * 7919 + rnd * 31 + i,
            placement=bench.placement,
        )
        total += time.perf_counter() - t0
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="R: rounds 1..R-1 are measured")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    sets = [f"rounds={args.rounds}", f"eval.every={args.rounds}", f"train.threads={args.threads}", *args.overrides]
    cfg = load_config(ROOT / "configs" / "quickstart.toml", sets)
    torch.set_num_threads(args.threads)
    print(f"configs/quickstart.toml {' '.join(sets)} · {load_note()}")
    sim = Simulation(cfg, None, export_adapters=False)
    res = sim.run()
    ratios = []
    for row in res.rounds[:-1]:
        rnd = row["round"]
        clients = [c["id"] for c in row["clients"] if c["participated"]]
        bare = min(bare_round(sim, rnd, clients) for _ in range(2))
        ratios.append(row["wall_s"] / bare)
        print(
            f"round {rnd}: engine {row['wall_s']:6.2f} s   bare local training {bare:6.2f} s   "
            f"({len(clients)} clients)   overhead {100 * (row['wall_s'] / bare - 1):+5.1f} %"
        )
    print(f"median overhead {100 * (statistics.median(ratios) - 1):+.1f} % (goal ≤ 10 %) · after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
