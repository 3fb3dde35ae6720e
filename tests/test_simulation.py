"""The in-process engine on a tiny random BERT and a slice of BBC News (fast)."""

import json

import numpy as np
import pytest
import torch

from celora.fl.simulation import Simulation, prepare, run_experiment

SIM = ("num_clients=4", "data.max_samples=240", "train.lr=5e-3", "data.partition=dirichlet")


@pytest.fixture(scope="module")
def make_cfg(tiny_config):
    """conftest's tiny experiment with 4 clients on 240 articles."""
    return lambda *extra: tiny_config(*SIM, *extra)


@pytest.fixture(scope="module")
def prepared(make_cfg):
    return prepare(make_cfg())


def test_run_folder_and_metrics(tmp_path, make_cfg):
    out = tmp_path / "run"
    res = run_experiment(make_cfg("method=celora-global", "aggregation.head=local"), out)
    for f in ("config.toml", "partition.json", "metrics.jsonl", "summary.json"):
        assert (out / f).is_file(), f
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    for key in ("round", "method", "acc_mean", "acc_weighted", "acc_worst10", "bytes_up", "bytes_down", "wall_s"):
        assert key in rows[0]
    c = rows[0]["clients"][0]
    assert {"id", "n_train", "acc", "loss", "bytes_up", "bytes_down"} <= set(c)
    summary = json.loads((out / "summary.json").read_text())
    for key in (
        "method",
        "acc_mean",
        "acc_weighted",
        "acc_worst10",
        "acc_global",
        "acc_majority",
        "bytes_up_total",
        "bytes_down_total",
        "bytes_per_client_round",
        "rounds",
        "wall_s",
    ):
        assert key in summary
    assert summary == res.summary
    assert all((out / "adapters" / f"client_{i}" / "adapter_model.safetensors").is_file() for i in range(4))
    part = json.loads((out / "partition.json").read_text())
    assert len(part["clients"]) == 4
    # bytes: 4 C matrices of 4×4 fp32 up and down per client-round, plus a small header
    per = summary["bytes_per_client_round"]["up"]
    assert 4 * 16 * 4 < per < 4 * 16 * 4 + 200
    assert summary["bytes_up_total"] == sum(r["bytes_up"] for r in rows)


def test_private_state_kept_and_only_c_shared(prepared, make_cfg):
    sim = Simulation(make_cfg("method=celora-global", "aggregation.head=local"), prepared=prepared)
    res = sim.run()
    a_names = [n for n in prepared.all_names if n.endswith("lora_A")]
    c_names = [n for n in prepared.all_names if n.endswith("lora_C")]
    # A is private: it differs between clients; C was last set to the same global mean for everyone
    assert not torch.allclose(res.states[0][a_names[0]], res.states[1][a_names[0]])
    assert all(torch.allclose(res.states[0][c], res.states[3][c]) for c in c_names)
    assert sim.up_layout.names == c_names


def test_celora_default_personalizes_c_and_head(prepared, make_cfg):
    """The shipped default (issue 5): C and the classifier head travel; each client gets its own mix."""
    sim = Simulation(make_cfg("method=celora", "rounds=1"), prepared=prepared)
    res = sim.run()
    heads = [n for n in prepared.all_names if n.startswith("classifier.")]
    c_names = [n for n in prepared.all_names if n.endswith("lora_C")]
    assert heads and sim.up_layout.names == c_names + heads
    assert res.summary["payload"]["shared_factors"] == ["C", "head"]
    numbers = sum(prepared.init_state[n].numel() for n in c_names + heads)
    assert 4 * numbers < res.summary["bytes_per_client_round"]["up"] < 4 * numbers + 300
    assert not torch.allclose(res.states[0][heads[0]], res.states[1][heads[0]])  # personalized, not one mean


def test_fedit_sends_a_b_and_costs_far_more(prepared, make_cfg):
    g = (
        Simulation(make_cfg("method=celora-global", "rounds=1", "aggregation.head=local"), prepared=prepared)
        .run()
        .summary
    )
    f = Simulation(make_cfg("method=fedit", "rounds=1"), prepared=prepared).run().summary
    assert f["payload"]["shared_factors"] == ["A", "B", "head"]
    assert f["bytes_per_client_round"]["up"] > 5 * g["bytes_per_client_round"]["up"]


def test_local_sends_nothing(prepared, make_cfg):
    s = Simulation(make_cfg("method=local", "rounds=1"), prepared=prepared).run().summary
    assert s["bytes_up_total"] == 0 and s["bytes_down_total"] == 0
    assert s["acc_mean"] == s["acc_mean_agg"]


def test_partial_participation(prepared, make_cfg):
    res = Simulation(make_cfg("method=celora-global", "clients_per_round=2", "rounds=3"), prepared=prepared).run()
    for row in res.rounds:
        assert row["participants"] == 2
        assert sum(c["bytes_up"] > 0 for c in row["clients"]) == 2
        assert all(c["bytes_up"] == 0 for c in row["clients"] if not c["participated"])


def test_deterministic_with_seed(prepared, make_cfg):
    a = Simulation(make_cfg("method=celora-global"), prepared=prepared).run().summary
    b = Simulation(make_cfg("method=celora-global"), prepared=prepared).run().summary
    assert a["acc_mean"] == b["acc_mean"] and a["bytes_up_total"] == b["bytes_up_total"]


