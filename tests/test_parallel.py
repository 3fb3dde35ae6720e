"""engine.parallel_clients: clients trained and evaluated together give what one at a time gives (fp32, CPU)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import celora.fl.backbone as backbone
import celora.fl.batched as batched
from celora.adapters.inject import clients_forward
from celora.adapters.trilora import TriLoraLinear
from celora.data.tasks import get_task
from celora.errors import CeloraError
from celora.fl.simulation import RunResult, Simulation
from celora.models.segments import RandomStream, own_draws, unsplit_attention_dropout

TOL = 1e-5
PER_CLIENT = ("acc", "loss", "acc_agg", "loss_agg", "train_loss", "bytes_up", "bytes_down", "participated", "dropped")


class Lines:
    """An observer that keeps the engine's messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def on_round_start(self, rnd: int, clients: list[int]) -> None:
        pass

    def on_client_done(self, rnd: int, client: int, record: Any) -> None:
        pass

    def on_round_end(self, rnd: int, metrics: dict[str, Any]) -> None:
        pass

    def on_message(self, text: str) -> None:
        self.lines.append(text)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= TOL * max(1.0, abs(float(a)))
    return a == b


def assert_same_run(seq: RunResult, par: RunResult) -> None:
    """Per-client metrics, bytes and adapters of every round agree to 1e-5."""
    assert len(seq.rounds) == len(par.rounds)
    for ra, rb in zip(seq.rounds, par.rounds, strict=True):
        for ca, cb in zip(ra["clients"], rb["clients"], strict=True):
            for key in PER_CLIENT:
                assert _close(ca.get(key), cb.get(key)), (ra["round"], ca["id"], key, ca.get(key), cb.get(key))
            for key in set(ca["metrics"]) | set(cb["metrics"]):
                assert _close(ca["metrics"].get(key), cb["metrics"].get(key)), (ra["round"], ca["id"], key)
    for i in seq.states:
        a, b = seq.states[i], par.states[i]
        assert set(a) == set(b)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=TOL, rtol=TOL), (i, k, float((a[k] - b[k]).abs().max()))


def run_both(tiny_config: Any, *extra: str, k: int | str = 3) -> tuple[RunResult, RunResult, list[str]]:
    """The run one client at a time, the run with ``engine.parallel_clients = k`` (which must train some clients
    together), and the latter's messages."""
    seq = Simulation(tiny_config(*extra)).run()
    lines, groups, real = Lines(), [], batched.train_together

    def counted(bench: Any, clients: Any, rnd: int, phase: Any) -> Any:
        groups.append(len(clients))
        return real(bench, clients, rnd, phase)

    batched.train_together = counted
    try:
        par = Simulation(tiny_config(*extra, f"engine.parallel_clients={k}"), observer=lines).run()
    finally:
        batched.train_together = real
    assert k == "auto" or max(groups, default=0) > 1, groups
    return seq, par, lines.lines


@pytest.mark.parametrize(
    "extra",
    [
        ("method=celora", "num_clients=4"),  # personalized: groups of 3 and 1
        (  # A, B and head train; clients stop after different numbers of steps; AdamW kept across rounds
            "method=fedit",
            "num_clients=4",
            "train.max_steps=3",
            "train.grad_clip=0.05",
            "train.schedule=cosine",
            "train.warmup_steps=1",
            "train.keep_optimizer=true",
            "train.weight_decay=0.01",
        ),
        ("method=celora", "model.basis=orthogonal", "model.heads=2"),  # frozen A, B; per-head scales folded into C
        ("method=fedsa", "model.name=tiny-llama", "clients_per_round=3", "num_clients=5", "dropout=0.3"),
    ],
    ids=["celora", "fedit-steps-clip-optimizer", "orthogonal-heads", "llama-fedsa-dropouts"],
)
def test_parallel_clients_equal_one_at_a_time(tiny_config: Any, extra: tuple[str, ...]) -> None:
    seq, par, _ = run_both(tiny_config, *extra)
    assert_same_run(seq, par)


