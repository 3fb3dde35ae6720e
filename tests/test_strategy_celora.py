"""The personalized `celora` strategy, fed hand-built C updates and data summaries."""

import numpy as np
import torch

from celora.config import AggregationConfig
from celora.fl.similarity import ClassSummary
from celora.fl.strategies import RoundContext, get_strategy

NAMES = ["l0.q.lora_C", "l0.v.lora_C"]


def _updates(directions):
    """Client j's C = I + d_j (same d on both layers); it started the round from I."""
    ups = {
        j: {n: torch.eye(2) + torch.tensor(d, dtype=torch.float32).reshape(2, 2) for n in NAMES}
        for j, d in enumerate(directions)
    }
    sent = {j: {n: torch.eye(2) for n in NAMES} for j in ups}
    return ups, sent


def _summary(mean):
    return {0: ClassSummary(np.array([1.0]), np.array([mean], dtype=float), np.full((1, 2), 0.1), 10)}


def test_lambda_zero_is_fedavg():
    s = get_strategy("celora", AggregationConfig(lam=0.0, beta=0.0))
    s.setup(np.array([1, 3]))
    ups, sent = _updates([[1, 0, 0, 0], [0, 0, 0, 1]])
    out = s.aggregate(RoundContext(1, 2, np.array([1, 3]), sent), ups)
    expected = (1 * ups[0][NAMES[0]] + 3 * ups[1][NAMES[0]]) / 4
    assert torch.allclose(out[0][NAMES[0]], expected) and torch.allclose(out[1][NAMES[1]], expected)


def test_parameter_similarity_groups_clients():
    s = get_strategy("celora", AggregationConfig(lam=1.0, beta=0.0))
    s.setup(np.ones(4))
    a, b = [1, 0.1, 0, 0], [0, 0, -0.1, -1]
    ups, sent = _updates([a, a, b, b])
    out = s.aggregate(RoundContext(1, 4, np.ones(4), sent), ups)
    w = s.diagnostics["weights"]
    assert np.allclose(w.sum(1), 1) and (w >= 0).all()
    for i, partner in [(0, 1), (1, 0), (2, 3), (3, 2)]:
        others = [j for j in range(4) if j not in (i, partner)]
        assert all(w[i, partner] > w[i, j] for j in others)
    assert not torch.allclose(out[0][NAMES[0]], out[2][NAMES[0]])  # personalized messages differ
    assert set(s.diagnostics["effective_collaborators"]) == {0, 1, 2, 3}


def test_data_similarity_drives_weights_when_beta_is_one():
    s = get_strategy("celora", AggregationConfig(lam=2.0, beta=1.0))
    s.setup(np.ones(4), [_summary([0, 0]), _summary([0.1, 0]), _summary([5, 5]), _summary([5, 5.1])])
    ups, sent = _updates([[1, 0, 0, 0]] * 4)  # identical updates: only the data can tell clients apart
    s.aggregate(RoundContext(1, 4, np.ones(4), sent), ups)
    w = s.diagnostics["weights"]
    assert w[0, 1] > w[0, 2] and w[2, 3] > w[2, 0]
    assert s.diagnostics["similarity_data"].shape == (4, 4)


def test_partial_participation_only_addresses_participants():
    s = get_strategy("celora")
    s.setup(np.ones(5), [_summary([k, 0]) for k in range(5)])
    ups, sent = _updates([[1, 0, 0, 0], [0, 1, 0, 0]])
    ups = {1: ups[0], 3: ups[1]}
    sent = {1: sent[0], 3: sent[1]}
    out = s.aggregate(RoundContext(2, 5, np.ones(5), sent), ups)
    assert set(out) == {1, 3}
    w = s.diagnostics["weights"]
    assert w.shape == (5, 5) and w[0].sum() == 0 and np.isclose(w[1].sum(), 1)
