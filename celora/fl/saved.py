"""Evaluate and use saved adapters: ``celora eval RUN_DIR|ADAPTER_DIR [--data FILE]``, ``celora generate``.

Each client's exported adapter (``RUN_DIR/adapters/client_<i>``, a standard PEFT LoRA folder) is loaded with
``peft.PeftModel.from_pretrained`` on a fresh copy of the run's frozen base and scored with the task's metrics
on that client's own test rows (recreated from the run's config and seed), or on every row of ``--data FILE``.
The exported adapter is the state a client holds at the end of the run (after its last server message), so a
run folder's scores equal its final round's "after aggregation" metrics (``<primary>_agg`` per client).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from celora.config import ExperimentConfig, apply_overrides, build_config, load_config
from celora.errors import CeloraError
from celora.eval import MetricSpec
from celora.fl.client import batch_on, evaluate_metrics
from celora.fl.prepare import prepare
from celora.models.device import place_model
from celora.models.zoo import load_model

ADAPTERS = "adapters"


@dataclass
class SavedEval:
    """Per-client scores of saved adapters and their means."""

    spec: MetricSpec
    clients: list[dict[str, Any]]
    means: dict[str, float] = field(default_factory=dict)


def find_run(path: Path) -> tuple[Path, list[tuple[int, Path]]]:
    """(run folder, [(client id, adapter folder)]) of a run folder or one client's adapter folder in it."""
    if (path / "adapter_config.json").is_file():
        run = path.parent.parent
        if not (run / "config.toml").is_file():
            raise CeloraError(f"{path}: an adapter folder outside a celora run folder (no {run / 'config.toml'})")
        try:
            cid = int(path.name.removeprefix("client_"))
        except ValueError:
            raise CeloraError(f"{path}: expected an adapter folder named client_<i>") from None
        return run, [(cid, path)]
    if not (path / "config.toml").is_file():
        raise CeloraError(f"{path}: not a run folder (no config.toml) nor an adapter folder (no adapter_config.json)")
    found = sorted(
        (int(d.name.removeprefix("client_")), d)
        for d in (path / ADAPTERS).glob("client_*")
        if (d / "adapter_config.json").is_file() and d.name.removeprefix("client_").isdigit()
    )
    if not found:
        raise CeloraError(
            f"{path}: no exported adapters under {path / ADAPTERS} (was the run started with --no-export?)"
        )
    return path, found


def run_config(run: Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The run's resolved config (config.toml), with ``--set`` overrides (e.g. train.device=cpu)."""
    cfg = load_config(run / "config.toml")
    return build_config(apply_overrides(cfg.model_dump(), list(overrides or []))) if overrides else cfg


def peft_model(cfg: ExperimentConfig, adapter: Path | None, num_labels: int, task_head: str) -> nn.Module:
    """A fresh frozen base with the saved PEFT adapter (``None``: the un-adapted base)."""
    base = load_model(cfg.model.name, num_labels=num_labels, seed=cfg.seed, head=task_head).model  # type: ignore[arg-type]
    if adapter is None:
        return base.eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(adapter)).eval()


def evaluate_saved(
    path: str | Path, *, data_file: str | None = None, base: bool = False, overrides: list[str] | None = None
) -> SavedEval:
    """Score every client's saved adapter (or, with ``base``, the un-adapted model) with the task's metrics."""
    run, adapters = find_run(Path(path))
    cfg = run_config(run, overrides)
    p = prepare(cfg)
    task, placement = p.task, p.bench.placement
    provider = p.provider()
    num_labels = len(provider.client(0).label_names)
    extra_data = None
    if data_file is not None:
        from celora.data.sites import read_data

        raw = read_data(cfg.data.model_copy(update={"task": task.name}), data_file)
        raw = task.prepare_rows(raw, p.loaded.tokenizer, cfg.model.max_length)
        extra_data = task.build(raw, p.loaded.tokenizer, cfg.model.max_length)
    rows = []
    base_model = peft_model(cfg, None, num_labels, task.head) if base else None
    for cid, folder in [(i, None) for i in range(provider.num_clients)] if base else adapters:
        model = base_model if base_model is not None else peft_model(cfg, folder, num_labels, task.head)
        place_model(model, placement, ())
        c = provider.client(cid)
        data, idx = (extra_data, np.arange(len(extra_data))) if extra_data is not None else (c.data, c.test_idx)
        with placement.autocast():
            m = evaluate_metrics(model, data, idx, cfg.eval.batch_size, task=task, extras=True)
        rows.append({"client": cid, "n_test": int(len(idx)), task.spec.primary: m.pop("score"), **m})
    keys = [k for k in rows[0] if k not in ("client", "n_test")]
    means = {f"{k}_mean": float(np.mean([r[k] for r in rows])) for k in keys}
    return SavedEval(task.spec, rows, means)


def summary_of(path: str | Path) -> dict[str, Any] | None:
    """The run's summary.json (None while the run has not finished)."""
    run, _ = find_run(Path(path))
    f = run / "summary.json"
    return {**json.loads(f.read_text(encoding="utf-8")), "_folder": str(run)} if f.is_file() else None


@torch.no_grad()
def generate_text(path: str | Path, prompt: str, *, system: str = "", max_new_tokens: int | None = None) -> str:
    """The greedy answer of a saved generative adapter (a run folder: its first client's) to one user turn."""
    from celora.data.generate import GenerateTask, GenerativeData
    from celora.data.sources import Dataset
    from celora.data.tasks import get_task

    run, adapters = find_run(Path(path))
    cfg = run_config(run)
    task = get_task(cfg.data.task or "classify").configured(cfg)
    if not isinstance(task, GenerateTask):
        raise CeloraError(f"celora generate: the run's data.task is '{cfg.data.task}', not a generative task")
    if not prompt.strip():
        raise CeloraError("celora generate: --prompt is empty")
    if max_new_tokens is not None:
        task = GenerateTask(task.max_response_tokens, max_new_tokens)
    loaded = load_model(cfg.model.name, num_labels=1, seed=cfg.seed, head="lm")
    from peft import PeftModel

    model = PeftModel.from_pretrained(loaded.model, str(adapters[0][1])).eval()
    row = Dataset("prompt", [prompt], np.zeros(1, dtype=np.int64), ["all"], responses=["."], systems=[system])
    data = task.build(dataclasses.replace(row, histories=[[]]), loaded.tokenizer, cfg.model.max_length)
    assert isinstance(data, GenerativeData)
    return data.decode(task.answers(model, batch_on(model, data, np.arange(1)))[0])
