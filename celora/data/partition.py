"""Split a labelled pool among federated clients (iid, Dirichlet, pathological, natural).

Every function here is deterministic given its seed. Index arrays are ``int64`` and sorted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from rich.table import Table

from celora.errors import CeloraError
from celora.registry import Registry

DIRICHLET_MAX_TRIES = 1000


class Partitioner(Protocol):
    """Signature shared by every registered partitioner."""

    def __call__(
        self,
        labels: np.ndarray,
        num_clients: int,
        rng: np.random.Generator,
        *,
        alpha: float,
        classes_per_client: int,
        column_values: np.ndarray | None,
        min_size: int = 2,
    ) -> list[np.ndarray]: ...


PARTITIONERS: Registry[Partitioner] = Registry("partitioner", "data.partition")


def register_partitioner(name: str) -> Callable[[Partitioner], Partitioner]:
    """Decorator: add a partitioner to ``PARTITIONERS`` under ``name``."""

    def deco(fn: Partitioner) -> Partitioner:
        PARTITIONERS[name] = fn
        return fn

    return deco


def _as_index(values: Any) -> np.ndarray:
    return np.sort(np.asarray(values, dtype=np.int64))


def allocate(sizes: np.ndarray, total: int, caps: np.ndarray | None = None) -> np.ndarray:
    """Split ``total`` over groups in proportion to ``sizes`` (largest remainder), each ≤ its cap.

    ``caps`` defaults to ``sizes``. Ties go to the larger group, then the lower index.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    caps = sizes.copy() if caps is None else np.asarray(caps, dtype=np.int64)
    total = int(min(total, int(caps.sum())))
    out = np.zeros(len(sizes), dtype=np.int64)
    if total <= 0 or sizes.sum() <= 0:
        return out
    quota = total * sizes / sizes.sum()
    out = np.minimum(np.floor(quota).astype(np.int64), caps)
    frac = quota - np.floor(quota)
    order = sorted(range(len(sizes)), key=lambda c: (-frac[c], -sizes[c], c))
    left = total - int(out.sum())
    while left > 0:
        progressed = False
        for c in order:
            if left == 0:
                break
            if out[c] < caps[c]:
                out[c] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    return out


