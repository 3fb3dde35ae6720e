"""Differential privacy: the analytic Gaussian mechanism, DP data summaries, DP on the shared update.

* Mechanism: ``M(x) = f(x) + N(0, sigma^2 I)`` with ``sigma = Delta_2 * sigma_1(epsilon, delta)``, where
  ``sigma_1`` is the smallest std for which the analytic Gaussian mechanism (Balle & Wang 2018, Thm. 8) is
  (epsilon, delta)-DP: ``Phi(1/(2s) - eps*s) - e^eps * Phi(-1/(2s) - eps*s) <= delta``. Valid for every
  epsilon > 0 (the classic ``sqrt(2 ln(1.25/delta))/epsilon`` needs epsilon < 1); computed by
  ``dp_accounting.get_sigma_gaussian``.
* Summaries: :func:`privatize_summary` (clipped GMM sufficient statistics, see its docstring).
* Shared update (client level, applied by the client before encoding its upload):
  ``u = upload - sent``;  ``u <- u * min(1, clip / ||u||_2)``;  ``u <- u + N(0, (z * clip)^2 I)``;
  ``upload = sent + u``. The norm is over every shared tensor jointly. Adjacency is zero-out at the
  client level (the client's update replaced by 0: L2 sensitivity ``clip``), so each upload is a Gaussian
  mechanism with noise multiplier ``z``; one client's uploads over T rounds compose (no amplification by
  sampling is claimed: the server sees who uploads). epsilon at ``update_delta`` comes from an RDP or PLD
  accountant of ``dp_accounting`` on ``SelfComposed(Gaussian(z), T)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from celora.errors import CeloraError

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

__all__ = [
    "ACCOUNTANTS",
    "UpdateDP",
    "analytic_gaussian_sigma",
    "clip_and_noise_update",
    "clip_features",
    "privacy_report",
    "update_generator",
    "privatize_summary",
    "update_dp_from_config",
    "update_epsilon",
    "update_noise_for_epsilon",
]


def analytic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float, *, field: str = "epsilon") -> float:
    """``sigma = Delta_2 * sigma_1(epsilon, delta)``: the analytic Gaussian mechanism (Balle & Wang 2018)."""
    from dp_accounting import get_sigma_gaussian

    if not (math.isfinite(epsilon) and epsilon > 0):
        raise CeloraError(f"{field} must be a finite number > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise CeloraError(f"{field.rsplit('_', 1)[0]}_delta must be in (0, 1), got {delta}")
    if not (math.isfinite(sensitivity) and sensitivity > 0):
        raise CeloraError(f"sensitivity must be > 0, got {sensitivity}")
    return float(sensitivity * get_sigma_gaussian(epsilon, delta))


# ----------------------------------------------------------------------------------------------- summaries


class _Summary(Protocol):
    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray
    n: int


S = TypeVar("S", bound=_Summary)


def clip_features(features: np.ndarray, clip: float) -> np.ndarray:
    """Scale every row to L2 norm at most ``clip``: ``x <- x * min(1, clip / ||x||)``."""
    if not clip > 0:
        raise CeloraError(f"privacy.summary_clip must be > 0, got {clip}")
    x = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    scale = np.minimum(1.0, clip / np.maximum(norms, np.finfo(np.float64).tiny))
    return x * scale


def privatize_summary(
    summary: Mapping[int, S],
    *,
    epsilon: float,
    delta: float,
    clip: float,
    rng: np.random.Generator,
    reg: float = 1e-5,
) -> dict[int, S]:
    """(epsilon, delta)-DP release of per-class GMM summaries via the analytic Gaussian mechanism.

    Precondition: every feature had L2 norm <= ``R = clip`` before fitting (use :func:`clip_features`); means
    outside the ball of radius R are rejected. For each class c and component g (``n_g = w_g n_c``) the
    statistics are ``n_g``, ``S1_g = n_g mu_g`` and ``S2_g = n_g (var_g + mu_g^2)`` (coordinate-wise). One example
    with responsibilities r (``||r||_2 <= 1``) contributes ``r``, ``r ⊗ x`` and ``r ⊗ (x ∘ x)``, so under
    replace-one adjacency the L2 sensitivities of the three releases, over all classes and components jointly, are

        Delta_n = sqrt(2),   Delta_S1 = 2 R,   Delta_S2 = 2 R^2   (||x ∘ x||_2 <= ||x||_2^2 <= R^2).

    The budget is split evenly over the three releases (``epsilon/3, delta/3`` each, basic composition) and
    each gets ``N(0, sigma^2)`` with ``sigma = Delta * sigma_1(epsilon/3, delta/3)`` (analytic Gaussian, valid for
    every epsilon > 0). Post-processing: ``n̂_g = max(noisy n_g, 1)``, ``mu = Ŝ1 / n̂``,
    ``var = max(Ŝ2 / n̂ - mu^2, reg)``, ``w = max(noisy n_g, 0)`` renormalised (uniform if all are 0) and
    ``n_c = max(1, round(sum_g noisy n_g))``. Caveat: the bounds treat the EM responsibilities of the other
    examples as fixed, so they are exact for ``G = 1`` and a calibration heuristic for ``G > 1``.
    """
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise CeloraError(f"privacy.summary_epsilon must be > 0, got {epsilon}")
    if not 0 < delta < 1:
        raise CeloraError(f"privacy.summary_delta must be in (0, 1), got {delta}")
    if not (math.isfinite(clip) and clip > 0):
        raise CeloraError(f"privacy.summary_clip must be > 0, got {clip}")
    eps_r, delta_r = epsilon / 3.0, delta / 3.0
    field = "privacy.summary_epsilon"
    sigma_n = analytic_gaussian_sigma(math.sqrt(2.0), eps_r, delta_r, field=field)
    sigma_s1 = analytic_gaussian_sigma(2.0 * clip, eps_r, delta_r, field=field)
    sigma_s2 = analytic_gaussian_sigma(2.0 * clip**2, eps_r, delta_r, field=field)

    out: dict[int, S] = {}
    for label, cs in summary.items():
        w0, mu0, var0 = np.asarray(cs.weights), np.asarray(cs.means), np.asarray(cs.variances)
        if not (np.isfinite(w0).all() and np.isfinite(mu0).all() and np.isfinite(var0).all()) or w0.sum() <= 0:
            raise CeloraError(f"summary.c{label}: weights must be finite with a positive sum, means/variances finite")
        w = w0 / w0.sum()
        if np.linalg.norm(mu0, axis=1).max() > clip * (1 + 1e-6):
            raise CeloraError(
                f"privacy.summary_clip: class {label} has a mean outside the clip radius {clip}; "
                "clip the features (clip_features) before fitting"
            )
        counts = w * cs.n
        s1 = counts[:, None] * mu0
        s2 = counts[:, None] * (var0 + mu0**2)
        noisy_counts = counts + rng.normal(0.0, sigma_n, size=counts.shape)
        noisy_s1 = s1 + rng.normal(0.0, sigma_s1, size=s1.shape)
        noisy_s2 = s2 + rng.normal(0.0, sigma_s2, size=s2.shape)
        denom = np.maximum(noisy_counts, 1.0)[:, None]
        means = noisy_s1 / denom
        variances = np.maximum(noisy_s2 / denom - means**2, reg)
        pos = np.maximum(noisy_counts, 0.0)
        weights = pos / pos.sum() if pos.sum() > 0 else np.full_like(pos, 1.0 / pos.size)
        n = max(1, int(round(float(noisy_counts.sum()))))
        out[label] = replace(cs, weights=weights, means=means, variances=variances, n=n)  # type: ignore[type-var]
    return out


# ----------------------------------------------------------------------------------------------- shared update


def _gaussian_event(noise: float, count: int) -> Any:
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise), count)


def _accountant(kind: str) -> Any:
    from dp_accounting import pld, rdp

    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant()
    raise CeloraError(f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {kind!r}")


def _check_rounds_delta(rounds: int, delta: float) -> None:
    """One-line errors for an accountant's number of compositions and its δ."""
    if rounds < 1:
        raise CeloraError(f"rounds must be >= 1 for the DP accountant, got {rounds}")
    if not 0 < delta < 1:
        raise CeloraError(f"privacy.update_delta must be in (0, 1), got {delta}")


