#!/usr/bin/env bash
# Issue 4/5 table: every method on the small-client regime (configs/bench_small.toml), 3 seeds,
# identical partitions per seed. Usage: benchmarks/small_clients.sh ALPHA [more celora compare options]
# Writes benchmarks/results/small-alpha<ALPHA>/ (compare.csv, compare.md, compare.png, one folder per cell).
set -euo pipefail
cd "$(dirname "$0")/.."
alpha="${1:-0.1}"
shift || true
.venv/bin/celora compare configs/bench_small.toml \
  --methods local,centralized,fedit,ffa,fedsa,fedsb,celora-global,celora --seeds 0,1,2 \
  --set data.alpha="$alpha" --out "benchmarks/results/small-alpha${alpha}" "$@"
