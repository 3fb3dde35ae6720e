"""The LLaVA-style VLM (tiny random DINOv2 → projector → tiny LLaMA) and the image-prompt task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from celora.config import build_config
from celora.data.images import digits
from celora.data.sources import with_image_size
from celora.data.tasks import batch_verbalizers, get_task
from celora.models.dinov2 import PixelProcessor, tiny_dinov2
from celora.models.vlm import VisionLanguageModel, VlmProcessor
from celora.models.zoo import _tiny_llama_config, char_tokenizer


def _tiny_vlm(seed: int = 0) -> tuple[VisionLanguageModel, VlmProcessor]:
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = _tiny_llama_config(len(tok), tok.pad_token_id)
    cfg.eos_token_id = tok.sep_token_id
    return VisionLanguageModel(tiny_dinov2(seed), LlamaForCausalLM(cfg).eval()), VlmProcessor(tok, PixelProcessor())


def test_vlm_prepends_image_tokens():
    vlm, _ = _tiny_vlm()
    ids = torch.randint(4, 30, (2, 5))
    pix = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        logits = vlm(ids, pixel_values=pix)
        other = vlm(ids, pixel_values=pix.flip(0))
        with vlm.seeing(pix):
            hidden = vlm.get_decoder()(input_ids=ids.repeat_interleave(3, 0)).last_hidden_state
    assert logits.shape == (2, 5, vlm.config.vocab_size)
    assert not torch.allclose(logits[0], other[0])  # the answer depends on the image
    torch.testing.assert_close(vlm.get_output_embeddings()(hidden[::3]), logits)  # image r serves rows 3r..3r+2
    assert vlm.features(pix).shape == (2, 32) and vlm.feature_dim == 32
    with pytest.raises(RuntimeError, match="no image bound"):
        vlm.get_decoder()(input_ids=ids)
    assert all(not p.requires_grad for p in vlm.vision.parameters())
    emb_std = float(vlm.lm.get_input_embeddings().weight.std())
    with torch.no_grad():
        out_std = float(vlm.projector(torch.randn(64, 5, 32) * 7).std())
    assert 0.5 * emb_std < out_std < 2 * emb_std  # image tokens start at the scale of token embeddings


def test_image_prompt_task_learns_digits():
    vlm, proc = _tiny_vlm()
    task = get_task("image-prompt")
    ds = with_image_size(digits().subset(np.arange(20)), 28)
    data = task.build(ds, proc, 160)
    batch = data.batch(np.arange(6))
    assert batch["pixel_values"].shape == (6, 3, 28, 28) and "target" in batch
    assert task.features(vlm, batch).shape == (6, 32)
    params = list(vlm.projector.parameters()) + list(vlm.lm.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    with torch.no_grad():
        first = float(task.loss(vlm, batch))
    for _ in range(8):
        loss = task.loss(vlm, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(task.loss(vlm, batch)) < first
    correct, loss_sum = task.score(vlm, batch)  # multi-token label words: one candidate row per class
    halves = [task.score(vlm, data.batch(idx)) for idx in (np.arange(3), np.arange(3, 6))]
    assert correct == sum(h[0] for h in halves)  # scoring does not depend on what else is in the batch
    assert loss_sum == pytest.approx(sum(h[1] for h in halves), rel=1e-4)
    assert vlm.projector.fc1.weight.grad is not None


def _vlm_config(method: str = "celora", **data):
    from celora.config import build_config

    return build_config(
        {
            "method": method,
            "rounds": 2,
            "num_clients": 2,
            "model": {"name": "tiny-vlm", "rank": 2, "max_length": 160},
            "data": {"name": "digits", "max_samples": 40, "image_size": 28, "test_fraction": 0.3, **data},
            "train": {"batch_size": 8, "max_steps": 2, "threads": 1},
            "eval": {"batch_size": 16},
        }
    )


def test_vlm_run_fedavgs_projector_and_splits_bytes():
    from celora.fl.simulation import Simulation

    sim = Simulation(_vlm_config(), export_adapters=False)
    assert sim.p.task.name == "image-prompt" and sim.fedavg_names
    assert all(n.startswith("projector.") for n in sim.fedavg_names)
    assert not any(".attention." in n for n in sim.up_layout.names)  # adapters on the LM only, not the ViT
    assert sim.p.task_setup_bytes == 4 * (2 * 32 + 1)  # (n, mean, mean square) of 32 ViT features, once
    stats = sim.p.loaded.model.projector
    assert float(stats.input_mean.abs().sum()) > 0 and not torch.allclose(stats.input_std, torch.ones(32))
    res = sim.run()
    assert res.summary["bytes_setup_up"] >= 2 * 4 * (2 * 32 + 1)
    proj = sum(sim.p.init_state[n].numel() for n in sim.fedavg_names)
    n_c = sum(1 for n in sim.up_layout.names if n.endswith(".lora_C"))
    pay = res.summary["payload"]
    assert pay["bytes_fedavg_modules"] == 4 * proj and pay["bytes_adapters"] == 4 * n_c * 2 * 2
    assert pay["bytes_message"] == pay["bytes_adapters"] + pay["bytes_fedavg_modules"] + pay["bytes_framing"]
    assert res.summary["bytes_per_client_round"]["up"] == pay["bytes_message"]
    assert pay["shared_factors"] == ["C"]  # the projector is reported as a FedAvg module, not as a head
    s0, s1 = res.states[0], res.states[1]
    for n in sim.fedavg_names:  # one global projector (FedAvg) ...
        torch.testing.assert_close(s0[n], s1[n])
    c = next(n for n in sim.up_layout.names if n.endswith(".lora_C"))
    assert not torch.allclose(s0[c], s1[c])  # ... while each client holds its own personalized C
    last = res.rounds[-1]["clients"]
    assert res.summary["acc_mean"] == pytest.approx(sum(x["acc"] for x in last) / len(last))


def test_vlm_fedit_shares_projector_once_and_local_shares_nothing():
    from celora.fl.simulation import Simulation

    sim = Simulation(_vlm_config("fedit"), export_adapters=False)
    names = sim.up_layout.names
    assert len(names) == len(set(names)) and set(sim.fedavg_names) <= set(names)
    local = Simulation(_vlm_config("local"), export_adapters=False)
    assert local.up_layout.names == [] and local.fedavg_names == []


def test_vlm_exact_match_decodes_with_the_image_bound():
    vlm, proc = _tiny_vlm()
    task = get_task("image-prompt")
    data = task.build(with_image_size(digits().subset(np.arange(6)), 28), proc, 160)
    batch = data.batch(np.arange(6))
    with torch.no_grad():
        answers = task._greedy(vlm, batch, 3)
        with vlm.seeing(batch["pixel_values"], at=int(batch["image_position"])):
            hidden = task.decoder_hidden(vlm, batch["input_ids"], batch["attention_mask"])
        first = vlm.get_output_embeddings()(hidden[torch.arange(6), batch["prompt_len"] - 1]).argmax(-1)
        with pytest.raises(RuntimeError, match="no image bound"):  # decoding needs the images
            task.greedy_answers_by_forward(vlm, batch, 1)
    assert all(len(a) <= 3 for a in answers)
    assert [a[0] if a else int(batch["end_id"]) for a in answers] == first.tolist()  # step 1 = argmax after prompt
    hits = task.extra_metrics(vlm, batch)["exact_match"]
    words = batch_verbalizers(batch)
    longest = task._greedy(vlm, batch, max(len(w) for w in words) + 1)
    assert hits == sum(a == words[y] for a, y in zip(longest, batch["labels"].tolist(), strict=True))


def test_projector_width_cuts_the_federated_bytes():
    from celora.errors import CeloraError
    from celora.fl.simulation import Simulation

    wide = Simulation(_vlm_config(), export_adapters=False)
    cfg = _vlm_config()
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"projector_hidden": 4})})
    narrow = Simulation(cfg, export_adapters=False)
    proj = narrow.p.loaded.model.projector
    v, h = proj.norm.normalized_shape[0], proj.fc2.out_features
    assert proj.fc1.out_features == 4 and proj.fc2.in_features == 4
    n = sum(narrow.p.init_state[name].numel() for name in narrow.fedavg_names)
    assert n == 2 * v + (v * 4 + 4) + (4 * h + h)  # LN, W₁, b₁, W₂, b₂: all FedAvg'd
    assert narrow.payload_split()["bytes_fedavg_modules"] == 4 * n < wide.payload_split()["bytes_fedavg_modules"]
    res = narrow.run()
    assert res.summary["payload"]["bytes_fedavg_modules"] == 4 * n
    assert res.summary["bytes_per_client_round"]["up"] < wide.payload_split()["bytes_fedavg_modules"]
    with pytest.raises(CeloraError, match="model.projector_hidden: only for a vision-language model"):
        Simulation(
            build_config({"model": {"name": "tiny-bert", "projector_hidden": 4}, "data": {"max_samples": 40}}),
            export_adapters=False,
        )


def _pretrained_config(**model):
    cfg = _vlm_config()
    m = {"projector": "pretrained", "projector_steps": 3, **model}
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=m)})


def test_pretrained_projector_is_frozen_and_only_c_travels(tmp_path, monkeypatch):
    from celora.fl.projector_setup import public_dataset
    from celora.fl.simulation import Simulation

    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    sim = Simulation(_pretrained_config(), export_adapters=False)
    model = sim.p.loaded.model
    assert not sim.fedavg_names and sim.p.loaded.fedavg_modules == () and sim.p.loaded.head_modules == ()
    assert sim.up_layout.names and all(n.endswith(".lora_C") for n in sim.up_layout.names)  # C only
    assert all(not p.requires_grad for p in model.projector.parameters())
    assert sim.p.task_setup_bytes == 0  # μ, σ come with the pre-aligned projector, from public images
    before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    res = sim.run()
    pay = res.summary["payload"]
    assert "bytes_fedavg_modules" not in pay and pay["bytes_adapters"] == 4 * len(sim.up_layout.names) * 2 * 2
    assert (
        res.summary["bytes_per_client_round"]["up"]
        == pay["bytes_message"]
        == pay["bytes_adapters"] + pay["bytes_framing"]
    )
    assert res.summary["projector"]["public_set"] == "mnist5k" and "zero_shot" in res.summary
    for k, v in model.projector.state_dict().items():
        torch.testing.assert_close(v, before[k])  # frozen through the run
    public, note = public_dataset(_pretrained_config())  # another source: nothing of the run's rows is excluded
    assert note["public_rows"] == len(public) == 5000


def test_pretrained_projector_cache_hit_reuses_the_file(tmp_path, monkeypatch):
    from celora.fl.prepare import prepare_model

    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    cfg = _pretrained_config(projector_data="digits")  # the run's own corpus: the 1,757 rows it does not load
    first = prepare_model(cfg, 10).loaded.model
    files = list((tmp_path / "projector").glob("*.safetensors"))
    assert len(files) == 1 and first.projector_note["cache"] == "built"
    assert first.projector_note["public_rows"] == 1797 - 40 and first.projector_note["excluded_rows"] == 40
    stamp = files[0].stat().st_mtime_ns
    second = prepare_model(cfg, 10).loaded.model
    assert second.projector_note["cache"] == "hit" and files[0].stat().st_mtime_ns == stamp
    for k, v in first.projector.state_dict().items():
        torch.testing.assert_close(second.projector.state_dict()[k], v)
    prepare_model(_pretrained_config(projector_data="digits", projector_steps=4), 10)  # other hyperparameters
    assert len(list((tmp_path / "projector").glob("*.safetensors"))) == 2


def test_projector_option_errors_name_the_key(tmp_path, monkeypatch):
    from celora.errors import CeloraError
    from celora.fl.prepare import prepare_model

    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    with pytest.raises(CeloraError, match=r"model\.projector"):
        build_config({"model": {"name": "tiny-vlm", "projector": "frozen"}})
    with pytest.raises(CeloraError, match=r"model\.projector_data needs model\.projector = 'pretrained'"):
        build_config({"model": {"name": "tiny-vlm", "projector_data": "mnist5k"}})
    with pytest.raises(CeloraError, match=r"^model\.projector_data: unknown dataset 'nope'"):
        prepare_model(_pretrained_config(projector_data="nope"), 10)
    with pytest.raises(CeloraError, match=r"^model\.projector_data: dataset 'bbcnews' has no images"):
        prepare_model(_pretrained_config(projector_data="bbcnews"), 10)
    whole = _vlm_config(max_samples=None)
    whole = whole.model_copy(update={"model": whole.model.model_copy(update={"projector": "pretrained"})})
    whole = whole.model_copy(update={"model": whole.model.model_copy(update={"projector_data": "digits"})})
    with pytest.raises(CeloraError, match=r"^model\.projector_data: no public rows"):
        prepare_model(whole, 10)
    with pytest.raises(CeloraError, match=r"^model\.projector: only for a vision-language model"):
        prepare_model(build_config({"model": {"name": "tiny-llama", "projector": "pretrained"}}), 2)
