"""Strategies are fed hand-built messages: no model involved."""

import numpy as np
import pytest
import torch

from celora.config import AggregationConfig
from celora.errors import CeloraError
from celora.fl.strategies import STRATEGIES, RoundContext, get_strategy

C = "enc.l0.q.lora_C"


def _ctx(n_train, rnd=1):
    return RoundContext(rnd=rnd, num_clients=len(n_train), n_train=np.asarray(n_train))


def test_registry_has_baselines_and_rejects_unknown():
    assert {"celora-global", "fedit", "local"} <= set(STRATEGIES)
    with pytest.raises(CeloraError, match="unknown method 'nope'"):
        get_strategy("nope")


def test_factor_sets_and_head_policy():
    g = get_strategy("celora-global")
    assert g.shared_factors == {"C", "head"} and g.trained_factors == {"A", "B", "C", "head"}
    assert get_strategy("celora").shared_factors == {"C", "head"}  # the measured default (issue 5)
    assert get_strategy("celora", AggregationConfig(head="local")).shared_factors == {"C"}
    f = get_strategy("fedit")
    assert f.shared_factors == {"A", "B", "head"} and "C" not in f.trained_factors
    f_local_head = get_strategy("fedit", AggregationConfig(head="local"))
    assert f_local_head.shared_factors == {"A", "B"}
    assert get_strategy("local").shared_factors == frozenset()


def test_celora_global_is_sample_weighted_mean_sent_to_all():
    s = get_strategy("celora-global")
    updates = {0: {C: torch.full((2, 2), 1.0)}, 2: {C: torch.full((2, 2), 4.0)}}
    out = s.aggregate(_ctx([10, 5, 30]), updates)
    assert set(out) == {0, 1, 2}  # everyone gets the new global C (delivered when next online)
    assert torch.allclose(out[1][C], torch.full((2, 2), (10 * 1 + 30 * 4) / 40))


def test_fedit_averages_a_b_and_head():
    s = get_strategy("fedit")
    ups = {
        i: {
            "l.lora_A": torch.full((3, 2), float(i)),
            "l.lora_B": torch.full((2, 3), 2.0 * i),
            "classifier.weight": torch.full((2, 3), float(i)),
        }
        for i in range(3)
    }
    out = s.aggregate(_ctx([1, 1, 2]), ups)
    assert torch.allclose(out[0]["l.lora_A"], torch.full((3, 2), 1.25))
    assert torch.allclose(out[0]["l.lora_B"], torch.full((2, 3), 2.5))


def test_local_sends_nothing_and_empty_round():
    assert get_strategy("local").aggregate(_ctx([1, 2]), {0: {C: torch.eye(2)}}) == {}
    assert get_strategy("fedit").aggregate(_ctx([1, 2]), {}) == {}


def test_more_baselines_factor_sets():
    assert get_strategy("ffa").trained_factors == {"B", "head"} and get_strategy("ffa").shared_factors == {"B", "head"}
    sa = get_strategy("fedsa")
    assert sa.trained_factors == {"A", "B", "head"} and sa.shared_factors == {"A"}
    sb = get_strategy("fedsb")
    assert sb.trained_factors == {"C", "head"} and sb.shared_factors == {"C"} and sb.basis == "svd"
    assert get_strategy("centralized").pooled and get_strategy("centralized").shared_factors == frozenset()


def test_fedsb_aggregation_is_exact():
    """mean_j ΔW(C_j) == ΔW(mean_j C_j) when A, B are shared and frozen (SVD basis)."""
    from torch import nn

    from celora.adapters.trilora import TriLoraLinear

    torch.manual_seed(0)
    layer = TriLoraLinear(nn.Linear(16, 12), rank=4, alpha=4, basis="svd", seed=0)
    g = torch.Generator().manual_seed(3)
    cs = [torch.randn(4, 4, generator=g) for _ in range(3)]
    n = [5, 1, 4]
    deltas = []
    for c in cs:
        with torch.no_grad():
            layer.lora_C.copy_(c)
        deltas.append(layer.delta_weight().detach())
    mean_delta = sum(w * d for w, d in zip(n, deltas, strict=True)) / sum(n)
    out = get_strategy("fedsb").aggregate(_ctx(n), {j: {C: c} for j, c in enumerate(cs)})
    with torch.no_grad():
        layer.lora_C.copy_(out[0][C])
    assert torch.allclose(layer.delta_weight(), mean_delta, atol=1e-5)
