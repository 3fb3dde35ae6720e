"""The same experiment (configs/flower.toml) on the in-process engine and on Flower's simulation engine.

    python benchmarks/bench_vs_flower_sim.py [--repeats 2] [--set rounds=1 …]

Alternates `celora run configs/flower.toml` (in-process) and `celora flower-sim . --stream` (= `flwr run .`,
Ray) as separate processes, each as a new user would start it: the Flower run gets a fresh FLWR_HOME, so it
launches (and this script afterwards ends) its own local SuperLink. For every run: process wall, peak RSS of
the whole process tree (psutil), accuracies; then the medians and the ratios Flower / in-process.
Run folders under --work (default a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import tomllib
from measure import Measured, load_note, measure

from celora.fl.flower.deploy import flower_env, free_port, stop_local_superlink

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run_inprocess(work: Path, k: int, overrides: list[str]) -> tuple[Measured, dict]:
    out = work / f"inprocess-{k}"
    cmd = [str(BIN / "celora"), "run", "configs/flower.toml", "--out", str(out)]
    for item in overrides:
        cmd += ["--set", item]
    m = measure(cmd, env=dict(os.environ), cwd=ROOT)
    return m, json.loads((out / "summary.json").read_text()) if m.returncode == 0 else {}


def run_flower(work: Path, k: int, overrides: list[str], nodes: int) -> tuple[Measured, dict]:
    out = work / f"flower-{k}"
    control = free_port()
    env = flower_env(work / f"flwr-home-{k}")  # fresh: flwr launches its own local SuperLink
    env.update(FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()), FLWR_LOCAL_CONTROL_API_PORT=str(control))
    settings = " ".join(overrides)
    cmd = [str(BIN / "celora"), "flower-sim", ".", "--federation-config", f"num-supernodes={nodes}", "--stream"]
    cmd += ["--run-config", f'set="{settings}" out="{out}"']
    try:
        m = measure(cmd, env=env, cwd=ROOT)
    finally:
        stop_local_superlink(control)
    ok = m.returncode == 0 and (out / "summary.json").is_file()
    return m, json.loads((out / "summary.json").read_text()) if ok else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="runs of each engine (alternating)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override (both engines)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the run folders")
    args = ap.parse_args()
    cfg = tomllib.loads((ROOT / "configs" / "flower.toml").read_text())
    nodes = int(next((o.split("=", 1)[1] for o in args.overrides if o.startswith("num_clients=")), cfg["num_clients"]))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-vs-flower-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"configs/flower.toml {' '.join(args.overrides)} · {nodes} clients · {load_note()}")
    rows: dict[str, list[tuple[Measured, dict]]] = {"in-process": [], "flower-sim": []}
    for k in range(args.repeats):
        for engine in ("in-process", "flower-sim"):
            if engine == "in-process":
                m, s = run_inprocess(work, k, args.overrides)
            else:
                m, s = run_flower(work, k, args.overrides, nodes)
            rows[engine].append((m, s))
            acc = f"acc {s['acc_mean']:.4f} global {s['acc_global']:.4f}" if s else f"FAILED (rc {m.returncode})"
            print(f"run {k + 1} {engine:<10} wall {m.wall_s:6.1f} s  peak RSS {m.peak_rss_mb:7.0f} MB  {acc}")
            if not s:
                print(m.output[-3000:])
                return 1
    med = {
        e: (statistics.median(m.wall_s for m, _ in r), statistics.median(m.peak_rss_mb for m, _ in r))
        for e, r in rows.items()
    }
    for engine, (wall, rss) in med.items():
        print(f"median {engine:<10} wall {wall:6.1f} s  peak RSS {rss:7.0f} MB")
    same = all(
        abs(a[1]["acc_mean"] - b[1]["acc_mean"]) < 1e-6
        for a, b in zip(rows["in-process"], rows["flower-sim"], strict=True)
    )
    print(
        f"flower-sim / in-process: wall {med['flower-sim'][0] / med['in-process'][0]:.2f}x, "
        f"peak RSS {med['flower-sim'][1] / med['in-process'][1]:.2f}x; accuracies {'identical' if same else 'DIFFER'}"
    )
    print(f"after: {load_note()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
