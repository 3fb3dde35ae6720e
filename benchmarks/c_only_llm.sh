#!/usr/bin/env bash
# Issue 15, item 4: the C-only question on a decoder LLM with no head (SmolLM2-135M, BBC News topics as label
# words, prompts ≤ 64 tokens). Regime: configs/bench_c_only_llm.toml (3 clients × 16 training articles, Dirichlet
# α = 1.0, 4 rounds × 3 local epochs at batch 2 = 96 optimizer steps per client; zero-shot = the un-adapted model
# before round 1, in every cell's summary). Columns (LABEL=METHOD;overrides):
#   local, centralized      floor and ceiling (LoRA r = 8: A, B train; lr 2e-3)
#   fedit                   FedIT r = 8 (A, B averaged; C frozen at I)
#   grad-r32-lr5e-3         the best C-only configuration of the MiniLM study: celora-global, gradient basis
#                           (LoRA-SB: SVD of one sign step estimated on 64 public proxy rows no client holds),
#                           A, B frozen and shared, r = 32, lr 5e-3; only C (32×32 per layer) travels
#   local-grad-r32-lr5e-3   its control: C trained locally in the same frozen basis, no exchange
# Usage: METHODS=local,centralized SEEDS=0 bash benchmarks/c_only_llm.sh [celora compare options]
# Resumable (finished cells are skipped; a cell cut off mid-run resumes from its checkpoint). One torch thread
# (THREADS=1). Writes benchmarks/results/c-only-llm/. Table: .venv/bin/python benchmarks/c_only_plot.py
# benchmarks/results/c-only-llm
set -euo pipefail
cd "$(dirname "$0")/.."
declare -A variant=(
  [grad-r32-lr5e-3]="celora-global;model.basis=gradient;model.rank=32;train.lr=5e-3"
  [local-grad-r32-lr5e-3]="local;model.basis=gradient;model.rank=32;train.lr=5e-3"
)
methods="${METHODS:-local,centralized,fedit,grad-r32-lr5e-3}"
variant_args=()
for label in ${methods//,/ }; do
  if [[ -n "${variant[$label]:-}" ]]; then variant_args+=(--variant "$label=${variant[$label]}"); fi
done
"${CELORA:-.venv/bin/celora}" compare configs/bench_c_only_llm.toml --methods "$methods" "${variant_args[@]}" \
  --seeds "${SEEDS:-0}" --set train.threads="${THREADS:-1}" --out benchmarks/results/c-only-llm "$@"