@pytest.mark.parametrize("attack", ["nan", "shape", "unknown", "garbage", "oversize"])
def test_hostile_payload_rejected_and_run_continues(prepared, attack, make_cfg):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    def hook(rnd, client, blob):
        if client != 1 or rnd != 1:
            return blob
        if attack == "garbage":
            return b"\x00\x01not a payload"
        if attack == "oversize":
            return blob + b"\0" * 100_000
        t = st_load(blob)
        key = next(iter(t))
        if attack == "nan":
            t[key] = t[key].clone()
            t[key].view(-1)[0] = float("nan")
        elif attack == "shape":
            t[key] = torch.zeros(3, 3)
        else:
            t["evil.lora_A"] = torch.zeros(2)
        return st_save(t, metadata={"wire": "fp32"})

    sim = Simulation(make_cfg("method=celora-global"), prepared=prepared, wire_hook=hook)
    res = sim.run()
    r1 = res.rounds[0]
    assert r1["rejected"] == 1
    bad = r1["clients"][1]
    assert bad["rejected"] and bad["participated"]
    assert res.rounds[1]["rejected"] == 0 and len(res.rounds) == 2
    assert np.isfinite(res.summary["acc_mean"])
    assert all(torch.isfinite(t).all() for st in res.states.values() for t in st.values())


def test_centralized_trains_one_model_and_sends_nothing(prepared, make_cfg):
    res = Simulation(make_cfg("method=centralized", "rounds=1"), prepared=prepared).run()
    assert res.summary["bytes_up_total"] == 0 and res.summary["bytes_down_total"] == 0
    a = [n for n in prepared.all_names if n.endswith("lora_A")][0]
    assert torch.equal(res.states[0][a], res.states[3][a])


def test_fedsb_forces_svd_basis_and_fedit_refuses_it(make_cfg):
    from celora.errors import CeloraError
    from celora.fl.simulation import check_names

    assert check_names(make_cfg("method=fedsb")).model.basis == "svd"
    with pytest.raises(CeloraError, match="model.basis"):
        check_names(make_cfg("method=fedit", "model.basis=svd"))


@pytest.mark.parametrize("method", ["ffa", "fedsa", "fedsb"])
def test_other_baselines_run_and_share_what_they_should(method, make_cfg):
    cfg = make_cfg(f"method={method}", "rounds=1")
    sim = Simulation(cfg, prepared=prepare(cfg))
    res = sim.run()
    factors = {n.rsplit("_", 1)[-1] for n in sim.up_layout.names if "lora_" in n}
    assert factors == {"ffa": {"B"}, "fedsa": {"A"}, "fedsb": {"C"}}[method]
    assert np.isfinite(res.summary["acc_mean"]) and res.summary["bytes_up_total"] > 0


def test_warmup_rounds_run_fedit_then_c_only(prepared, make_cfg):
    cfg = make_cfg("method=celora", "rounds=3", "aggregation.warmup_rounds=1", "aggregation.head=local")
    res = Simulation(cfg, prepared=prepared).run()
    per_round_up = [r["bytes_up"] for r in res.rounds]
    assert per_round_up[0] > 5 * per_round_up[1] and per_round_up[1] == per_round_up[2]
    a = [n for n in prepared.all_names if n.endswith("lora_A")][0]
    # A was averaged in the warm-up round and then trained locally: clients drift apart again
    assert not torch.allclose(res.states[0][a], res.states[1][a])
    assert res.summary["payload"]["shared_factors"] == ["C"]


def test_train_ab_false_trains_only_c_and_head(prepared, make_cfg):
    cfg = make_cfg("method=celora-global", "rounds=1", "model.train_ab=false")
    res = Simulation(cfg, prepared=prepared).run()
    for name in prepared.all_names:
        if name.endswith(("lora_A", "lora_B")):
            assert torch.equal(res.states[2][name], prepared.init_state[name]), name
    from celora.errors import CeloraError

    with pytest.raises(CeloraError, match="train_ab"):
        Simulation(make_cfg("method=fedit", "model.train_ab=false"), prepared=prepared)


def test_train_c_false_keeps_c_at_identity(prepared, make_cfg):
    """The "C frozen at I" control: C never moves, so sharing it carries nothing."""
    res = Simulation(make_cfg("method=celora", "rounds=1", "model.train_c=false"), prepared=prepared).run()
    for name in prepared.all_names:
        if name.endswith("lora_C"):
            assert torch.equal(res.states[1][name], prepared.init_state[name]), name
        if name.endswith("lora_B"):
            assert not torch.equal(res.states[1][name], prepared.init_state[name]), name
    from celora.errors import CeloraError

    with pytest.raises(CeloraError, match="train_c"):
        Simulation(make_cfg("method=fedsb", "model.train_c=false"), prepared=prepared)


def test_diagnostics_every_round(prepared, make_cfg):
    res = Simulation(make_cfg("method=celora-global"), prepared=prepared).run()
    for row in res.rounds:
        d = row["diag"]
        assert np.isfinite(d["aggregation_delta"]) and np.isfinite(d["update_cosine_mean"])
        n = np.array([c["n_train"] for c in row["clients"] if c["participated"]], dtype=float)
        p = n / n.sum()  # FedAvg: every participant mixes the same p, so 1 / Σ_j w_ij² = 1 / Σ_j p_j²
        assert d["effective_collaborators_mean"] == pytest.approx(1.0 / float((p**2).sum()))


def test_majority_baseline():
    from celora.eval import majority_baseline

    y = np.array([0, 0, 1, 1, 1, 2, 0, 1])
    # client 0 trains on 0,0,1 → answers 0; its test rows 1, 0 → 0.5. client 1 trains on 1,1 → 1; test 2, 1 → 0.5
    assert majority_baseline(y, [np.array([0, 1, 2]), np.array([3, 4])], [np.array([7, 6]), np.array([5, 3])]) == 0.5
    assert majority_baseline(y, [np.array([0]), np.array([], dtype=int)], [np.array([1]), np.array([2])]) == 1.0
    assert np.isnan(majority_baseline(y, [np.array([], dtype=int)], [np.array([1])]))
