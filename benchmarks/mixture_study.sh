#!/usr/bin/env bash
# Issue 23: clients with different tasks. Every method on a task mixture config (default configs/mixture_encoder.toml:
# MiniLM, 4 classification components × 3 clients), identical partitions per seed; per-component results and the
# same-component share of the learned weights are in each cell's summary.json (benchmarks/mixture_table.py prints
# the table). Usage: benchmarks/mixture_study.sh [CONFIG] [SEEDS]; METHODS=a,b,... picks the columns.
# Resumable: re-run to finish missing cells (a cell is complete when <method>/seed_<s>/cell.json exists).
# Writes benchmarks/results/mixture-<config stem>/.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:-configs/mixture_encoder.toml}"
seeds="${2:-0,1,2}"
methods="${METHODS:-local,centralized,fedit,ffa,fedsa,celora-global,celora,celora-c-only,celora-grad}"
out="benchmarks/results/mixture-$(basename "$config" .toml)"
# celora-c-only: only C travels (the head stays local); celora-grad: issue 15's best frozen basis (gradient, r = 32,
# lr 5e-3, C only; 32 gradient rows: the mixture holds 36 global test rows), personalized; celora-resp: data summaries
# of the prompt and the response tokens (data.summary_features = input+response, generate task only)
declare -A variant=(
  [celora-resp]="celora;data.summary_features=input+response"
  [celora-c-only]="celora;aggregation.head=local"
  [celora-grad]="celora;aggregation.head=local;model.basis=gradient;model.rank=32;model.gradient_samples=32;train.lr=5e-3"
)
variant_args=()
for label in ${methods//,/ }; do
  if [[ -n "${variant[$label]:-}" ]]; then variant_args+=(--variant "$label=${variant[$label]}"); fi
done
HF_HUB_OFFLINE=1 .venv/bin/celora compare "$config" --methods "$methods" --seeds "$seeds" --out "$out" \
  ${variant_args[@]+"${variant_args[@]}"}
.venv/bin/python benchmarks/mixture_table.py "$out"