def stratified_sample(idx: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Pick ``n`` of ``idx`` at random, keeping label proportions of ``labels[idx]`` (sorted)."""
    idx = np.asarray(idx, dtype=np.int64)
    if n >= len(idx):
        return np.sort(idx)
    classes, inverse = np.unique(labels[idx], return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    counts = allocate(sizes, n)
    picked = [
        rng.choice(idx[inverse == c], size=int(counts[c]), replace=False) for c in range(len(classes)) if counts[c] > 0
    ]
    return _as_index(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


@register_partitioner("iid")
def iid(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    column_values: np.ndarray | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Shuffle the pool and cut it into ``num_clients`` near-equal parts."""
    perm = rng.permutation(len(labels))
    return [_as_index(part) for part in np.array_split(perm, num_clients)]


@register_partitioner("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    column_values: np.ndarray | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Per class, share its examples over clients with proportions ~ Dir(alpha).

    Draws are repeated (at most ``DIRICHLET_MAX_TRIES`` times) until every client holds at
    least ``min_size`` examples; smaller ``alpha`` gives more skewed label mixes.
    """
    n = len(labels)
    if n < num_clients * min_size:
        raise CeloraError(
            f"partition 'dirichlet': {n} examples cannot give {num_clients} clients "
            f"min_size={min_size} each; use fewer clients"
        )
    classes = np.unique(labels)
    sizes = np.array([int((labels == c).sum()) for c in classes])
    for _ in range(DIRICHLET_MAX_TRIES):
        props = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))
        counts = np.zeros((len(classes), num_clients), dtype=np.int64)
        for ci, n_c in enumerate(sizes):
            cuts = np.floor(np.cumsum(props[ci]) * n_c).astype(np.int64)
            cuts[-1] = n_c
            counts[ci] = np.diff(np.concatenate([[0], cuts]))
        if counts.sum(axis=0).min() >= min_size:
            break
    else:
        raise CeloraError(
            f"partition 'dirichlet': no draw gave every client min_size={min_size} examples "
            f"in {DIRICHLET_MAX_TRIES} tries; use a larger alpha (now {alpha}) "
            f"or fewer clients (now {num_clients})"
        )
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for ci, c in enumerate(classes):
        members = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for k in range(num_clients):
            parts[k].append(members[start : start + counts[ci, k]])
            start += int(counts[ci, k])
    return [_as_index(np.concatenate(p)) for p in parts]


def pathological_classes(client: int, num_classes: int, classes_per_client: int) -> list[int]:
    """Class positions of ``client``: block ``b = client // 2``, classes ``(k*b + j) mod K``."""
    k = classes_per_client
    block = client // 2
    return [(k * block + j) % num_classes for j in range(k)]


@register_partitioner("pathological")
def pathological(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    column_values: np.ndarray | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Each client holds exactly ``k = classes_per_client`` classes, clients paired up.

    Rule: with the pool's K classes in sorted order, client ``i`` belongs to block
    ``b = i // 2`` and holds classes ``{(k*b + j) mod K : j = 0..k-1}``. So clients {0,1} hold
    classes {0..k-1}, clients {2,3} the next k classes, wrapping around K. Each class's
    examples are shuffled and split evenly among the clients that hold it; classes no client
    holds are left out.
    """
    classes = np.unique(labels)
    num_classes = len(classes)
    k = classes_per_client
    if not 1 <= k <= num_classes:
        raise CeloraError(f"partition 'pathological': classes_per_client={k} must be in 1..{num_classes}")
    holders: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    for i in range(num_clients):
        for c in pathological_classes(i, num_classes, k):
            holders[c].append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c, owners in holders.items():
        if not owners:
            continue
        members = rng.permutation(np.flatnonzero(labels == classes[c]))
        for owner, chunk in zip(owners, np.array_split(members, len(owners)), strict=True):
            parts[owner].append(chunk)
    return [_as_index(np.concatenate(p)) for p in parts]


def _sorted_groups(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    try:
        return np.unique(values, return_inverse=True)
    except TypeError:  # mixed types in an object column
        return np.unique(values.astype(str), return_inverse=True)


@register_partitioner("natural")
def natural(
    labels: np.ndarray,
    num_clients: int,
    rng: np.random.Generator,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    column_values: np.ndarray | None = None,
    min_size: int = 2,
) -> list[np.ndarray]:
    """One client per distinct value of ``column_values`` (sorted).

    With more values than clients, value group ``g`` (in sorted order) goes to client
    ``g mod num_clients``.
    """
    if column_values is None:
        raise CeloraError("partition 'natural' needs data.column")
    values = np.asarray(column_values)
    if len(values) != len(labels):
        raise CeloraError(f"partition 'natural': data.column has {len(values)} values for {len(labels)} examples")
    groups, inverse = _sorted_groups(values)
    if len(groups) < num_clients:
        raise CeloraError(
            f"partition 'natural': data.column has {len(groups)} distinct values, fewer than num_clients={num_clients}"
        )
    client_of = inverse.reshape(-1) % num_clients
    return [_as_index(np.flatnonzero(client_of == i)) for i in range(num_clients)]


@dataclass
class ClientSplit:
    """One client's train and test indices into the full dataset."""

    client_id: int
    train_idx: np.ndarray
    test_idx: np.ndarray


@dataclass
class FederatedSplit:
    """Client splits plus a held-out global test set (indices into the full dataset)."""

    clients: list[ClientSplit]
    global_test_idx: np.ndarray
    scheme: str


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def train_test_split(
    idx: np.ndarray, labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of ``idx``; ≥1 test example when there are ≥2 examples."""
    if len(idx) < 2:
        return _as_index(idx), np.zeros(0, dtype=np.int64)
    classes, inverse = np.unique(labels[idx], return_inverse=True)
    sizes = np.bincount(inverse, minlength=len(classes))
    caps = np.maximum(sizes - 1, 0)  # keep one train example of every class
    test_parts: list[np.ndarray] = []
    if caps.sum() > 0:
        want = min(max(1, _half_up(len(idx) * test_fraction)), int(caps.sum()))
        eligible = np.where(sizes >= 2, sizes, 0)
        counts = allocate(eligible, want, caps)
        for c in range(len(classes)):
            if counts[c] > 0:
                members = idx[inverse == c]
                test_parts.append(rng.choice(members, size=int(counts[c]), replace=False))
    else:  # only singleton classes: give up one class to have a test example
        test_parts.append(rng.choice(idx, size=1, replace=False))
    test = _as_index(np.concatenate(test_parts))
    train = _as_index(np.setdiff1d(idx, test))
    return train, test


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < float(value) < 1.0:
        raise CeloraError(f"{name} must be in (0, 1), got {value}")


def make_federated_split(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    alpha: float = 0.5,
    classes_per_client: int = 2,
    column_values: np.ndarray | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    global_test_fraction: float = 0.1,
    train_per_client: int | None = None,
    min_size: int = 2,
    test_per_client: int | None = None,
) -> FederatedSplit:
    """Carve a stratified global test set, partition the rest, split each client train/test.

    ``train_per_client`` caps each client's train set (stratified random subset) without
    changing any test set; ``test_per_client`` caps each client's test set the same way.
    Independent RNG streams derived from ``seed`` drive the global test carve, the partition,
    the client splits and the caps.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise CeloraError("labels must be a non-empty 1-D array")
    if scheme not in PARTITIONERS:
        known = ", ".join(sorted(PARTITIONERS))
        raise CeloraError(f"unknown partition '{scheme}' (known: {known})")
    if int(num_clients) != num_clients or num_clients < 1:
        raise CeloraError(f"num_clients must be an integer >= 1, got {num_clients}")
    _check_fraction("test_fraction", test_fraction)
    _check_fraction("global_test_fraction", global_test_fraction)
    if not float(alpha) > 0.0:
        raise CeloraError(f"alpha must be > 0, got {alpha}")
    num_classes = len(np.unique(labels))
    upper = num_classes if scheme == "pathological" else max(num_classes, classes_per_client)
    if not 1 <= classes_per_client <= upper:
        raise CeloraError(
            f"classes_per_client must be in 1..{num_classes} (number of classes), got {classes_per_client}"
        )
    if min_size < 1:
        raise CeloraError(f"min_size must be >= 1, got {min_size}")
    if train_per_client is not None and train_per_client < 1:
        raise CeloraError(f"train_per_client must be >= 1, got {train_per_client}")
    if test_per_client is not None and test_per_client < 1:
        raise CeloraError(f"test_per_client must be >= 1, got {test_per_client}")
    if column_values is not None and len(column_values) != len(labels):
        raise CeloraError(f"data.column has {len(column_values)} values for {len(labels)} examples")
    n = len(labels)
    if num_clients > n:
        raise CeloraError(f"num_clients={num_clients} exceeds the number of examples ({n})")

    rng_global, rng_part, rng_split, rng_cap = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    everything = np.arange(n, dtype=np.int64)
    n_global = min(max(1, _half_up(n * global_test_fraction)), n - 1)
    global_test = stratified_sample(everything, labels, n_global, rng_global)
    pool = np.setdiff1d(everything, global_test)
    if num_clients > len(pool):
        raise CeloraError(f"num_clients={num_clients} exceeds the {len(pool)} examples left after the global test set")
    pool_columns = None if column_values is None else np.asarray(column_values)[pool]
    parts = PARTITIONERS[scheme](
        labels[pool],
        num_clients,
        rng_part,
        alpha=float(alpha),
        classes_per_client=int(classes_per_client),
        column_values=pool_columns,
        min_size=int(min_size),
    )
    clients: list[ClientSplit] = []
    for cid, part in enumerate(parts):
        idx = pool[part]
        if len(idx) == 0:
            raise CeloraError(f"partition '{scheme}' left client {cid} with no examples; use fewer num_clients")
        train, test = train_test_split(idx, labels, test_fraction, rng_split)
        if train_per_client is not None and len(train) > train_per_client:
            train = stratified_sample(train, labels, int(train_per_client), rng_cap)
        if test_per_client is not None and len(test) > test_per_client:
            test = stratified_sample(test, labels, int(test_per_client), rng_cap)
        clients.append(ClientSplit(client_id=cid, train_idx=train, test_idx=test))
    return FederatedSplit(clients=clients, global_test_idx=global_test, scheme=scheme)


def partition_summary(split: FederatedSplit, labels: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """JSON-able overview: sizes per client and the train label histogram."""
    labels = np.asarray(labels)
    clients = []
    for c in split.clients:
        counts = np.bincount(labels[c.train_idx], minlength=len(label_names))
        clients.append(
            {
                "id": int(c.client_id),
                "n_train": int(len(c.train_idx)),
                "n_test": int(len(c.test_idx)),
                "label_hist": {name: int(counts[i]) for i, name in enumerate(label_names)},
            }
        )
    return {
        "scheme": split.scheme,
        "num_clients": len(split.clients),
        "global_test": int(len(split.global_test_idx)),
        "clients": clients,
    }


MAX_LABEL_COLUMNS = 12  # more labels than this: one "labels held" column instead of one column per label


def format_partition_table(summary: dict[str, Any]) -> Table:
    """Render ``partition_summary`` output: one row per client, one column per label (with more than
    ``MAX_LABEL_COLUMNS`` labels: how many each client holds and its largest counts, ``name count, …``)."""
    names: list[str] = []
    for client in summary["clients"]:
        names.extend(n for n in client["label_hist"] if n not in names)
    table = Table(
        title=(
            f"partition '{summary['scheme']}': {summary['num_clients']} clients, global test {summary['global_test']}"
        )
    )
    table.add_column("client", justify="right")
    table.add_column("n_train", justify="right")
    table.add_column("n_test", justify="right")
    wide = len(names) > MAX_LABEL_COLUMNS
    for name in ["labels", "largest (label count)"] if wide else names:
        table.add_column(str(name), justify="left" if wide else "right")
    for client in summary["clients"]:
        hist = client["label_hist"]
        if wide:
            held = sorted(((c, n) for n, c in hist.items() if c > 0), key=lambda t: (-t[0], t[1]))
            shown = ", ".join(f"{n} {c}" for c, n in held[:3]) + (f", +{len(held) - 3}" if len(held) > 3 else "")
            cells = [str(len(held)), shown]
        else:
            cells = [str(hist.get(name, 0)) for name in names]
        table.add_row(str(client["id"]), str(client["n_train"]), str(client["n_test"]), *cells)
    return table
