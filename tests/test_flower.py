"""celora on Flower: the wire format, the strategy + ClientApp over an in-memory grid, and (slow) real
SuperLink/SuperNode processes on loopback — insecure, and TLS with SuperNode authentication."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

flwr = pytest.importorskip("flwr")

from flower_helpers import FLOWER, MemoryGrid, check_message_log, read_jsonl  # noqa: E402

from celora import cli  # noqa: E402
from celora.errors import CeloraError  # noqa: E402
from celora.fl.flower.server import CeloraFlowerStrategy  # noqa: E402
from celora.fl.flower.wire import KEY, blob_record, digest, number, record_blob  # noqa: E402
from celora.fl.payload import PayloadError, decode  # noqa: E402
from celora.fl.simulation import Simulation, prepare  # noqa: E402


@pytest.fixture(scope="module")
def make_cfg(tiny_config):
    """conftest's tiny experiment with the Flower tests' learning rates and skew."""
    return lambda *extra: tiny_config(*FLOWER, *extra)


@pytest.fixture(scope="module")
def inprocess(make_cfg):
    """The in-process engine's result on the tiny setup (reference for every runtime test)."""
    cfg = make_cfg()
    sim = Simulation(cfg, prepared=prepare(cfg), export_adapters=False)
    return sim.run()


def _assert_same_accuracies(ref_rows, rows, tol=1e-6):
    assert len(ref_rows) == len(rows)
    for a, b in zip(ref_rows, rows, strict=True):
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            for key in ("acc", "acc_agg", "loss", "loss_agg"):
                same = np.isnan(ca[key]) and np.isnan(cb[key]) or abs(ca[key] - cb[key]) <= tol
                assert same, (a["round"], ca["id"], key, ca[key], cb[key])
            assert (ca["bytes_up"], ca["bytes_down"]) == (cb["bytes_up"], cb["bytes_down"])
        assert set(a) <= set(b)


# --------------------------------------------------------------------------- fast
def test_blob_travels_verbatim_and_flower_counts_it():
    blob = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(200))
    rec = blob_record(blob)
    assert record_blob(rec) == blob
    assert rec.count_bytes() == len(blob) + len(KEY)
    rec2 = flwr.app.ArrayRecord({KEY: flwr.app.Array(np.zeros(3))})
    with pytest.raises(PayloadError):
        record_blob(rec2)


def test_flower_processes_run_without_telemetry():
    """Flower's exit waits on a telemetry post; offline, a SuperExec whose SuperNode ends meanwhile raises SIGINT on
    itself inside that wait and prints a KeyboardInterrupt traceback (CI): our processes run with telemetry off."""
    from celora.fl.flower.deploy import flower_env

    assert flower_env()["FLWR_TELEMETRY_ENABLED"] == "0"


