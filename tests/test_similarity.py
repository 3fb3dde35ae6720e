"""Data similarity (class GMM summaries + hierarchical OT) and parameter similarity."""

import numpy as np
import ot
import pytest
import torch

from celora.errors import CeloraError
from celora.fl.similarity import (
    ClassSummary,
    clip_features,
    data_distance_matrix,
    data_similarity,
    fit_class_gmms,
    ot3_batched,
    param_similarity,
    privatize_summary,
    summary_from_tensors,
    summary_to_tensors,
)

D = 6


def _gaussians(k: int = 3, g: int = 2, seed: int = 0) -> list[ClassSummary]:
    """Fixed class-conditional mixtures, well separated between classes."""
    rng = np.random.default_rng(seed)
    return [
        ClassSummary(
            weights=rng.dirichlet(np.ones(g)),
            means=3.0 * c + rng.normal(size=(g, D)),
            variances=rng.uniform(0.2, 2.0, size=(g, D)),
            n=1,
        )
        for c in range(k)
    ]


def _client(classes: list[ClassSummary], counts, labels=None) -> dict[int, ClassSummary]:
    labels = range(len(classes)) if labels is None else labels
    return {
        int(lab): ClassSummary(cs.weights, cs.means, cs.variances, int(n))
        for lab, cs, n in zip(labels, classes, counts, strict=True)
        if n > 0
    }


def _random_client(rng: np.random.Generator, max_k: int = 4, max_g: int = 3) -> dict[int, ClassSummary]:
    out = {}
    for c in rng.permutation(6)[: rng.integers(1, max_k + 1)]:
        g = int(rng.integers(1, max_g + 1))
        out[int(c)] = ClassSummary(
            weights=rng.dirichlet(np.ones(g)),
            means=rng.normal(scale=2.0, size=(g, D)),
            variances=rng.uniform(0.1, 3.0, size=(g, D)),
            n=int(rng.integers(1, 50)),
        )
    return out


# ------------------------------------------------------------------------------------------ client-side fit


def test_fit_class_gmms_components_and_determinism():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1 + 2 + 40 + 4, D))
    y = np.array([7] + [3] * 2 + [0] * 40 + [5] * 4)
    x[-4:] = x[-1]  # class 5: four copies of one point -> a single component
    s = fit_class_gmms(x, y, seed=1)
    assert sorted(s) == [0, 3, 5, 7]
    assert [s[c].weights.shape[0] for c in (7, 3, 0, 5)] == [1, 2, 3, 1]
    assert [s[c].n for c in (7, 3, 0, 5)] == [1, 2, 40, 4]
    np.testing.assert_allclose(s[7].means[0], x[0])
    np.testing.assert_allclose(s[7].variances, 1e-5)
    two = s[3].means[np.argsort(s[3].means[:, 0])]
    np.testing.assert_allclose(two, x[1:3][np.argsort(x[1:3, 0])], atol=1e-6)
    np.testing.assert_allclose(s[3].variances, 1e-5, rtol=1e-3)
    for cs in s.values():
        assert cs.weights.sum() == pytest.approx(1.0) and (cs.variances > 0).all()
        assert cs.means.shape == cs.variances.shape == (cs.weights.shape[0], D)
    again = fit_class_gmms(x, y, seed=1)
    for c in s:
        np.testing.assert_array_equal(s[c].means, again[c].means)
        np.testing.assert_array_equal(s[c].variances, again[c].variances)
    unlabeled = fit_class_gmms(x[3:43], None, max_components=2)
    assert list(unlabeled) == [0] and unlabeled[0].n == 40 and unlabeled[0].weights.shape == (2,)
    with pytest.raises(CeloraError, match="summary.labels"):
        fit_class_gmms(x, y[:-1])


