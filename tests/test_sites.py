"""Site-local data (data.sites): config keys, each site's own file and split, label agreement, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from celora.config import load_config
from celora.data.sites import agree_labels, label_message, load_global_test, load_site, read_site, split_site
from celora.data.sites import parse_label_message as parse_labels
from celora.errors import CeloraError

WORDS = {
    "sport": ["goal", "match", "team", "coach"],
    "money": ["bank", "stock", "price", "market"],
    "tech": ["chip", "code", "robot", "cloud"],
}


def write_site(path, mix: dict[str, int], seed: int = 0, text: str = "text", label: str = "label"):
    """A CSV with ``mix[topic]`` rows of each topic (text column ``text``, label column ``label``)."""
    rng = np.random.default_rng(seed)
    rows = [f"{text},{label}"]
    for topic, count in mix.items():
        rows += [" ".join(rng.choice(WORDS[topic], size=6)) + f",{topic}" for _ in range(count)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def _data(sites, *extra):
    return load_config(None, [f"data.sites={json.dumps(sites)}", *extra]).data


# --------------------------------------------------------------------------- config
def test_sites_set_num_clients_and_replace_the_file_source(tmp_path):
    cfg = load_config("configs/quickstart.toml", ['data.sites=["a.csv", "b.parquet", "c.jsonl"]'])
    assert cfg.num_clients == 3 and cfg.data.sites == ["a.csv", "b.parquet", "c.jsonl"]
    again = tmp_path / "c.toml"
    from celora.config import dump_config

    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    assert load_config(None, ['data.sites=["a.csv", "b.csv"]', "num_clients=2"]).num_clients == 2


@pytest.mark.parametrize(
    "overrides,match",
    [
        (['data.sites=["a.csv", "b.csv"]', "num_clients=3"], "num_clients = 3 but data.sites lists 2 files"),
        (['data.sites=["a.csv", "a.csv"]'], r"data.sites\[1\]: 'a.csv' is listed twice"),
        (['data.sites=["a.csv"]', "data.path=x.csv"], "data.sites and data.path both given"),
        (["data.sites=[]"], "data.sites"),
        (['data.labels=["x", "y"]'], "data.labels needs data.sites"),
        (["data.global_test_path=g.csv"], "data.global_test_path needs data.sites"),
        (['data.sites=["a.csv"]', 'data.labels=["x", "x"]'], "label 'x' is listed twice"),
        (['data.sites=["a.csv"]', 'data.labels=["x"]'], "data.labels"),
    ],
)
def test_bad_site_keys_are_one_line(overrides, match):
    with pytest.raises(CeloraError, match=match) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- reading and splitting
def test_each_site_reads_its_own_file_and_splits_its_own_test_set(tmp_path):
    a = write_site(tmp_path / "a.csv", {"sport": 30, "money": 10})
    b = write_site(tmp_path / "b.csv", {"money": 12, "tech": 28}, seed=1)
    data = _data([a, b], "data.test_fraction=0.25")
    raw = [read_site(data, 0), read_site(data, 1)]
    assert raw[0].label_names == ["money", "sport"] and raw[1].label_names == ["money", "tech"]
    labels = agree_labels([r.label_names for r in raw], data.sites)
    assert labels == ["money", "sport", "tech"]
    sites = [load_site(data, k, labels, seed=3, dataset=raw[k]) for k in range(2)]
    for site, n in zip(sites, (40, 40), strict=True):
        assert len(site.train_idx) + len(site.test_idx) == n and len(site.test_idx) == 10
        assert not set(site.train_idx) & set(site.test_idx)
        assert site.dataset.label_names == labels
    hist = np.bincount(sites[1].dataset.labels, minlength=3)
    assert hist.tolist() == [12, 0, 28]  # ids of the agreed space
    test_hist = np.bincount(sites[0].dataset.labels[sites[0].test_idx], minlength=3)
    assert test_hist.tolist() == [2, 8, 0]  # stratified: 10 of 30 sport / 10 money, rounded
    again = load_site(data, 0, labels, seed=3)
    assert np.array_equal(again.test_idx, sites[0].test_idx)  # seeded by (seed, site)
    other = split_site(sites[0].dataset, data, seed=4, index=0)[1]
    assert not np.array_equal(other, sites[0].test_idx)


def test_a_site_may_hold_one_class_and_caps_apply_per_site(tmp_path):
    a = write_site(tmp_path / "a.csv", {"sport": 20})
    b = write_site(tmp_path / "b.csv", {"money": 20, "sport": 20})
    data = _data([a, b], "data.train_per_client=8", "data.max_samples=30")
    raw = [read_site(data, k) for k in range(2)]
    assert len(raw[0]) == 20 and len(raw[1]) == 30
    labels = agree_labels([r.label_names for r in raw], data.sites)
    site = load_site(data, 1, labels, dataset=raw[1])
    assert len(site.train_idx) == 8 and len(site.test_idx) == 6


def test_label_agreement_declared_numeric_and_single_class():
    assert agree_labels([["10", "2"], ["1"]], ["a", "b"]) == ["1", "2", "10"]
    assert agree_labels([["b"], ["a", "c"]], ["a", "b"], declared=["c", "b", "a"]) == ["c", "b", "a"]
    with pytest.raises(CeloraError, match=r"site 1 \('b.csv'\): label 'z' is not in data.labels"):
        agree_labels([["a"], ["a", "z"]], ["a.csv", "b.csv"], declared=["a", "b"])
    with pytest.raises(CeloraError, match="single label 'x'"):
        agree_labels([["x"], ["x"]], ["a", "b"])


def test_label_message_carries_names_only_and_is_checked():
    names = ["money", "sport"]
    assert parse_labels(label_message(names), 0) == names
    for bad in (b"\xff", b"{}", b"[]", b'["a", "a"]', b'["a", 3]', b'[""]'):
        with pytest.raises(CeloraError, match="site 2"):
            parse_labels(bad, 2)


@pytest.mark.parametrize("case", ["missing", "empty", "header_only", "wrong_column", "unknown_label"])
def test_bad_site_files_name_the_site_and_the_file(tmp_path, case):
    good = write_site(tmp_path / "good.csv", {"sport": 5, "money": 5})
    bad = tmp_path / "bad.csv"
    if case == "empty":
        bad.write_text("")
    elif case == "header_only":
        bad.write_text("text,label\n")
    elif case == "wrong_column":
        write_site(bad, {"sport": 5}, label="topic")
    elif case == "unknown_label":
        write_site(bad, {"sport": 5, "tech": 5})
    data = _data([good, str(bad)], *(['data.labels=["money", "sport"]'] if case == "unknown_label" else []))
    with pytest.raises(CeloraError) as info:
        ds = read_site(data, 1)
        load_site(data, 1, data.labels or ds.label_names, dataset=ds)
    msg = str(info.value)
    assert msg.startswith(f"site 1 ('{bad}'): ") and "\n" not in msg
    assert {
        "missing": "not found",
        "empty": "empty",
        "header_only": "no rows",
        "wrong_column": "'label' not found",
        "unknown_label": "label 'tech'",
    }[case] in msg
    assert len(read_site(data, 0)) == 10  # the other site is unaffected


def test_global_test_file_in_the_run_label_space(tmp_path):
    g = write_site(tmp_path / "g.csv", {"tech": 3, "money": 2})
    data = _data(["a.csv"], f"data.global_test_path={json.dumps(g)}")
    ds = load_global_test(data, ["money", "sport", "tech"])
    assert ds is not None and sorted(ds.labels.tolist()) == [0, 0, 2, 2, 2]
    with pytest.raises(CeloraError, match=r"data.global_test_path .*label 'tech' is not in the run's label space"):
        load_global_test(data, ["money", "sport"])
    assert load_global_test(_data(["a.csv"]), ["x", "y"]) is None


def test_vlm_feature_statistics_combine_like_the_pooled_rows():
    """Sites send (n_i, m_i, q_i) of their own rows; the combined μ, σ equal those of all rows pooled."""
    import celora.data.images  # noqa: F401  (registers the image tasks)
    from celora.data.tasks import get_task

    task = get_task("image-prompt")
    rng = np.random.default_rng(0)
    rows = [torch.as_tensor(rng.normal(k, 1 + k, size=(n, 5))) for k, n in enumerate((7, 30, 2))]
    stats = [{"n": torch.tensor(float(len(v))), "mean": v.mean(0), "mean_square": v.pow(2).mean(0)} for v in rows]
    got = task.combine_statistics(stats)
    pooled = torch.cat(rows)
    assert torch.allclose(got["mean"], pooled.mean(0).float(), atol=1e-5)
    assert torch.allclose(got["std"], pooled.std(0, unbiased=False).float(), atol=1e-5)
    assert get_task("classify").combine_statistics(stats) == {}
