#!/usr/bin/env bash
# Issue 3 table: celora and celora-global with C only (head local, as they shipped then), fedit, local on the
# quickstart config with Dirichlet α = 0.1, 3 seeds, identical partitions per seed.
# Prints the table; writes benchmarks/results/quickstart-alpha01/ (resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/celora compare configs/quickstart.toml --methods celora-C-only,celora-global-C-only,fedit,local --seeds 0,1,2 \
  --variant "celora-C-only=celora;aggregation.head=local" \
  --variant "celora-global-C-only=celora-global;aggregation.head=local" \
  --set data.alpha=0.1 --out benchmarks/results/quickstart-alpha01 "$@"