def test_summary_tensor_round_trip():
    rng = np.random.default_rng(0)
    s = fit_class_gmms(rng.normal(size=(30, D)), rng.integers(0, 3, size=30))
    t = summary_to_tensors(s)
    assert all(v.dtype == torch.float32 for v in t.values())
    assert set(t) >= {"summary.c0.weights", "summary.c0.means", "summary.c0.variances", "summary.c0.n"}
    back = summary_from_tensors(t, feature_dim=D)
    assert sorted(back) == sorted(s)
    for c in s:
        assert back[c].n == s[c].n
        np.testing.assert_allclose(back[c].weights, s[c].weights, rtol=1e-6)
        np.testing.assert_allclose(back[c].means, s[c].means, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(back[c].variances, s[c].variances, rtol=1e-6)


@pytest.mark.parametrize(
    "mutate, name",
    [
        (lambda t: t.update({"summary.c0.extra": torch.ones(1)}), "summary.c0.extra"),
        (lambda t: t.update({"model.weight": torch.ones(1)}), "model.weight"),
        (lambda t: t["summary.c1.means"].__setitem__((0, 0), float("nan")), "summary.c1.means"),
        (lambda t: t.update({"summary.c0.means": torch.zeros(2, D + 1)}), "summary.c0.means"),
        (lambda t: t.update({"summary.c0.variances": torch.ones(1, D)}), "summary.c0.variances"),
        (lambda t: t["summary.c1.variances"].__setitem__((0, 1), -1.0), "summary.c1.variances"),
        (lambda t: t.update({"summary.c0.weights": torch.tensor([0.9, 0.9])}), "summary.c0.weights"),
        (lambda t: t.update({"summary.c0.n": torch.tensor(2.5)}), "summary.c0.n"),
        (lambda t: t.pop("summary.c1.n"), "summary.c1.n"),
    ],
)
def test_summary_from_tensors_rejects_bad_payloads(mutate, name):
    def cls(g):
        return ClassSummary(np.full(g, 1.0 / g), np.zeros((g, D)), np.ones((g, D)), 5)

    t = summary_to_tensors({0: cls(2), 1: cls(3)})
    mutate(t)
    with pytest.raises(CeloraError, match=name.replace(".", r"\.")):
        summary_from_tensors(t, feature_dim=D)
    with pytest.raises(CeloraError, match="feature dim"):
        summary_from_tensors(summary_to_tensors({0: cls(2)}), feature_dim=D + 1)


def test_privatize_summary_valid_and_noise_shrinks_with_epsilon():
    rng = np.random.default_rng(0)
    x = clip_features(rng.normal(size=(3000, D)), 2.0)
    assert np.linalg.norm(x, axis=1).max() <= 2.0 + 1e-12
    s = fit_class_gmms(x, np.repeat([0, 1], 1500), max_components=2)
    errors = []
    for eps in (0.3, 3.0):
        err = []
        for seed in range(5):
            p = privatize_summary(s, epsilon=eps, delta=1e-5, clip=2.0, rng=np.random.default_rng(seed))
            back = summary_from_tensors(summary_to_tensors(p), feature_dim=D)  # still a valid summary
            assert sorted(back) == [0, 1]
            for c in p:
                assert (p[c].variances >= 1e-5).all() and p[c].weights.sum() == pytest.approx(1.0)
                assert (p[c].weights >= 0).all() and p[c].n >= 1
                err.append(np.abs(p[c].means - s[c].means).mean())
        errors.append(np.mean(err))
    assert errors[1] < errors[0] / 3
    same = privatize_summary(s, epsilon=1.0, delta=1e-5, clip=2.0, rng=np.random.default_rng(7))
    again = privatize_summary(s, epsilon=1.0, delta=1e-5, clip=2.0, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(same[0].means, again[0].means)
    for kwargs, field in [
        ({"epsilon": 0.0, "delta": 1e-5, "clip": 2.0}, "privacy.summary_epsilon"),
        ({"epsilon": 1.0, "delta": 1.0, "clip": 2.0}, "privacy.summary_delta"),
        ({"epsilon": 1.0, "delta": 1e-5, "clip": -1.0}, "privacy.summary_clip"),
        ({"epsilon": 1.0, "delta": 1e-5, "clip": 0.01}, "privacy.summary_clip"),  # means outside the ball
    ]:
        with pytest.raises(CeloraError, match=field):
            privatize_summary(s, rng=np.random.default_rng(0), **kwargs)


# ------------------------------------------------------------------------------------------ server-side distance


def test_ot3_batched_matches_emd2():
    rng = np.random.default_rng(0)
    n = 400
    cost = rng.uniform(size=(n, 3, 3)) * rng.choice([1e-3, 1.0, 1e3], size=(n, 1, 1))
    a, b = rng.dirichlet(np.ones(3), size=n), rng.dirichlet(np.ones(3), size=n)
    a[::4, 2] = 0.0  # zero-weight (padded) components
    b[::3, 0] = 0.0
    cost[::5, 2] = cost[::5, 0]  # duplicated rows / columns, ties
    a /= a.sum(axis=1, keepdims=True)
    b /= b.sum(axis=1, keepdims=True)
    ref = np.array([ot.emd2(a[i], b[i], cost[i]) for i in range(n)])
    np.testing.assert_allclose(ot3_batched(cost, a, b), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "fast"])
def test_distance_zero_for_identical_and_relabelled_clients(method):
    classes = _gaussians(k=3, g=3)
    base = _client(classes, [50, 30, 20])
    relabelled = _client(classes, [50, 30, 20], labels=[9, 4, 1])
    other = _client(classes, [10, 10, 80])
    d = data_distance_matrix([base, relabelled, base, other], method=method)
    assert d[0, 1] < 1e-8 and d[0, 2] < 1e-8 and d[1, 2] < 1e-8
    assert d[0, 3] > 1.0
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 0.0)


