"""Cost against the number of simulated clients on the same total data (the quickstart: MiniLM, BBC News).

    python benchmarks/bench_scale.py                                  # 10 and 100 clients, 1 round
    python benchmarks/bench_scale.py --clients 10 100 1000 --set data.name=clothing --set data.max_samples=5000

Each point is a separate `celora run configs/quickstart.toml --set rounds=1 --set num_clients=N` process (as a
new user starts it): process wall (imports, data, model, data summaries, the round, the final evaluation,
adapter export), seconds per round (metrics.jsonl), peak RSS (psutil); then each point's ratio to the first.
Goal (issue 14): 100 clients ≤ 1.3 × the wall of 10 and ≤ 1.2 × its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from measure import load_note, measure

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--threads", type=int, default=1, help="train.threads (the machine is shared: 1)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the run folders")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    sets = ["rounds=1", f"train.threads={args.threads}", *args.overrides]
    print(f"configs/quickstart.toml {' '.join(sets)} · {load_note()}")
    first: tuple[float, float] | None = None
    for n in args.clients:
        out = work / f"clients-{n}"
        cmd = [str(BIN / "celora"), "run", "configs/quickstart.toml", "--out", str(out), "--set", f"num_clients={n}"]
        for item in sets:
            cmd += ["--set", item]
        m = measure(cmd, env=dict(os.environ), cwd=ROOT)
        if m.returncode != 0:
            print(f"{n:>5} clients: FAILED (rc {m.returncode})\n{m.output[-3000:]}")
            return 1
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        per_round = sum(r["wall_s"] for r in rows) / len(rows)
        first = first or (m.wall_s, m.peak_rss_mb)
        evaluated = (
            summary.get("global_eval", {}).get("clients", n) if isinstance(summary.get("global_eval"), dict) else n
        )
        print(
            f"{n:>5} clients: wall {m.wall_s:7.1f} s ({m.wall_s / first[0]:.2f}x)  round {per_round:6.1f} s  "
            f"peak RSS {m.peak_rss_mb:6.0f} MB ({m.peak_rss_mb / first[1]:.2f}x)  acc {summary['acc_mean']:.3f}  "
            f"global {summary['acc_global']:.3f} on {evaluated} clients"
        )
    print(f"after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
