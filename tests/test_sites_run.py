"""data.sites end to end: one client per file in-process and under Flower (the real ClientApp over an in-memory
grid; slow: real SuperLink + SuperNodes on loopback), the server never given the files, bad files → one line."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flower_helpers import MemoryGrid, read_jsonl
from test_sites import write_site

from celora import cli
from celora.config import load_config
from celora.fl.simulation import Simulation

flwr = pytest.importorskip("flwr")

TINY = [
    "model.name=tiny-bert",
    "model.rank=4",
    "model.max_length=32",
    "rounds=2",
    "train.batch_size=16",
    "train.lr=3e-2",
    "train.head_lr=5e-2",
    "train.threads=1",
]
MIXES = [{"sport": 30, "money": 10}, {"money": 12, "tech": 28}, {"sport": 10, "tech": 10, "money": 10}]


def _cfg(sites, *extra):
    return load_config(None, [*TINY, f"data.sites={json.dumps([str(s) for s in sites])}", *extra])


def _rows_of(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Three sites, each a CSV with its own label mix."""
    folder = tmp_path_factory.mktemp("sites")
    return [write_site(folder / f"site{k}.csv", mix, seed=k) for k, mix in enumerate(MIXES)]


@pytest.fixture(scope="module")
def inprocess(sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess") / "run"
    return Simulation(_cfg(sites), out, export_adapters=False).run(), out


def _same_clients(ref_rows, rows):
    assert len(ref_rows) == len(rows)
    for a, b in zip(ref_rows, rows, strict=True):
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            for key in ("n_train", "acc", "acc_agg", "loss", "loss_agg", "bytes_up", "bytes_down"):
                assert abs(ca[key] - cb[key]) <= 1e-6, (a["round"], ca["id"], key, ca[key], cb[key])


def _check_own_files(rows, partition, sites):
    """Each client's n_train + n_test is its own file's row count, and it holds only its file's labels."""
    for i, path in enumerate(sites):
        own = _rows_of(path)
        client = partition["clients"][i]
        assert client["n_train"] + client["n_test"] == len(own)
        assert rows[-1]["clients"][i]["n_train"] == client["n_train"]
        held = {name for name, n in client["label_hist"].items() if n}
        assert held <= {r["label"] for r in own}
    assert partition["scheme"] == "sites"


def test_inprocess_one_client_per_site_file(sites, inprocess):
    res, out = inprocess
    partition = json.loads((out / "partition.json").read_text())
    _check_own_files(res.rounds, partition, sites)
    assert set(partition["clients"][1]["label_hist"]) == {"money", "sport", "tech"}  # the agreed label space
    assert res.summary["num_clients"] == 3 and res.summary["bytes_setup_up"] > 0
    assert load_config(out / "config.toml").data.labels == ["money", "sport", "tech"]  # the agreed space


def test_flower_server_never_needs_the_site_files(tmp_path, sites, inprocess):
    """The ServerApp's config lists site paths that do not exist; each node reads only its own site-path.
    Per-client accuracies and bytes equal the in-process run's."""
    from celora.fl.flower.server import CeloraFlowerStrategy

    ref, _ = inprocess
    server_view = [tmp_path / "nowhere" / Path(s).name for s in sites]
    assert not any(p.exists() for p in server_view)
    out = tmp_path / "run"
    strategy = CeloraFlowerStrategy(_cfg(server_view), out, round_timeout=5, node_wait=1, export=False)
    grid = MemoryGrid(3, node_configs=[{"site-path": s} for s in sites])
    summary = strategy.run(grid)
    rows = read_jsonl(out / "metrics.jsonl")
    _same_clients(ref.rounds, rows)
    _check_own_files(rows, json.loads((out / "partition.json").read_text()), sites)
    assert summary["bytes_setup_up"] == ref.summary["bytes_setup_up"]  # label names + summaries, counted alike
    assert summary["bytes_up_total"] == ref.summary["bytes_up_total"]
    assert summary["bytes_setup_down"] == ref.summary["bytes_setup_down"] == 0  # no task set-up for a classifier
    assert load_config(out / "config.toml").data.labels == ["money", "sport", "tech"]
    labels = [x for x in read_jsonl(out / "flower" / "messages.jsonl") if x["type"] == "query.labels"]
    assert sorted(x["client"] for x in labels) == [0, 1, 2] and all(
        x["records"] == {"celora": "ConfigRecord"} for x in labels
    )


@pytest.mark.parametrize("case", ["missing", "empty", "unknown_label", "wrong_column"])
def test_bad_site_file_is_one_line_and_exit_2(tmp_path, sites, monkeypatch, capsys, case):
    bad = tmp_path / "bad.csv"
    extra = []
    if case == "empty":
        bad.write_text("")
    elif case == "unknown_label":
        write_site(bad, {"sport": 5, "tech": 5})
        extra = ["--set", 'data.labels=["money", "sport"]']
    elif case == "wrong_column":
        write_site(bad, {"sport": 5, "money": 5}, label="topic")
    argv = ["celora", "run", "--out", str(tmp_path / "run"), "--no-export"]
    for item in [*TINY, f"data.sites={json.dumps([sites[0], str(bad)])}"]:
        argv += ["--set", item]
    monkeypatch.setattr(sys, "argv", argv + extra)
    with pytest.raises(SystemExit) as ex:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and "Traceback" not in err
    assert len(err.splitlines()) == 1 and f"site 1 ('{bad}')" in " ".join(err.split()), err


def test_a_node_failure_is_its_own_one_line_message():
    from flwr.app import Error, Message, RecordDict

    from celora.fl.flower.server import node_failure

    ask = Message(RecordDict(), dst_node_id=7, message_type="query.labels")
    ask.metadata.__dict__["_message_id"] = "m1"
    reason = "<class 'celora.errors.CeloraError'>:<'site 1 ('/d/b.csv'): file not found'>"
    rep = Message(Error(code=1, reason=reason), reply_to=ask)
    assert node_failure(rep) == "site 1 ('/d/b.csv'): file not found"
    other = Message(Error(code=1, reason="<class 'KeyError'>:<'x'>"), reply_to=ask)
    assert node_failure(other).endswith("failed the setup: <class 'KeyError'>:<'x'>")


@pytest.mark.slow
def test_real_supernodes_with_their_own_files_killed_then_resumed_from_the_cli(
    tmp_path, sites, inprocess, monkeypatch, capsys
):
    """`celora run CONFIG --runtime flower` with data.sites (real SuperLink + one SuperNode per file, node i given
    only site-path = its own file) is SIGKILLed with every process it started once round 1 of 2 is checkpointed;
    `celora run --runtime flower --resume RUN` restarts them, the nodes restore their state from RUN/flower/nodes,
    and the run ends with the uninterrupted in-process run's per-client metrics and bytes, each client on its own
    file. (That the server is never given the files: the in-memory grid test above.)"""
    import subprocess

    from flower_helpers import check_message_log, kill_tree

    from celora.config import dump_config

    ref, _ = inprocess
    out = tmp_path / "run"
    (tmp_path / "sites.toml").write_text(dump_config(_cfg(sites)), encoding="utf-8")
    celora = [sys.executable, "-m", "celora.cli", "run", str(tmp_path / "sites.toml"), "--runtime", "flower"]
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen([*celora, "--out", str(out)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.monotonic()
    try:
        while not (out / "checkpoints" / "ckpt-000001.json").is_file():
            assert first.poll() is None and time.monotonic() - t0 < 300, (tmp_path / "first.log").read_text()[-800:]
            time.sleep(0.5)
    finally:
        kill_tree(first.pid)
        log.close()
    assert not (out / "summary.json").is_file()
    monkeypatch.setattr(sys, "argv", ["celora", "run", "--runtime", "flower", "--resume", str(out), "--no-export"])
    monkeypatch.setattr(cli.console, "width", 400)  # the printed lines unwrapped
    cli.main()
    printed = capsys.readouterr().out
    assert f"resuming {out} from its checkpoint of round 1 of 2" in printed and f"run folder: {out}" in printed
    rows = read_jsonl(out / "metrics.jsonl")
    _same_clients(ref.rounds, rows)
    _check_own_files(rows, json.loads((out / "partition.json").read_text()), sites)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["flower"]["lost_clients"] == {} and np.isnan(summary["acc_global"])  # no global test file
    assert (summary["bytes_up_total"], summary["bytes_down_total"]) == (
        ref.summary["bytes_up_total"],
        ref.summary["bytes_down_total"],
    )
    messages = read_jsonl(out / "flower" / "messages.jsonl")
    check_message_log(messages, 3, 0)  # (A, B never on the wire)
    setups = [x for x in messages if x["type"] == "query.setup"]
    assert [x["state_round"] for x in setups] == [-1, -1, -1, 1, 1, 1]  # after resuming: each its own round-1 state
    logs = "\n".join(p.read_text(errors="replace") for p in (out / "flower").glob("supernode-*.log"))
    assert "Traceback" not in logs


def test_global_test_file_is_every_site_s_global_rows(tmp_path, sites):
    from celora.fl.sites import prepare_sites

    g = write_site(tmp_path / "global.csv", {"tech": 4, "sport": 3}, seed=9)
    p = prepare_sites(_cfg(sites, f"data.global_test_path={json.dumps(g)}"))
    for i, data in p.datas.items():
        assert len(data.global_idx) == 7 and len(data.data) == len(_rows_of(sites[i])) + 7
        assert sorted(data.labels[data.global_idx].tolist()) == [1, 1, 1, 2, 2, 2, 2]  # sport, tech


def _image_sites_cfg(tmp_path, sizes, *extra: str):
    """Image sites for the tiny VLM: site k holds ``sizes[k]`` random 12×12 images labelled a / b."""
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for k, n in enumerate(sizes):
        (tmp_path / f"s{k}").mkdir()
        lines = ["file,y"]
        for r in range(n):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(tmp_path / f"s{k}" / f"{r}.png")
            lines.append(f"{r}.png,{'ab'[(r + k) % 2]}")
        (tmp_path / f"s{k}" / "site.csv").write_text("\n".join(lines) + "\n")
        paths.append(str(tmp_path / f"s{k}" / "site.csv"))
    keys = ["model.name=tiny-vlm", "model.rank=2", "model.max_length=160", "data.image_column=file"]
    keys += ["data.label_column=y", "data.image_size=28", f"data.sites={json.dumps(paths)}", *extra]
    return load_config(None, keys)


def test_a_late_vlm_site_gets_the_task_setup_the_others_got(tmp_path):
    """min_clients=2 on three VLM image sites: sites 0, 1 start (their statistics make the projector's μ, σ); site 2
    connects in round 2, joins, and receives that same combined task set-up before it trains."""
    from celora.fl.flower.server import CeloraFlowerStrategy
    from celora.fl.flower.wire import arrays_of, digest, record_blob

    cfg = _image_sites_cfg(tmp_path, (6, 8, 7), "min_clients=2", "rounds=2", 'data.labels=["a", "b"]')
    grid = MemoryGrid(3, joins={1002: (2, 2)})
    strategy = CeloraFlowerStrategy(cfg, tmp_path / "run", round_timeout=5, node_wait=1, export=False)
    summary = strategy.run(grid)
    sent = [m for m in grid.sent if m.metadata.message_type == "query.task_setup"]
    assert sorted(m.metadata.dst_node_id for m in sent) == [1000, 1001, 1002]
    blobs = {digest(record_blob(arrays_of(m.content, "setup"))) for m in sent}
    held = {digest(record_blob(grid.contexts[n].state["celora.task_setup"])) for n in (1000, 1001, 1002)}
    assert len(blobs) == 1 and held == blobs  # the late site holds exactly what the others got
    assert summary["flower"]["joined_late"] == {"2": 2}
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert rows[1]["clients"][2]["participated"]


def test_vlm_statistics_come_from_each_site_and_combine_to_the_pooled_ones(tmp_path):
    """Image sites for the VLM: each site sends (n, mean, mean square) of its own ViT tokens; the projector's
    μ, σ equal those of all training rows pooled, and the bytes are counted per site."""

    from celora.data.images import ImagePromptData
    from celora.fl.prepare import prepare
    from celora.fl.sites import SitesPrepared

    cfg = _image_sites_cfg(tmp_path, (6, 9))
    p = prepare(cfg)
    assert isinstance(p, SitesPrepared)
    model = p.loaded.model
    feats = []
    with torch.no_grad():
        for data in p.datas.values():
            assert isinstance(data.data, ImagePromptData)
            pix = data.data.images.batch(data.train_idx)["pixel_values"]
            feats.append(model.vision(pixel_values=pix).last_hidden_state.flatten(0, 1).double())
    pooled = torch.cat(feats)
    torch.testing.assert_close(model.projector.input_mean, pooled.mean(0).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.projector.input_std, pooled.std(0, unbiased=False).float(), atol=1e-4, rtol=1e-4)
    assert all(p.setup.up[i] > 4 * (2 * 32 + 1) for i in (0, 1)) and p.setup.down[0] == p.setup.down[1] > 0


def test_gradient_basis_needs_server_rows_which_sites_do_not_give(sites):
    from celora.errors import CeloraError
    from celora.fl.prepare import prepare

    with pytest.raises(CeloraError, match="model.basis = 'gradient'.*data.sites"):
        prepare(_cfg(sites, "model.basis=gradient", "model.train_ab=false"))


def test_a_late_site_is_checked_against_the_labels_agreed_without_it(tmp_path, sites):
    """min_clients=2: sites 0 and 1 agree on the label space; site 2 joins in round 2 and is checked against it —
    with labels inside it joins, with a label outside it is refused with one line naming the site."""
    from celora.fl.flower.server import CeloraFlowerStrategy

    class Notes:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def on_round_start(self, rnd, clients):
            pass

        def on_client_done(self, rnd, client, record):
            pass

        def on_round_end(self, rnd, metrics):
            pass

        def on_message(self, text):
            self.lines.append(text)

    inside = write_site(tmp_path / "late_ok.csv", {"sport": 10, "money": 10}, seed=5)
    outside = tmp_path / "late_bad.csv"
    write_site(outside, {"sport": 10, "tech": 10}, seed=6)
    outside.write_text(outside.read_text().replace(",tech\n", ",art\n"))  # a label no early site holds
    outside = str(outside)
    for late, joins in ((inside, True), (outside, False)):
        notes = Notes()
        files = [sites[0], sites[1], late]
        cfg = _cfg(files, "min_clients=2")
        strategy = CeloraFlowerStrategy(cfg, tmp_path / Path(late).stem, round_timeout=5, node_wait=1, export=False)
        strategy.obs = notes
        grid = MemoryGrid(3, joins={1002: (2, 2)}, node_configs=[{"site-path": s} for s in files])
        summary = strategy.run(grid)
        agreed = load_config(tmp_path / Path(late).stem / "config.toml").data.labels
        assert agreed == ["money", "sport", "tech"]  # from sites 0 and 1 only
        assert any("sites [2] join later" in line for line in notes.lines)
        if joins:
            assert summary["flower"]["joined_late"] == {"2": 2}
        else:
            assert "2" not in summary["flower"]["joined_late"]
            refused = [line for line in notes.lines if "could not join" in line]
            assert refused and "site 2" in refused[0] and "'art'" in refused[0] and "\n" not in refused[0]