def test_dropout_draws_each_clients_own_masks(tiny_config: Any, monkeypatch: Any) -> None:
    """With dropout in the base (hidden and SDPA attention, p = 0.1) and on the adapters' input, clients trained
    together draw the masks each draws alone: the same run to 1e-5 (with one stacked mask it is not)."""
    real = backbone.load_model

    def with_dropout(*args: Any, **kwargs: Any) -> Any:
        loaded = real(*args, **kwargs)
        for m in loaded.model.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.1
        return loaded

    monkeypatch.setattr(backbone, "load_model", with_dropout)
    seq, par, lines = run_both(tiny_config, "method=celora", "num_clients=4", "model.dropout=0.1")
    assert_same_run(seq, par)
    assert not [line for line in lines if "dropout" in line], lines


def test_own_draws_trims_each_client_and_restores_the_generator() -> None:
    x = torch.ones(5, 6, 3)
    drop = nn.Dropout(0.5).train()
    torch.manual_seed(3)
    streams = [RandomStream(torch.device("cpu"))]
    torch.manual_seed(4)
    streams.append(RandomStream(torch.device("cpu")))
    before = torch.get_rng_state()
    with own_draws(drop, [2, 3], [4, 6], streams):
        y = drop(x)
    assert torch.equal(torch.get_rng_state(), before) and "forward" not in vars(drop)
    torch.manual_seed(3)
    a = nn.functional.dropout(torch.ones(2, 4, 3), 0.5)
    torch.manual_seed(4)
    b = nn.functional.dropout(torch.ones(3, 6, 3), 0.5)
    assert torch.equal(y[:2, :4], a) and torch.equal(y[:2, 4:], x[:2, 4:]) and torch.equal(y[2:], b)
    with own_draws(drop, [2, 3], [4, 6], streams):  # each stream goes on from where it stopped
        again = drop(x)
    assert not torch.equal(again[2:], b)


def test_eager_attention_dropout_is_said_to_be_unsplit(tiny_bert: Any) -> None:
    model = tiny_bert.model
    assert unsplit_attention_dropout(model) == 0.0  # sdpa: an AttentionInterface function
    model.config.attention_probs_dropout_prob = 0.1
    assert unsplit_attention_dropout(model) == 0.0
    model.set_attn_implementation("eager")
    assert unsplit_attention_dropout(model) == 0.1


def test_prompt_task_trains_together_and_evaluates_one_at_a_time(tiny_config: Any, tmp_path: Path) -> None:
    rows = "\n".join(f"{['bad', 'good'][i % 2]} thing {i},{['no', 'yes'][i % 2]}" for i in range(48))
    (tmp_path / "d.csv").write_text("text,label\n" + rows + "\n")
    extra = ("model.name=tiny-llama", "model.max_length=96", f"data.path={tmp_path / 'd.csv'}", "data.task=prompt")
    extra += ('data.verbalizers=["no", "yes"]', "data.partition=iid", "rounds=1", "train.batch_size=4")
    seq, par, _ = run_both(tiny_config, *extra)
    assert_same_run(seq, par)
    assert batched.loss_kind(get_task("prompt")) == "tokens" and not batched.scores_kind(get_task("prompt"))


def test_a_task_without_per_client_loss_runs_one_at_a_time() -> None:
    assert batched.loss_kind(get_task("classify")) == "logits" and batched.scores_kind(get_task("classify"))
    assert batched.loss_kind(get_task("image")) == "logits"
    assert batched.loss_kind(get_task("image-prompt")) is None


def test_out_of_memory_halves_the_group_and_nothing_is_lost(tiny_config: Any, monkeypatch: Any) -> None:
    real = batched.train_together

    def small_memory(bench: Any, clients: Any, rnd: int, phase: Any) -> Any:
        if len(clients) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(bench, clients, rnd, phase)

    monkeypatch.setattr(batched, "train_together", small_memory)
    seq, par, lines = run_both(tiny_config, "num_clients=5", "rounds=1", k=4)
    assert_same_run(seq, par)
    assert any("ran out of memory" in line for line in lines), lines


