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
methods="${METHODS:-local,centralized,fedit,ffa,fedsa,celora-global,celora}"
out="benchmarks/results/mixture-$(basename "$config" .toml)"
HF_HUB_OFFLINE=1 .venv/bin/celora compare "$config" --methods "$methods" --seeds "$seeds" --out "$out"
.venv/bin/python benchmarks/mixture_table.py "$out"
