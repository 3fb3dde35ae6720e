"""The run folder: the one place a run's files are written (both runtimes).

Layout of ``<out>/``:
  config.toml          the resolved experiment config (``celora run --resume`` reads it back)
  partition.json       per-client sizes and label histograms (reported by the clients)
  metrics.jsonl        one row per round (``celora.fl.records.round_row``)
  summary.json         the run summary (written last: its presence means the run finished)
  similarity_data.npy, weights_round_<t>.npy   the personalized strategy's S^data and w_ij
  zero_shot.json       the un-adapted model, for tasks where that is meaningful
  adapters/client_<i>/ PEFT exports of every client's final adapter
  checkpoints/ckpt-<t>.safetensors + ckpt-<t>.json   the state after round t (``save_checkpoint``); removed
                       once summary.json is written

A ``RunFolder(None)`` writes nothing (runs without a folder, e.g. in tests and comparisons' memory).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from celora.config import ExperimentConfig, dump_config
from celora.data.sources import one_line
from celora.eval import MetricSpec, score_headline

log = logging.getLogger("celora")
LOG_FILE = "celora.log"
_LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class _RunLog(logging.FileHandler):
    """The run's celora.log: the "celora" logger at INFO (round lines, rejections, checkpoints, warnings)."""


CHECKPOINT_FORMAT = 1


class RunFolder:
    """Writes a run's files under ``path`` (nothing when ``path`` is None)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None

    def __bool__(self) -> bool:
        return self.path is not None

    def start(self, cfg: ExperimentConfig, partition: dict[str, Any] | None, *, fresh: bool = True) -> None:
        """Create the folder, write config.toml and partition.json; ``fresh`` empties metrics.jsonl."""
        if self.path is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if fresh or not (self.path / "metrics.jsonl").is_file():
            (self.path / "metrics.jsonl").write_text("", encoding="utf-8")
        self.open_log(fresh)
        log.info(
            "run %s: method %s, model %s, %d clients, %d rounds, data %s, seed %d",
            "started" if fresh else "resumed",
            cfg.method,
            cfg.model.name,
            cfg.num_clients,
            cfg.rounds,
            cfg.data.source,
            cfg.seed,
        )
        self.write_text("config.toml", dump_config(cfg))
        if partition is not None:
            self.write_json("partition.json", partition)

    def open_log(self, fresh: bool = True) -> None:
        """Send the "celora" logger's records (INFO and up) to ``celora.log`` in the folder until ``close_log``."""
        self.close_log()  # one run log at a time in a process
        if self.path is None:
            return
        handler = _RunLog(self.path / LOG_FILE, mode="w" if fresh else "a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        log.addHandler(handler)
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)  # records reach the file; console handlers keep their own levels

    @staticmethod
    def close_log() -> None:
        for handler in [h for h in log.handlers if isinstance(h, _RunLog)]:
            log.removeHandler(handler)
            handler.close()

    def write_text(self, name: str, text: str) -> None:
        if self.path is not None:
            target = self.path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2))

    def save_npy(self, name: str, arr: np.ndarray) -> None:
        if self.path is not None:
            np.save(self.path / name, arr)

    def append_row(self, row: dict[str, Any]) -> None:
        """Append one round's row to metrics.jsonl (and its headline to celora.log)."""
        log.info(
            "round %d: %s, %d participants, %d rejected, up %d B, down %d B, %.1fs",
            row["round"],
            score_headline(row),
            row.get("participants", 0),
            row.get("rejected", 0),
            row["bytes_up"],
            row["bytes_down"],
            row["wall_s"],
        )
        if self.path is not None:
            with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def rewrite_rows(self, rows: list[dict[str, Any]]) -> None:
        """metrics.jsonl = exactly ``rows`` (on resume: drop rows written after the checkpoint)."""
        if self.path is not None:
            self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        """summary.json, the final line of celora.log; the run log closes."""
        self.write_json("summary.json", summary)
        p = MetricSpec.of(summary).primary
        log.info(
            "final: %s mean %.3f, global %.3f, %.0f B up / %.0f B down per client-round, %.0fs",
            p,
            summary[f"{p}_mean"],
            summary.get(f"{p}_global", float("nan")),
            summary["bytes_per_client_round"]["up"],
            summary["bytes_per_client_round"]["down"],
            summary["wall_s"],
        )
        self.close_log()

    def drop_checkpoints(self) -> None:
        """A finished run (summary.json written) keeps its results, not its checkpoints (only an unfinished
        run resumes)."""
        if self.path is not None:
            shutil.rmtree(self.path / "checkpoints", ignore_errors=True)

    def export_adapters(self, exporter: Any, states: Mapping[int, dict[str, torch.Tensor]]) -> None:
        """Every client's final adapter as a PEFT folder (``exporter``: ``celora.adapters.export.PeftExporter``)."""
        if self.path is not None:
            for i, st in states.items():
                exporter.save(st, self.path / "adapters" / f"client_{i}")


