"""The run folder: the one place a run's files are written (both runtimes).

Layout of ``<out>/``:
  config.toml          the resolved experiment config (``celora run --resume`` reads it back)
  partition.json       per-client sizes and label histograms (reported by the clients)
  metrics.jsonl        one row per round (``celora.fl.records.round_row``)
  summary.json         the run summary (written last: its presence means the run finished)
  similarity_data.npy, weights_round_<t>.npy   the personalized strategy's S^data and w_ij
  zero_shot.json       the un-adapted model, for tasks where that is meaningful
  adapters/client_<i>/ PEFT exports of every client's final adapter
  checkpoints/         see ``celora.fl.checkpoint``

A ``RunFolder(None)`` writes nothing (runs without a folder, e.g. in tests and comparisons' memory).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celora.config import ExperimentConfig, dump_config


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
        self.write_text("config.toml", dump_config(cfg))
        if partition is not None:
            self.write_json("partition.json", partition)

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
        """Append one round's row to metrics.jsonl."""
        if self.path is not None:
            with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")

    def rewrite_rows(self, rows: list[dict[str, Any]]) -> None:
        """metrics.jsonl = exactly ``rows`` (on resume: drop rows written after the checkpoint)."""
        if self.path is not None:
            self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.write_json("summary.json", summary)

    def export_adapters(self, exporter: Any, states: Mapping[int, dict[str, torch.Tensor]]) -> None:
        """Every client's final adapter as a PEFT folder (``exporter``: ``celora.adapters.export.PeftExporter``)."""
        if self.path is not None:
            for i, st in states.items():
                exporter.save(st, self.path / "adapters" / f"client_{i}")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (empty when the file is missing)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
