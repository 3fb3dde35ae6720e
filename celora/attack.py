"""`celora attack`: measure what an honest-but-curious server reconstructs from one client's shared tensors.

Setting: the experiment's model and data (``celora.fl.simulation.prepare``), adapters at ``--rank``; the
attacked client (``--client``) first trains ``--warm-steps`` local steps from the seeded init (so B ≠ 0 and C
has a gradient: at the init ∇C = 0), then the server observes it on ``--samples`` batches (see
``celora.privacy.inversion``); when it has fewer batches, the next clients are attacked the same way (each
warmed from the seeded init on its own rows) until ``--samples`` batches are reached. Outputs in ``--out``:
attack.json (settings, per-batch rows, means with 95 % intervals, the random floor), attack.md (one table
row) and attack.png (images: original over reconstruction) or attack_samples.md (text: reference beside
reconstruction).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celora.config import ExperimentConfig
from celora.errors import CeloraError
from celora.privacy.attacks.lm_prior import LMPrior, TextPrior, special_frame
from celora.privacy.inversion import AttackResult, AttackSettings, Kind, get_threat, merge_results, run_attack

__all__ = ["COLUMNS", "attack_experiment", "markdown_row", "markdown_table", "write_outputs"]

COLUMNS = (
    "shared",
    "rank",
    "batch",
    "protocol",
    "N",
    "method",
    "ROUGE-1",
    "ROUGE-2",
    "ROUGE-L",
    "token F1",
    "PSNR",
    "SSIM",
    "label acc",
    "feature cos",
    "random floor R-1",
)


def attack_experiment(
    cfg: ExperimentConfig,
    shared: str,
    *,
    batch_size: int = 1,
    fedavg: bool = False,
    local_steps: int = 4,
    samples: int = 10,
    iterations: int = 200,
    warm_steps: int = 10,
    client: int = 0,
    progress: Any = None,
    prepared: Any = None,
    warmed: dict[tuple[int, int], dict[str, torch.Tensor]] | None = None,
    lm_prior: str | None = None,
    lm_weight: float = 0.1,
) -> tuple[AttackResult, dict[str, Any]]:
    """Prepare the experiment (or reuse ``prepared`` from ``prepare(cfg)`` of the same config), warm the
        client's adapter from the seeded init, and attack its batches; (result, settings). When ``client`` has
        fewer than ``samples`` batches, the next clients (wrapping) are attacked too, each warmed from the seeded
        init on its own rows, until ``samples`` batches are attacked or every client's batches are used. ``warmed``
    (optional, per (client, warm_steps)): warmed states kept across calls with the same ``prepared`` (the warm-up
    does not depend on the threat model). ``lm_prior``: a causal LM of the zoo (e.g. ``smollm2``) read as a
    language-model prior by the text optimisation attack (``privacy.attacks.lm_prior``), weight ``lm_weight``."""
    from celora.adapters.inject import get_tensors, set_tensors
    from celora.fl.prepare import Prepared, check_names, prepare

    threat = get_threat(shared)
    if warm_steps < 0 or local_steps < 1 or iterations < 0 or samples < 1:
        raise CeloraError("--warm-steps must be >= 0, --local-steps >= 1, --iterations >= 0, --samples >= 1")
    cfg = check_names(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    p = prepared if prepared is not None else prepare(cfg)
    if not isinstance(p, Prepared):
        raise CeloraError("celora attack: data.sites is not supported (the attack reads one partitioned dataset)")
    kind: Kind = "image" if p.loaded.kind == "vision" else "text"
    if p.loaded.kind in ("vlm",) or (kind == "text" and p.loaded.kind != "encoder"):
        raise CeloraError(f"celora attack: model.name '{cfg.model.name}' is not supported (text encoders and ViTs)")
    if lm_prior is not None and kind != "text":
        raise CeloraError("--lm-prior: a language-model prior applies to text attacks only")
    if lm_weight < 0:
        raise CeloraError(f"--lm-weight must be >= 0, got {lm_weight}")
    if not 0 <= client < cfg.num_clients:
        raise CeloraError(f"--client {client}: must be in [0, {cfg.num_clients})")
    model = p.loaded.model
    normalise = None
    if kind == "image":
        proc = p.loaded.tokenizer

        def normalise(x: torch.Tensor) -> torch.Tensor:
            return proc(x * 255.0)

    prior = _text_prior(lm_prior, lm_weight, p.loaded.tokenizer, model) if lm_prior is not None else None
    parts: list[AttackResult] = []
    clients: list[int] = []
    for k in range(cfg.num_clients):  # from ``client`` on, wrapping, until ``samples`` batches are attacked
        remaining = samples - sum(r.summary["batches"] for r in parts)
        if remaining <= 0:
            break
        c = (client + k) % cfg.num_clients
        rows = p.split.clients[c].train_idx
        if len(rows) < batch_size:
            continue
        set_tensors(model, p.init_state)  # every attacked client warms up from the seeded init
        if warmed is not None and (c, warm_steps) in warmed:
            set_tensors(model, warmed[(c, warm_steps)])
        else:
            _warm_up(cfg, p, rows, warm_steps)
            if warmed is not None:
                warmed[(c, warm_steps)] = {n: t.clone() for n, t in get_tensors(model, p.init_state).items()}
        model.eval()
        settings = AttackSettings(
            threat, batch_size, local_steps if fedavg else 0, cfg.train.lr, remaining, iterations, cfg.seed + 1000 * k
        )
        parts.append(
            run_attack(
                model,
                p.encoded,
                rows,
                kind,
                settings,
                p.loaded.head_modules,
                p.init_state,  # type: ignore[arg-type]
                tokenizer=p.loaded.tokenizer,
                normalise=normalise,
                progress=progress,
                prior=prior,
            )
        )
        clients.append(c)
    if not parts:
        raise CeloraError(f"--batch-size {batch_size}: no client has that many training rows")
    result = merge_results(parts, settings)
    meta = {
        "model": cfg.model.name,
        "data": cfg.data.path or cfg.data.name,
        "rank": cfg.model.rank,
        "targets": list(p.spec.targets),
        "max_length": cfg.model.max_length,
        "client": client,
        "clients": clients,
        "warm_steps": warm_steps,
        "lr": cfg.train.lr,
        "iterations": iterations,
        "seed": cfg.seed,
        "threat": asdict(threat),
        "lm_prior": lm_prior,
        "lm_weight": lm_weight if lm_prior is not None else None,
    }
    return result, meta


def _text_prior(name: str, weight: float, tokenizer: Any, victim: torch.nn.Module) -> TextPrior:
    """The zoo's causal LM ``name`` as a prior over the victim tokenizer's decoded text, on the victim's device."""
    from celora.models.zoo import load_model

    lm = load_model(name, 0, head="lm")
    lm.model.to(next(victim.parameters()).device)
    return TextPrior(
        LMPrior(lm.model, lm.tokenizer),
        lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True),
        special_frame(tokenizer),
        sorted(tokenizer.all_special_ids),
        weight=weight,
    )


