#!/usr/bin/env bash
# Issue 5 study: does a shared C carry knowledge, and which configuration should `celora` ship?
# Small-client regime (configs/bench_small.toml), Dirichlet α = ALPHA (default 1.0), 3 seeds, identical partitions.
# Besides the issue-4 columns (benchmarks/small_clients.sh), variants of celora with the head shared (the default):
#   C-at-I+head       the control: C frozen at I (model.train_c = false), so only the head carries anything
#   r16+head          C of rank 16 (r² = 256 numbers per layer); r32+head, r64+head likewise
#   C-at-I-r16+head   the control at rank 16
#   local-r16         the floor at rank 16 (local training, A, B of rank 16)
#   svd+head          LoRA-XS basis: A, B from the SVD of W0 (identical on every client), trained locally, C from 0
#   svd+head-lr1e-2   the same at lr 1e-2 (LoRA-XS trains its r×r matrix at larger learning rates)
#   fedsb-lr1e-2      Fed-SB (A, B frozen in the SVD basis, only C and the head train) at lr 1e-2
#   warmup1+head      one round of FedIT (A, B, head averaged) to align the basis, then celora
#   int8+head         celora with int8 on the wire (per-tensor scale)
# The variants are defined in benchmarks/small_clients.sh, which this runs with a longer column list.
# METHODS (comma-separated) picks the columns, e.g. METHODS=r32+head,r64+head bash benchmarks/basis_study.sh 1.0
# Resumable. Writes benchmarks/results/small-alpha<ALPHA>/.
set -euo pipefail
alpha="${1:-1.0}"
shift || true
export METHODS="${METHODS:-local,centralized,fedit,ffa,fedsa,fedsb,celora-global,celora,celora-C-only,C-at-I+head,r16+head,C-at-I-r16+head,local-r16,r32+head,r64+head,svd+head,warmup1+head,int8+head,fedsb-lr1e-2,ffa-lr1e-2,svd+head-lr1e-2}"
exec bash "$(dirname "$0")/small_clients.sh" "$alpha" "$@"