def test_auto_picks_a_k_and_says_so(tiny_config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batched, "AUTO_SECONDS", 0.0)  # each full group is one K's measurement
    seq, par, lines = run_both(tiny_config, "rounds=2", "num_clients=6", k="auto")
    assert_same_run(seq, par)
    said = [line for line in lines if line.startswith("engine.parallel_clients = auto")]
    assert len(said) == 2 and "timing K = 1, 2, 4" in said[0] and "clients together" in said[1], lines


def test_speed_search_doubles_while_it_gains_then_settles_on_the_fastest() -> None:
    search = batched.SpeedSearch(cap=64, min_seconds=1.0)
    assert search.observe(1, 10, 0.5) is None and search.k == 1  # under a second: still K = 1
    assert search.observe(1, 10, 0.5) is None and search.k == 2  # rate(1) = 20 rows/s
    assert search.observe(1, 100, 0.1) is None and search.k == 2  # a partial group is not K = 2's rate
    assert search.observe(2, 30, 1.0) is None and search.k == 4  # 30 ≥ 1.05 · 20
    assert search.observe(4, 31, 1.0) == 4  # 31 < 1.05 · 30: stop, the fastest so far
    assert search.rates == {1: 20.0, 2: 30.0, 4: 31.0}
    slower = batched.SpeedSearch(cap=64, min_seconds=0.0)
    slower.observe(1, 20, 1.0)
    assert slower.observe(2, 10, 1.0) == 1  # stacking lost: back to one at a time
    capped = batched.SpeedSearch(cap=3, min_seconds=0.0)
    capped.observe(1, 10, 1.0)
    assert capped.observe(2, 40, 1.0) == 2  # 4 > cap


def test_config_rejects_a_bad_value(tiny_config: Any) -> None:
    for bad in ("0", "many"):
        with pytest.raises(CeloraError, match="engine.parallel_clients"):
            tiny_config(f"engine.parallel_clients={bad}")


@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 4, 1]], ids=["equal", "unequal"])
def test_layer_applies_each_clients_factors_to_its_rows(sizes: list[int]) -> None:
    torch.manual_seed(0)
    layer = TriLoraLinear(nn.Linear(6, 5), rank=4, alpha=4.0, basis="orthogonal", heads=2)
    views = [
        {f"l.lora_{f}": torch.randn_like(getattr(layer, f"lora_{f}")) for f in ("A", "C", "B", "S")} for _ in sizes
    ]
    model = nn.Sequential()
    model.add_module("l", layer)
    x = torch.randn(sum(sizes), 7, 6)
    with clients_forward(model, sizes, views, ()):
        together = model(x)
    alone = []
    for x_k, v in zip(x.split(sizes), views, strict=True):
        with torch.no_grad():
            for f in ("A", "C", "B", "S"):
                getattr(layer, f"lora_{f}").copy_(v[f"l.lora_{f}"])
        alone.append(model(x_k))
    assert layer.clients is None
    assert torch.allclose(together, torch.cat(alone), atol=1e-6)


def test_head_routes_each_clients_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("classifier", nn.Linear(4, 3))
    views = [{"classifier.weight": torch.randn(3, 4), "classifier.bias": torch.randn(3)} for _ in range(2)]
    x = torch.randn(5, 4)
    with clients_forward(model, [2, 3], views, ("classifier",)):
        y = model(x)
    ref = [x_k @ v["classifier.weight"].T + v["classifier.bias"] for x_k, v in zip(x.split([2, 3]), views, strict=True)]
    assert torch.allclose(y, torch.cat(ref)) and isinstance(model.classifier, nn.Linear)
    assert np.isfinite(y.detach().numpy()).all()
