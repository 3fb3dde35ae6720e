"""DP mechanisms: analytic Gaussian (every ε), the update's clip + noise, the accountant, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from celora.config import build_config
from celora.errors import CeloraError
from celora.privacy.dp import (
    analytic_gaussian_sigma,
    clip_and_noise_update,
    update_dp_from_config,
    update_epsilon,
    update_noise_for_epsilon,
)


def _delta_of(sigma: float, eps: float, sens: float = 1.0) -> float:
    """Balle & Wang 2018, Thm. 8: the exact δ of the Gaussian mechanism at ε."""
    a, b = sens / (2 * sigma), eps * sigma / sens
    return float(norm.cdf(a - b) - math.exp(eps) * norm.cdf(-a - b))


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0, 10.0, 30.0])
def test_analytic_gaussian_is_tight_for_every_epsilon(eps):
    delta, sens = 1e-5, 2.0
    sigma = analytic_gaussian_sigma(sens, eps, delta)
    assert _delta_of(sigma, eps, sens) <= delta * (1 + 1e-6)
    assert _delta_of(sigma * 0.97, eps, sens) > delta  # the smallest such sigma (tight)
    classic = sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    if eps < 1:
        assert sigma < classic  # never worse where the classic formula is valid
    if eps >= 10:
        assert sigma > classic  # the classic formula under-noises here: it is invalid for large ε


def test_update_epsilon_accountant_and_inverse():
    e1 = update_epsilon(1.0, 10, 1e-5)
    assert update_epsilon(2.0, 10, 1e-5) < e1 < update_epsilon(1.0, 20, 1e-5)
    assert update_epsilon(1.0, 10, 1e-5, "pld") <= e1 * 1.01  # PLD is at least as tight as RDP
    z = update_noise_for_epsilon(3.0, 5, 1e-5)
    assert update_epsilon(z, 5, 1e-5) == pytest.approx(3.0, rel=1e-2)


def test_clip_and_noise_update():
    sent = {"a": torch.ones(3, 3), "b": torch.zeros(4)}
    up = {"a": torch.ones(3, 3) + 3.0, "b": torch.full((4,), 4.0)}
    out = clip_and_noise_update(up, sent, clip=1e6, noise=0.0)
    assert all(torch.equal(out[k], up[k]) for k in up)  # noise 0 and a loose clip: identical to no DP
    out = clip_and_noise_update(up, sent, clip=1.0, noise=0.0)
    d = torch.cat([(out[k] - sent[k]).flatten() for k in up])
    assert float(d.norm()) == pytest.approx(1.0, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    noisy = clip_and_noise_update(up, sent, clip=1.0, noise=2.0, generator=g)
    resid = torch.cat([(noisy[k] - out[k]).flatten() for k in up])
    assert 0.5 < float(resid.std()) / 2.0 < 1.5
    with pytest.raises(CeloraError, match="privacy.update_clip"):
        clip_and_noise_update(up, sent, clip=0.0, noise=1.0)
    with pytest.raises(CeloraError, match="privacy.update_noise"):
        clip_and_noise_update(up, sent, clip=1.0, noise=float("nan"))


def test_update_dp_from_config_and_bad_values():
    cfg = build_config({"rounds": 4, "privacy": {"update_clip": 0.5, "update_epsilon": 2.0}})
    dp = update_dp_from_config(cfg.privacy, cfg.rounds)
    assert dp is not None and dp.epsilon == pytest.approx(2.0, rel=1e-2) and dp.noise > 0
    clip_only = update_dp_from_config(build_config({"privacy": {"update_clip": 1.0, "update_noise": 0}}).privacy, 3)
    assert clip_only is not None and clip_only.epsilon == math.inf
    assert update_dp_from_config(build_config({}).privacy, 3) is None
    for bad, field in [
        ({"update_noise": 1.0}, "update_clip is required"),
        ({"update_clip": 1.0}, "exactly one of update_noise or update_epsilon"),
        ({"update_clip": -1.0, "update_noise": 1.0}, "privacy.update_clip"),
        ({"update_clip": 1.0, "update_noise": -1.0}, "privacy.update_noise"),
        ({"update_clip": 1.0, "update_epsilon": 0.0}, "privacy.update_epsilon"),
        ({"update_clip": 1.0, "update_noise": 1.0, "update_delta": 1.5}, "privacy.update_delta"),
        ({"update_clip": 1.0, "update_noise": 1.0, "accountant": "moments"}, "privacy.accountant"),
        ({"summary_epsilon": -2.0}, "privacy.summary_epsilon"),
    ]:
        with pytest.raises(CeloraError, match=field) as err:
            build_config({"privacy": bad})
        assert "\n" not in str(err.value)
    assert np.isfinite(analytic_gaussian_sigma(1.0, 100.0, 1e-9))


TINY_RUN = [
    "model.name=tiny-bert",
    "model.rank=4",
    "model.max_length=32",
    "num_clients=2",
    "rounds=2",
    "data.max_samples=60",
    "train.max_steps=2",
    "train.batch_size=16",
    "train.lr=5e-3",
    "method=celora-global",
]


def test_update_dp_in_a_run_noise_zero_equals_no_dp_and_epsilon_in_summary(tmp_path):
    import json

    from celora.compare import _cell_row, table_cells
    from celora.config import load_config
    from celora.fl.simulation import run_experiment

    plain = run_experiment(load_config(None, TINY_RUN), tmp_path / "plain")
    zero = run_experiment(load_config(None, TINY_RUN + ["privacy.update_clip=1e9", "privacy.update_noise=0"]), None)
    for key in ("acc_mean", "acc_mean_agg", "acc_global"):
        assert zero.summary[key] == plain.summary[key]
    assert "privacy" not in plain.summary and zero.summary["privacy"]["update"]["epsilon"] is None
    out = tmp_path / "dp"
    noisy = run_experiment(load_config(None, TINY_RUN + ["privacy.update_clip=0.1", "privacy.update_epsilon=3"]), out)
    saved = json.loads((out / "summary.json").read_text())
    assert saved["privacy"]["update"]["epsilon"] == pytest.approx(3.0, rel=1e-2)
    assert saved["privacy"]["update"]["update_noise"] > 0
    for i, state in plain.states.items():  # what the server mixed differs: the uploads were clipped and noised
        c_names = [k for k in state if k.endswith(".lora_C")]
        assert c_names and any(not torch.equal(state[k], noisy.states[i][k]) for k in c_names)
        assert all(torch.equal(state[k], zero.states[i][k]) for k in state)
    row = _cell_row(saved, 0)
    agg = {k: row[k] for k in row} | {f"{k}_std": 0.0 for k in row} | {"seeds": 1, "delta_local": float("nan")}
    assert table_cells(agg)[-1] == "3.00"  # the ε column of `celora compare`
