"""Partitioners and the federated train/test split."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rich.console import Console

from celora.data.partition import (
    PARTITIONERS,
    FederatedSplit,
    allocate,
    format_partition_table,
    make_federated_split,
    partition_summary,
    pathological_classes,
)
from celora.errors import CeloraError

KW = {"alpha": 0.5, "classes_per_client": 2, "column_values": None}


def _labels(sizes: list[int], seed: int = 0) -> np.ndarray:
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)])
    return np.random.default_rng(seed).permutation(labels).astype(np.int64)


LABELS = _labels([60, 50, 40, 30, 20])
GROUPS = np.array([f"g{i % 7}" for i in range(len(LABELS))])


def _run(scheme: str, seed: int, labels: np.ndarray = LABELS, n: int = 6, **kw: object) -> list[np.ndarray]:
    args: dict[str, object] = dict(KW, column_values=GROUPS[: len(labels)] if scheme == "natural" else None)
    args.update(kw)
    return PARTITIONERS[scheme](labels, n, np.random.default_rng(seed), **args)  # type: ignore[arg-type]


def _entropy(labels: np.ndarray) -> float:
    p = np.bincount(labels) / len(labels)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _all_idx(split: FederatedSplit) -> list[np.ndarray]:
    return [split.global_test_idx] + [a for c in split.clients for a in (c.train_idx, c.test_idx)]


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "natural"])
def test_disjoint_deterministic_seeded(scheme: str) -> None:
    parts = _run(scheme, 0)
    assert len(parts) == 6
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))
    assert flat.min() >= 0 and flat.max() < len(LABELS)
    if scheme != "pathological":  # pathological may leave classes nobody holds; here K=5 < 6 blocks
        assert sorted(flat.tolist()) == list(range(len(LABELS)))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    again = _run(scheme, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    if scheme != "natural":  # natural is a function of the column only
        other = _run(scheme, 1)
        assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_even() -> None:
    sizes = [len(p) for p in _run("iid", 0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    labels = _labels([200] * 5)

    def mean_entropy(alpha: float) -> float:
        vals = [_entropy(labels[p]) for s in range(3) for p in _run("dirichlet", s, labels, n=8, alpha=alpha)]
        return float(np.mean(vals))

    low, high = mean_entropy(0.1), mean_entropy(100.0)
    assert low < high - 0.5
    assert high > np.log(5) - 0.05


def test_dirichlet_min_size_and_error() -> None:
    parts = _run("dirichlet", 0, n=10, alpha=0.1, min_size=5)
    assert min(len(p) for p in parts) >= 5
    with pytest.raises(CeloraError, match="larger alpha"):
        _run("dirichlet", 0, _labels([30, 30]), n=25, alpha=0.001, min_size=2)
    with pytest.raises(CeloraError, match="min_size=2"):
        _run("dirichlet", 0, _labels([5, 5]), n=6)


@pytest.mark.parametrize("num_classes", [4, 5])
def test_pathological_pairs(num_classes: int) -> None:
    labels = _labels([40] * num_classes)
    parts = _run("pathological", 0, labels, n=4)
    held = [sorted(set(labels[p].tolist())) for p in parts]
    assert held == [[0, 1], [0, 1], [2, 3], [2, 3]]
    # each held class is split evenly between its holders
    for c in range(4):
        counts = [int((labels[p] == c).sum()) for p in parts if c in labels[p]]
        assert counts == [20, 20]


def test_pathological_wraps_and_exact_k() -> None:
    assert [pathological_classes(i, 5, 2) for i in range(6)] == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 0], [4, 0]]
    labels = _labels([60] * 5)
    parts = _run("pathological", 0, labels, n=10, classes_per_client=3)
    for i, p in enumerate(parts):
        assert sorted(set(labels[p].tolist())) == sorted(pathological_classes(i, 5, 3))
        assert len(set(labels[p].tolist())) == 3
    holders = {c: [int((labels[p] == c).sum()) for p in parts if (labels[p] == c).any()] for c in range(5)}
    for counts in holders.values():
        assert max(counts) - min(counts) <= 1


def test_natural_groups_and_merge() -> None:
    labels = _labels([10, 10])
    col = np.array(["b", "a", "c"] * 6 + ["a", "b"])
    parts = _run("natural", 0, labels, n=3, column_values=col)
    assert [sorted(set(col[p].tolist())) for p in parts] == [["a"], ["b"], ["c"]]
    merged = _run("natural", 0, labels, n=2, column_values=col)
    assert [sorted(set(col[p].tolist())) for p in merged] == [["a", "c"], ["b"]]
    with pytest.raises(CeloraError, match=r"data.column has 3 distinct values, fewer than num_clients=4"):
        _run("natural", 0, labels, n=4, column_values=col)
    with pytest.raises(CeloraError, match=r"partition 'natural' needs data.column"):
        _run("natural", 0, labels, n=2, column_values=None)


def test_allocate() -> None:
    assert allocate(np.array([50, 30, 20]), 10).tolist() == [5, 3, 2]
    assert allocate(np.array([1, 1, 1]), 2).sum() == 2
    assert allocate(np.array([5, 1]), 4, caps=np.array([4, 0])).tolist() == [4, 0]


# ---------------------------------------------------------------- make_federated_split


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological", "natural"])
def test_split_disjoint_and_deterministic(scheme: str) -> None:
    col = GROUPS if scheme == "natural" else None
    split = make_federated_split(LABELS, 5, scheme, column_values=col, seed=3)
    parts = _all_idx(split)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist()))
    held_out = set(split.global_test_idx.tolist())
    for c in split.clients:
        assert held_out.isdisjoint(c.train_idx.tolist()) and held_out.isdisjoint(c.test_idx.tolist())
    assert len(split.global_test_idx) == 20  # 10% of 200
    # stratified global test: 60/50/40/30/20 -> 6/5/4/3/2
    assert np.bincount(LABELS[split.global_test_idx]).tolist() == [6, 5, 4, 3, 2]
    assert all(len(c.test_idx) >= 1 for c in split.clients)
    again = make_federated_split(LABELS, 5, scheme, column_values=col, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, _all_idx(again), strict=True))
    assert split.scheme == scheme and [c.client_id for c in split.clients] == list(range(5))


def test_global_test_same_across_schemes_and_seeds_differ() -> None:
    a = make_federated_split(LABELS, 4, "iid", seed=0)
    b = make_federated_split(LABELS, 4, "dirichlet", seed=0)
    c = make_federated_split(LABELS, 4, "iid", seed=1)
    assert np.array_equal(a.global_test_idx, b.global_test_idx)
    assert not np.array_equal(a.global_test_idx, c.global_test_idx)


def test_train_test_stratified() -> None:
    labels = _labels([100, 60, 40])
    split = make_federated_split(labels, 2, "iid", test_fraction=0.25, seed=0)
    for c in split.clients:
        tr = np.bincount(labels[c.train_idx], minlength=3) / len(c.train_idx)
        te = np.bincount(labels[c.test_idx], minlength=3) / len(c.test_idx)
        assert np.abs(tr - te).max() < 0.05
        total = len(c.train_idx) + len(c.test_idx)
        assert abs(len(c.test_idx) - 0.25 * total) <= 1


def test_tiny_clients_get_a_test_example() -> None:
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7], dtype=np.int64)
    split = make_federated_split(labels, 9, "iid", seed=0)
    for c in split.clients:
        assert len(c.train_idx) >= 1 and len(c.test_idx) >= 1


def test_train_per_client_cap_keeps_tests() -> None:
    full = make_federated_split(LABELS, 4, "dirichlet", alpha=1.0, seed=5)
    capped = make_federated_split(LABELS, 4, "dirichlet", alpha=1.0, seed=5, train_per_client=8)
    assert np.array_equal(full.global_test_idx, capped.global_test_idx)
    for f, c in zip(full.clients, capped.clients, strict=True):
        assert np.array_equal(f.test_idx, c.test_idx)
        assert len(c.train_idx) == min(8, len(f.train_idx))
        assert set(c.train_idx.tolist()) <= set(f.train_idx.tolist())
    iid = make_federated_split(_labels([100, 100]), 2, "iid", train_per_client=10, seed=0)
    for c in iid.clients:
        assert abs(int((_labels([100, 100])[c.train_idx] == 0).sum()) - 5) <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients"),
        ({"scheme": "x"}, r"unknown partition 'x' \(known: dirichlet, iid, natural, pathological\)"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"global_test_fraction": 1.5}, "global_test_fraction"),
        ({"alpha": 0.0}, "alpha"),
        ({"scheme": "pathological", "classes_per_client": 6}, "classes_per_client"),
        ({"classes_per_client": 0}, "classes_per_client"),
        ({"num_clients": 500}, "num_clients"),
        ({"num_clients": 190}, "num_clients"),
        ({"train_per_client": 0}, "train_per_client"),
        ({"min_size": 0}, "min_size"),
        ({"column_values": np.arange(3)}, "data.column"),
        ({"scheme": "natural"}, "data.column"),
    ],
)
def test_split_validation(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"num_clients": 4, "scheme": "iid"}
    args.update(kwargs)
    with pytest.raises(CeloraError, match=match):
        make_federated_split(LABELS, **args)  # type: ignore[arg-type]


def test_summary_and_table() -> None:
    names = ["a", "b", "c", "d", "e"]
    split = make_federated_split(LABELS, 3, "pathological", seed=0)
    summary = partition_summary(split, LABELS, names)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["scheme"] == "pathological" and summary["num_clients"] == 3
    assert summary["global_test"] == len(split.global_test_idx)
    first = summary["clients"][0]
    assert first["id"] == 0 and first["n_train"] == len(split.clients[0].train_idx)
    assert list(first["label_hist"]) == names
    assert sum(first["label_hist"].values()) == first["n_train"]
    assert first["label_hist"]["c"] == 0  # client 0 holds classes {0, 1}
    table = format_partition_table(summary)
    assert table.row_count == 3
    assert [str(c.header) for c in table.columns] == ["client", "n_train", "n_test", *names]
    console = Console(width=120, record=True)
    console.print(table)
    assert "pathological" in console.export_text()


def test_partition_table_with_many_labels_lists_the_largest_counts() -> None:
    """34 labels (a task mixture's union) do not become 34 columns: labels held and the three largest counts."""
    hist = {f"l{i}": 0 for i in range(34)} | {"l3": 5, "l7": 2, "l9": 1, "l20": 1}
    summary = {
        "scheme": "natural",
        "num_clients": 1,
        "global_test": 4,
        "clients": [{"id": 0, "n_train": 9, "n_test": 3, "label_hist": hist}],
    }
    table = format_partition_table(summary)
    assert [str(c.header) for c in table.columns] == ["client", "n_train", "n_test", "labels", "largest (label count)"]
    console = Console(width=80, record=True)
    console.print(table)
    assert "l3 5, l7 2, l20 1, +1" in console.export_text()
