"""Faults a real federation meets: a run killed and resumed, clients dropping out, outlier updates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from celora import cli
from celora.config import load_config
from celora.fl.run_folder import load_checkpoint, read_rows
from celora.fl.simulation import Simulation, prepare

FAULTS = ("num_clients=4", "data.max_samples=200", "train.lr=5e-3", "data.partition=dirichlet")


@pytest.fixture(scope="module")
def make_cfg(tiny_config):
    """conftest's tiny experiment with 4 clients on 200 articles."""
    return lambda *extra: tiny_config(*FAULTS, *extra)


@pytest.fixture(scope="module")
def prepared(make_cfg):
    return prepare(make_cfg())


def _per_client(rows):
    """Per round and client: accuracies, loss and bytes (NaN, for a client with no metric yet, as None)."""
    keys = ("acc", "acc_agg", "loss", "bytes_up", "bytes_down")
    return [[tuple(None if c[k] != c[k] else c[k] for k in keys) for c in r["clients"]] for r in rows]


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["celora", *args])
    code: int | str | None = 0
    try:
        cli.main()
    except SystemExit as ex:
        code = ex.code
    return (0 if code is None else int(code)), capsys.readouterr().err.strip()


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, capsys, tiny_config):
    """A real `celora run` process is SIGKILLed after round 2 of 4; the newest checkpoint is then damaged
    (half-written); `celora run --resume` falls back to the previous one and ends exactly where an
    uninterrupted run ends: same per-client accuracies, losses and bytes in every round."""
    extra = ["rounds=4", "clients_per_round=3", "dropout=0.3", "method=celora"]
    out = tmp_path / "run"
    args = [sys.executable, "-m", "celora.cli", "run", "--out", str(out), "--no-export"]
    for item in tiny_config.overrides(*FAULTS, *extra):
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    marker = out / "checkpoints" / "ckpt-000002.json"
    deadline = time.monotonic() + 240
    while not marker.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    assert not (out / "summary.json").exists()
    newest = sorted((out / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    assert load_checkpoint(out) is not None and load_checkpoint(out).round >= 2
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written checkpoint
    fallback = load_checkpoint(out)
    assert fallback is not None and fallback.path.stem < newest.stem
    code, err = _cli(monkeypatch, capsys, "run", "--resume", str(out), "--no-export")
    assert code == 0, err
    resumed = read_rows(out / "metrics.jsonl")
    assert [r["round"] for r in resumed] == [1, 2, 3, 4]
    cfg = load_config(out / "config.toml", [])
    ref = Simulation(cfg, tmp_path / "ref", export_adapters=False).run()
    assert _per_client(resumed) == _per_client(ref.rounds)
    assert [r["dropped"] for r in resumed] == [r["dropped"] for r in ref.rounds]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("acc_mean", "acc_mean_agg", "acc_global", "bytes_up_total", "bytes_down_total"):
        assert summary[key] == ref.summary[key], key
    assert not (out / "checkpoints").exists()  # a finished run keeps its results, not its checkpoints
    code, err = _cli(monkeypatch, capsys, "run", "--resume", str(out))
    assert code == 2 and "already finished" in err


def test_resume_needs_a_checkpoint(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.toml").write_text('method = "celora"\n')
    code, err = _cli(monkeypatch, capsys, "run", "--resume", str(tmp_path))
    assert code == 2 and "no complete checkpoint" in err and len(err.splitlines()) == 1
    code, err = _cli(monkeypatch, capsys, "run", "--resume", str(tmp_path / "nope"))
    assert code == 2 and "config.toml" in err
    code, err = _cli(monkeypatch, capsys, "run", "configs/quickstart.toml", "--set", "checkpoint_every=-1")
    assert code == 2 and "checkpoint_every" in err


def test_dropout_keeps_state_and_lists_who_dropped(prepared, monkeypatch, capsys, make_cfg):
    cfg = make_cfg("rounds=4", "dropout=0.3", "dropout_before=0.2", "method=celora")
    res = Simulation(cfg, prepared=prepared).run()
    dropped = [r["dropped"] for r in res.rounds]
    assert any(dropped), dropped  # with this seed somebody drops
    for row in res.rounds:
        for c in row["clients"]:
            if c["id"] in row["dropped"]:
                assert c["dropped"] in ("before", "after") and not c["participated"] and c["bytes_up"] == 0
        assert row["participants"] == 4 - len(row["dropped"])
    assert all(torch.isfinite(t).all() for st in res.states.values() for t in st.values())
    assert np.isfinite(res.summary["acc_mean"])
    again = Simulation(cfg, prepared=prepared).run()
    assert [r["dropped"] for r in again.rounds] == dropped  # seeded
    code, err = _cli(monkeypatch, capsys, "run", "configs/quickstart.toml", "--set", "dropout=1.0")
    assert code == 2 and "dropout = 1.0" in err and len(err.splitlines()) == 1


def _scale_client_1(factor: float):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    def hook(rnd: int, client: int, blob: bytes) -> bytes:
        if client != 1 or rnd != 1:
            return blob
        if factor == 0:
            return b"garbage"
        t = st_load(blob)
        return st_save({k: v * factor for k, v in t.items()}, metadata={"wire": "fp32"})

    return hook


@pytest.mark.parametrize("method", ["celora", "fedit"])
def test_outlier_update_rejected_by_norm_ratio(prepared, method, make_cfg):
    """Client 1 sends 100× its upload in round 1: max_norm_ratio rejects it with a reason, and the run is
    exactly the run in which that upload never arrived (personalized `celora` and FedAvg alike)."""
    cfg = make_cfg(f"method={method}", "aggregation.max_norm_ratio=5")
    res = Simulation(cfg, prepared=prepared, wire_hook=_scale_client_1(100.0)).run()
    bad = res.rounds[0]["clients"][1]
    assert res.rounds[0]["rejected"] == 1 and "aggregation.max_norm_ratio" in bad["rejected"]
    assert res.rounds[1]["rejected"] == 0
    lost = Simulation(make_cfg(f"method={method}"), prepared=prepared, wire_hook=_scale_client_1(0)).run()
    same = [[(c["acc"], c["acc_agg"], c["loss"], c["bytes_down"]) for c in r["clients"]] for r in res.rounds]
    assert same == [[(c["acc"], c["acc_agg"], c["loss"], c["bytes_down"]) for c in r["clients"]] for r in lost.rounds]
    unguarded = Simulation(make_cfg(f"method={method}"), prepared=prepared, wire_hook=_scale_client_1(100.0)).run()
    assert unguarded.rounds[0]["rejected"] == 0


def test_clip_norm_bounds_every_message(prepared, make_cfg):
    """With clip_norm = c, round 1's C̄_i − C_init = Σ_j w_ij clip(u_j) has norm ≤ c for every client,
    however large the outlier's update."""
    c = 0.05
    cfg = make_cfg("method=celora", "rounds=1", f"aggregation.clip_norm={c}")
    sim = Simulation(cfg, prepared=prepared, wire_hook=_scale_client_1(100.0))
    res = sim.run()
    names = sim.up_layout.names
    for i, st in res.states.items():
        if res.rounds[0]["clients"][i]["participated"]:
            delta = torch.cat([(st[n] - prepared.init_state[n]).reshape(-1) for n in names])
            assert float(delta.norm()) <= c * (1 + 1e-5), i
    free = Simulation(make_cfg("method=celora", "rounds=1"), prepared=prepared, wire_hook=_scale_client_1(100.0)).run()
    big = torch.cat([(free.states[0][n] - prepared.init_state[n]).reshape(-1) for n in names])
    assert float(big.norm()) > 10 * c


def test_resume_in_process_keeps_optimizer_moments(prepared, make_cfg, tmp_path):
    """With train.keep_optimizer each client's AdamW moments travel through the checkpoint too: a run that
    dies at the start of round 3 and is resumed equals the uninterrupted one."""
    from celora.fl.records import Silent

    class DiesInRound3(Silent):
        def on_round_start(self, rnd: int, clients: list[int]) -> None:
            if rnd == 3:
                raise RuntimeError("died")

    cfg = make_cfg("rounds=3", "clients_per_round=3", "train.keep_optimizer=true")
    ref = Simulation(cfg, tmp_path / "ref", prepared=prepared, export_adapters=False).run()
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="died"):
        Simulation(cfg, run, prepared=prepared, export_adapters=False, observer=DiesInRound3()).run()
    ckpt = load_checkpoint(run)
    assert ckpt is not None and ckpt.round == 2 and ckpt.state["optimizers"]
    resumed = Simulation(cfg, run, prepared=prepared, export_adapters=False, resume=True).run()
    assert _per_client(resumed.rounds) == _per_client(ref.rounds)


def test_compare_resumes_a_cell_cut_off_mid_run(make_cfg, tmp_path):
    """`celora compare` continues a cell that died mid-run from its checkpoint: the same cell row as a clean
    comparison's."""
    from celora.compare import run_comparison
    from celora.fl.records import Silent

    class DiesInRound2(Silent):
        def on_round_start(self, rnd: int, clients: list[int]) -> None:
            if rnd == 2:
                raise RuntimeError("died")

    base = make_cfg("rounds=2", "clients_per_round=3")
    clean = run_comparison(base, ["celora"], [0], tmp_path / "clean")
    with pytest.raises(RuntimeError, match="died"):
        run_comparison(base, ["celora"], [0], tmp_path / "cut", observer_for=lambda m, s: DiesInRound2())
    assert load_checkpoint(tmp_path / "cut" / "celora" / "seed_0") is not None
    resumed = run_comparison(base, ["celora"], [0], tmp_path / "cut")

    def same(rows):  # NaN-safe: compared as JSON text, wall time left out
        return json.dumps([{k: v for k, v in r.items() if k != "wall_s"} for r in rows], sort_keys=True)

    assert same(resumed) == same(clean)
    assert "resumed from ckpt-000001" in (tmp_path / "cut" / "celora" / "seed_0" / "celora.log").read_text()
