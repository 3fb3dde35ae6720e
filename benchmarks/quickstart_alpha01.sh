#!/usr/bin/env bash
# Issue 3 table: celora, celora-global, fedit, local on the quickstart config with Dirichlet α = 0.1,
# 3 seeds, identical partitions per seed. Prints the table; writes benchmarks/results/quickstart-alpha01/.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/celora compare configs/quickstart.toml --methods celora,celora-global,fedit,local --seeds 0,1,2 \
  --set data.alpha=0.1 --out benchmarks/results/quickstart-alpha01 "$@"