def test_certificates_and_node_keys_load_like_flower(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    from celora.fl.flower.certs import main

    main([str(tmp_path), "--nodes", "2"])
    cert = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    priv = load_ssh_private_key((tmp_path / "node_1").read_bytes(), None)
    pub = load_ssh_public_key((tmp_path / "node_1.pub").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.curve.name == "secp384r1"


def test_run_config_options_and_errors(tmp_path, make_cfg):
    from celora.fl.flower.server_app import FlowerOptions, resolve

    opts = FlowerOptions.from_run_config({"config": "configs/quickstart.toml", "set": "rounds=1", "round-timeout": 30})
    assert opts.round_timeout == 30.0
    cfg, out = resolve(opts.model_copy(update={"out": str(tmp_path / "r")}), None)
    assert cfg.rounds == 1 and out == tmp_path / "r"
    with pytest.raises(CeloraError, match="round-timeout"):
        FlowerOptions.from_run_config({"round-timeout": -1})
    with pytest.raises(CeloraError, match="only in-process"):
        CeloraFlowerStrategy(make_cfg("method=centralized"), None)


def test_cli_rejects_unknown_runtime(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["celora", "run", "--runtime", "mpi"])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    assert ex.value.code == 2
    assert "--runtime must be inprocess or flower" in capsys.readouterr().err


def test_strategy_and_clientapp_match_inprocess(tmp_path, inprocess, make_cfg):
    """Real ClientApp + Flower strategy over an in-memory grid: same accuracies, personalized C̄_i, C only."""
    out = tmp_path / "run"
    strategy = CeloraFlowerStrategy(make_cfg(), out, round_timeout=5, node_wait=1)
    grid = MemoryGrid(3)
    summary = strategy.run(grid)
    rows = read_jsonl(out / "metrics.jsonl")
    _assert_same_accuracies(inprocess.rounds, rows)
    assert abs(summary["acc_global"] - inprocess.summary["acc_global"]) <= 1e-6
    assert set(inprocess.summary) <= set(summary)
    assert summary["bytes_up_total"] == inprocess.summary["bytes_up_total"]
    # Flower's own count: celora's bytes + the record key of every blob message
    lines = read_jsonl(out / "flower" / "messages.jsonl")
    blobs_up = sum(1 for x in lines if x["dir"] == "up" and ("up" in x["records"] or "summary" in x["records"]))
    blobs_down = sum(1 for x in lines if x["dir"] == "down" and "down" in x["records"])
    assert summary["flower"]["bytes_up_arrays"] == summary["bytes_up_total"] + len(KEY) * blobs_up
    assert summary["flower"]["bytes_down_arrays"] == summary["bytes_down_total"] + len(KEY) * blobs_down
    check_message_log(lines, 3, 2)
    # one fresh RecordDict per message; the C̄_i of different clients differ as tensors
    trains = [m for m in grid.sent if m.metadata.message_type == "train" and "down" in m.content]
    assert len({id(m.content) for m in trains}) == len(trains)
    layout, dtype = strategy.core.phase.down_layout, strategy.core.phase.dtype
    last = {m.metadata.dst_node_id: decode(record_blob(m.content["down"]), layout, dtype) for m in trains[-3:]}
    a, b = list(last.values())[:2]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # private factors stayed in context.state on the nodes
    state = grid.contexts[grid.nodes[0]].state["celora.state"]
    assert any(k.endswith("lora_A") for k in state) and (out / "adapters" / "client_0").is_dir()


def test_lost_node_is_reported_not_dropped(tmp_path, make_cfg):
    out = tmp_path / "run"
    strategy = CeloraFlowerStrategy(make_cfg(), out, round_timeout=1, node_wait=1, export=False)
    grid = MemoryGrid(3, dead={1002: 2})  # client 2 stops answering from round 2 on
    summary = strategy.run(grid)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["lost"] for r in rows] == [[], [2]]
    c2 = rows[1]["clients"][2]
    assert not c2["participated"] and c2["rejected"].startswith("lost: no reply")
    assert rows[1]["rejected"] == 1 and rows[1]["participants"] == 2
    assert summary["flower"]["lost_clients"]["2"]["round"] == 2
    assert summary["flower"]["global_eval_clients"] == 2
    assert all(m.metadata.dst_node_id != 1002 for m in grid.sent if m.metadata.message_type == "evaluate")


def test_digest_is_content_hash():
    assert digest(b"") == "e3b0c44298fc1c14"  # the first 16 hex digits of SHA-256: what a client confirms
    assert digest(b"abc") == "ba7816bf8f01cfea"


# --------------------------------------------------------------------------- slow: real processes
@pytest.mark.slow
def test_tls_node_auth_and_a_supernode_killed_and_restarted(tmp_path, inprocess, make_cfg):
    """TLS + SuperNode authentication, 4 rounds; an unregistered SuperNode is refused; one SuperNode is SIGKILLed
    after round 1 and restarted with the same node config: round 2 completes with the others and reports it lost,
    the restarted node restores its own state from its state-dir and trains again in round 3, and the run finishes."""
    from celora.config import dump_config
    from celora.fl.flower.deploy import LocalDeployment, write_app

    out = tmp_path / "run"
    app_dir = write_app(tmp_path / "app", dump_config(make_cfg("rounds=4")))
    run_config = {"config": "experiment.toml", "out": str(out), "round-timeout": 60.0, "export": False}
    with LocalDeployment(tmp_path / "dep", 3, tls=True, auth=True) as dep:
        dep.start()
        intruder = dep.start_supernode(3, partition=0, key=True)  # its key was never registered
        run = dep.run_app(app_dir, run_config, timeout=420)
        log = out / "flower" / "messages.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and run.poll() is None:
            ups = [x for x in read_jsonl(log) if x["dir"] == "up" and x["round"] == 1] if log.is_file() else []
            if len(ups) == 3:
                break
            time.sleep(1.0)
        assert run.poll() is None, dep.procs["flwr-run"].tail()
        dep.kill("supernode-2")
        dep.restart_supernode(2)  # the same node config: partition 2, its state-dir, its key
        run.wait(timeout=max(10.0, deadline + 240 - time.monotonic()))
        assert run.returncode == 0, dep.procs["flwr-run"].tail()
        intruder_log = intruder.tail(200)
        intruder_code = intruder.popen.poll()
        superlink_log = dep.procs["superlink"].log.read_text(errors="replace")
    summary = json.loads((out / "summary.json").read_text())
    rows = read_jsonl(out / "metrics.jsonl")
    assert summary["rounds"] == 4 and len(rows) == 4
    assert list(summary["flower"]["nodes"]) == ["0", "1", "2"]  # the intruder never joined
    lost = [r["lost"] for r in rows]
    assert lost[:2] == [[], [2]] and lost[2] in ([], [2]) and lost[3] == [], lost  # back in round 3 or 4
    c2 = rows[1]["clients"][2]
    assert c2["rejected"].startswith("lost:") and not c2["participated"]
    assert rows[1]["participants"] == 2
    assert rows[3]["clients"][2]["participated"]  # it trains again
    rejoin = [x for x in read_jsonl(log) if x["type"] == "query.setup" and x["client"] == 2][-1]
    assert rejoin["round"] >= 2 and rejoin["state_round"] == 1  # it restored its own round-1 A, B, head
    # round 1 is untouched by the loss, and round 2's local step of the survivors too
    # (client 2 died before its round-1 C̄_2 reached it: that message was never delivered)
    r1, ref1 = rows[0]["clients"], inprocess.rounds[0]["clients"]
    for i in range(3):
        assert abs(r1[i]["acc"] - ref1[i]["acc"]) <= 1e-6 and abs(r1[i]["loss"] - ref1[i]["loss"]) <= 1e-6
    for i in (0, 1):
        assert abs(r1[i]["acc_agg"] - ref1[i]["acc_agg"]) <= 1e-6 and r1[i]["bytes_down"] == ref1[i]["bytes_down"]
    assert r1[2]["bytes_down"] == 0
    for i in (0, 1):
        assert abs(rows[1]["clients"][i]["acc"] - inprocess.rounds[1]["clients"][i]["acc"]) <= 1e-6
    # the SuperNode whose key was never registered is refused by the SuperLink and gives up
    assert intruder_code not in (None, 0), intruder_log[-500:]
    assert "Failed to activate SuperNode" in intruder_log
    assert "No SuperNode found with the given public key" in superlink_log


def test_warmup_phase_switch_matches_inprocess(tmp_path, make_cfg):
    """k rounds of FedIT (A, B travel), then C only: the switch flushes pending messages as in-process."""
    extra = ("aggregation.warmup_rounds=1", "aggregation.warmup_method=fedit", "rounds=3", "clients_per_round=2")
    cfg = make_cfg(*extra)
    ref = Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run()
    strategy = CeloraFlowerStrategy(make_cfg(*extra), tmp_path / "run", round_timeout=5, node_wait=1)
    summary = strategy.run(MemoryGrid(3))
    _assert_same_accuracies(ref.rounds, read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    assert summary["bytes_down_total"] == ref.summary["bytes_down_total"]


# --------------------------------------------------------------------------- faults (in-memory grid)
def test_server_crash_then_resume_with_node_state_on_disk(tmp_path, inprocess, make_cfg):
    """The ServerApp dies in round 2; a new one resumes from the round-1 checkpoint, and every node — a fresh
    Context, as after a SuperNode restart — restores its private A, B, head from its ``state-dir``: the run
    ends with the uninterrupted run's per-client accuracies and bytes."""
    out, nodes = tmp_path / "run", {"state-dir": str(tmp_path / "nodes")}
    crashing = MemoryGrid(3, crash_at=2, node_config=nodes)
    with pytest.raises(RuntimeError, match="crashed in round 2"):
        CeloraFlowerStrategy(make_cfg(), out, round_timeout=5, node_wait=1).run(crashing)
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl")] == []  # round 1 closes only in round 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-000001.json", "ckpt-000001.safetensors"]
    assert len(list((tmp_path / "nodes").glob("*-client_*/state-000001.safetensors"))) == 3
    strategy = CeloraFlowerStrategy(make_cfg(), out, round_timeout=5, node_wait=1, resume=True)
    summary = strategy.run(MemoryGrid(3, node_config=nodes))
    _assert_same_accuracies(inprocess.rounds, read_jsonl(out / "metrics.jsonl"))
    assert summary["bytes_up_total"] == inprocess.summary["bytes_up_total"]
    with pytest.raises(CeloraError, match="no complete checkpoint"):
        CeloraFlowerStrategy(make_cfg(), tmp_path / "empty", node_wait=1, resume=True).run(MemoryGrid(3))


def test_lost_node_rejoins_and_late_node_joins(tmp_path, make_cfg):
    """Client 2's node dies in round 2 and is restarted (a new node id, same state-dir) in round 3: it rejoins.
    With min_clients=2, a run whose third SuperNode connects only in round 2 starts without it."""
    nodes = {"state-dir": str(tmp_path / "nodes")}
    grid = MemoryGrid(3, dead={1002: 2}, joins={1003: (2, 3)}, node_config=nodes)
    CeloraFlowerStrategy(make_cfg("rounds=3"), tmp_path / "a", round_timeout=5, node_wait=1, export=False).run(grid)
    rows = read_jsonl(tmp_path / "a" / "metrics.jsonl")
    assert [r["lost"] for r in rows] == [[], [2], []]
    assert rows[1]["clients"][2]["rejected"].startswith("lost") and rows[2]["clients"][2]["participated"]
    grid = MemoryGrid(3, joins={1002: (2, 2)})
    summary = CeloraFlowerStrategy(
        make_cfg("rounds=2", "min_clients=2"), tmp_path / "b", round_timeout=5, node_wait=1, export=False
    ).run(grid)
    rows = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    assert rows[0]["lost"] == [2] and not rows[0]["clients"][2]["participated"]
    assert rows[1]["lost"] == [] and rows[1]["clients"][2]["participated"]
    assert (tmp_path / "b" / "similarity_data.npy").is_file()  # S^data once the last summary arrived
    assert summary["flower"]["nodes"]["2"] == 1002 and summary["flower"]["joined_late"] == {"2": 2}
    with pytest.raises(CeloraError, match="only 2 of 3 SuperNodes"):
        CeloraFlowerStrategy(make_cfg(), None, node_wait=1).run(MemoryGrid(3, joins={1002: (2, 2)}))


def test_dropout_and_outlier_rejection_match_inprocess(tmp_path, make_cfg):
    """Simulated dropouts and a 100× update rejected by max_norm_ratio: the Flower strategy and the in-process
    loop give the same rows (the server core draws the dropouts and screens the updates in both)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    extra = ("rounds=3", "dropout=0.3", "dropout_before=0.1", "aggregation.max_norm_ratio=5")

    def scale(blob: bytes) -> bytes:
        return st_save({k: v * 100 for k, v in st_load(blob).items()}, metadata={"wire": "fp32"})

    target: dict[str, int] = {}

    def hook(rnd: int, client: int, blob: bytes) -> bytes:  # the first upload that reaches the server in round 1
        if rnd == 1:
            target.setdefault("client", client)
        return scale(blob) if (rnd, client) == (1, target["client"]) else blob

    def tamper(msg, reply):  # type: ignore[no-untyped-def]
        if msg.metadata.message_type == "train" and msg.metadata.group_id == "1" and "up" in reply.content:
            if number(reply.content["celora"], "partition-id") == target["client"]:
                reply.content["up"] = blob_record(scale(record_blob(reply.content["up"])))
        return reply

    cfg = make_cfg(*extra)
    ref = Simulation(cfg, prepared=prepare(cfg), export_adapters=False, wire_hook=hook).run()
    assert any(r["dropped"] for r in ref.rounds) and ref.rounds[0]["rejected"] >= 1
    out = tmp_path / "run"
    CeloraFlowerStrategy(make_cfg(*extra), out, round_timeout=5, node_wait=1, export=False).run(
        MemoryGrid(3, tamper=tamper)
    )
    rows = read_jsonl(out / "metrics.jsonl")
    _assert_same_accuracies(ref.rounds, rows)
    assert [r["dropped"] for r in rows] == [r["dropped"] for r in ref.rounds]
    assert [r["rejected"] for r in rows] == [r["rejected"] for r in ref.rounds]


def test_kept_optimizer_moments_survive_on_the_node(tmp_path, make_cfg):
    """train.keep_optimizer under Flower: each node keeps its AdamW moments between messages (context.state)
    and on its disk, so the rows equal the in-process loop's, also after a ServerApp crash and resume."""
    extra = ("rounds=3", "clients_per_round=2", "train.keep_optimizer=true")
    cfg = make_cfg(*extra)
    ref = Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run()
    out, nodes = tmp_path / "run", {"state-dir": str(tmp_path / "nodes")}
    with pytest.raises(RuntimeError, match="crashed in round 3"):
        CeloraFlowerStrategy(make_cfg(*extra), out, round_timeout=5, node_wait=1, export=False).run(
            MemoryGrid(3, crash_at=3, node_config=nodes)
        )
    CeloraFlowerStrategy(make_cfg(*extra), out, round_timeout=5, node_wait=1, export=False, resume=True).run(
        MemoryGrid(3, node_config=nodes)
    )
    _assert_same_accuracies(ref.rounds, read_jsonl(out / "metrics.jsonl"))
