"""Site-local data (``data.sites``): one file per client, read only by that client's own runtime.

Before round 1, in-process and under Flower alike:

1. each site reads its own file (:func:`read_site`, the own-file reader of :mod:`celora.data.sources`)
   and sends the server its label names only (:func:`label_message`, counted in bytes);
2. the server fixes the label space (:func:`agree_labels`): the declared ``data.labels`` (class ids in
   that order), or the union of the sites' names, sorted (numerically when every name is an integer);
3. each site maps its rows into that space (:func:`to_label_space`; a label outside it stops the run
   with one line naming the site and its file) and splits its own test set (:func:`split_site`:
   stratified, seeded by (seed, site), ``data.test_fraction``, then the per-client caps).

Every error is one line ``site <i> ('<file>'): <reason>``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from celora.config import DataConfig
from celora.data.formats import generative_reader
from celora.data.partition import stratified_sample, train_test_split
from celora.data.sources import Dataset, load_dataset
from celora.data.tasks import TASKS
from celora.errors import CeloraError

MAX_LABELS = 100_000  # a label message with more names is rejected (hostile input)
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class Site:
    """One client's own data: its rows in the agreed label space and its train/test split (row indices)."""

    index: int
    path: str
    dataset: Dataset
    train_idx: np.ndarray
    test_idx: np.ndarray


def site_path(data: DataConfig, index: int, override: str | None = None) -> str:
    """The file of site ``index``: ``override`` (e.g. a SuperNode's ``site-path``) or ``data.sites[index]``."""
    if override:
        return override
    if not data.sites:
        raise CeloraError("data.sites is not set: no site files")
    if not 0 <= index < len(data.sites):
        raise CeloraError(f"site {index}: out of range for data.sites ({len(data.sites)} files)")
    return data.sites[index]


def site_error(index: int, path: str, reason: str | BaseException) -> CeloraError:
    """The one-line error of a site: ``site <i> ('<file>'): <reason>``."""
    text = " ".join(str(reason).split())
    return CeloraError(f"site {index} ('{path}'): {text}")


def read_data(data: DataConfig, path: str) -> Dataset:
    """A labelled file with the ``data.*_column`` keys (the own-file reader; one class is enough), or a file of
    generative rows (``data.format``, ``data.prompt_column``, …) for a generative task."""
    if data.task is not None and data.task in TASKS and TASKS[data.task].rows == "generative":
        return load_dataset(None, path=path, reader=generative_reader(data), min_classes=1)
    return load_dataset(
        None,
        path=path,
        text_column=data.text_column,
        label_column=data.label_column,
        image_column=data.image_column,
        image_size=data.image_size,
        min_classes=1,
    )


def _relabel(ds: Dataset, labels: Sequence[str]) -> Dataset:
    """``ds`` with class ids in the space ``labels`` (CeloraError naming the first label outside it)."""
    position = {name: k for k, name in enumerate(labels)}
    outside = [n for n in ds.label_names if n not in position]
    if outside:
        raise CeloraError(f"label '{outside[0]}' is not in the run's label space {list(labels)}")
    remap = np.asarray([position[n] for n in ds.label_names], dtype=np.int64)
    return replace(ds, labels=remap[ds.labels], label_names=list(labels))


def read_site(data: DataConfig, index: int, path: str | None = None, *, seed: int = 0) -> Dataset:
    """Site ``index`` reads its own file with the ``data.*_column`` keys (labels: the file's own names).

    ``data.max_samples`` caps the site's rows (stratified, seeded by (seed, site)). A site may hold a
    single class. Missing, unreadable or empty file, missing column → :func:`site_error`.
    """
    path = site_path(data, index, path)
    if not Path(path).is_file():
        raise site_error(index, path, "file not found")
    try:
        ds = read_data(data, path)
    except CeloraError as err:
        raise site_error(index, path, err) from None
    if data.max_samples is not None and data.max_samples < len(ds):
        rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))
        ds = ds.subset(stratified_sample(np.arange(len(ds)), ds.labels, data.max_samples, rng))
    return ds


def label_message(names: Sequence[str]) -> bytes:
    """What a site sends for the label agreement: its label names, as JSON (nothing else travels)."""
    return json.dumps(list(names), ensure_ascii=False).encode("utf-8")


