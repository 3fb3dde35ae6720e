"""A VLM's projector pre-aligned once, centrally, on public images that no client holds (``model.projector =
"pretrained"``), then frozen: nothing of it travels, only what the method shares (C for ``celora``).

Training: before the adapters are injected, the fresh (seeded) projector P is trained with the task's own
loss — the causal-LM loss on the answer word of the image prompt — on the public images, the ViT and the LM
frozen, AdamW at ``train.lr``, ``model.projector_steps`` steps of ``train.batch_size`` rows in a seeded order
(eval mode). Its input standardisation μ, σ is computed from the same public images (so the clients' one-time
feature-statistics set-up is skipped). P is then frozen and dropped from the trained modules: it is no longer
the VLM's "head" nor a FedAvg module.

The public set (``model.projector_data``; default ``mnist5k`` for ``digits``, else ``data.name``):
- another shipped image dataset: disjoint from the clients' data by source;
- the run's own dataset: only its rows outside the run's seeded ``data.max_samples`` subset (the clients'
  train, test and the global test rows all come from that subset); an error when the run loads every row.
In both cases a public image whose pixels (at ``data.image_size``) equal one of the run's images is dropped.
Public images go through the clients' pipeline: first to the run dataset's native resolution (``digits``:
8 px; MNIST's empty 4-px frame is cut first, so its 20×20 digit box becomes sklearn's 8×8, which the digit
fills, and each image's intensity is stretched to 0..255 as sklearn's ink counts are), then to
``data.image_size``.
With ``data.sites`` the server holds no rows: ``model.projector_data`` must name a shipped dataset.

Every party (server, each site) recomputes the same projector from public data or reads it from the cache:
``<cache root>/projector/<key>.safetensors``, key = a hash of (model, projector width, public set and the rows
used, prompt, max_length, steps, lr, batch size, seed, precision), written atomically (temporary file +
rename). Its metadata (public rows, loss before/after, seconds) is the run's note ``summary.json`` →
``projector``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from celora.config import ExperimentConfig
from celora.data.sources import Dataset, load_dataset, with_image_size
from celora.data.tasks import Task
from celora.errors import CeloraError
from celora.models.cache import cache_root
from celora.models.device import Placement, place_model, to_device
from celora.models.vlm import VisionLanguageModel
from celora.models.zoo import LoadedModel

PUBLIC_SETS = {"digits": "mnist5k"}  # a task's default public set when it is not its own held-out rows
NATIVE_SIZE = {"digits": 8}  # a shipped dataset's own resolution: public images pass through it first
BORDER = {"mnist5k": 4}  # empty frame cut off first (MNIST centres a 20×20 digit box in 28×28; sklearn's fill 8×8)
STATS_ROWS = 1_000  # public rows the input standardisation μ, σ is computed on (seeded sample)


def public_set_name(cfg: ExperimentConfig) -> str:
    """``model.projector_data``, or the task's default public set."""
    d = cfg.data
    if cfg.model.projector_data is not None:
        return cfg.model.projector_data
    if d.sites is not None or d.path is not None:
        raise CeloraError(
            "model.projector_data: name a shipped public image dataset (`celora datasets`) when the run reads "
            "data.sites or data.path"
        )
    return PUBLIC_SETS.get(d.name, d.name)


def _run_dataset(cfg: ExperimentConfig) -> Dataset | None:
    """The rows this run loads (every client's and the global test rows); None with data.sites."""
    d = cfg.data
    if d.sites is not None:
        return None
    return load_dataset(
        None if d.path else d.name,
        path=d.path,
        text_column=d.text_column,
        label_column=d.label_column,
        max_samples=d.max_samples,
        seed=cfg.seed,
        image_column=d.image_column,
        image_size=d.image_size,
    )


def _image_hashes(images: np.ndarray) -> np.ndarray:
    """One SHA-1 of the pixels per image (equal hashes: the same image)."""
    return np.array([hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest() for x in images])


def _load_native(name: str, size: int) -> Dataset:
    """Shipped dataset ``name`` without its empty border (``BORDER``), reduced to ``size``² pixels, each image's
    intensity stretched to 0..255 (98 % of sklearn's digits reach 255: a cell full of ink)."""
    public = load_dataset(name)
    if public.images is None:
        return public
    cut = BORDER.get(name, 0)
    images = public.images[:, :, cut:-cut, cut:-cut] if cut else public.images
    small = with_image_size(dataclasses.replace(public, images=np.ascontiguousarray(images)), size).images
    assert small is not None
    top = small.reshape(len(small), -1).max(1).astype(np.float64).clip(1)[:, None, None, None]
    return dataclasses.replace(public, images=np.rint(small * (255.0 / top)).astype(np.uint8))


