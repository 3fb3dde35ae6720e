"""Task mixtures ([[data.mixture]]): components on their own clients, results per component, and whether the
learned weights pool a client with its own component more than FedAvg does (celora.fl.components)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from celora.config import load_config
from celora.errors import CeloraError
from celora.fl.components import same_component_share, weight_shares
from celora.fl.simulation import Simulation, prepare


def _components(tmp: Path) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    math_rows = [{"prompt": f"{a} plus {b}", "response": str(a + b)} for a, b in rng.integers(0, 10, (40, 2))]
    words = ["cat", "dog", "sun", "sky", "red", "zip"]
    word_rows = [{"instruction": f"spell {w} backwards please", "output": w[::-1]} for w in rng.choice(words, 40)]
    a, b = tmp / "math.jsonl", tmp / "words.jsonl"
    a.write_text("".join(json.dumps({k: str(v) for k, v in r.items()}) + "\n" for r in math_rows))
    b.write_text("".join(json.dumps(r) + "\n" for r in word_rows))
    return a, b


def _mixture_cfg(tmp: Path, *extra: str):
    a, b = _components(tmp)
    toml = tmp / "mix.toml"
    toml.write_text(
        'rounds = 2\n[model]\nname = "tiny-llama"\nrank = 4\nmax_length = 32\n'
        '[data]\ntask = "generate"\nmax_response_tokens = 4\n'
        f'[[data.mixture]]\npath = "{a}"\nclients = 2\n[[data.mixture]]\npath = "{b}"\nclients = 2\n'
        "[train]\nbatch_size = 8\nlr = 5e-3\nthreads = 1\n"
    )
    return load_config(toml, list(extra))


def test_a_mixture_reports_per_component_and_celora_pools_within_components(tmp_path):
    cfg = _mixture_cfg(tmp_path)
    assert cfg.num_clients == 4
    assert cfg.data.source == "mixture of math, words"  # banner and celora.log name the components, not data.name
    res = Simulation(cfg, tmp_path / "run", prepared=prepare(cfg), export_adapters=False).run()
    comps = res.summary["components"]
    assert comps["math"]["clients"] == [0, 1] and comps["words"]["clients"] == [2, 3]
    assert all("rougeL_mean" in c and "rougeL_mean_agg" in c for c in comps.values())
    part = json.loads((tmp_path / "run" / "partition.json").read_text())
    assert [c["component"] for c in part["clients"]] == ["math", "math", "words", "words"]
    for row in res.rounds:  # every round: the learned weights favour the own component over FedAvg's share
        d = row["diag"]
        assert d["same_component_share"] > d["fedavg_same_component_share"] + 0.1
        assert d["same_component_share_data"] > d["fedavg_same_component_share"]
    assert res.summary["final_same_component_share"] == res.rounds[-1]["diag"]["same_component_share"]
    from celora.report import write_html_report

    html = write_html_report(tmp_path / "run").read_text()
    assert "Per component (task mixture)" in html and "math" in html and "words" in html
    assert "data mixture of math, words" in html
    assert "data mixture of math, words, seed 0" in (tmp_path / "run" / "celora.log").read_text()


def test_fedavg_share_is_the_sample_share_and_celora_global_equals_it(tmp_path):
    cfg = _mixture_cfg(tmp_path, "method=celora-global")
    res = Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run()
    d = res.rounds[-1]["diag"]  # the sample-weighted mean: exactly FedAvg's share
    assert d["same_component_share"] == pytest.approx(d["fedavg_same_component_share"], abs=1e-9)
    assert set(res.summary["components"]) == {"math", "words"}


def test_weight_shares_from_hand_built_weights():
    comps = ["a", "a", "b"]
    assert same_component_share(np.eye(3), comps) == pytest.approx(1.0)
    assert same_component_share(np.full((3, 3), 1 / 3), comps) == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    n = np.array([10, 10, 20])
    w = np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    out = weight_shares({"participants": [0, 1, 2], "weights": w}, comps, n, lam=1.0)
    assert out["same_component_share"] == pytest.approx(1.0)
    assert out["fedavg_same_component_share"] == pytest.approx((0.5 + 0.5 + 0.5) / 3)
    assert weight_shares({"participants": [0], "weights": w}, comps, n, lam=1.0) == {}


def test_classification_components_keep_their_label_spaces(tmp_path):
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    a.write_text("text,label\n" + "".join(f"good thing {i},pos\nbad thing {i},neg\n" for i in range(10)))
    b.write_text("text,label\n" + "".join(f"sport news {i},sport\ntech news {i},tech\n" for i in range(10)))
    toml = tmp_path / "c.toml"
    toml.write_text(
        'rounds = 1\n[model]\nname = "tiny-bert"\nrank = 4\nmax_length = 32\n'
        f'[[data.mixture]]\npath = "{a}"\nlabel = "reviews"\n[[data.mixture]]\npath = "{b}"\nlabel = "news"\n'
        "[train]\nthreads = 1\n"
    )
    p = prepare(load_config(toml))
    assert p.dataset.label_names == ["reviews:neg", "reviews:pos", "news:sport", "news:tech"]


@pytest.mark.parametrize(
    "mixture,needle",
    [
        ('[[data.mixture]]\nname = "bbcnews"\npath = "x.csv"\n[[data.mixture]]\nname = "clothing"\n', "exactly one"),
        ('[[data.mixture]]\nname = "bbcnews"\n[[data.mixture]]\nname = "bbcnews"\n', "repeat"),
        ('[[data.mixture]]\nname = "bbcnews"\n[[data.mixture]]\nname = "nosuch"\n', "unknown dataset 'nosuch'"),
    ],
)
def test_bad_mixtures_name_the_problem(tmp_path, mixture, needle):
    toml = tmp_path / "bad.toml"
    toml.write_text('[model]\nname = "tiny-bert"\n' + mixture)
    with pytest.raises(CeloraError, match=needle):
        prepare(load_config(toml))


def test_num_clients_must_match_the_components(tmp_path):
    with pytest.raises(CeloraError, match="components hold 4 clients"):
        _mixture_cfg(tmp_path, "num_clients=3")


def test_mixture_alpha_gives_clients_that_mix_tasks(tmp_path):
    """data.mixture_alpha: small α → nearly pure clients, large α → clients holding both components; every client
    has rows, is named by its majority component, and the draw is seeded."""
    from celora.data.mixture import MIXTURE_CLIENT, load_mixture, mixed_owners

    def purity(alpha: float) -> float:
        owner = mixed_owners([200, 200], 4, alpha, np.random.default_rng(0))
        comp = np.repeat([0, 1], 200)
        return float(np.mean([max(np.mean(comp[owner == k]), 1 - np.mean(comp[owner == k])) for k in set(owner)]))

    assert purity(0.05) > 0.95 and purity(100.0) < 0.65
    cfg = _mixture_cfg(tmp_path, "data.mixture_alpha=1.0")
    ds = load_mixture(cfg.data, generative=True, seed=0)
    again = load_mixture(cfg.data, generative=True, seed=0)
    assert (ds.columns[MIXTURE_CLIENT] == again.columns[MIXTURE_CLIENT]).all()
    assert sorted(set(ds.columns[MIXTURE_CLIENT])) == ["000", "001", "002", "003"]
    infos = Simulation(cfg, tmp_path / "run", prepared=prepare(cfg), export_adapters=False).infos
    assert len(infos) == 4 and all(i["component"] in ("math", "words") for i in infos), infos
    with pytest.raises(CeloraError, match="mixture_alpha needs data.mixture"):
        load_config(None, ["data.mixture_alpha=0.5"])
    with pytest.raises(CeloraError, match="rows for 50 clients"):
        mixed_owners([40, 40], 50, 1.0, np.random.default_rng(0))


def test_a_mixture_under_flower_equals_the_engine(tmp_path):
    """The same mixture config through Flower's messages (real ClientApp, in-memory grid): each node reads its own
    component, and the per-client ROUGE-L, bytes and same-component shares are the in-process engine's."""
    from flower_helpers import MemoryGrid, read_jsonl

    from celora.fl.flower.server import CeloraFlowerStrategy

    cfg = _mixture_cfg(tmp_path)
    engine = Simulation(cfg, tmp_path / "engine", prepared=prepare(cfg), export_adapters=False).run()
    strategy = CeloraFlowerStrategy(cfg, tmp_path / "run", round_timeout=30, node_wait=1, export=False)
    summary = strategy.run(MemoryGrid(4))
    assert summary["bytes_per_client_round"] == engine.summary["bytes_per_client_round"]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for a, b in zip(engine.rounds, rows, strict=True):
        got = [c["rougeL_agg"] for c in b["clients"]]
        assert got == pytest.approx([c["rougeL_agg"] for c in a["clients"]], abs=1e-6)
        assert b["diag"]["same_component_share"] == pytest.approx(a["diag"]["same_component_share"], abs=1e-6)
    assert set(summary["components"]) == {"math", "words"}