def update_epsilon(noise: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """epsilon at ``delta`` of ``rounds`` compositions of the Gaussian mechanism with noise multiplier ``noise``."""
    if not (math.isfinite(noise) and noise > 0):
        raise CeloraError(f"privacy.update_noise must be a finite number > 0, got {noise}")
    _check_rounds_delta(rounds, delta)
    acc = _accountant(accountant)
    acc.compose(_gaussian_event(noise, rounds))
    return float(acc.get_epsilon(delta))


def update_noise_for_epsilon(epsilon: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest noise multiplier z with ``update_epsilon(z, rounds, delta) <= epsilon`` (Brent search)."""
    import dp_accounting

    if not (math.isfinite(epsilon) and epsilon > 0):
        raise CeloraError(f"privacy.update_epsilon must be a finite number > 0, got {epsilon}")
    _check_rounds_delta(rounds, delta)
    _accountant(accountant)  # validates the name
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: _accountant(accountant),
        lambda s: _gaussian_event(s, rounds),
        epsilon,
        delta,
        dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-4,
    )
    return float(z)


@dataclass(frozen=True)
class UpdateDP:
    """Resolved client-level DP on the shared update: clip radius, noise multiplier, epsilon over the run."""

    clip: float
    noise: float
    delta: float
    rounds: int
    accountant: str
    epsilon: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "update_clip": self.clip,
            "update_noise": self.noise,
            "update_delta": self.delta,
            "rounds": self.rounds,
            "accountant": self.accountant,
            "epsilon": self.epsilon,
        }


def update_dp_from_config(privacy: Any, rounds: int) -> UpdateDP | None:
    """Resolve ``privacy.update_*`` (clip + noise, or clip + target epsilon) into an :class:`UpdateDP`.

    ``update_noise = 0`` clips only (epsilon = inf, reported as such); no ``update_clip`` → no update DP.
    Cached: every client runtime and the server resolve the same settings once.
    """
    return _resolve(
        getattr(privacy, "update_clip", None),
        getattr(privacy, "update_noise", None),
        getattr(privacy, "update_epsilon", None),
        float(getattr(privacy, "update_delta", 1e-5)),
        str(getattr(privacy, "accountant", "rdp")),
        int(rounds),
    )


@functools.lru_cache(maxsize=64)
def _resolve(
    clip: float | None, noise: float | None, target: float | None, delta: float, kind: str, rounds: int
) -> UpdateDP | None:
    if clip is None:
        if noise is not None or target is not None:
            raise CeloraError("privacy.update_clip is required with privacy.update_noise or privacy.update_epsilon")
        return None
    if not (math.isfinite(clip) and clip > 0):
        raise CeloraError(f"privacy.update_clip must be a finite number > 0, got {clip}")
    if noise is not None and target is not None:
        raise CeloraError("privacy.update_noise and privacy.update_epsilon: give one (the noise or the target epsilon)")
    if noise is None and target is None:
        raise CeloraError("privacy.update_clip needs privacy.update_noise or privacy.update_epsilon")
    if target is not None:
        z = update_noise_for_epsilon(float(target), rounds, delta, kind)
        return UpdateDP(float(clip), z, delta, rounds, kind, update_epsilon(z, rounds, delta, kind))
    assert noise is not None
    if not (math.isfinite(noise) and noise >= 0):
        raise CeloraError(f"privacy.update_noise must be a finite number >= 0, got {noise}")
    eps = math.inf if noise == 0 else update_epsilon(float(noise), rounds, delta, kind)
    return UpdateDP(float(clip), float(noise), delta, rounds, kind, eps)


def privacy_report(privacy: Any, rounds: int) -> dict[str, Any]:
    """summary.json's ``privacy``: the shared update's (epsilon, delta) over the run and the summaries' budget.

    ``update.epsilon`` is None when the update is only clipped (noise 0: no DP guarantee)."""
    out: dict[str, Any] = {}
    dp = update_dp_from_config(privacy, rounds)
    if dp is not None:
        upd = dp.as_dict()
        upd["epsilon"] = dp.epsilon if math.isfinite(dp.epsilon) else None
        upd["adjacency"] = "client-level, zero-out (one client's whole update); no amplification by sampling"
        out["update"] = upd
    if getattr(privacy, "summary_epsilon", None) is not None:
        out["summary"] = {
            "epsilon": privacy.summary_epsilon,
            "delta": privacy.summary_delta,
            "mechanism": "analytic Gaussian",
        }
    return out


def update_generator(seed: int, rnd: int, client: int) -> torch.Generator:
    """The noise stream of one client's upload in one round (reproducible, and the same after a resume)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rnd * 7_919 + client) % (2**63 - 1))


def clip_and_noise_update(
    upload: Mapping[str, torch.Tensor],
    sent: Mapping[str, torch.Tensor] | None,
    *,
    clip: float,
    noise: float,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``sent + clip_C(upload - sent) + N(0, (noise * C)^2 I)`` over all shared tensors jointly.

    ``sent`` = what the client was sent (its starting point this round; ``None`` or a missing name → 0).
    Noise is drawn on CPU from ``generator`` (reproducible) and moved to each tensor's device.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise CeloraError(f"privacy.update_clip must be a finite number > 0, got {clip}")
    if not (math.isfinite(noise) and noise >= 0):
        raise CeloraError(f"privacy.update_noise must be a finite number >= 0, got {noise}")
    names = sorted(upload)
    base = {n: (sent[n] if sent is not None and n in sent else torch.zeros_like(upload[n])) for n in names}
    for n in names:
        if base[n].shape != upload[n].shape:
            raise CeloraError(f"{n}: sent shape {tuple(base[n].shape)} != upload shape {tuple(upload[n].shape)}")
    start = {n: base[n].detach().to(upload[n].device, torch.float64) for n in names}
    delta = {n: upload[n].detach().to(torch.float64) - start[n] for n in names}
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in delta.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    if scale == 1.0 and noise == 0:
        return {n: upload[n] for n in names}  # nothing to do: bit-identical to the non-DP upload
    out: dict[str, torch.Tensor] = {}
    for n in names:
        d = delta[n] * scale
        if noise > 0:
            z = torch.randn(d.shape, generator=generator, dtype=torch.float64)
            d = d + z.to(d.device) * (noise * clip)
        out[n] = (start[n] + d).to(upload[n].dtype)
    return out
