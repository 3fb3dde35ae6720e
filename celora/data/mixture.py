"""A task mixture (``[[data.mixture]]``): several datasets, each in its own format, each on its own clients.

Component c (a shipped dataset or a file) is read with its own keys, then its rows are split iid (seeded) over
its ``clients``; all components become one dataset with two columns: ``component`` (its title) and
``mixture_client`` (``<c:02d>/<k:03d>``, sorted in component order), which the natural partition turns into
Σ_c clients (client ids follow the components' order). Each client is scored on its own component. With
``data.mixture_alpha`` clients mix tasks instead (``mixed_owners``): each is scored on its own rows, each row by
its component's task, and reported under the component most of its training rows come from.

Row types: under a generative task every component becomes prompt → response rows (a classification set as
instruction → label word); under classification the label spaces are kept apart (``<component>:<label>``),
one head over their union.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from celora.config import DataConfig, MixtureComponent
from celora.data.formats import as_generative, generative_reader
from celora.data.sources import Dataset, load_dataset
from celora.errors import CeloraError

COMPONENT = "component"
MIXTURE_CLIENT = "mixture_client"


def read_component(data: DataConfig, comp: MixtureComponent, *, generative: bool, seed: int) -> Dataset:
    """One component's rows with its own keys (a generative task: as prompt → response rows)."""
    keys = data.model_copy(
        update={
            "format": comp.format,
            "prompt_column": comp.prompt_column,
            "response_column": comp.response_column,
            "system_column": comp.system_column,
        }
    )
    try:
        ds = load_dataset(
            comp.name if comp.path is None else None,
            path=comp.path,
            text_column=comp.text_column,
            label_column=comp.label_column,
            max_samples=comp.max_samples,
            seed=seed,
            min_classes=1,
            reader=generative_reader(keys) if generative and comp.path is not None else None,
        )
    except CeloraError as err:
        raise CeloraError(f"data.mixture component '{comp.title}': {err}") from None
    if comp.name is not None and comp.label_column in ds.columns:  # a shipped set labelled by one of its columns
        ds = relabel_by(ds, comp.label_column)
    if comp.instruction is not None:
        ds = dataclasses.replace(ds, instruction=comp.instruction)
    return as_generative(ds) if generative else ds


def relabel_by(ds: Dataset, column: str) -> Dataset:
    """The dataset with the values of ``column`` as its labels (sorted names; the set's own instruction and label
    words no longer apply)."""
    values = np.asarray([str(v) for v in ds.columns[column]], dtype=object)
    names = sorted(set(values.tolist()))
    position = {v: k for k, v in enumerate(names)}
    labels = np.asarray([position[v] for v in values], dtype=np.int64)
    return dataclasses.replace(ds, labels=labels, label_names=names, instruction=None, verbalizers=None)


def concat(parts: list[Dataset], names: list[str], *, generative: bool) -> Dataset:
    """The components' rows one after another, with the ``component`` column; classification label spaces kept
    apart as ``<component>:<label>`` (generative rows: the one class they share)."""
    label_names: list[str] = []
    labels = []
    for name, p in zip(names, parts, strict=True):
        if generative:
            labels.append(np.zeros(len(p), dtype=np.int64))
            continue
        labels.append(p.labels + len(label_names))
        label_names += [f"{name}:{v}" for v in p.label_names]

    def cat(field: str) -> list[Any] | None:
        values = [getattr(p, field) for p in parts]
        return None if any(v is None for v in values) else [x for v in values for x in v]

    return Dataset(
        name="mixture",
        texts=[t for p in parts for t in p.texts],
        labels=np.concatenate(labels),
        label_names=parts[0].label_names if generative else label_names,
        columns={
            COMPONENT: np.asarray([n for n, p in zip(names, parts, strict=True) for _ in range(len(p))], dtype=object)
        },
        skipped_rows=sum(p.skipped_rows for p in parts),
        responses=cat("responses") if generative else None,
        systems=cat("systems") if generative else None,
        histories=cat("histories") if generative else None,
    )


def load_mixture(data: DataConfig, *, generative: bool, seed: int) -> Dataset:
    """Every component of ``data.mixture``, concatenated, each row tagged with the client that holds it."""
    assert data.mixture is not None
    parts = [read_component(data, c, generative=generative, seed=seed) for c in data.mixture]
    names = [c.title for c in data.mixture]
    ds = concat(parts, names, generative=generative)
    rng = np.random.default_rng([seed, 0x313])
    if data.mixture_alpha is not None:
        owner = mixed_owners([len(p) for p in parts], sum(c.clients for c in data.mixture), data.mixture_alpha, rng)
        return dataclasses.replace(ds, columns={**ds.columns, MIXTURE_CLIENT: owner})
    owners: list[str] = []
    for c, (comp, part) in enumerate(zip(data.mixture, parts, strict=True)):
        if len(part) < 2 * comp.clients:
            raise CeloraError(f"data.mixture component '{comp.title}': {len(part)} rows for {comp.clients} clients")
        slot = np.empty(len(part), dtype=np.int64)
        slot[rng.permutation(len(part))] = np.arange(len(part)) % comp.clients
        owners += [f"{c:02d}/{k:03d}" for k in slot]
    return dataclasses.replace(ds, columns={**ds.columns, MIXTURE_CLIENT: np.asarray(owners, dtype=object)})


def mixed_owners(
    sizes: list[int], clients: int, alpha: float, rng: np.random.Generator, min_rows: int = 4
) -> np.ndarray:
    """``data.mixture_alpha``: the client of every row when clients mix tasks. Client k draws its component
    shares p_k ~ Dirichlet(α·1_C); component c's rows go to client k with probability p_kc / Σ_j p_jc (seeded),
    redrawn until every client holds ≥ ``min_rows`` rows. Owner names ``<k:03d>`` (one client per name)."""
    total = sum(sizes)
    if total < min_rows * clients:
        raise CeloraError(f"data.mixture_alpha: {total} rows for {clients} clients (at least {min_rows} each)")
    for _ in range(100):
        shares = rng.dirichlet(np.full(len(sizes), alpha), size=clients)  # clients × components
        slots = [rng.choice(clients, size=n, p=shares[:, c] / shares[:, c].sum()) for c, n in enumerate(sizes)]
        slot = np.concatenate(slots)
        if np.bincount(slot, minlength=clients).min() >= min_rows:
            return np.asarray([f"{k:03d}" for k in slot], dtype=object)
    raise CeloraError(f"data.mixture_alpha = {alpha:g}: no draw in 100 gave every client {min_rows} rows (raise α)")
