#!/usr/bin/env bash
# Issue 15 item 5: the VLM's projector FedAvg'd (today: trained by the clients, 99 % of every message) against a
# projector pre-aligned once on public images no client holds and frozen (model.projector = "pretrained": only C
# travels). configs/vlm_digits.toml (public set: MNIST-5k) and configs/vlm_textile.toml (public set: the textile
# images outside the run's 400-image sample), method celora, the shipped configs' regime (5 clients, 3 rounds,
# 8 steps of 8 per client-round), eval.every=3 (accuracy measured in the final round only: the same final
# numbers, a third less evaluation). Cells run one at a time, seed by seed, both tasks per seed.
# Usage: benchmarks/vlm_projector.sh; SEEDS="0 1", TASKS="digits textile", METHODS=celora,celora-pretrained
# (add local,local-pretrained for the no-exchange references). Resumable: re-run to finish missing cells.
# CELORA overrides the command (e.g. CELORA="python -m celora.cli" with PYTHONPATH set).
# Writes benchmarks/results/vlm-projector/<task>/<column>/seed_<s>/; table: benchmarks/vlm_projector_table.py.
set -euo pipefail
cd "$(dirname "$0")/.."
celora="${CELORA:-.venv/bin/celora}"
methods="${METHODS:-celora,celora-pretrained}"
variants=()  # compare adds every --variant as a column: pass only the ones asked for
for label in ${methods//,/ }; do
  if [[ "$label" == *-pretrained ]]; then variants+=(--variant "$label=${label%-pretrained};model.projector=pretrained"); fi
done
for seed in ${SEEDS:-0 1}; do
  for task in ${TASKS:-digits textile}; do
    OMP_NUM_THREADS=1 $celora compare "configs/vlm_${task}.toml" --methods "$methods" ${variants[@]+"${variants[@]}"} \
      --seeds "$seed" --set train.threads="${THREADS:-1}" --set eval.every=3 \
      --out "benchmarks/results/vlm-projector/${task}"
  done
done
