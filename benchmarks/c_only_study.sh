#!/usr/bin/env bash
# Issue 15: does the r×r exchange carry knowledge once A, B are frozen and shared?
# Regime (configs/bench_c_only.toml): MiniLM, BBC News, 5 clients × 20 training documents, Dirichlet α = ALPHA
# (default 1.0), 10 rounds × 6 local epochs at batch 4 = 300 optimizer steps per client, identical partitions per
# seed. Every C-only column keeps the head LOCAL, so only C can carry knowledge between clients.
# Columns (LABEL=METHOD;overrides), lr = train.lr of the adapter factors (the head stays at head_lr 1e-2):
#   local, centralized            floor and ceiling (A, B, C, head train; rank 8, lr 2e-3)
#   fedit                         FedIT r = 8 (A, B and head averaged; C frozen at I)
#   ffa-lr1e-2                    FFA-LoRA r = 8 at lr 1e-2 (A frozen, B and head averaged)
#   orth-r32-lr<L>                celora-global, orthogonal basis (A, B frozen, shared), h = 1, r = 32, C-only
#   orth4-r32-lr<L>               the same with 4 heads (block-diagonal C, a trainable scale per head)
#   grad-r32-lr<L>                celora-global, gradient basis (LoRA-SB: SVD of one sign step on 64 public rows)
#   svd-r32-lr<L>                 fedsb (SVD-of-W0 basis, A, B frozen), r = 32
#   local-orth-r32-lr<L>          the control: local training of C alone in the same frozen basis (no exchange)
#   ...-r64 / -r128 / celora-...  the best C-only configuration at larger rank, and personalized (celora)
#   orth-head-... / grad-head-...  the same with the head shared (averaged) as well
# with <L> one of 5e-4, 1e-3, 5e-3, 1e-2 (chosen on seed 0).
# Usage: METHODS=local,orth-r32-lr5e-3 SEEDS=0 bash benchmarks/c_only_study.sh [ALPHA] [celora compare options]
# Resumable (finished cells are skipped). One torch thread (THREADS=1). Writes benchmarks/results/c-only-alpha<ALPHA>/.
# Table and plots: .venv/bin/python benchmarks/c_only_plot.py benchmarks/results/c-only-alpha1.0
set -euo pipefail
cd "$(dirname "$0")/.."
alpha="${1:-1.0}"
shift || true
declare -A variant=(
  [ffa-lr1e-2]="ffa;train.lr=1e-2"
)
c_only="aggregation.head=local"
for lr in 5e-4 1e-3 5e-3 1e-2; do
  for r in 32 64 128; do
    sfx="r${r}-lr${lr}"
    variant[orth-$sfx]="celora-global;$c_only;model.basis=orthogonal;model.rank=$r;train.lr=$lr"
    variant[orth4-$sfx]="celora-global;$c_only;model.basis=orthogonal;model.heads=4;model.rank=$r;train.lr=$lr"
    variant[grad-$sfx]="celora-global;$c_only;model.basis=gradient;model.rank=$r;train.lr=$lr"
    variant[svd-$sfx]="fedsb;model.rank=$r;train.lr=$lr"
    variant[local-orth-$sfx]="local;model.basis=orthogonal;model.rank=$r;train.lr=$lr"
    variant[local-orth4-$sfx]="local;model.basis=orthogonal;model.heads=4;model.rank=$r;train.lr=$lr"
    variant[local-grad-$sfx]="local;model.basis=gradient;model.rank=$r;train.lr=$lr"
    variant[celora-orth-$sfx]="celora;$c_only;model.basis=orthogonal;model.rank=$r;train.lr=$lr"
    variant[celora-orth4-$sfx]="celora;$c_only;model.basis=orthogonal;model.heads=4;model.rank=$r;train.lr=$lr"
    variant[celora-grad-$sfx]="celora;$c_only;model.basis=gradient;model.rank=$r;train.lr=$lr"
    variant[grad-head-$sfx]="celora-global;aggregation.head=shared;model.basis=gradient;model.rank=$r;train.lr=$lr"
    variant[orth-head-$sfx]="celora-global;aggregation.head=shared;model.basis=orthogonal;model.rank=$r;train.lr=$lr"
  done
done
methods="${METHODS:-local,centralized,fedit,ffa-lr1e-2}"
variant_args=()
for label in ${methods//,/ }; do
  if [[ -n "${variant[$label]:-}" ]]; then variant_args+=(--variant "$label=${variant[$label]}"); fi
done
"${CELORA:-.venv/bin/celora}" compare configs/bench_c_only.toml --methods "$methods" "${variant_args[@]}" \
  --seeds "${SEEDS:-0,1,2}" --set data.alpha="$alpha" --set train.threads="${THREADS:-1}" \
  --out "benchmarks/results/c-only-alpha${alpha}" "$@"
