"""GPU smoke check: MiniLM, SmolLM2 (classifier and generative), 2 clients, 1 round, bf16 and fp32, on CUDA / MPS.

    python benchmarks/gpu_smoke.py                       # every model × precision on the default accelerator
    python benchmarks/gpu_smoke.py --device cuda:1 --precision bf16
    python benchmarks/gpu_smoke.py --device cpu --models tiny-bert tiny-llama tiny-llama-gen   # a CPU dry run
    python benchmarks/gpu_smoke.py --models minilm --precision bf16 --parallel 1 4 16 auto   # + a K sweep

Prints one line per run (device, precision, wall, the task's primary metric, train loss, peak accelerator
memory) and checks that every base parameter sat on the device, that adapters and the head stayed fp32, and
that the metrics are finite; exits 1 when a check fails. Without a CUDA or MPS device (and no --device cpu)
it says so and exits 0.
Runs in a few minutes on one GPU (most of it loading SmolLM2 once per precision).

``--parallel K …`` adds, per model and precision, a sweep of ``engine.parallel_clients`` over a bigger run
(``--sweep-clients``, default 16 clients, 1 round): wall, round wall, peak GPU memory, the mean score after
aggregation and its largest per-client difference from the first K (each client draws its own dropout masks,
so in fp32 that is 0 up to rounding; under bf16 the stacked matmuls round differently: it bounds that difference).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from celora.config import build_config  # noqa: E402
from celora.fl.simulation import Simulation  # noqa: E402

CONFIGS: dict[str, dict[str, Any]] = {
    "minilm": {
        "model": {"name": "minilm", "rank": 8, "max_length": 128},
        "data": {"name": "bbcnews", "max_samples": 400, "train_per_client": 64, "test_per_client": 32},
        "train": {"batch_size": 16, "lr": 2e-3, "head_lr": 1e-2},
    },
    "smollm2": {
        "model": {"name": "smollm2", "rank": 8, "max_length": 96},
        "data": {"name": "clothing", "max_samples": 400, "train_per_client": 32, "test_per_client": 16},
        "train": {"batch_size": 8, "lr": 1e-3},
        "eval": {"batch_size": 16},
    },
    "smollm2-gen": {  # the generative task (configs/llm_titles.toml, smaller)
        "model": {"name": "smollm2", "rank": 8, "max_length": 80},
        "data": {
            "name": "clothing-titles",
            "task": "generate",
            "max_samples": 400,
            "train_per_client": 32,
            "test_per_client": 12,
            "max_response_tokens": 12,
        },
        "train": {"batch_size": 8, "lr": 2e-3},
        "eval": {"batch_size": 12},
    },
    "tiny-bert": {  # CPU dry run of this script
        "model": {"name": "tiny-bert", "rank": 4, "max_length": 48},
        "data": {"name": "bbcnews", "max_samples": 120},
        "train": {"batch_size": 16, "lr": 5e-3},
    },
    "tiny-llama": {
        "model": {"name": "tiny-llama", "rank": 2, "max_length": 160},
        "data": {"name": "digits", "max_samples": 60, "task": "prompt"},
        "train": {"batch_size": 8, "lr": 1e-2},
    },
    "tiny-llama-gen": {
        "model": {"name": "tiny-llama", "rank": 2, "max_length": 48},
        "data": {"name": "chatterbot", "task": "generate", "max_samples": 60, "max_response_tokens": 16},
        "train": {"batch_size": 8, "lr": 1e-2},
    },
}


def accelerator() -> str | None:
    """The default accelerator: cuda, else mps, else None."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def run_one(name: str, device: str, precision: str) -> tuple[dict[str, Any], list[str]]:
    """One 2-client, 1-round run; its figures and the checks that failed."""
    spec = CONFIGS[name]
    train = {**spec["train"], "device": device, "precision": precision, "max_steps": 4}
    cfg = build_config({"rounds": 1, "num_clients": 2, "seed": 0, **spec, "train": train})
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    sim = Simulation(cfg, None, export_adapters=False)
    res = sim.run()
    wall = time.perf_counter() - t0
    p = sim.p
    problems = []
    devices = {str(q.device) for q in p.loaded.model.parameters()}
    want = str(p.placement.device)
    if devices != {want} and not (want == "cuda" and all(d.startswith("cuda") for d in devices)):
        problems.append(f"parameters on {sorted(devices)}, expected {want}")
    trained = [q for n, q in p.loaded.model.named_parameters() if n in set(p.all_names)]
    if p.placement.compute is not None and any(q.dtype != torch.float32 for q in trained):
        problems.append("an adapter or head parameter is not fp32 under autocast")
    s = res.summary
    metric = s["primary_metric"]["name"]
    for key in (f"{metric}_mean", f"{metric}_mean_agg", f"{metric}_global"):
        if not math.isfinite(float(s[key])):
            problems.append(f"{key} = {s[key]}")
    train_loss = res.rounds[-1]["clients"][0]["train_loss"]
    if not math.isfinite(train_loss):
        problems.append(f"train loss {train_loss}")
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan")
    row = {
        "model": name,
        "placement": p.placement.describe(),
        "wall_s": wall,
        "metric": metric,
        "score": s[f"{metric}_mean"],
        "global": s[f"{metric}_global"],
        "train_loss": train_loss,
        "peak_MiB": peak,
    }
    return row, problems


