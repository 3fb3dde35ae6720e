"""Behaviour no other test exercised: adapter dropout and its PEFT export, a VLM adapter exported as PEFT, a local
Hugging Face folder as model.name, reduced wire precision inside a run."""

import json

import pytest
import torch
from peft import PeftModel

from celora.adapters.export import PeftExporter
from celora.adapters.inject import AdapterSpec, adapter_layers, get_tensors, inject_adapters, set_tensors, view_names
from celora.fl.simulation import run_experiment
from celora.models.zoo import load_model


def _randomize(model, names, seed=1, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    state = {k: v + scale * torch.randn(v.shape, generator=g) for k, v in get_tensors(model, names).items()}
    set_tensors(model, state)
    return state


def test_adapter_dropout_acts_in_training_only_and_is_exported(tmp_path):
    lm = load_model("tiny-bert", 3, seed=0)
    spec = AdapterSpec(rank=4, alpha=8, targets=("query", "value"), dropout=0.5)
    inject_adapters(lm.model, spec)
    state = _randomize(lm.model, view_names(lm.model, {"A", "B", "C", "head"}, lm.head_modules))
    layer = next(iter(adapter_layers(lm.model).values()))
    x = torch.randn(4, 7, layer.base.in_features)
    layer.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), layer(x))  # a fresh dropout mask per pass
    layer.eval()
    with torch.no_grad():
        no_drop = layer.base(x) + layer.scaling * (x @ layer.lora_A @ layer.lora_C @ layer.lora_B)
    torch.testing.assert_close(layer(x), no_drop)  # evaluation sees every input
    batch = lm.tokenizer(["federated dropout", "tri-matrix"], padding=True, return_tensors="pt")
    lm.model.eval()
    with torch.no_grad():
        ours = lm.model(**batch).logits
    PeftExporter(lm.model, spec, lm.head_modules).save(state, tmp_path / "c0")
    assert json.loads((tmp_path / "c0" / "adapter_config.json").read_text())["lora_dropout"] == 0.5
    peft_model = PeftModel.from_pretrained(load_model("tiny-bert", 3, seed=0).model, str(tmp_path / "c0")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**batch).logits, ours, atol=1e-5, rtol=1e-5)


def test_vlm_adapter_and_projector_export_as_peft(tmp_path):
    vlm = load_model("tiny-vlm", 2, seed=0, head="lm")
    spec = AdapterSpec(rank=2, alpha=2, targets=vlm.default_targets)
    inject_adapters(vlm.model, spec)
    names = view_names(vlm.model, {"A", "B", "C", "head"}, vlm.head_modules)
    assert any(n.startswith("projector.") for n in names)  # the projector travels with the adapter
    state = _randomize(vlm.model, names)
    ids = torch.randint(4, 30, (2, 6))
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ours = vlm.model(ids, pixel_values=pixels)
    PeftExporter(vlm.model, spec, vlm.head_modules).save(state, tmp_path / "vlm0")
    fresh = load_model("tiny-vlm", 2, seed=0, head="lm").model
    with torch.no_grad():
        plain = fresh(ids, pixel_values=pixels)
        peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "vlm0")).eval()
        theirs = peft_model(ids, pixel_values=pixels)
    assert not torch.allclose(plain, ours, atol=1e-3)  # the adapter and projector change the answer
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_a_local_hugging_face_folder_is_a_model_name(tmp_path, tiny_config):
    folder = tmp_path / "my-bert"
    lm = load_model("tiny-bert", 2, seed=0)
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    res = run_experiment(tiny_config(f"model.name={folder}", "rounds=1", "train.max_steps=1"), tmp_path / "run")
    assert res.summary["rounds"] == 1 and res.summary["bytes_per_client_round"]["up"] > 0
    assert "query" in json.dumps(
        json.loads((tmp_path / "run" / "adapters" / "client_0" / "adapter_config.json").read_text())["target_modules"]
    )  # the folder's default targets


