"""Server-side cost of personalised aggregation at scale (synthetic inputs, fixed seed).

1. one-time data distance (hierarchical OT over class GMM summaries) with the fast path, and the exact-vs-fast
   relative error on a subset;
2. per-round work: parameter similarity + learned weights + every client's personalised C̄_i.

Usage: .venv/bin/python benchmarks/bench_server_scale.py [--clients 1000]
Writes benchmarks/results/server_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import ot

from celora.fl.similarity import ClassSummary, ClientSummary, data_distance_matrix, data_similarity, param_similarity
from celora.fl.weights import combine, effective_collaborators, learned_weights


def synthetic_summaries(
    n_clients: int, n_classes: int, n_components: int, dim: int, seed: int
) -> tuple[list[ClientSummary], np.ndarray]:
    """Non-IID clients: Dirichlet(0.5) class proportions, shared class centres plus client-specific shifts."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=1.0 / np.sqrt(dim), size=(n_classes, n_components, dim)) * 10.0
    sizes = rng.integers(100, 1000, size=n_clients)
    summaries: list[ClientSummary] = []
    for i in range(n_clients):
        counts = 1 + rng.multinomial(int(sizes[i]) - n_classes, rng.dirichlet(np.full(n_classes, 0.5)))
        shift = rng.normal(scale=0.2 / np.sqrt(dim), size=dim)
        summaries.append(
            {
                c: ClassSummary(
                    weights=rng.dirichlet(np.full(n_components, 2.0)),
                    means=centres[c] + shift + rng.normal(scale=0.3 / np.sqrt(dim), size=(n_components, dim)),
                    variances=rng.uniform(0.5, 1.5, size=(n_components, dim)) / dim,
                    n=int(counts[c]),
                )
                for c in range(n_classes)
            }
        )
    return summaries, sizes.astype(np.float64)


def per_round(
    p: np.ndarray, s_data: np.ndarray, sent: np.ndarray, new: np.ndarray, beta: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """One round of server work: u_j = vec(C_j - C̄_j^sent), S^param, learned weights, C̄_i = sum_j w_ij C_j."""
    updates = (new - sent).reshape(new.shape[0], -1)
    s_param = param_similarity(updates)
    w = learned_weights(p, s_data, s_param, beta=beta, lam=lam)
    return w, combine(w, new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--components", type=int, default=3)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--subset", type=int, default=30, help="clients in the exact-vs-fast comparison")
    ap.add_argument("--repeats", type=int, default=5, help="repeats of the per-round timing (median reported)")
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "server_scale.json")
    args = ap.parse_args()

    n = args.clients
    summaries, sizes = synthetic_summaries(n, args.classes, args.components, args.dim, args.seed)

    # --- one-time data distance: exact vs fast on a subset, then the fast path on everyone
    sub = summaries[: min(args.subset, n)]
    t0 = time.perf_counter()
    d_exact = data_distance_matrix(sub, method="exact")
    t_exact_sub = time.perf_counter() - t0
    t0 = time.perf_counter()
    d_fast_sub = data_distance_matrix(sub, method="fast")
    t_fast_sub = time.perf_counter() - t0
    off = ~np.eye(len(sub), dtype=bool)
    rel_err = float(np.max(np.abs(d_fast_sub - d_exact)[off] / d_exact[off])) if off.any() else 0.0

    t0 = time.perf_counter()
    dist = data_distance_matrix(summaries, method="fast")
    t_distance = time.perf_counter() - t0
    s_data = data_similarity(dist)

    # --- per-round server work
    rng = np.random.default_rng(args.seed + 1)
    shape = (n, args.layers, args.rank, args.rank)
    sent = rng.normal(size=shape).astype(np.float32)
    new = sent + 0.01 * rng.normal(size=shape).astype(np.float32)
    p = sizes / sizes.sum()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        w, agg = per_round(p, s_data, sent, new, args.beta, args.lam)
        times.append(time.perf_counter() - t0)
    t_round = statistics.median(times)
    n_eff = effective_collaborators(w)

    results = {
        "clients": n,
        "classes": args.classes,
        "components": args.components,
        "feature_dim": args.dim,
        "layers": args.layers,
        "rank": args.rank,
        "seed": args.seed,
        "per_round_s": t_round,
        "per_round_target_s": 1.0,
        "data_distance_fast_s": t_distance,
        "data_distance_target_s": 60.0,
        "subset_clients": len(sub),
        "subset_exact_s": t_exact_sub,
        "subset_fast_s": t_fast_sub,
        "subset_max_rel_err_fast_vs_exact": rel_err,
        "mean_effective_collaborators": float(n_eff.mean()),
        "aggregate_shape": list(agg.shape),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "numpy": np.__version__,
        "pot": ot.__version__,
    }

    rows = [
        (f"per-round server work ({n} clients, {args.layers}x{args.rank}x{args.rank} C)", f"{t_round:.3f} s", "< 1 s"),
        (
            f"data distance, fast ({n} clients, {args.classes} cls, {args.components} comp, {args.dim}-d)",
            f"{t_distance:.2f} s",
            "< 60 s",
        ),
        (f"data distance, exact ({len(sub)} clients)", f"{t_exact_sub:.2f} s", ""),
        (f"data distance, fast ({len(sub)} clients)", f"{t_fast_sub:.3f} s", ""),
        ("max rel. error fast vs exact (subset)", f"{rel_err:.2e}", ""),
        ("mean effective collaborators (1/sum w^2)", f"{n_eff.mean():.2f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