def run_sweep(name: str, device: str, precision: str, ks: list[str], clients: int) -> list[dict[str, Any]]:
    """One run per K of ``engine.parallel_clients`` (``clients`` clients, 1 round, up to 4 steps each)."""
    spec = CONFIGS[name]
    data = dict(spec["data"])
    if "train_per_client" in data:
        data["max_samples"] = clients * (data["train_per_client"] + data.get("test_per_client", 0))
    train = {**spec["train"], "device": device, "precision": precision, "max_steps": 4}
    rows, first = [], None
    for k in ks:
        cfg = build_config(
            {
                "rounds": 1,
                "num_clients": clients,
                "seed": 0,
                **spec,
                "data": data,
                "train": train,
                "engine": {"parallel_clients": k if k == "auto" else int(k)},
            }
        )
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = Simulation(cfg, None, export_adapters=False).run()
        wall = time.perf_counter() - t0
        metric = res.summary["primary_metric"]["name"]
        per_client = [c[f"{metric}_agg"] for c in res.rounds[-1]["clients"]]
        first = first or per_client
        rows.append(
            {
                "k": k,
                "wall_s": wall,
                "round_s": res.rounds[-1]["wall_s"],
                "peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else float("nan"),
                "metric": metric,
                "score": res.summary[f"{metric}_mean_agg"],
                "max_diff": max(abs(a - b) for a, b in zip(per_client, first, strict=True)),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cuda | cuda:N | mps | cpu (default: the accelerator)")
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp16", "fp32", "auto"])
    ap.add_argument("--models", nargs="+", default=["minilm", "smollm2", "smollm2-gen"], choices=sorted(CONFIGS))
    ap.add_argument("--parallel", nargs="+", default=[], metavar="K", help="engine.parallel_clients sweep (or auto)")
    ap.add_argument("--sweep-clients", type=int, default=16, help="clients of the --parallel sweep's runs")
    args = ap.parse_args(argv)
    device = args.device or accelerator()
    if device is None:
        print(
            "gpu_smoke: no CUDA or MPS device here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): nothing to check. "
            "Run it on a machine with a GPU (or --device cpu for a dry run)."
        )
        return 0
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        print(f"gpu_smoke on {device}: {torch.cuda.get_device_name(index)}, torch {torch.__version__}")
    failed = 0
    for name in args.models:
        for precision in args.precision:
            try:
                row, problems = run_one(name, device, precision)
            except Exception as err:  # a smoke check reports every failure and goes on
                print(f"FAIL {name} {precision}: {type(err).__name__}: {err}")
                failed += 1
                continue
            status = "ok  " if not problems else "FAIL"
            print(
                f"{status} {row['model']:<10} {row['placement']:<24} wall {row['wall_s']:6.1f} s  "
                f"{row['metric']} {row['score']:.3f}  global {row['global']:.3f}  train loss {row['train_loss']:.5f}  "
                f"peak {row['peak_MiB']:.0f} MiB" + ("" if not problems else "  " + "; ".join(problems))
            )
            failed += bool(problems)
            if not args.parallel:
                continue
            try:
                sweep = run_sweep(name, device, precision, args.parallel, args.sweep_clients)
            except Exception as err:
                print(f"FAIL {name} {precision} parallel sweep: {type(err).__name__}: {err}")
                failed += 1
                continue
            for r in sweep:
                print(
                    f"     {name:<10} {precision:<5} K={r['k']:<5} {args.sweep_clients} clients: "
                    f"wall {r['wall_s']:6.1f} s  round {r['round_s']:6.1f} s  peak {r['peak_MiB']:.0f} MiB  "
                    f"{r['metric']}_agg {r['score']:.3f}"
                    f"  max per-client diff vs K={args.parallel[0]} {r['max_diff']:.4f}"
                )
    print("gpu_smoke: all checks passed" if not failed else f"gpu_smoke: {failed} run(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
