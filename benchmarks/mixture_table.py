"""Issue 23's table from a mixture comparison folder: per method (mean ± std over seeds) the primary metric overall
and per component (after aggregation), the paired difference to `local`, the same-component share of the learned
weights against FedAvg's, and bytes per client-round; then celora's paired differences per seed to `local` and
`fedit` with its fraction of fedit's bytes (the equal-bytes view is `celora compare`'s compare.png
in the same folder).

    python benchmarks/mixture_table.py benchmarks/results/mixture-mixture_encoder
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def pm(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if v.size == 0:
        return "–"
    return f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.3f}"


def main(folder: str) -> int:
    cells: dict[str, dict[int, dict]] = {}
    for f in sorted(Path(folder).glob("*/seed_*/summary.json")):
        cells.setdefault(f.parent.parent.name, {})[int(f.parent.name.removeprefix("seed_"))] = json.loads(f.read_text())
    if not cells:
        print(f"{folder}: no finished cells")
        return 1
    first = next(iter(next(iter(cells.values())).values()))
    p = first["primary_metric"]["name"]
    comps = list(first["components"])
    ref = cells.get("local", {})
    head = ["method", "seeds", f"{p} (after agg.)", "Δ vs local", *comps, "same-comp. share / FedAvg", "B/client-round"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for method, by_seed in cells.items():
        seeds = sorted(by_seed)
        score = [by_seed[s][f"{p}_mean_agg"] for s in seeds]
        delta = [by_seed[s][f"{p}_mean_agg"] - ref[s][f"{p}_mean_agg"] for s in seeds if s in ref]
        per = [pm([by_seed[s]["components"][c][f"{p}_mean_agg"] for s in seeds]) for c in comps]
        share = [by_seed[s].get("final_same_component_share") for s in seeds]
        fedavg = [by_seed[s].get("final_fedavg_same_component_share") for s in seeds]
        shares = f"{pm(share)} / {pm(fedavg)}" if any(x is not None for x in share) else "–"
        up = np.mean([by_seed[s]["bytes_per_client_round"]["up"] for s in seeds])
        row = [method, str(len(seeds)), pm(score), pm(delta) if method != "local" else "–", *per, shares, f"{up:,.0f}"]
        print("| " + " | ".join(row) + " |")
    paired(cells, p)
    return 0


def paired(cells: dict[str, dict[int, dict]], p: str, method: str = "celora") -> None:
    """celora − local and celora − fedit per seed (paired: identical partitions), and the bytes ratio to fedit."""
    mine = cells.get(method, {})
    for other in ("local", "fedit"):
        ref = cells.get(other, {})
        seeds = sorted(set(mine) & set(ref))
        if not seeds:
            continue
        d = [mine[s][f"{p}_mean_agg"] - ref[s][f"{p}_mean_agg"] for s in seeds]
        per = ", ".join(f"seed {s}: {x:+.3f}" for s, x in zip(seeds, d, strict=True))
        print(f"{method} − {other}: {per}; mean {pm(d)}")
    if "fedit" in cells and mine:
        total = [sum(c["bytes_per_client_round"].values()) for c in mine.values()]
        fedit = [sum(c["bytes_per_client_round"].values()) for c in cells["fedit"].values()]
        print(f"{method}'s bytes per client-round: {np.mean(total) / np.mean(fedit):.3f} of fedit's")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/mixture-mixture_encoder"))
