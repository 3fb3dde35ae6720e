"""Gradient-inversion harness on tiny random models (fast): it beats its random start, the head leaks the label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from celora.adapters.inject import adapter_layers
from celora.config import load_config
from celora.errors import CeloraError
from celora.fl.prepare import prepare
from celora.privacy.attacks.span import candidate_residuals, first_layer_embeddings
from celora.privacy.attacks.text import optimise_text
from celora.privacy.inversion import (
    THREATS,
    AttackSettings,
    _eager_attention,
    attack_batch,
    factor_names,
    get_threat,
    observe,
    span_input,
)
from celora.privacy.metrics import token_f1

TINY = ["model.name=tiny-bert", "model.rank=4", "model.max_length=12", "num_clients=2", "data.max_samples=60"]


@pytest.fixture(scope="module")
def tiny():
    p = prepare(load_config(None, TINY))
    _eager_attention(p.loaded.model)
    return p


def _batch(p, n=1, start=0):
    return p.encoded.batch(p.split.clients[0].train_idx[start : start + n])


def test_head_leaks_label_and_feature_at_batch_1(tiny):
    for start in range(3):
        batch = _batch(tiny, start=start)
        row, _ = attack_batch(
            tiny.loaded.model,
            batch,
            "text",
            AttackSettings(THREATS["head"], iterations=0),
            tiny.loaded.head_modules,
            tiny.init_state,
            tokenizer=tiny.loaded.tokenizer,
        )
        assert row["label_acc"] == 1.0
        assert row["feature_cos"] > 0.999


def test_text_optimisation_beats_its_random_start(tiny):
    """Over 3 sequences the matching loss falls below a fifth of its start and every reconstruction holds more of
    the sequence's tokens than its random start (one token of 12 is 0.083 F1; 100 iterations was too few to be
    robust across CPUs, whose float rounding differs)."""
    m = tiny.loaded.model
    names = factor_names(m, ("full",), tiny.loaded.head_modules)
    saved = {n: q.requires_grad for n, q in m.named_parameters()}
    gains = []
    for start in range(3):
        batch = _batch(tiny, start=start)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        labels = batch["labels"]

        def loss(mm, x=inputs, y=labels):
            return nn.functional.cross_entropy(mm(**x).logits, y)

        obs = observe(m, loss, names, names)
        lengths = [int(batch["attention_mask"].sum())]
        for n, q in m.named_parameters():
            q.requires_grad_(n in names)
        try:
            res = optimise_text(m, names, obs, batch["labels"], lengths, iterations=300, seed=0)
        finally:
            for n, q in m.named_parameters():
                q.requires_grad_(saved[n])
        ref = batch["input_ids"][0, : lengths[0]].tolist()
        assert res.loss < 0.2 * res.start_loss
        gains.append(token_f1(ref, res.ids[0]) - token_f1(ref, res.start_ids[0]))
    assert min(gains) > 0 and float(np.mean(gains)) >= 0.05, gains  # more of the batch's tokens, every time


def test_span_test_is_exact_on_the_full_gradient_and_its_closed_form_matches(tiny):
    m = tiny.loaded.model
    batch = _batch(tiny, start=1)
    row, ex = attack_batch(
        m,
        batch,
        "text",
        AttackSettings(THREATS["full"]),
        tiny.loaded.head_modules,
        tiny.init_state,
        tokenizer=tiny.loaded.tokenizer,
    )
    assert row["method"] == "span" and row["token_f1"] == 1.0 and row["rouge1"] == 1.0
    assert ex["reconstruction"] == ex["reference"]
    emb = first_layer_embeddings(m)
    u, _ = torch.linalg.qr(torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    proj = torch.randn(32, 12, generator=torch.Generator().manual_seed(1))
    res = candidate_residuals(emb, u, proj, 6)  # closed form of ||(I − UUᵀ) Pᵀ LN(E_v + P_p + T_0)|| / ||·||
    vocab = emb.word_embeddings.weight.shape[0]
    with torch.no_grad():
        x = emb(input_ids=torch.arange(vocab)[:, None].expand(-1, 6)).double() @ proj.double()
    brute = ((x - (x @ u) @ u.T).norm(dim=-1) / x.norm(dim=-1)).T
    assert torch.allclose(res.double(), brute, atol=1e-5)


def test_private_basis_attacker_uses_the_seeded_init(tiny):
    m = tiny.loaded.model
    first = next(iter(adapter_layers(m)))
    obs = {f"{first}.lora_C": torch.ones(4, 4)}
    assert span_input(m, THREATS["c-known"], obs) is not None
    assert span_input(m, THREATS["head"], obs) is None
    with pytest.raises(CeloraError, match="--shared 'fedsa'"):
        get_threat("fedsa")


def test_image_span_inversion_beats_its_random_start():
    from celora.adapters.inject import AdapterSpec, get_tensors, inject_adapters, view_names
    from celora.data.images import digits
    from celora.data.sources import with_image_size
    from celora.data.tasks import get_task
    from celora.models.dinov2 import ImageClassifier, PixelProcessor, tiny_dinov2
    from celora.privacy.inversion import run_attack

    # wide enough (251 equations per 196-pixel patch) and 2 layers (in a single layer only the CLS query has a gradient)
    model = ImageClassifier(tiny_dinov2(0, hidden=256, layers=2), 10).eval()
    inject_adapters(model, AdapterSpec(rank=2, alpha=2.0, targets=("q_proj", "v_proj")))
    proc = PixelProcessor(28)
    data = get_task("image").build(with_image_size(digits().subset(np.arange(8)), 28), proc, 0)
    seeded = get_tensors(model, view_names(model, {"A", "B"}, ("classifier",)))
    res = run_attack(
        model,
        data,
        np.arange(8),
        "image",
        AttackSettings(THREATS["full"], samples=2),
        ("classifier",),
        seeded,
        normalise=lambda x: proc(x * 255.0),
    )
    m = res.summary["metrics"]
    assert res.summary["methods"] == ["span"]
    assert m["psnr"]["mean"] > m["start_psnr"]["mean"] + 15 and m["ssim"]["mean"] > 0.9


def test_attack_outputs(tmp_path, tiny):
    from celora.attack import attack_experiment, write_outputs

    result, meta = attack_experiment(
        load_config(None, TINY), "c+head", samples=1, iterations=2, warm_steps=1, prepared=tiny
    )
    files = write_outputs(result, meta, tmp_path)
    assert [f.name for f in files] == ["attack.json", "attack.md", "attack_samples.md"]
    saved = json.loads(files[0].read_text())
    assert saved["summary"]["threat"] == "c+head" and saved["summary"]["metrics"]["label_acc"]["mean"] == 1.0
    assert "| c+head | 4 | 1 | fedsgd |" in files[1].read_text()


def test_attack_spills_over_to_the_next_clients(tiny):
    from celora.attack import attack_experiment, markdown_row

    cfg = load_config(None, TINY)
    per_client = len(tiny.split.clients[0].train_idx) // 10
    result, meta = attack_experiment(
        cfg, "head", batch_size=10, samples=per_client + 1, iterations=0, warm_steps=1, prepared=tiny
    )
    assert meta["clients"] == [0, 1] and result.summary["batches"] == per_client + 1
    assert result.summary["metrics"]["feature_cos"]["n"] == per_client + 1
    assert markdown_row(result.summary, 4)[4] == f"{10 * (per_client + 1)} ({per_client + 1} batches)"
    warmed: dict = {}  # warmed states kept across calls give the same attack as warming up again
    for _ in range(2):
        again, _meta = attack_experiment(
            cfg, "head", batch_size=10, samples=per_client + 1, iterations=0, warm_steps=1, prepared=tiny, warmed=warmed
        )
        assert again.rows == result.rows
    assert sorted(warmed) == [(0, 1), (1, 1)]
