"""Methods × seeds on identical partitions: one run folder per cell, resumable, one table.

Every (method, seed) cell of a comparison uses the same data split for that seed (the partition
depends only on the data config and the seed). A cell is finished when ``<method>/seed_<s>/cell.json``
exists; re-running a comparison skips finished cells.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from celora.config import ExperimentConfig, apply_overrides, build_config, dump_config
from celora.errors import CeloraError
from celora.eval import MetricSpec
from celora.fl.run_folder import load_checkpoint
from celora.fl.simulation import Observer, Prepared, Simulation, check_names, prepare
from celora.fl.sites import SitesPrepared
from celora.tables import frame_csv, frame_markdown

SCORE_SUFFIXES = ("mean", "weighted", "worst10", "mean_agg", "global")  # of the task's primary metric
COST_KEYS = ("bytes_up_per_client_round", "bytes_down_per_client_round", "bytes_total", "wall_s", "update_epsilon")
EXTRA_KEYS = ("exact_match_mean", "nll_mean", "ppl_mean")  # written when the task reports them


def cell_keys(primary: str = "acc") -> tuple[str, ...]:
    """compare.csv's columns for a task whose primary metric is ``primary`` (accuracy: acc_mean, …)."""
    return ("method", "seed", *(f"{primary}_{s}" for s in SCORE_SUFFIXES), *COST_KEYS)


def primary_of(rows: Sequence[Mapping[str, Any]]) -> str:
    """The primary metric of a comparison's cells (all cells of one comparison share the task)."""
    return MetricSpec.of(rows[0]).primary if rows else "acc"


def parse_list(text: str, what: str) -> list[str]:
    """'a,b , c' → ['a', 'b', 'c'] (CeloraError naming ``what`` if empty)."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise CeloraError(f"{what}: give at least one value (comma-separated)")
    return items


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' → [0, 1, 2]."""
    try:
        return [int(x) for x in parse_list(text, "--seeds")]
    except ValueError:
        raise CeloraError(f"--seeds: expected integers like 0,1,2, got {text!r}") from None


@dataclass(frozen=True)
class Variant:
    """A named column of a comparison: a method plus config overrides (e.g. another adapter basis)."""

    label: str
    method: str
    overrides: tuple[str, ...] = ()


_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def parse_variant(text: str) -> Variant:
    """'LABEL=METHOD;key=value;key=value' → Variant (CeloraError naming --variant if malformed)."""
    head, *overrides = [x.strip() for x in text.split(";") if x.strip()] or [""]
    label, sep, method = (x.strip() for x in head.partition("="))
    if not sep or not _LABEL.match(label) or not method:
        raise CeloraError(f"--variant {text!r}: expected LABEL=METHOD;key=value;... (e.g. svd16=celora;model.rank=16)")
    return Variant(label, method, tuple(overrides))


def parse_variants(texts: Sequence[str]) -> dict[str, Variant]:
    """Every --variant, keyed by label (CeloraError on a repeated label)."""
    out: dict[str, Variant] = {}
    for v in map(parse_variant, texts):
        if v.label in out:
            raise CeloraError(f"--variant: label {v.label!r} given twice")
        out[v.label] = v
    return out