def parse_label_message(blob: bytes, site: int) -> list[str]:
    """A site's label names from its message (hostile input: a list of distinct non-empty strings)."""
    try:
        names = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CeloraError(f"site {site}: label message is not JSON") from None
    if not isinstance(names, list) or not 0 < len(names) <= MAX_LABELS:
        raise CeloraError(f"site {site}: label message must be a list of 1..{MAX_LABELS} names")
    if not all(isinstance(n, str) and 0 < len(n) <= MAX_LABEL_CHARS for n in names):
        raise CeloraError(f"site {site}: every label name must be a string of 1..{MAX_LABEL_CHARS} characters")
    if len(set(names)) != len(names):
        raise CeloraError(f"site {site}: label message lists a name twice")
    return list(names)


def _canonical_int(name: str) -> bool:
    try:
        return str(int(name)) == name
    except ValueError:
        return False


def agree_labels(
    site_labels: Sequence[Sequence[str]],
    sites: Sequence[str],
    declared: Sequence[str] | None = None,
    min_classes: int = 2,
) -> list[str]:
    """The label space of the run: ``declared`` (each site's names must lie in it), else the union of
    the sites' names, sorted numerically when all are integers, else as strings; at least ``min_classes``
    classes (a generative task's rows have one)."""
    if declared is not None:
        allowed = set(declared)
        for k, names in enumerate(site_labels):
            outside = [n for n in names if n not in allowed]
            if outside:
                raise site_error(k, sites[k], f"label '{outside[0]}' is not in data.labels {list(declared)}")
        return list(declared)
    union = sorted({n for names in site_labels for n in names})
    if all(_canonical_int(n) for n in union):
        union = sorted(union, key=int)
    if len(union) < min_classes:
        raise CeloraError(
            f"data.sites: all sites hold the single label '{union[0] if union else ''}'; need at least 2 classes"
        )
    return union


def to_label_space(ds: Dataset, labels: Sequence[str], index: int, path: str) -> Dataset:
    """The site's rows with class ids in the agreed space ``labels`` (a name outside it → site_error)."""
    try:
        return _relabel(ds, labels)
    except CeloraError as err:
        raise site_error(index, path, err) from None


def split_site(ds: Dataset, data: DataConfig, *, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """The site's own stratified train/test split (``data.test_fraction``, seeded by (seed, site)), then
    ``data.train_per_client`` / ``data.test_per_client`` caps (stratified)."""
    rng_split, rng_cap = (np.random.default_rng(s) for s in np.random.SeedSequence([seed, index, 2]).spawn(2))
    train, test = train_test_split(np.arange(len(ds), dtype=np.int64), ds.labels, data.test_fraction, rng_split)
    if data.train_per_client is not None and len(train) > data.train_per_client:
        train = stratified_sample(train, ds.labels, data.train_per_client, rng_cap)
    if data.test_per_client is not None and len(test) > data.test_per_client:
        test = stratified_sample(test, ds.labels, data.test_per_client, rng_cap)
    return train, test


def load_site(
    data: DataConfig,
    index: int,
    labels: Sequence[str],
    *,
    seed: int = 0,
    path: str | None = None,
    dataset: Dataset | None = None,
) -> Site:
    """Site ``index``'s own data in the label space ``labels``, split train/test (``dataset``: already read)."""
    path = site_path(data, index, path)
    ds = dataset if dataset is not None else read_site(data, index, path, seed=seed)
    ds = to_label_space(ds, labels, index, path)
    train, test = split_site(ds, data, seed=seed, index=index)
    if len(train) == 0:
        raise site_error(index, path, f"{len(ds)} usable row(s): too few to train on")
    return Site(index, path, ds, train, test)


def load_global_test(data: DataConfig, labels: Sequence[str]) -> Dataset | None:
    """The optional shared global test file (``data.global_test_path``) in the label space ``labels``."""
    path = data.global_test_path
    if path is None:
        return None
    if not Path(path).is_file():
        raise CeloraError(f"data.global_test_path: file not found: {path}")
    try:
        return _relabel(read_data(data, path), labels)
    except CeloraError as err:
        raise CeloraError(f"data.global_test_path '{path}': {err}") from None