def public_dataset(cfg: ExperimentConfig) -> tuple[Dataset, dict[str, Any]]:
    """The public rows (no client holds them) with the run's prompt, and a note of how they were chosen."""
    name = public_set_name(cfg)
    native = NATIVE_SIZE.get(cfg.data.name) if cfg.data.path is None and cfg.data.sites is None else None
    try:  # at the clients' native resolution first (digits: 8 px), then at data.image_size, as their images were
        public = load_dataset(name, image_size=cfg.data.image_size) if native is None else _load_native(name, native)
    except CeloraError as err:
        raise CeloraError(f"model.projector_data: {err}") from None
    if public.images is None:
        raise CeloraError(f"model.projector_data: dataset '{name}' has no images")
    public = with_image_size(public, cfg.data.image_size)
    assert public.images is not None
    run = _run_dataset(cfg)
    total = len(public)
    keep = np.ones(total, dtype=bool)
    if run is not None:
        if name == cfg.data.name and cfg.data.path is None:  # the run's own corpus: only the rows it does not load
            keep &= ~np.isin(np.asarray(public.texts), np.asarray(run.texts))
        if run.images is not None:  # never an image a client holds, whatever its source
            keep &= ~np.isin(_image_hashes(public.images), _image_hashes(run.images))
        if public.label_names != run.label_names:
            raise CeloraError(
                f"model.projector_data: dataset '{name}' has labels {public.label_names}, the run {run.label_names}"
            )
    if not keep.any():
        raise CeloraError(
            f"model.projector_data: no public rows of '{name}' left outside the run's data "
            "(set data.max_samples below its size, or name another dataset)"
        )
    public = public.subset(np.flatnonzero(keep))
    d = cfg.data
    public = dataclasses.replace(
        public, instruction=d.instruction or public.instruction, verbalizers=d.verbalizers or public.verbalizers
    )
    ids = hashlib.sha1("\n".join(public.texts).encode()).hexdigest()[:16]
    return public, {
        "public_set": name,
        "public_rows": len(public),
        "excluded_rows": int(total - len(public)),
        "rows_id": ids,
    }


def _cache_key(cfg: ExperimentConfig, note: dict[str, Any], placement: Placement, dataset: Dataset) -> str:
    m, t = cfg.model, cfg.train
    parts = {
        "model": m.name,
        "projector_hidden": m.projector_hidden,
        "public": [note["public_set"], note["rows_id"], cfg.data.image_size],
        "prompt": [dataset.instruction, dataset.verbalizers, m.max_length],
        "steps": m.projector_steps,
        "lr": t.lr,
        "batch_size": t.batch_size,
        "seed": cfg.seed,
        "precision": [str(placement.weights), str(placement.compute)],
        "version": 1,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def _train(
    model: VisionLanguageModel, task: Task, data: Any, cfg: ExperimentConfig, placement: Placement
) -> dict[str, Any]:
    """μ, σ from the public images, then ``projector_steps`` AdamW steps on the projector alone."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed * 7_919 + 29)
    order = rng.permutation(len(data))
    torch.manual_seed(cfg.seed * 100_003 + 7)
    stats = task.site_statistics(model, data, np.sort(order[:STATS_ROWS]))
    task.apply_setup(model, task.combine_statistics([stats]))
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.projector.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    bs, losses, device = cfg.train.batch_size, [], next(model.projector.parameters()).device
    was_training = model.training
    model.eval()
    for step in range(cfg.model.projector_steps):
        start = (step * bs) % len(order)
        idx = np.take(order, np.arange(start, start + bs), mode="wrap")
        with placement.autocast():
            loss = task.loss(model, to_device(data.batch(idx), device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    model.train(was_training)
    for p in params:
        p.requires_grad_(False)
    k = max(1, min(10, len(losses) // 4))
    return {
        "steps": len(losses),
        "loss_first": round(float(np.mean(losses[:k])), 4),
        "loss_last": round(float(np.mean(losses[-k:])), 4),
        "train_s": round(time.perf_counter() - t0, 1),
    }


def pretrain_projector(loaded: LoadedModel, task: Task, cfg: ExperimentConfig, placement: Placement) -> LoadedModel:
    """Pre-align the VLM's projector on the public set (or read it from the cache), freeze it, and return the
    model entry without trained modules (nothing of the projector trains or travels)."""
    model = loaded.model
    if not isinstance(model, VisionLanguageModel):
        raise CeloraError(f"model.projector: only for a vision-language model, not '{cfg.model.name}'")
    public, note = public_dataset(cfg)
    key = _cache_key(cfg, note, placement, public)
    path = cache_root() / "projector" / f"{key}.safetensors"
    place_model(model, placement, ("projector",))
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            saved = json.loads((f.metadata() or {}).get("note", "{}"))
        model.projector.load_state_dict(state)
        note = {**saved, "cache": "hit"}
    else:
        data = task.build(public, loaded.tokenizer, cfg.model.max_length)
        note = {**note, **_train(model, task, data, cfg, placement), "cache": "built"}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{key}-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            state = {k: v.detach().cpu().contiguous() for k, v in model.projector.state_dict().items()}
            save_file(state, tmp, metadata={"note": json.dumps(note)})
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the entry from other users of a shared cache
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    model.projector.requires_grad_(False)
    model.projector_frozen = True
    model.projector_note = {**note, "cache_file": str(path)}
    return dataclasses.replace(loaded, head_modules=(), fedavg_modules=())