def test_reduced_wire_precision_inside_a_run(tiny_config):
    overrides = ["method=celora", "aggregation.head=local", "rounds=2", "train.max_steps=2"]
    full = run_experiment(tiny_config(*overrides), None).summary
    for dtype, ratio in (("fp16", 0.5), ("int8", 0.25)):
        low = run_experiment(tiny_config(*overrides, f"payload.dtype={dtype}"), None).summary
        assert low["payload"]["dtype"] == dtype
        # the C matrices on the wire shrink by the dtype's width (+ one fp32 scale per tensor for int8)
        assert (
            low["payload"]["bytes_adapters"]
            <= full["payload"]["bytes_adapters"] * ratio + 4 * full["payload"]["tensors"]
        )
        assert low["bytes_per_client_round"]["up"] == low["payload"]["bytes_message"]
        # the run trains through the quantised exchange: the same accuracy to within a few points
        assert abs(low["acc_mean_agg"] - full["acc_mean_agg"]) < 0.1


def test_dp_summaries_inside_a_run(tmp_path, tiny_config):
    """privacy.summary_epsilon noises the uploaded summaries: the server's data similarity moves away from the
    noiseless one, the more the smaller ε."""
    import numpy as np

    def similarity(*extra: str) -> np.ndarray:
        out = tmp_path / "-".join(extra or ("plain",))
        run_experiment(
            tiny_config("method=celora", "rounds=1", "train.max_steps=1", *extra), out, export_adapters=False
        )
        return np.load(out / "similarity_data.npy")

    plain = similarity()
    weak = np.abs(similarity("privacy.summary_epsilon=1000") - plain).max()
    strong = np.abs(similarity("privacy.summary_epsilon=0.5") - plain).max()
    assert 0 < weak < strong


def test_every_run_folder_has_its_log(tmp_path, tiny_config):
    import logging

    def hostile(rnd, client, blob):
        return blob + b"\0" * 100_000 if (rnd, client) == (1, 2) else blob

    from celora.fl.simulation import Simulation

    Simulation(tiny_config("method=celora", "train.max_steps=1"), tmp_path / "a", wire_hook=hostile).run()
    lines = (tmp_path / "a" / "celora.log").read_text(encoding="utf-8").splitlines()
    assert "run started: method celora, model tiny-bert, 3 clients, 2 rounds" in lines[0]
    assert any("round 1: rejected the update of client 2" in line for line in lines)
    assert [
        line.split(" INFO ")[1].split(":")[0] for line in lines if " INFO round " in line and "acc mean" in line
    ] == [
        "round 1",
        "round 2",
    ]
    assert "final: acc mean" in lines[-1]
    run_experiment(tiny_config("method=local", "rounds=1", "train.max_steps=1"), tmp_path / "b")
    assert "method local" in (tmp_path / "b" / "celora.log").read_text(encoding="utf-8")
    assert "method local" not in (tmp_path / "a" / "celora.log").read_text(encoding="utf-8")  # one log per run
    assert not [h for h in logging.getLogger("celora").handlers if isinstance(h, logging.FileHandler)]


class WireTap:
    """Every blob a Simulation actually puts on the wire: uploads (through its wire hook) and every download
    (the server's message for a client, as the client applied it: ServerCore.delivered)."""

    def __init__(self, sim):
        self.up: list[tuple[int, int, bytes]] = []
        self.down: list[tuple[int, bytes]] = []
        self.sim = sim
        delivered = sim.server.delivered

        def tapped(i, blob, tensors=None):
            self.down.append((i, blob))
            return delivered(i, blob, tensors)

        sim.server.delivered = tapped

    def hook(self, rnd, client, blob):
        self.up.append((rnd, client, blob))
        return blob

    @staticmethod
    def factors(blob: bytes) -> set[str]:
        from safetensors.torch import load as st_load

        return {key.split(":")[0] for key in st_load(blob)}


