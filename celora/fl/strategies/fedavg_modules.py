"""Modules every method federates by FedAvg, beside its own factors (e.g. a VLM's projector).

The method combines its own tensors as usual; each tensor named in ``fedavg_names`` gets the
sample-weighted mean x̄ = Σ_j n_j x_j / Σ_j n_j over the participants j, added to the message of
every client the method addresses (every participant at least).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from celora.fl.strategies.base import RoundContext, Strategy
from celora.tensors import Tensors, weighted_mean


def aggregate_with_fedavg(
    strategy: Strategy, ctx: RoundContext, updates: Mapping[int, Tensors], fedavg_names: Sequence[str]
) -> dict[int, Tensors]:
    """``strategy.aggregate`` on the method's own tensors, FedAvg on ``fedavg_names``; merged messages."""
    if not fedavg_names or not updates:
        return strategy.aggregate(ctx, updates)
    side = set(fedavg_names)
    own = {i: {k: v for k, v in u.items() if k not in side} for i, u in updates.items()}
    own_sent = {i: {k: v for k, v in s.items() if k not in side} for i, s in ctx.sent.items()}
    own_ctx = RoundContext(ctx.rnd, ctx.num_clients, ctx.n_train, own_sent)
    messages = strategy.aggregate(own_ctx, own) if any(own.values()) else {}
    sizes = {i: float(ctx.n_train[i]) for i in updates}
    mean = weighted_mean({i: {k: u[k] for k in fedavg_names} for i, u in updates.items()}, sizes)
    return {i: {**messages.get(i, {}), **mean} for i in sorted(set(messages) | set(updates))}
