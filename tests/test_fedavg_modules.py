"""A VLM's projector travels beside the method's factors and is combined by FedAvg."""

from __future__ import annotations

import numpy as np
import torch

from celora.fl.strategies import RoundContext, get_strategy
from celora.fl.strategies.fedavg_modules import aggregate_with_fedavg


def _updates(seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        i: {"l.lora_C": torch.randn(4, 4, generator=g), "projector.fc1.weight": torch.randn(3, 2, generator=g)}
        for i in (0, 2, 3)
    }


def test_projector_is_fedavg_and_c_follows_the_method():
    ups = _updates()
    n_train = np.array([10, 99, 30, 60])
    sent = {i: {k: torch.zeros_like(v) for k, v in u.items()} for i, u in ups.items()}
    ctx = RoundContext(rnd=1, num_clients=4, n_train=n_train, sent=sent)
    strat = get_strategy("celora")
    strat.setup(n_train)
    msgs = aggregate_with_fedavg(strat, ctx, ups, ["projector.fc1.weight"])
    assert sorted(msgs) == [0, 2, 3]
    w = np.array([10, 30, 60], dtype=float) / 100
    mean = sum(float(wi) * ups[i]["projector.fc1.weight"] for wi, i in zip(w, (0, 2, 3), strict=True))
    for i in msgs:
        torch.testing.assert_close(msgs[i]["projector.fc1.weight"], mean)
    alone = get_strategy("celora")
    alone.setup(n_train)
    own = {i: {"l.lora_C": u["l.lora_C"]} for i, u in ups.items()}
    own_sent = {i: {"l.lora_C": s["l.lora_C"]} for i, s in sent.items()}
    ref = alone.aggregate(RoundContext(1, 4, n_train, own_sent), own)
    for i in msgs:
        torch.testing.assert_close(msgs[i]["l.lora_C"], ref[i]["l.lora_C"])


def test_fedavg_method_reaches_every_client_and_no_names_is_plain():
    ups = _updates(1)
    ctx = RoundContext(rnd=1, num_clients=4, n_train=np.array([1, 1, 1, 1]))
    msgs = aggregate_with_fedavg(get_strategy("fedsb"), ctx, ups, ["projector.fc1.weight"])
    assert sorted(msgs) == [0, 1, 2, 3] and set(msgs[1]) == {"l.lora_C", "projector.fc1.weight"}
    plain = aggregate_with_fedavg(get_strategy("fedsb"), ctx, ups, [])
    assert set(plain[1]) == {"l.lora_C", "projector.fc1.weight"}  # nothing split off
