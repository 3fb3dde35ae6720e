#!/usr/bin/env bash
# Issue 5 study: does a shared C carry knowledge? Small-client regime (configs/bench_small.toml:
# 10 clients × 30 training documents, MiniLM, BBC News), Dirichlet α = ALPHA (default 1.0), 3 seeds,
# identical partitions per seed. Columns: the floor and ceiling (local, centralized), FedIT, Fed-SB,
# celora as shipped, celora-global, and variants:
#   celora+head  — celora with the classifier head shared too (personalized like C)
#   C-at-I+head     — the control: same as celora+head but C frozen at I (only the head carries anything)
# Resumable: re-run the same command to finish missing cells. Writes benchmarks/results/small-alpha<ALPHA>/.
# Runs with one torch thread per process (THREADS=2 on an otherwise idle 2-core machine: ~3.5 min a cell).
# METHODS=a,b,... restricts the columns (the two variants are always added).
set -euo pipefail
cd "$(dirname "$0")/.."
alpha="${1:-1.0}"
shift || true
.venv/bin/celora compare configs/bench_small.toml \
  --methods "${METHODS:-local,celora+head,C-at-I+head,fedit,centralized,celora,fedsb,celora-global}" \
  --variant "celora+head=celora;aggregation.head=shared" \
  --variant "C-at-I+head=celora;aggregation.head=shared;model.train_c=false" \
  --seeds 0,1,2 --set data.alpha="$alpha" --set train.threads="${THREADS:-1}" \
  --out "benchmarks/results/small-alpha${alpha}" "$@"