def cell_config(base: ExperimentConfig, method: str, seed: int, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The base config with this cell's method, seed and overrides (validated)."""
    data = base.model_dump()
    data.update(method=method, seed=seed)
    return check_names(build_config(apply_overrides(data, list(overrides))))


def _update_epsilon(summary: dict[str, Any]) -> float:
    """ε of the shared update over the run (NaN: no update DP, or clipping without noise)."""
    eps = summary.get("privacy", {}).get("update", {}).get("epsilon")
    return float("nan") if eps is None else float(eps)


def _cell_row(summary: dict[str, Any], seed: int) -> dict[str, Any]:
    per = summary["bytes_per_client_round"]
    spec = MetricSpec.of(summary)
    p = spec.primary
    return {
        "method": summary["method"],
        "seed": seed,
        **{f"{p}_{s}": summary[f"{p}_{s}"] for s in SCORE_SUFFIXES},
        **({"primary_metric": spec.as_dict()} if p != "acc" else {}),
        "bytes_up_per_client_round": per["up"],
        "bytes_down_per_client_round": per["down"],
        "bytes_total": summary["bytes_up_total"] + summary["bytes_down_total"],
        "wall_s": summary["wall_s"],
        "update_epsilon": _update_epsilon(summary),
        **({f"{p}_zero_shot": summary["zero_shot"][f"{p}_mean"]} if "zero_shot" in summary else {}),
        **{k: summary[k] for k in EXTRA_KEYS if k in summary},
    }


def resumable(cell_dir: Path, cfg: ExperimentConfig) -> bool:
    """Does ``cell_dir`` hold an unfinished run of exactly ``cfg`` with a complete checkpoint?"""
    written = cell_dir / "config.toml"
    if not written.is_file() or written.read_text(encoding="utf-8") != dump_config(check_names(cfg)):
        return False
    return load_checkpoint(cell_dir) is not None


def run_comparison(
    base: ExperimentConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    *,
    observer_for: Callable[[str, int], Observer | None] | None = None,
    on_skip: Callable[[str, int], None] | None = None,
    variants: Mapping[str, Variant] | None = None,
) -> list[dict[str, Any]]:
    """Run every missing (method, seed) cell; return one row per cell (finished ones read back; one cut off
    mid-run resumes from its checkpoint).

    ``methods`` are column labels: a registered method, or the label of one of ``variants``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    known = dict(variants or {})
    cols = [known.get(m, Variant(m, m)) for m in methods]
    cells = [(v.label, s, cell_config(base, v.method, s, v.overrides)) for s in seeds for v in cols]  # validate all
    prepared: dict[str, Prepared | SitesPrepared] = {}
    rows: list[dict[str, Any]] = []
    for method, seed, cfg in cells:
        cell_dir = out / method / f"seed_{seed}"
        done = cell_dir / "cell.json"
        if done.is_file():
            rows.append(json.loads(done.read_text(encoding="utf-8")))
            if on_skip:
                on_skip(method, seed)
            continue
        key = json.dumps([seed, cfg.model.model_dump(), cfg.data.model_dump()], sort_keys=True)
        if key not in prepared:
            prepared.clear()  # one prepared model at a time keeps memory flat
            prepared[key] = prepare(cfg)
        obs = observer_for(method, seed) if observer_for else None
        resume = resumable(cell_dir, cfg)  # a cell interrupted mid-run continues from its checkpoint
        sim = Simulation(cfg, cell_dir, observer=obs, prepared=prepared[key], export_adapters=False, resume=resume)
        result = sim.run()
        row = _cell_row(result.summary, seed) | {"method": method}
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(row, indent=2), encoding="utf-8")
        tmp.replace(done)
        rows.append(row)
    write_outputs(rows, out, methods)
    return rows


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


REFERENCE = "local"  # the floor every method is compared with, seed by seed


def _paired_delta(rows: Sequence[dict[str, Any]], method: str, key: str) -> tuple[float, float]:
    """Mean ± sample std over seeds of d_s = x_s(method) − x_s(local) (NaN when local or the method is missing)."""
    ref = {r["seed"]: r[key] for r in rows if r["method"] == REFERENCE}
    return _mean_std([r[key] - ref[r["seed"]] for r in rows if r["method"] == method and r["seed"] in ref])


def aggregate_rows(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[dict[str, Any]]:
    """Per method: mean and sample std over seeds of every metric, and the paired difference to ``local``
    (``delta_local`` after local training, ``delta_local_agg`` after aggregation) when it ran too."""
    out = []
    p = primary_of(rows)
    for m in methods:
        cell = [r for r in rows if r["method"] == m]
        if not cell:
            continue
        agg: dict[str, Any] = {"method": m, "seeds": len(cell), "primary": p}
        for k in cell_keys(p)[2:]:
            agg[k], agg[k + "_std"] = _mean_std([r.get(k, float("nan")) for r in cell])
        nan = (float("nan"), float("nan"))
        agg["delta_local"], agg["delta_local_std"] = _paired_delta(rows, m, f"{p}_mean") if m != REFERENCE else nan
        agg["delta_local_agg"], agg["delta_local_agg_std"] = (
            _paired_delta(rows, m, f"{p}_mean_agg") if m != REFERENCE else nan
        )
        out.append(agg)
    return out


def table_columns(primary: str = "acc") -> tuple[str, ...]:
    """The comparison table's header for a task whose primary metric is ``primary``."""
    return (
        "method",
        "seeds",
        f"{primary} mean",
        "worst-10 %",
        f"{primary} after agg.",
        "Δ vs local (local step / after agg.)",
        f"global {primary}",
        "up B/client-round",
        "down B/client-round",
        "total MB",
        "wall s",
        "update ε",
    )


def _pm(mean: float, std: float, sign: str = "") -> str:
    """'m ± s' to 3 decimals ('–' for NaN); a mean that rounds to zero prints without a minus sign."""
    if math.isnan(mean):
        return "–"
    return f"{0.0 if abs(mean) < 5e-4 else mean:{sign}.3f} ± {std:.3f}"


def table_cells(a: dict[str, Any]) -> list[str]:
    """One aggregated method as the text cells of ``table_columns`` (shared by compare.md and the CLI)."""
    p = a.get("primary", "acc")
    delta = "–"
    if not math.isnan(a["delta_local"]):
        step = _pm(a["delta_local"], a["delta_local_std"], "+")
        delta = f"{step} / {_pm(a['delta_local_agg'], a['delta_local_agg_std'], '+')}"
    return [
        a["method"],
        str(a["seeds"]),
        _pm(a[f"{p}_mean"], a[f"{p}_mean_std"]),
        _pm(a[f"{p}_worst10"], a[f"{p}_worst10_std"]),
        _pm(a[f"{p}_mean_agg"], a[f"{p}_mean_agg_std"]),
        delta,
        _pm(a[f"{p}_global"], a[f"{p}_global_std"]),
        f"{a['bytes_up_per_client_round']:,.0f}",
        f"{a['bytes_down_per_client_round']:,.0f}",
        f"{a['bytes_total'] / 1e6:.3f}",
        f"{a['wall_s']:.0f}",
        "–" if math.isnan(a.get("update_epsilon", math.nan)) else f"{a['update_epsilon']:.2f}",
    ]


def comparison_frame(agg: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The comparison (accuracy mean ± std over seeds, paired Δ to local, bytes) as one frame of display strings:
    the CLI, compare.md and report.html render this same frame."""
    p = agg[0].get("primary", "acc") if agg else "acc"
    return pd.DataFrame([table_cells(a) for a in agg], columns=list(table_columns(p)))


def markdown_table(agg: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table."""
    return frame_markdown(comparison_frame(agg)) + "\n"


def _plot_on(ax: Any, agg: Sequence[dict[str, Any]], title: str) -> None:
    """Personalized accuracy (± std) vs total MB on the wire (log x) on ``ax``, one marker per method."""
    positive = [a["bytes_total"] / 1e6 for a in agg if a["bytes_total"] > 0]
    floor = min(positive) / 10 if positive else 1e-3
    markers = "os^Dv<>pPX*h"
    for k, a in enumerate(agg):
        mb = a["bytes_total"] / 1e6
        ax.errorbar(
            mb if mb > 0 else floor,
            a[f"{a.get('primary', 'acc')}_mean"],
            yerr=a[f"{a.get('primary', 'acc')}_mean_std"],
            fmt=markers[k % len(markers)],
            capsize=3,
            label=f"{a['method']}" + ("" if mb > 0 else " (0 B)"),
        )
    ax.set_xscale("log")
    ax.set_xlabel("total MB on the wire (up + down, all clients, all rounds)")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title)


def plot_comparison(agg: Sequence[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """compare.png: personalized accuracy (± std) vs total MB on the wire (log x), one marker per method."""
    return plot_panels({title: agg}, path)


def panels_figure(panels: Mapping[str, Sequence[dict[str, Any]]]) -> Any:
    """One accuracy-vs-bytes panel per comparison (e.g. one per Dirichlet α), side by side, shared y axis; one
    legend, right of the last panel (it never covers a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels) + 1.8, 4.2), sharey=True, squeeze=False)
    for ax, (title, agg) in zip(axes[0], panels.items(), strict=True):
        _plot_on(ax, agg, title)
    first = next((a for agg in panels.values() for a in agg), {})
    axes[0][0].set_ylabel(f"personalized {first.get('primary', 'acc')} (mean over clients)")
    if any(panels.values()):
        axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_panels(panels: Mapping[str, Sequence[dict[str, Any]]], path: str | Path) -> Path:
    """``panels_figure`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = panels_figure(panels)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def read_cells(out: str | Path) -> list[dict[str, Any]]:
    """Every finished cell (``<label>/seed_<s>/cell.json``) of a comparison folder."""
    return [json.loads(f.read_text(encoding="utf-8")) for f in sorted(Path(out).glob("*/seed_*/cell.json"))]


def comparison_cells(folder: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """A comparison folder's finished cells and its methods, in the order the comparison ran them
    (compare.csv's order when present, else the cells')."""
    cells = read_cells(folder)
    order = [c["method"] for c in cells]
    if (Path(folder) / "compare.csv").is_file():
        order = list(pd.read_csv(Path(folder) / "compare.csv")["method"].astype(str)) + order
    present = {c["method"] for c in cells}
    methods = [m for m in dict.fromkeys(order) if m in present]
    cells.sort(key=lambda c: (methods.index(c["method"]), c["seed"]))
    return cells, methods


def write_outputs(rows: Sequence[dict[str, Any]], out: Path, methods: Sequence[str]) -> list[dict[str, Any]]:
    """compare.csv (one row per cell), compare.md (aggregated), compare.png."""
    p = primary_of(rows)
    extra = (f"{p}_zero_shot", *EXTRA_KEYS)
    keys = list(cell_keys(p)) + [k for k in extra if any(k in r for r in rows)]
    cells = pd.DataFrame([{k: r.get(k, "") for k in keys} for r in rows], columns=keys)
    (out / "compare.csv").write_text(frame_csv(cells), encoding="utf-8")
    agg = aggregate_rows(rows, methods)
    (out / "compare.md").write_text(markdown_table(agg), encoding="utf-8")
    plot_comparison(agg, out / "compare.png", title=out.name)
    return agg
