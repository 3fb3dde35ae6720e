"""`celora flower-sim`: the documented Flower simulation command works without the venv's bin folder on PATH."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from celora.fl.flower.deploy import flower_env, free_port, stop_local_superlink  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_flower_env_puts_this_environment_first() -> None:
    env = flower_env()
    assert env["PATH"].split(os.pathsep)[0] == str(BIN)
    assert (BIN / "flower-superlink").is_file() and (BIN / "flwr").is_file()
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert "FLWR_HOME" not in env or env["FLWR_HOME"] == os.environ.get("FLWR_HOME")


@pytest.mark.slow
def test_documented_flower_sim_line_runs_without_the_venv_on_path(tmp_path: Path) -> None:
    """README: `.venv/bin/celora flower-sim . --federation-config "num-supernodes=4" --stream` (here 2 tiny nodes)."""
    control = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN) or "/usr/bin"
    env.update(
        FLWR_HOME=str(tmp_path / "flwr-home"),  # a fresh home: flwr must launch its own local SuperLink
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        FLWR_LOCAL_CONTROL_API_PORT=str(control),
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
    )
    out = tmp_path / "run"
    settings = "model.name=tiny-bert num_clients=2 rounds=1 data.max_samples=60 train.threads=1"
    cmd = [str(BIN / "celora"), "flower-sim", ".", "--federation-config", "num-supernodes=2", "--stream"]
    cmd += ["--run-config", f'set="{settings}" out="{out}" export=false']
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        stop_local_superlink(control)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Unable to launch" not in proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 2 and summary["rounds"] == 1
