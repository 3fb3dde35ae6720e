"""Adapter bases (random, svd, orthogonal, gradient) and the training knobs they need; tiny models only."""

import typing

import pytest
import torch
from torch import nn

from celora.adapters.bases import BASES, apply_gradient_basis, get_basis, sum_weight_gradients
from celora.adapters.inject import fold_head_scales
from celora.adapters.trilora import TriLoraLinear
from celora.config import ModelConfig, load_config
from celora.errors import CeloraError
from celora.fl.client import lr_factor
from celora.fl.simulation import Simulation, check_names, prepare
from celora.fl.strategies import RoundContext, get_strategy

TINY = [
    "model.name=tiny-bert",
    "model.rank=4",
    "model.max_length=32",
    "num_clients=3",
    "rounds=1",
    "data.max_samples=120",
    "data.train_per_client=12",
    "train.batch_size=8",
    "train.lr=5e-3",
]


def _cfg(*extra: str):
    return load_config(None, TINY + list(extra))


def test_registry_and_config_name_the_same_bases():
    literal = typing.get_args(ModelConfig.model_fields["basis"].annotation)
    assert set(literal) == set(BASES) == {"random", "svd", "orthogonal", "gradient"}
    assert {n for n, b in BASES.items() if b.frozen} == {"orthogonal", "gradient"}
    with pytest.raises(CeloraError, match="model.basis"):
        get_basis("qr")


def test_orthogonal_basis_is_orthonormal_shared_and_starts_at_zero():
    base = nn.Linear(24, 20)
    l1 = TriLoraLinear(base, rank=8, alpha=8, basis="orthogonal", seed=3)
    l2 = TriLoraLinear(nn.Linear(24, 20), rank=8, alpha=8, basis="orthogonal", seed=3)
    a, b = l1.lora_A.detach(), l1.lora_B.detach()
    assert torch.allclose(a.T @ a, torch.eye(8), atol=1e-5) and torch.allclose(b @ b.T, torch.eye(8), atol=1e-5)
    assert torch.equal(a, l2.lora_A) and torch.equal(b, l2.lora_B)
    assert torch.count_nonzero(l1.lora_C) == 0 and l1.lora_S is None


def test_heads_are_independent_blocks_with_scales_folded_into_c():
    layer = TriLoraLinear(nn.Linear(24, 20), rank=8, alpha=8, basis="orthogonal", seed=1, heads=4)
    a = layer.lora_A.detach()
    for i in range(4):  # each head orthonormal on its own
        blk = a[:, 2 * i : 2 * i + 2]
        assert torch.allclose(blk.T @ blk, torch.eye(2), atol=1e-5)
    assert layer.lora_S is not None and layer.lora_S.shape == (4,)
    x = torch.randn(5, 24)
    layer(x).sum().backward()  # C = 0: C gets a gradient, only inside its diagonal blocks
    grad = layer.lora_C.grad
    assert grad is not None and grad.abs().sum() > 0
    assert torch.count_nonzero(grad * (1 - torch.block_diag(*[torch.ones(2, 2)] * 4))) == 0
    with torch.no_grad():
        layer.lora_C.copy_(torch.block_diag(*[torch.randn(2, 2) for _ in range(4)]))
        layer.lora_S.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    before, y = layer.delta_weight().detach(), layer(x).detach()
    fold_head_scales(nn.Sequential(layer))
    assert torch.equal(layer.lora_S.detach(), torch.ones(4))
    assert torch.allclose(layer.delta_weight(), before, atol=1e-5) and torch.allclose(layer(x), y, atol=1e-5)


@pytest.mark.parametrize("basis,heads", [("orthogonal", 1), ("orthogonal", 2), ("svd", 1)])
def test_aggregating_c_is_exact_with_frozen_shared_a_b(basis, heads):
    """Σ_j p_j A C_j B = A (Σ_j p_j C_j) B: the server's mean of C is the mean of the clients' ΔW."""
    layer = TriLoraLinear(nn.Linear(16, 12), rank=4, alpha=4, basis=basis, seed=0, heads=heads)
    g = torch.Generator().manual_seed(3)
    cs = [torch.randn(4, 4, generator=g) for _ in range(3)]
    n = torch.tensor([5, 1, 4])
    deltas = []
    for c in cs:
        with torch.no_grad():
            layer.lora_C.copy_(c)
        deltas.append(layer.delta_weight().detach())
    mean_delta = sum(w * d for w, d in zip(n.tolist(), deltas, strict=True)) / n.sum()
    ctx = RoundContext(rnd=1, num_clients=3, n_train=n.numpy())
    out = get_strategy("celora-global").aggregate(ctx, {j: {"m.lora_C": c} for j, c in enumerate(cs)})
    with torch.no_grad():
        layer.lora_C.copy_(out[0]["m.lora_C"])
    assert torch.allclose(layer.delta_weight(), mean_delta, atol=1e-5)


