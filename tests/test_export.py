import pytest
import torch
from peft import PeftModel

from celora.adapters.export import PeftExporter
from celora.adapters.inject import AdapterSpec, get_tensors, inject_adapters, set_tensors, view_names
from celora.models.zoo import load_model


@pytest.mark.parametrize("name,targets", [("tiny-bert", ("query", "value")), ("tiny-llama", ("q_proj", "v_proj"))])
def test_peft_export_reproduces_outputs(tmp_path, name, targets):
    lm = load_model(name, 3, seed=0)
    spec = AdapterSpec(rank=4, alpha=8, targets=targets)
    inject_adapters(lm.model, spec)
    names = view_names(lm.model, {"A", "B", "C", "head"}, lm.head_modules)
    g = torch.Generator().manual_seed(1)
    state = {k: v + 0.2 * torch.randn(v.shape, generator=g) for k, v in get_tensors(lm.model, names).items()}
    set_tensors(lm.model, state)
    batch = lm.tokenizer(["hello federated world", "tri-matrix"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = lm.model(**batch).logits
    PeftExporter(lm.model, spec, lm.head_modules).save(state, tmp_path / "client_0")
    assert (tmp_path / "client_0" / "adapter_config.json").is_file()
    assert (tmp_path / "client_0" / "adapter_model.safetensors").is_file()
    fresh = load_model(name, 3, seed=0).model
    with torch.no_grad():  # scramble the fresh head: the export must carry the client's own head
        for p in fresh.get_submodule(lm.head_modules[0]).parameters():
            p.normal_()
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "client_0")).eval()
    with torch.no_grad():
        theirs = peft_model(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-5)
