"""Wall per round against engine.parallel_clients (K) and the number of clients, on the same total data.

    python benchmarks/bench_parallel.py                                    # K 1 4 16 × 10 100 1000 clients
    python benchmarks/bench_parallel.py --clients 10 100 --ks 1 16 --set data.max_samples=2000   # smaller
    python benchmarks/bench_parallel.py --set model.name=tiny-bert        # the engine's own cost (tiny model)

Each point is its own process (a fresh peak RSS): configs/quickstart.toml (MiniLM) on the clothing reviews
(5,000 rows, IID: BBC News is too small for 1,000 clients), 1 round, ``--set num_clients=N
engine.parallel_clients=K``. Printed: the round's wall (metrics.jsonl's ``wall_s``: train, evaluate twice,
upload, aggregate, deliver), its ratio to K = 1 at the same N and to the first N at the same K, the process's
peak RSS (and peak GPU memory on a GPU), the mean accuracy after aggregation, the K used
(what "auto" chose). Goal (issue 25, this CPU): 1,000 clients ≤ 1.2 × the wall of 10, and no K slower than K = 1.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ["rounds=1", "data.name=clothing", "data.max_samples=5000", "data.partition=iid"]


def point(n: int, k: str, sets: list[str]) -> dict[str, float]:
    """One run in this process: the round's wall, peak RSS (MB), peak GPU memory (MB), accuracy."""
    import torch

    from celora.config import load_config
    from celora.fl.simulation import Simulation

    cfg = load_config(ROOT / "configs" / "quickstart.toml", [*sets, f"num_clients={n}", f"engine.parallel_clients={k}"])
    t0 = time.perf_counter()
    sim = Simulation(cfg, export_adapters=False)
    res = sim.run()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else float("nan")
    return {
        "round_s": sum(r["wall_s"] for r in res.rounds) / len(res.rounds),
        "process_s": time.perf_counter() - t0,
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gpu_mb": gpu,
        "k": float(sim.parallel.k or 1),  # what "auto" chose
        "acc": float(res.summary.get("acc_mean_agg", res.summary.get("acc_mean", float("nan")))),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--ks", nargs="+", default=["1", "4", "16"], help="engine.parallel_clients values (or auto)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--threads", type=int, default=1, help="train.threads (the machine is shared: 1)")
    ap.add_argument("--point", nargs=2, metavar=("N", "K"), help=argparse.SUPPRESS)  # one run, JSON out
    args = ap.parse_args()
    sets = [*BASE, f"train.threads={args.threads}", *args.overrides]
    if args.point:
        print(json.dumps(point(int(args.point[0]), args.point[1], sets)))
        return 0
    print(f"configs/quickstart.toml --set {' '.join(sets)}")
    print(
        f"{'clients':>7} {'K':>5} {'round':>9} {'vs K=1':>7} {'vs N0':>6} {'process':>8} {'peak RSS':>9} "
        f"{'peak GPU':>9} {'acc_agg':>7} {'K used':>6}"
    )
    rows: dict[tuple[int, str], dict[str, float]] = {}
    for n in args.clients:
        for k in args.ks:
            cmd = [sys.executable, __file__, "--point", str(n), k, "--threads", str(args.threads)]
            for item in args.overrides:
                cmd += ["--set", item]
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{n:>7} {k:>5} FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}")
                return 1
            m = rows[(n, k)] = json.loads(proc.stdout.strip().splitlines()[-1])
            one = rows.get((n, args.ks[0]), m)
            first = rows.get((args.clients[0], k), m)
            print(
                f"{n:>7} {k:>5} {m['round_s']:8.1f}s {m['round_s'] / one['round_s']:6.2f}x "
                f"{m['round_s'] / first['round_s']:5.2f}x {m['process_s']:7.1f}s {m['rss_mb']:7.0f}MB "
                f"{m['gpu_mb']:7.0f}MB {m['acc']:7.3f} {m['k']:6.0f}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
