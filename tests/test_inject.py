import pytest
import torch

from celora.adapters.inject import (
    AdapterSpec,
    adapter_layers,
    factor_of,
    get_tensors,
    inject_adapters,
    set_tensors,
    set_trainable,
    view_names,
)
from celora.errors import CeloraError
from celora.models.zoo import load_model


def test_inject_wraps_targets_only(tiny_bert):
    names = inject_adapters(tiny_bert.model, AdapterSpec(rank=2, alpha=2, targets=("query", "value")))
    assert len(names) == 4 and all(n.endswith(("query", "value")) for n in names)
    assert set(adapter_layers(tiny_bert.model)) == set(names)


def test_inject_into_llama_q_v():
    lm = load_model("tiny-llama", 2)
    names = inject_adapters(lm.model, AdapterSpec(rank=2, alpha=2, targets=("q_proj", "v_proj")))
    assert len(names) == 4


def test_unknown_target_names_field(tiny_bert):
    with pytest.raises(CeloraError, match="model.targets"):
        inject_adapters(tiny_bert.model, AdapterSpec(targets=("nope",)))


def test_views_and_freeze_masks(tiny_bert):
    m = tiny_bert.model
    inject_adapters(m, AdapterSpec(rank=2, alpha=2))
    c_names = view_names(m, {"C"}, tiny_bert.head_modules)
    assert len(c_names) == 4 and all(factor_of(n) == "C" for n in c_names)
    head = view_names(m, {"head"}, tiny_bert.head_modules)
    assert head == ["classifier.weight", "classifier.bias"]
    params = set_trainable(m, {"A", "B"}, tiny_bert.head_modules)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == set(view_names(m, {"A", "B"}, tiny_bert.head_modules))
    assert len(params) == 8
    with pytest.raises(ValueError):
        view_names(m, {"Z"}, tiny_bert.head_modules)


def test_get_set_round_trip(tiny_bert):
    m = tiny_bert.model
    inject_adapters(m, AdapterSpec(rank=2, alpha=2))
    names = view_names(m, {"A", "B", "C", "head"}, tiny_bert.head_modules)
    t = get_tensors(m, names)
    new = {k: v + 1 for k, v in t.items()}
    set_tensors(m, new)
    assert all(torch.equal(get_tensors(m, [k])[k], v) for k, v in new.items())
    with pytest.raises(ValueError, match="shape"):
        set_tensors(m, {names[0]: torch.zeros(1)})


def test_two_independent_clients_get_identical_basis():
    a = load_model("tiny-bert", 3, seed=0)
    b = load_model("tiny-bert", 3, seed=0)
    for lm in (a, b):
        inject_adapters(lm.model, AdapterSpec(rank=2, alpha=2, seed=5, basis="svd"))
    na = view_names(a.model, {"A", "B"}, a.head_modules)
    ta, tb = get_tensors(a.model, na), get_tensors(b.model, na)
    assert all(torch.equal(ta[k], tb[k]) for k in na)
