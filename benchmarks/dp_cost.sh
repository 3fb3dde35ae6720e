#!/usr/bin/env bash
# Accuracy cost of DP on the shared update (issue 16): the small-client benchmark (configs/bench_small.toml at
# Dirichlet α = 1.0, celora default: C + head shared), seed 0, with privacy.update_clip = CLIP and a target ε over
# the 5 rounds (RDP accountant, δ = 1e-5). Compare with benchmarks/results/small-alpha1.0/celora/seed_0 (no DP).
# Usage: benchmarks/dp_cost.sh [EPS ...]   (default: 3 8). Resumable: a finished cell is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
clip="${CLIP:-1.0}"
out=benchmarks/results/dp-small-alpha1.0
epsilons=("$@")
[ ${#epsilons[@]} -eq 0 ] && epsilons=(3 8)
for eps in "${epsilons[@]}"; do
  cell="$out/eps$eps"
  [ -f "$cell/summary.json" ] && continue
  celora run configs/bench_small.toml --set data.alpha=1.0 --set train.threads=1 \
    --set privacy.update_clip="$clip" --set privacy.update_epsilon="$eps" --no-export --out "$cell"
done
python - "$out" <<'PY'
import json, pathlib, sys
base = json.loads(pathlib.Path("benchmarks/results/small-alpha1.0/celora/seed_0/summary.json").read_text())
print("| ε (update, 5 rounds) | noise z | clip | acc (local step) | acc after agg. |")
print("|---|---|---|---|---|")
print(f"| no DP | – | – | {base['acc_mean']:.3f} | {base['acc_mean_agg']:.3f} |")
for f in sorted(pathlib.Path(sys.argv[1]).glob("eps*/summary.json")):
    s = json.loads(f.read_text()); u = s["privacy"]["update"]
    print(f"| {u['epsilon']:.2f} | {u['update_noise']:.3f} | {u['update_clip']} | {s['acc_mean']:.3f} | {s['acc_mean_agg']:.3f} |")
PY