@pytest.mark.parametrize(
    "method,travels",
    [("celora", {"C", "head"}), ("celora-global", {"C", "head"}), ("fedit", {"A", "B", "head"})],
)
def test_what_travels_is_what_the_messages_carry(tiny_config, method, travels):
    """A and B never travel under celora: asserted on every blob sent, both ways (fedit: they do)."""
    from celora.fl.simulation import Simulation

    tap = WireTap.__new__(WireTap)
    cfg = tiny_config(f"method={method}", "rounds=1", "train.max_steps=1")
    sim = Simulation(cfg, wire_hook=lambda r, c, b: tap.hook(r, c, b))
    WireTap.__init__(tap, sim)
    sim.run()
    assert len(tap.up) == 3 and len(tap.down) >= 3
    for blob in [b for *_, b in tap.up] + [b for *_, b in tap.down]:
        assert WireTap.factors(blob) == travels


def test_a_missed_message_reaches_the_personalized_client(tmp_path, tiny_config):
    """Under Flower, client 2's node is down when its personalized C̄_2 is due (round 2) and comes back in round 3:
    it then receives exactly that message (its own, not another client's) before it trains, and confirms it."""
    from flower_helpers import MemoryGrid, read_jsonl

    from celora.fl.flower.server import CeloraFlowerStrategy

    grid = MemoryGrid(3, dead={1002: 2}, joins={1003: (2, 3)}, node_config={"state-dir": str(tmp_path / "nodes")})
    cfg = tiny_config("method=celora", "rounds=3", "train.max_steps=1")
    CeloraFlowerStrategy(cfg, tmp_path / "run", round_timeout=5, node_wait=1, export=False).run(grid)
    log = read_jsonl(tmp_path / "run" / "flower" / "messages.jsonl")
    due = {x["client"]: x["digest"] for x in log if x["dir"] == "down" and x["round"] == 2}
    assert len(set(due.values())) == 3  # personalized: three different C̄_i
    late = next(x for x in log if x["dir"] == "down" and x["round"] == 3 and x["client"] == 2)
    assert late["deliver"] == "missed" and late["digest"] == due[2]
    reply = next(x for x in log if x["dir"] == "up" and x["round"] == 3 and x["client"] == 2 and x["type"] == "train")
    assert reply["received"] == due[2]


def test_a_rejected_upload_under_celora_is_left_out_of_the_mix(tmp_path, tiny_config):
    from celora.fl.simulation import Simulation

    def oversize(rnd, client, blob):
        return blob + b"\0" * 100_000 if (rnd, client) == (1, 1) else blob

    res = Simulation(tiny_config("method=celora", "train.max_steps=1"), tmp_path, wire_hook=oversize).run()
    r1 = res.rounds[0]
    assert r1["rejected"] == 1 and r1["clients"][1]["rejected"].startswith("payload oversize")
    import numpy as np

    w = np.load(tmp_path / "weights_round_1.npy")
    assert (w[:, 1] == 0).all() and np.allclose(w[[0, 2]].sum(axis=1), 1.0)  # nobody mixes in client 1's C
    assert res.rounds[1]["rejected"] == 0 and np.load(tmp_path / "weights_round_2.npy")[:, 1].any()


def test_int8_payloads_under_flower_match_the_engine(tmp_path, tiny_config):
    """payload.dtype = int8 through Flower's messages: the same bytes and accuracies as the in-process run."""
    from flower_helpers import MemoryGrid, read_jsonl

    from celora.fl.flower.server import CeloraFlowerStrategy

    cfg = tiny_config("method=celora", "payload.dtype=int8", "train.max_steps=1")
    engine = run_experiment(cfg, None)
    summary = CeloraFlowerStrategy(cfg, tmp_path / "run", round_timeout=5, node_wait=1, export=False).run(MemoryGrid(3))
    assert summary["payload"]["dtype"] == "int8"
    assert summary["bytes_per_client_round"] == engine.summary["bytes_per_client_round"]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    for a, b in zip(engine.rounds, rows, strict=True):
        assert [c["acc_agg"] for c in a["clients"]] == pytest.approx([c["acc_agg"] for c in b["clients"]], abs=1e-6)
