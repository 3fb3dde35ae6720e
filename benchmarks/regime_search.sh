#!/usr/bin/env bash
# Issue 5 regime search (seed 0, configs/bench_small.toml at Dirichlet α = 0.1): which adapter
# basis / head policy / learning rate lets a shared C carry knowledge. One `celora run` per setting;
# results in benchmarks/results/regime-search-alpha0.1/<name>/ (skips finished runs).
# celora ran with the head local (C only), its default then; rand8-hs shares the head (the default now).
# Print the table: .venv/bin/python benchmarks/summarize_runs.py benchmarks/results/regime-search-alpha0.1/*
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/regime-search-alpha0.1
run() {
  name=$1; shift
  [ -f "$out/$name/summary.json" ] && return 0
  .venv/bin/celora run configs/bench_small.toml --no-export --out "$out/$name" "$@"
}
run local-lr5e-3 --set method=local --set train.lr=5e-3
run svd-frozen-r16 --set aggregation.head=local --set model.basis=svd --set model.train_ab=false --set model.rank=16
run svdF16-lr1e-2 --set aggregation.head=local --set model.basis=svd --set model.train_ab=false --set model.rank=16 --set train.lr=1e-2
run svdF16-lr3e-2 --set aggregation.head=local --set model.basis=svd --set model.train_ab=false --set model.rank=16 --set train.lr=3e-2
run svd-ab-r16 --set aggregation.head=local --set model.basis=svd --set model.rank=16
run svdAB16-lr1e-2 --set aggregation.head=local --set model.basis=svd --set model.rank=16 --set train.lr=1e-2
run rand8-hs --set aggregation.head=shared
