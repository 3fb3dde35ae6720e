import pytest
import torch
from torch import nn

from celora.adapters.trilora import TriLoraLinear, module_seed


def _layer(**kw):
    torch.manual_seed(0)
    return TriLoraLinear(nn.Linear(12, 10), rank=4, alpha=kw.pop("alpha", 8.0), **kw)


def test_init_is_identity_function_and_c_is_identity():
    layer = _layer()
    x = torch.randn(5, 12)
    assert torch.equal(layer.lora_C.data, torch.eye(4))
    assert torch.all(layer.lora_B == 0)
    assert torch.allclose(layer(x), layer.base(x))


def test_forward_matches_delta_weight_formula():
    layer = _layer()
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_C.normal_()
    x = torch.randn(5, 12)
    expected = x @ (layer.base.weight + layer.delta_weight()).T + layer.base.bias
    assert layer.scaling == 2.0
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_same_seed_same_basis_different_seed_different():
    a = _layer(seed=7)
    b = _layer(seed=7)
    c = _layer(seed=8)
    assert torch.equal(a.lora_A, b.lora_A)
    assert not torch.equal(a.lora_A, c.lora_A)
    assert module_seed(1, "x.query") == module_seed(1, "x.query") != module_seed(1, "x.value")


def test_paper_init_is_small_gaussian():
    layer = TriLoraLinear(nn.Linear(400, 400), rank=16, alpha=16, init="paper", seed=0)
    assert layer.lora_A.std().item() == pytest.approx(1e-3, rel=0.05)


def test_svd_basis_is_deterministic_and_starts_at_zero_delta():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    l1 = TriLoraLinear(base, rank=4, alpha=4, basis="svd", seed=1)
    l2 = TriLoraLinear(nn.Linear(12, 10), rank=4, alpha=4, basis="svd", seed=2)
    l2.base.load_state_dict(base.state_dict())
    l2.reset_adapter(init="kaiming", basis="svd", seed=99)
    assert torch.allclose(l1.lora_A, l2.lora_A) and torch.allclose(l1.lora_B, l2.lora_B)
    assert torch.all(l1.delta_weight() == 0)
    # with C = I the adapter spans the top-r part of W0: A I B = U_r S_r V_rᵀ (transposed)
    with torch.no_grad():
        l1.lora_C.copy_(torch.eye(4))
    u, s, vh = torch.linalg.svd(base.weight.detach(), full_matrices=False)
    assert torch.allclose(l1.delta_weight(), (u[:, :4] * s[:4]) @ vh[:4], atol=1e-5)


def test_svd_rank_too_large_is_an_error():
    with pytest.raises(ValueError, match="rank"):
        TriLoraLinear(nn.Linear(3, 3), rank=4, alpha=4, basis="svd")
