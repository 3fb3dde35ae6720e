"""Write example site files for ``data.sites`` from BBC News (offline): one CSV per site, each with its
own label mix (docs/flower.md §4).

    python benchmarks/make_sites.py runs/sites            # 3 sites: runs/sites/site-{a,b,c}.csv
    python benchmarks/make_sites.py runs/sites --per-site 120 --seed 1

Site k draws its documents with topic weights rotated by k (0.55, 0.25, 0.1, 0.05, 0.05), so the sites
differ in label mix as real sites do; no document is in two files. Columns: ``text``, ``label``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from celora.data.sources import load_dataset

WEIGHTS = np.array([0.55, 0.25, 0.1, 0.05, 0.05])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--per-site", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    ds = load_dataset("bbcnews")
    rng = np.random.default_rng(args.seed)
    pools = {c: list(rng.permutation(np.flatnonzero(ds.labels == c))) for c in range(ds.num_classes)}
    args.folder.mkdir(parents=True, exist_ok=True)
    for k in range(args.sites):
        weights = np.roll(WEIGHTS[: ds.num_classes], k)
        counts = np.floor(weights / weights.sum() * args.per_site).astype(int)
        path = args.folder / f"site-{chr(ord('a') + k)}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            out = csv.writer(fh)
            out.writerow(["text", "label"])
            for c, n in enumerate(counts):
                for _ in range(min(int(n), len(pools[c]))):
                    i = pools[c].pop()
                    out.writerow([ds.texts[i], ds.label_names[c]])
        print(
            f"{path}: {int(counts.sum())} rows, " + ", ".join(f"{ds.label_names[c]} {n}" for c, n in enumerate(counts))
        )


if __name__ == "__main__":
    main()