@dataclass
class Checkpoint:
    """A run's state after round ``round``: ``state`` is JSON-able with the tensors restored in place."""

    round: int
    state: dict[str, Any]
    path: Path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name in the same folder, fsync it, rename it over ``path``, fsync the folder:
    a reader sees the old file or the whole new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # e.g. a platform without folder handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """JSON-able form of ``obj`` with every tensor / array moved into ``tensors`` (keyed by its path).

    Dicts with non-string keys become ``{"__items__": [[key, value], …]}``; arrays ``{"__np__": key}``."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().to("cpu").clone().contiguous()
        return {"__t__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.array(obj, copy=True))
        return {"__np__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[k, pack(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [pack(v, tensors, f"{path}/{k}") for k, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of ``pack``."""
    if isinstance(obj, dict):
        if set(obj) == {"__t__"}:
            return tensors[obj["__t__"]]
        if set(obj) == {"__np__"}:
            return tensors[obj["__np__"]].numpy()
        if set(obj) == {"__items__"}:
            return {k: unpack(v, tensors) for k, v in obj["__items__"]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def _checkpoint_dir(run: Path) -> Path:
    return run / "checkpoints"


def save_checkpoint(run: Path, rnd: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Atomically write the state after round ``rnd``: tensors as safetensors, the rest (and the tensors'
    sha256) as JSON, written last — the JSON is the commit marker. Older checkpoints beyond ``keep`` go."""
    folder = _checkpoint_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = pack(state, tensors)
    blob = st_save(tensors)
    name = f"ckpt-{rnd:06d}"
    atomic_write(folder / f"{name}.safetensors", blob)
    marker = {"format": CHECKPOINT_FORMAT, "round": rnd, "sha256": hashlib.sha256(blob).hexdigest(), "state": meta}
    atomic_write(folder / f"{name}.json", json.dumps(marker).encode("utf-8"))
    log.info("checkpoint after round %d: %s (%d B of tensors)", rnd, folder / f"{name}.json", len(blob))
    for old in sorted(folder.glob("ckpt-*.json"))[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    return folder / f"{name}.json"


def read_checkpoint(marker: Path) -> Checkpoint:
    meta = json.loads(marker.read_text(encoding="utf-8"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
    blob = marker.with_suffix(".safetensors").read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ValueError("checksum mismatch (damaged or half-written tensors)")
    return Checkpoint(int(meta["round"]), unpack(meta["state"], st_load(blob)), marker)


def load_checkpoint(run: Path) -> Checkpoint | None:
    """The newest complete checkpoint of ``run`` (a damaged one is logged and the previous one used)."""
    for marker in sorted(_checkpoint_dir(run).glob("ckpt-*.json"), reverse=True):
        try:
            return read_checkpoint(marker)
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("checkpoint %s is unusable (%s): trying the previous one", marker.name, err)
    return None


def state_blob(state: Mapping[str, torch.Tensor], extra: Any = None) -> bytes:
    """One safetensors blob: a client state's tensors, plus ``extra`` (e.g. AdamW moments) packed beside them."""
    tensors = {f"s/{k}": v.detach().to("cpu").clone().contiguous() for k, v in state.items()}
    packed: dict[str, torch.Tensor] = {}
    meta = pack(extra, packed, "x")
    tensors.update(packed)
    return st_save(tensors, metadata={"extra": json.dumps(meta)})


def state_from_blob(blob: bytes) -> tuple[dict[str, torch.Tensor], Any]:
    """Inverse of ``state_blob``: (state, extra)."""
    tensors = st_load(blob)
    state = {k[2:]: v for k, v in tensors.items() if k.startswith("s/")}
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])  # safetensors: u64 header length, JSON header (metadata)
    extra = unpack(json.loads(header.get("__metadata__", {}).get("extra", "null")), tensors)
    return state, extra


def save_client_state(
    folder: Path, rnd: int, state: Mapping[str, torch.Tensor], extra: Any = None, keep: int = 3
) -> Path:
    """A client's private state after round ``rnd`` (and ``extra``: its AdamW moments with
    train.keep_optimizer), on its own disk: ``<folder>/state-<t>.safetensors`` (atomic; the last ``keep`` are
    kept so that a server resuming an earlier round finds its match)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state-{rnd:06d}.safetensors"
    atomic_write(path, state_blob(state, extra))
    for old in sorted(folder.glob("state-*.safetensors"))[:-keep]:
        old.unlink(missing_ok=True)
    return path


def state_mismatch(state: Mapping[str, torch.Tensor], expect: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` is not a state of this run's adapters (other tensor names or shapes), or None."""
    if set(state) != set(expect):
        missing, extra = sorted(set(expect) - set(state)), sorted(set(state) - set(expect))
        return f"other tensors (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, t in expect.items():
        if tuple(state[name].shape) != tuple(t.shape):
            return f"tensor {name} has shape {tuple(state[name].shape)}, expected {tuple(t.shape)}"
    return None


def load_client_state(
    folder: Path, upto: int, expect: Mapping[str, torch.Tensor] | None = None
) -> tuple[int, dict[str, torch.Tensor], Any] | None:
    """(round, state, extra) of the newest usable state saved after a round ≤ ``upto``, or None. A damaged
    (e.g. truncated) file, or one of another model's tensors (names or shapes other than ``expect``'s), is refused
    with one warning line and the previous one is tried."""
    for path in sorted(folder.glob("state-*.safetensors"), reverse=True):
        rnd = int(path.stem.removeprefix("state-"))
        if rnd > upto:
            continue
        try:
            state, extra = state_from_blob(path.read_bytes())
        except Exception as err:  # noqa: BLE001  (safetensors raises its own error type on a damaged file)
            log.warning("client state %s is unusable (%s): trying the previous one", path, one_line(err))
            continue
        why = state_mismatch(state, expect) if expect is not None else None
        if why is None:
            return rnd, state, extra
        log.warning("client state %s is not this run's (%s): trying the previous one", path, why)
    return None


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (empty when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
