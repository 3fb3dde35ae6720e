"""The celora ClientApp: one federated client per SuperNode, its private factors kept in ``context.state``.

The partition (client id) comes from the node config (``partition-id``; Flower's simulation engine
sets it). The experiment config arrives once from the server in the setup message and is kept in
``context.state``; the client rebuilds the same ``prepare(cfg)`` (deterministic by seed) and uses the
in-process engine's client side (``Simulation.client_fit`` / ``client_receive``), so results match.

Messages (all built by ``celora.fl.flower.server``):
- ``query.setup``: config → partition id, plus the one-time data summary for methods that use it.
- ``train``: optionally the C̄_i (or other shared tensors) the server addressed to this client, then
  local training; the reply carries only what the method shares.
- ``evaluate``: the last round's message, evaluation on the global test set, adapter export (local).
A, B and the head never leave the node: they live in ``context.state`` (kept by the SuperNode).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from celora.errors import CeloraError  # noqa: E402
from celora.fl.flower.wire import arrays_of, blob_record, config_of, digest, number, record_blob  # noqa: E402

app = ClientApp()

_STATE = "celora.state"  # ArrayRecord: the client's full adapter view (A, B, C, head)
_META = "celora.meta"  # ConfigRecord: the experiment config (TOML) received at setup
_SIMS: dict[str, Any] = {}  # config digest → Simulation (a ClientApp process may serve many messages)
NODE_TRAIN_KEYS = ("device", "precision")  # node config keys: this SuperNode's own train.device / train.precision


def node_overrides(node_config: Any) -> list[str]:
    """``--set``-style overrides from a SuperNode's node config (each node picks its device and precision)."""
    return [f"train.{k}={node_config[k]}" for k in NODE_TRAIN_KEYS if k in node_config]


def _simulation(toml_text: str, node_config: Any) -> Any:
    """Build (once per process and config) the engine whose client side this app runs."""
    overrides = node_overrides(node_config)
    key = hashlib.sha256((toml_text + "\n".join(overrides)).encode()).hexdigest()
    if key not in _SIMS:
        import tomllib

        from celora.config import apply_overrides, build_config
        from celora.fl.simulation import Simulation, prepare

        cfg = build_config(apply_overrides(tomllib.loads(toml_text), overrides))
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _SIMS.clear()
        _SIMS[key] = Simulation(cfg, None, prepared=prepare(cfg), export_adapters=False)
    return _SIMS[key]


def _partition(context: Context, num_clients: int) -> int:
    """Client id = node config ``partition-id`` (checked against ``num-partitions`` and the config)."""
    nc = context.node_config
    if "partition-id" not in nc:
        raise CeloraError("node config lacks partition-id (start the SuperNode with --node-config 'partition-id=N')")
    pid = int(nc["partition-id"])
    parts = int(nc.get("num-partitions", num_clients))
    if parts != num_clients:
        raise CeloraError(f"node config num-partitions={parts} but the experiment has num_clients={num_clients}")
    if not 0 <= pid < num_clients:
        raise CeloraError(f"partition-id {pid} out of range for num_clients={num_clients}")
    return pid


def _load_state(context: Context, sim: Any) -> dict[str, torch.Tensor]:
    if _STATE not in context.state:
        return {k: v.clone() for k, v in sim.p.init_state.items()}
    rec = context.state[_STATE]
    assert isinstance(rec, ArrayRecord)
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in rec.items()}


def _save_state(context: Context, state: dict[str, torch.Tensor]) -> None:
    context.state[_STATE] = ArrayRecord.from_torch_state_dict(state)


def _setup_ctx(context: Context) -> tuple[Any, int]:
    meta = context.state.get(_META)
    if not isinstance(meta, ConfigRecord) or "toml" not in meta:
        raise CeloraError("this node has not received the experiment config (setup message missing)")
    sim = _simulation(str(meta["toml"]), context.node_config)
    return sim, _partition(context, sim.cfg.num_clients)


def _deliver(
    sim: Any, i: int, state: dict[str, torch.Tensor], msg: Message, how: str, reply: ConfigRecord, metrics: MetricRecord
) -> dict[str, torch.Tensor]:
    """Apply the server's message (``how`` = 'eval': evaluate after it; 'missed': just apply it)."""
    if how == "none":
        return state
    sim.activate(sim.strategy_for(max(1, int(number(msg.content["celora"], "layout")))))  # the sender's layout
    if "down" not in msg.content:
        raise CeloraError(f"server announced a message ({how}) but sent none")
    blob = record_blob(arrays_of(msg.content, "down"))
    reply["received"] = digest(blob)
    if how == "eval":
        state, acc, loss = sim.client_receive(i, state, blob)
        metrics["acc_agg"], metrics["loss_agg"] = float(acc), float(loss)
        return state
    from celora.fl.payload import decode

    return {**state, **decode(blob, sim.down_layout, sim.dtype)}


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Receive the experiment config; answer with the partition id (and the data summary if asked)."""
    conf = config_of(msg.content)
    toml_text = str(conf["config"])
    context.state[_META] = ConfigRecord({"toml": toml_text})
    sim = _simulation(toml_text, context.node_config)
    i = _partition(context, sim.cfg.num_clients)
    content = RecordDict({"celora": ConfigRecord({"partition-id": i})})
    if bool(conf["summary"]):
        content["summary"] = blob_record(sim.client_summary_blob(i))
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the pending server message, train locally, upload what the method shares."""
    sim, i = _setup_ctx(context)
    conf = config_of(msg.content)
    reply = ConfigRecord({"partition-id": i})
    metrics = MetricRecord()
    state = _deliver(sim, i, _load_state(context, sim), msg, str(conf["deliver"]), reply, metrics)
    content = RecordDict({"celora": reply})
    if bool(conf["fit"]):
        sim.activate(sim.strategy_for(int(number(conf, "round"))))
        state, up, rec = sim.client_fit(int(number(conf, "round")), i, state)
        metrics.update({"acc": rec.acc, "loss": rec.loss, "train_loss": rec.train_loss, "n_train": rec.n_train})
        if up is not None:
            content["up"] = blob_record(up)
    _save_state(context, state)
    content["metrics"] = metrics
    return Message(content, reply_to=msg)


@app.evaluate()
def final(msg: Message, context: Context) -> Message:
    """Last message: apply it, evaluate on the global test set, export the adapter on this node."""
    from celora.adapters.export import PeftExporter
    from celora.adapters.inject import set_tensors
    from celora.fl.client import evaluate

    sim, i = _setup_ctx(context)
    conf = config_of(msg.content)
    reply = ConfigRecord({"partition-id": i})
    metrics = MetricRecord()
    state = _deliver(sim, i, _load_state(context, sim), msg, str(conf["deliver"]), reply, metrics)
    _save_state(context, state)
    p = sim.p
    set_tensors(p.loaded.model, state)
    gidx = p.split.global_test_idx
    with p.placement.autocast():
        metrics["acc_global"] = evaluate(p.loaded.model, p.encoded, gidx, sim.cfg.eval.batch_size, task=p.task)[0]
    target = str(context.node_config.get("adapters-dir", "") or conf.get("adapters-dir", ""))
    if target:
        exporter = PeftExporter(p.loaded.model, p.spec, p.loaded.head_modules, p.loaded.source)
        reply["adapter"] = str(exporter.save(state, Path(target) / f"client_{i}"))
    return Message(RecordDict({"celora": reply, "metrics": metrics}), reply_to=msg)
