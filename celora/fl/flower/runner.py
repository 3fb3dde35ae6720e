"""``celora run CONFIG --runtime flower``: the experiment on a local Flower deployment of real processes.

Starts a SuperLink and ``num_clients`` SuperNodes on loopback, submits a generated Flower app with
``flwr run``, follows the run folder the ServerApp writes (metrics.jsonl, summary.json, adapters —
the same files as the in-process engine, plus ``flower/``: message log, process logs), and shuts
every process down, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from celora.config import ExperimentConfig, dump_config
from celora.errors import CeloraError
from celora.fl.flower.deploy import LocalDeployment, write_app
from celora.fl.flower.server_app import ERROR_FILE
from celora.fl.simulation import Observer, RunResult, check_names


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def run_flower(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    observer: Observer | None = None,
    export: bool = True,
    tls: bool = False,
    auth: bool = False,
    round_timeout: float = 600.0,
    timeout: float = 3600.0,
    sites: list[str] | None = None,
    resume: bool = False,
) -> RunResult:
    """Run ``cfg`` on a local SuperLink + SuperNodes and return the run's summary and rows.

    With ``data.sites`` SuperNode i is started with its own file (``site-path`` in its node config:
    ``sites[i]``, default ``data.sites[i]`` resolved here); the ServerApp never opens a site file.
    ``resume``: continue ``out_dir`` from its newest complete checkpoint on a fresh SuperLink; each SuperNode
    restores its private state from its state folder (``out_dir/flower/nodes/node_i``), which a run keeps."""
    cfg = check_names(cfg)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    (out / ERROR_FILE).unlink(missing_ok=True)
    work = out / "flower"
    if resume:  # the killed SuperLink's database lists nodes that are gone: the new one starts empty
        for db in work.glob("superlink.db*"):
            db.unlink()
    app_dir = write_app(work / "app", dump_config(cfg))
    dep = LocalDeployment(work, cfg.num_clients, tls=tls, auth=auth, sites=sites or cfg.data.sites)
    seen = 0
    try:
        if observer is not None:
            observer.on_message(f"starting a SuperLink on {dep.address} and {cfg.num_clients} SuperNodes")
        dep.start()
        run_config: dict[str, object] = {
            "config": "experiment.toml",
            "out": str(out),
            "round-timeout": float(round_timeout),
            "export": export,
            "resume": resume,
        }
        flwr_run = dep.run_app(app_dir, run_config, timeout)
        deadline = time.monotonic() + timeout
        while flwr_run.poll() is None:
            if time.monotonic() > deadline:
                raise CeloraError(f"flower run did not finish within {timeout:g}s (logs: {work})")
            if not dep.procs["superlink"].alive():
                raise CeloraError(f"the SuperLink exited: {dep.procs['superlink'].tail(5)}")
            rows = _rows(out / "metrics.jsonl")
            for row in rows[seen:]:
                if observer is not None:
                    observer.on_round_end(int(row["round"]), row)
            seen = max(seen, len(rows))
            time.sleep(1.0)
        if not (out / "summary.json").is_file():
            if (out / ERROR_FILE).is_file():
                raise CeloraError((out / ERROR_FILE).read_text(encoding="utf-8").strip())
            tail = dep.procs["flwr-run"].tail(15)
            raise CeloraError(f"flower run ended without a summary (logs in {work}): {tail[-600:]}")
    finally:
        dep.stop()
    rows = _rows(out / "metrics.jsonl")
    for row in rows[seen:]:
        if observer is not None:
            observer.on_round_end(int(row["round"]), row)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    diagnostics: dict[str, Any] = {}
    last = out / f"weights_round_{len(rows)}.npy"
    if last.is_file():
        diagnostics["weights"] = np.load(last)
    return RunResult(summary, rows, {}, diagnostics)
