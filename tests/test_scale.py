"""Cost that scales with the work: eval.global_clients, eval.every, eval.batch_size, engine.state (fast, tiny)."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from celora.config import build_config
from celora.errors import CeloraError
from celora.eval import global_eval_clients


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"eval": {"every": 0}}, "eval.every"),
        ({"eval": {"global_clients": 0}}, "eval.global_clients"),
        ({"num_clients": 4, "eval": {"global_clients": 5}}, "eval.global_clients (5) > num_clients (4)"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size"),
        ({"engine": {"state": "tape"}}, "engine.state"),
        ({"train": {"eval_batch_size": 8}, "eval": {"batch_size": 16}}, "same setting"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(CeloraError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        build_config(data)
    assert "\n" not in str(err.value)


def test_train_eval_batch_size_is_read_as_eval_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celora"):
        cfg = build_config({"train": {"eval_batch_size": 8}})
    assert cfg.eval.batch_size == 8 and "train.eval_batch_size is now eval.batch_size" in caplog.text
    assert build_config({}).eval.batch_size == 64


def test_global_eval_sample_is_seeded_and_defaults_to_ten() -> None:
    assert global_eval_clients(7, None, 0) == list(range(7))
    assert global_eval_clients(10, None, 3) == list(range(10))
    some = global_eval_clients(100, None, 0)
    assert len(some) == 10 == len(set(some)) and some == sorted(some) and some == global_eval_clients(100, None, 0)
    assert some != global_eval_clients(100, None, 1)
    assert len(global_eval_clients(100, 25, 0)) == 25 and global_eval_clients(5, 5, 0) == [0, 1, 2, 3, 4]


# --------------------------------------------------------------------------- behaviour inside a run
def test_global_evaluation_runs_on_the_seeded_sample(tiny_config) -> None:  # type: ignore[no-untyped-def]
    from celora.fl.simulation import Simulation

    sim = Simulation(tiny_config("num_clients=5", "rounds=1", "eval.global_clients=2"), export_adapters=False)
    res = sim.run()
    note = res.summary["global_eval"]
    assert note["clients"] == 2 and note["of"] == 5 and note["ids"] == global_eval_clients(5, 2, 0)
    want = sum(sim.clients[i].evaluate_global() for i in note["ids"]) / 2
    assert res.summary["acc_global"] == pytest.approx(want, abs=1e-12)
    assert note["sampled"] == "a seeded sample (eval.global_clients)"


def test_eval_every_skips_rounds_but_not_the_last_and_not_training(tiny_config) -> None:  # type: ignore[no-untyped-def]
    import math

    from celora.fl.simulation import run_experiment

    sparse = run_experiment(tiny_config("rounds=3", "eval.every=2"))
    dense = run_experiment(tiny_config("rounds=3"))
    evaluated = [not math.isnan(r["acc_mean"]) for r in sparse.rounds]
    assert evaluated == [False, True, True]  # rounds 2 (every 2nd) and 3 (the last)
    assert all(math.isnan(c["acc_agg"]) for c in sparse.rounds[0]["clients"])
    for a, b in zip(sparse.rounds[1:], dense.rounds[1:], strict=True):
        assert a["acc_mean"] == b["acc_mean"] and a["acc_mean_agg"] == b["acc_mean_agg"]
    for i, state in dense.states.items():  # evaluation does not touch training
        assert all(torch.equal(state[k], sparse.states[i][k]) for k in state)


def test_evaluation_batch_halves_until_it_fits(monkeypatch: pytest.MonkeyPatch, tiny_config) -> None:  # type: ignore[no-untyped-def]
    from celora.fl.client import evaluate_metrics
    from celora.fl.prepare import prepare
    from celora.models.device import BatchFit

    p = prepare(tiny_config())
    idx = p.split.clients[0].test_idx
    want = evaluate_metrics(p.loaded.model, p.encoded, idx, 4, task=p.task)
    score = p.task.score

    def small_only(model, batch):  # type: ignore[no-untyped-def]
        if batch["labels"].shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return score(model, batch)

    monkeypatch.setattr(p.task, "score", small_only)
    fit = BatchFit(64)
    got = evaluate_metrics(p.loaded.model, p.encoded, idx, fit, task=p.task)
    assert got == want and fit.size == 4


def test_disk_states_give_the_same_run_and_stay_off_the_heap(tmp_path, tiny_config) -> None:  # type: ignore[no-untyped-def]
    from celora.fl.simulation import Simulation, run_experiment

    mem = run_experiment(tiny_config())
    sim = Simulation(tiny_config("engine.state=disk"), tmp_path / "run")
    disk = sim.run()
    for a, b in zip(disk.rounds, mem.rounds, strict=True):
        assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}
    for i, state in mem.states.items():
        assert all(torch.equal(state[k], disk.states[i][k]) for k in state)
    assert all(c._state == {} for c in sim.clients)  # no client holds its state in memory
    files = list((tmp_path / "run").glob("client-states-*/client_*.safetensors"))
    assert len(files) == len(sim.clients)
    adapters = tmp_path / "run" / "adapters"
    assert (adapters / "client_0" / "adapter_config.json").is_file()
    cards = {(adapters / f"client_{i}" / "README.md").read_text() for i in range(len(sim.clients))}
    assert len(cards) == 1 and "peft" in cards.pop()  # PEFT's card, rendered once and copied
