"""Print one Markdown row per run folder: final-round personalized accuracy (after local training and
after receiving the server's message), worst-10 %, bytes up per client-round, rounds completed.

Usage: .venv/bin/python benchmarks/summarize_runs.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(run: Path) -> str:
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    last = rounds[-1]
    n = max(1, int(last["participants"]))
    name = f"{run.parent.name}/{run.name}" if run.name.startswith("seed_") else run.name
    return (
        f"| {name} | {len(rounds)} | {last['acc_mean']:.3f} | {last['acc_mean_agg']:.3f} | "
        f"{last['acc_worst10']:.3f} | {last['bytes_up'] // n:,} |"
    )


def main(paths: list[str]) -> None:
    print("| run | rounds | acc mean | acc after agg. | worst-10 % | up B/client-round |")
    print("|---|---|---|---|---|---|")
    for p in paths:
        run = Path(p)
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size:
            print(row(run))


if __name__ == "__main__":
    main(sys.argv[1:])
