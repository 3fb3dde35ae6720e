#!/usr/bin/env bash
# Issue 5: the similarity strength λ of celora's learned weights w_i = Proj_simplex(p + λ s_i), head shared
# (the default), seed 0, on the small-client regime at Dirichlet α = ALPHA (default 1.0). λ = 1 (the default)
# is the `celora` cell of benchmarks/results/small-alpha<ALPHA>/. Writes benchmarks/results/lambda-alpha<ALPHA>/.
set -euo pipefail
cd "$(dirname "$0")/.."
alpha="${1:-1.0}"
shift || true
.venv/bin/celora compare configs/bench_small.toml --methods hs-lam0.5,hs-lam2,hs-lam4 \
  --variant "hs-lam0.5=celora;aggregation.head=shared;aggregation.lam=0.5" \
  --variant "hs-lam2=celora;aggregation.head=shared;aggregation.lam=2" \
  --variant "hs-lam4=celora;aggregation.head=shared;aggregation.lam=4" \
  --seeds "${SEEDS:-0}" --set data.alpha="$alpha" --set train.threads="${THREADS:-1}" \
  --out "benchmarks/results/lambda-alpha${alpha}" "$@"