def test_gradient_basis_is_the_rank_r_svd_of_one_sign_step():
    torch.manual_seed(0)
    layer = TriLoraLinear(nn.Linear(10, 8), rank=3, alpha=6, basis="gradient", seed=0)
    assert torch.count_nonzero(layer.delta_weight()) == 0  # the gradient is taken at W0
    x, y = torch.randn(6, 10), torch.randn(6, 8)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    grads = sum_weight_gradients({"l": layer}, lambda b: ((layer(b[0]) - b[1]) ** 2).mean(), batches)
    assert not layer.base.weight.requires_grad and layer.base.weight.grad is None
    w = layer.base.weight.detach().clone().requires_grad_(True)
    full = torch.zeros(8, 10)
    for xs, ys in batches:
        w.grad = None
        ((xs @ w.T + layer.base.bias.detach() - ys) ** 2).mean().backward()
        full += w.grad
    assert torch.allclose(grads["l"], full, atol=1e-5)
    apply_gradient_basis({"l": layer}, grads, lr=1e-2)
    u, s, vh = torch.linalg.svd(-1e-2 * torch.sign(full.double()))
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(layer.delta_weight().double(), best, atol=1e-5)
    a = layer.lora_A.detach()
    assert torch.allclose(a.T @ a, torch.eye(3), atol=1e-5)


@pytest.mark.parametrize("basis,heads", [("orthogonal", 2), ("gradient", 1)])
def test_frozen_bases_train_only_c_and_head_and_stay_identical(basis, heads):
    cfg = _cfg(
        "method=celora-global",
        f"adapter.basis={basis}",
        f"adapter.heads={heads}",
        "aggregation.head=local",
        "adapter.gradient_samples=16",
    )
    prepared = prepare(cfg)
    sim = Simulation(cfg, prepared=prepared)
    assert sim.server.phase.trained == {"C", "head"}
    sim.server.phase.trainable(prepared.bench)
    trained = {n.rsplit(".", 1)[-1] for n, p in prepared.loaded.model.named_parameters() if p.requires_grad}
    assert "lora_A" not in trained and "lora_B" not in trained and "lora_C" in trained
    assert ("lora_S" in trained) == (heads > 1)
    assert [n for n in sim.up_layout.names if "lora_" in n] and all(n.endswith("lora_C") for n in sim.up_layout.names)
    res = sim.run()
    assert res.summary["bytes_up_total"] > 0
    ab = [n for n in prepared.all_names if n.endswith(("lora_A", "lora_B"))]
    for i in range(3):
        for n in ab:
            assert torch.equal(res.states[i][n], prepared.init_state[n])
    if basis == "gradient":
        note = res.summary["basis_setup"]
        assert note["proxy_rows"] == 16 and note["proxy_rows_from_global_test"] == 0
        assert torch.count_nonzero(prepared.init_state[ab[0]]) > 0


def test_bad_basis_settings_are_one_line_errors():
    with pytest.raises(CeloraError, match=r"model\.basis"):
        _cfg("adapter.basis=qr")
    with pytest.raises(CeloraError, match=r"heads \(3\) must divide rank \(4\)"):
        _cfg("adapter.heads=3")
    with pytest.raises(CeloraError, match="model.heads = 2 needs model.basis = 'orthogonal'"):
        check_names(_cfg("adapter.heads=2", "adapter.basis=svd"))
    with pytest.raises(CeloraError, match="nothing to train"):
        check_names(_cfg("method=ffa", "adapter.basis=gradient"))
    with pytest.raises(CeloraError, match="keeps C frozen, but model.basis = 'orthogonal'"):
        check_names(_cfg("method=ffa", "adapter.basis=orthogonal"))
    with pytest.raises(CeloraError, match="model.gradient_samples"):
        _cfg("adapter.gradient_samples=0")
    with pytest.raises(CeloraError, match="model.gradient_samples = 100000"):
        prepare(_cfg("adapter.basis=gradient", "adapter.gradient_samples=100000"))


def test_lr_schedule_and_bad_training_knobs():
    assert [lr_factor(t, 10, "constant", 2) for t in (0, 1, 5)] == [0.5, 1.0, 1.0]
    cos = [lr_factor(t, 10, "cosine", 2) for t in range(10)]
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[-1] < 0.05 and all(x >= y for x, y in zip(cos[2:], cos[3:], strict=False))
    for bad, field in (("train.schedule=linear", "train.schedule"), ("train.grad_clip=0", "train.grad_clip")):
        with pytest.raises(CeloraError, match=field):
            _cfg(bad)
    with pytest.raises(CeloraError, match="train.warmup_steps"):
        _cfg("train.warmup_steps=-1")


def test_keep_optimizer_resumes_each_clients_adam_moments():
    cfg = _cfg("method=celora-global", "adapter.basis=orthogonal", "rounds=2", "train.keep_optimizer=true")
    prepared = prepare(cfg)
    sim = Simulation(cfg, prepared=prepared)
    sim.run()
    per_round = -(-12 // 8)  # ⌈n_train / batch⌉ steps, one epoch
    for c in sim.clients:
        state = c.optimizer_state
        assert state is not None
        assert {int(s["step"]) for s in state["state"].values()} == {2 * per_round}  # moments of both rounds
    sim = Simulation(_cfg("method=celora-global", "adapter.basis=orthogonal", "rounds=1"), prepared=prepared)
    sim.run()
    assert all(c.optimizer_state is None for c in sim.clients)
