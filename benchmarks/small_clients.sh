#!/usr/bin/env bash
# Issue 4 table: every method on the small-client regime (configs/bench_small.toml: MiniLM, BBC News,
# 10 clients × 30 training documents, 5 rounds), Dirichlet α = ALPHA, 3 seeds, identical partitions per seed.
# Columns: local and centralized (floor and ceiling), fedit, ffa, fedsa, fedsb, celora-global, celora (the shipped
# default: C and the head shared, personalized), celora-C-only (celora with the head local: only C travels) and
# ffa-lr1e-2 (FFA-LoRA at lr 1e-2: every other column uses the config's lr 2e-3, at which FFA learns little).
# Usage: benchmarks/small_clients.sh ALPHA [more celora compare options]; METHODS=a,b,... picks columns, plain
# methods or the variant labels below (benchmarks/basis_study.sh explains the issue-5 ones).
# Resumable: re-run to finish missing cells.
# One torch thread per process (THREADS=2 on an otherwise idle 2-core machine). Writes benchmarks/results/small-alpha<ALPHA>/.
set -euo pipefail
cd "$(dirname "$0")/.."
alpha="${1:-0.1}"
shift || true
declare -A variant=(
  [celora-C-only]="celora;aggregation.head=local"
  [ffa-lr1e-2]="ffa;train.lr=1e-2"
  [C-at-I+head]="celora;aggregation.head=shared;model.train_c=false"
  [r16+head]="celora;model.rank=16;aggregation.head=shared"
  [local-r16]="local;model.rank=16"
  [C-at-I-r16+head]="celora;model.rank=16;aggregation.head=shared;model.train_c=false"
  [r32+head]="celora;model.rank=32;aggregation.head=shared"
  [r64+head]="celora;model.rank=64;aggregation.head=shared"
  [svd+head]="celora;model.basis=svd;aggregation.head=shared"
  [warmup1+head]="celora;aggregation.warmup_rounds=1;aggregation.head=shared"
  [int8+head]="celora;payload.dtype=int8;aggregation.head=shared"
  [fedsb-lr1e-2]="fedsb;train.lr=1e-2"
  [svd+head-lr1e-2]="celora;model.basis=svd;aggregation.head=shared;train.lr=1e-2"
)
methods="${METHODS:-local,centralized,fedit,ffa,ffa-lr1e-2,fedsa,fedsb,celora-global,celora,celora-C-only}"
variant_args=()
for label in ${methods//,/ }; do
  if [[ -n "${variant[$label]:-}" ]]; then variant_args+=(--variant "$label=${variant[$label]}"); fi
done
.venv/bin/celora compare configs/bench_small.toml --methods "$methods" "${variant_args[@]}" \
  --seeds "${SEEDS:-0,1,2}" --set data.alpha="$alpha" --set train.threads="${THREADS:-1}" \
  --out "benchmarks/results/small-alpha${alpha}" "$@"