def test_distance_grows_as_label_distributions_diverge():
    classes = _gaussians(k=3, g=2)
    p0, p1 = np.array([0.8, 0.1, 0.1]), np.array([0.1, 0.1, 0.8])
    clients = [_client(classes, np.round(1000 * ((1 - t) * p0 + t * p1))) for t in np.linspace(0, 1, 6)]
    d = data_distance_matrix(clients, method="exact")
    assert np.all(np.diff(d[0]) > 0)
    np.testing.assert_allclose(d, data_distance_matrix(clients, method="fast"), rtol=1e-9, atol=1e-9)


def test_fast_path_matches_exact_on_random_problems():
    rng = np.random.default_rng(0)
    for max_g in (1, 2, 3, 4):  # 4 components: the fast path falls back to the network simplex per inner problem
        clients = [_random_client(rng, max_g=max_g) for _ in range(7)]
        exact = data_distance_matrix(clients, method="exact")
        fast = data_distance_matrix(clients, method="fast", threads=2)
        assert (exact[~np.eye(7, dtype=bool)] > 0).all()
        np.testing.assert_allclose(fast, exact, rtol=1e-9, atol=1e-10)
        np.testing.assert_array_equal(fast, fast.T)
    np.testing.assert_allclose(data_distance_matrix(clients, method="auto"), exact)
    with pytest.raises(CeloraError, match="aggregation.distance_method"):
        data_distance_matrix(clients, method="sinkhorn")
    with pytest.raises(CeloraError, match=r"summaries\[1\]"):
        data_distance_matrix([clients[0], {}])


def test_data_similarity_scaling():
    d = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 4.0], [2.0, 4.0, 0.0]])
    s = data_similarity(d)
    np.testing.assert_allclose(s, np.exp(-d / 2.0))
    np.testing.assert_array_equal(np.diag(s), 1.0)
    np.testing.assert_array_equal(data_similarity(np.zeros((3, 3))), np.ones((3, 3)))
    np.testing.assert_array_equal(data_similarity(np.zeros((1, 1))), [[1.0]])
    with pytest.raises(CeloraError, match="similarity.distance"):
        data_similarity(-d)


def test_param_similarity():
    rng = np.random.default_rng(0)
    u = rng.normal(size=(1, 20))
    updates = np.vstack([u, 3.0 * u, -u, np.zeros((1, 20)), rng.normal(size=(1, 20))])
    s = param_similarity(updates)
    unit = updates / np.maximum(np.linalg.norm(updates, axis=1, keepdims=True), 1e-300)
    off = ~np.eye(5, dtype=bool)
    np.testing.assert_allclose(s[off], ((1 + unit @ unit.T) / 2)[off], atol=1e-12)  # S^param = (1 + cos) / 2
    np.testing.assert_allclose(s, s.T)
    assert s[0, 1] == pytest.approx(1.0) and s[0, 2] == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(s[3, [0, 1, 2, 4]], 0.5)  # zero update: cos 0
    np.testing.assert_array_equal(np.diag(s), 1.0)