def _warm_up(cfg: ExperimentConfig, p: Any, rows: np.ndarray, steps: int) -> None:
    """``steps`` local steps of the client's own training (A, B, C, head) on ``rows``: B ≠ 0, so ∇C ≠ 0."""
    from celora.adapters.inject import set_trainable, view_names
    from celora.fl.client import train_local

    if not steps:
        return
    model = p.loaded.model
    params = set_trainable(model, {"A", "B", "C", "head"}, p.loaded.head_modules)
    head_names = set(view_names(model, {"head"}, p.loaded.head_modules))
    train_local(
        model,
        p.encoded,
        rows,
        params,
        task=p.task,
        epochs=10_000,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        head_params=[q for n, q in model.named_parameters() if n in head_names],
        head_lr=cfg.train.head_lr,
        max_steps=steps,
        seed=cfg.seed,
    )


def _fmt(m: dict[str, Any], key: str, digits: int = 3) -> str:
    v = m.get(key)
    if not v or v.get("n", 0) == 0:
        return "–"
    if v["n"] == 1:
        return f"{v['mean']:.{digits}f} (1 batch)"  # no interval from a single batch
    return f"{v['mean']:.{digits}f} ± {v['ci95']:.{digits}f}"


def _n(summary: dict[str, Any]) -> str:
    """N: the examples attacked, with the batches (the unit of the intervals) when a batch holds several."""
    n, b = summary["examples"], summary["batches"]
    return str(n) if summary["batch_size"] == 1 else f"{n} ({b} batch{'es' if b > 1 else ''})"


def markdown_row(summary: dict[str, Any], rank: int) -> list[str]:
    """One table row (COLUMNS) from an attack summary."""
    m = summary["metrics"]
    floor = summary.get("random_floor", {})
    return [
        summary["threat"],
        str(rank),
        str(summary["batch_size"]),
        summary["protocol"],
        _n(summary),
        "/".join(summary["methods"]),
        _fmt(m, "rouge1"),
        _fmt(m, "rouge2"),
        _fmt(m, "rougeL"),
        _fmt(m, "token_f1"),
        _fmt(m, "psnr", 1),
        _fmt(m, "ssim"),
        _fmt(m, "label_acc", 2),
        _fmt(m, "feature_cos"),
        _fmt(floor, "rouge1"),
    ]


def markdown_table(rows: list[list[str]], columns: tuple[str, ...] = COLUMNS) -> str:
    """A Markdown table of ``rows`` under ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _image_grid(examples: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [
        (ref[j, 0], rec[j, 0])
        for ex in examples
        for ref, rec in [(ex["reference"], ex["reconstruction"])]
        for j in range(ref.shape[0])
    ][:16]
    fig, axes = plt.subplots(2, len(pairs), figsize=(1.2 * len(pairs) + 0.6, 2.8), squeeze=False)
    for j, (ref, rec) in enumerate(pairs):
        for row, img in ((0, ref), (1, rec)):
            axes[row, j].imshow(np.clip(img, 0, 1), cmap="gray", vmin=0, vmax=1)
            axes[row, j].axis("off")
    axes[0, 0].set_title("original", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstruction", fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _text_samples(examples: list[dict[str, Any]], path: Path, limit: int = 5) -> None:
    lines = ["| reference | reconstruction |", "|---|---|"]
    for ex in examples[:limit]:
        for ref, rec in zip(ex["reference"], ex["reconstruction"], strict=True):
            clean = [s.replace("|", "\\|").replace("\n", " ") for s in (ref, rec)]
            lines.append(f"| {clean[0]} | {clean[1]} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_outputs(result: AttackResult, meta: dict[str, Any], out: Path) -> list[Path]:
    """attack.json, attack.md and the picture (attack.png for images, attack_samples.md for text)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"settings": meta, "summary": result.summary, "rows": result.rows}
    files = [out / "attack.json", out / "attack.md"]
    files[0].write_text(json.dumps(payload, indent=2, default=float), encoding="utf-8")
    files[1].write_text(markdown_table([markdown_row(result.summary, meta["rank"])]), encoding="utf-8")
    if result.summary["kind"] == "image":
        files.append(out / "attack.png")
        _image_grid(result.examples, files[-1])
    else:
        files.append(out / "attack_samples.md")
        _text_samples(result.examples, files[-1])
    return files
