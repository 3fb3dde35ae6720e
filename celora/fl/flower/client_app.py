"""The celora ClientApp: one federated client per SuperNode, running the client runtime
(``celora.fl.client.ClientRuntime``) — never the whole engine; its private factors kept in ``context.state``.

The partition (client id) comes from the node config (``partition-id``; Flower's simulation engine
sets it). The experiment config arrives once from the server in the setup message and is kept in
``context.state``; the client loads its own ``ClientData`` (``_client_data``: today the seeded partition of
the configured dataset) and the frozen model, and runs the same ``ClientRuntime`` as the in-process loop,
so results match.

Messages (all built by ``celora.fl.flower.server``):
- ``query.labels`` (``data.sites`` without declared ``data.labels``): the node reads its own file (node
  config ``site-path``, default ``data.sites[partition-id]``) and answers with its label names only.
- ``query.setup``: config → partition id and the client's ``info`` (counts only: n_train, n_test, label
  histogram, majority baseline, label names), plus the one-time data summary for methods that use it and,
  for a site, the task statistics of its own rows (``stats``, e.g. the VLM's feature moments).
- ``query.task_setup``: the combined task set-up (e.g. the projector's μ, σ), kept in ``context.state``.
- ``train``: optionally the C̄_i (or other shared tensors) the server addressed to this client, then
  local training; the reply carries only what the method shares.
- ``evaluate``: the last round's message, evaluation on the global test set, adapter export (local).
A, B and the head never leave the node: they live in ``context.state`` (kept by the SuperNode) and, when
the node config has ``state-dir``, on the node's disk after every round
(``<state-dir>/<config digest>-client_<i>/state-<t>.safetensors``, the last 3). A setup message with
``resume-round = t`` (a resumed server, or a node rejoining mid-run) makes the node restore the newest
state saved after a round ≤ t, so a restarted SuperNode continues with its own A, B and head.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from celora.errors import CeloraError  # noqa: E402
from celora.eval import global_eval_clients  # noqa: E402
from celora.fl.flower.wire import EXTRA, EXTRA_AGG, arrays_of, blob_record, config_of, digest, number, record_blob  # noqa: E402

app = ClientApp()

_STATE = "celora.state"  # ArrayRecord: the client's full adapter view (A, B, C, head)
_META = "celora.meta"  # ConfigRecord: the experiment config (TOML) received at setup
_TASK_SETUP = "celora.task_setup"  # ArrayRecord: the combined task set-up (data.sites), applied on every load
_OPT = "celora.optimizer"  # ArrayRecord (one blob): the client's AdamW moments, with train.keep_optimizer
_ENVS: dict[str, _Env] = {}  # config digest → what this process loaded for it (a ClientApp serves many messages)
NODE_TRAIN_KEYS = ("device", "precision")  # node config keys: this SuperNode's own train.device / train.precision


def node_overrides(node_config: Any) -> list[str]:
    """``--set``-style overrides from a SuperNode's node config (each node picks its device and precision)."""
    return [f"train.{k}={node_config[k]}" for k in NODE_TRAIN_KEYS if k in node_config]


@dataclass
class _Env:
    """What a ClientApp process loads once per experiment: config, frozen model, data provider, protocol."""

    cfg: Any  # ExperimentConfig
    bench: Any  # celora.fl.backbone.Backbone
    provider: Any  # celora.fl.client.DataProvider
    phases: Any  # celora.fl.backbone.Phases


def _config(toml_text: str, node_config: Any = None) -> Any:
    """The experiment config of a setup message, with this node's overrides (e.g. its device)."""
    import tomllib

    from celora.config import apply_overrides, build_config

    return build_config(apply_overrides(tomllib.loads(toml_text), node_overrides(node_config or {})))


def _site_path(node_config: Any) -> str | None:
    """This node's own data file (node config ``site-path``), if it was given one."""
    value = node_config.get("site-path")
    return str(value) if value else None


def _env(toml_text: str, node_config: Any) -> _Env:
    """Load (once per process and config) the model and this node's data provider: with ``data.sites``
    only this node's own file (its ``site-path``, default ``data.sites[partition-id]``)."""
    overrides = node_overrides(node_config)
    site = _site_path(node_config)
    text = "\n".join([toml_text, *overrides, f"site={site} partition={node_config.get('partition-id')}"])
    key = hashlib.sha256(text.encode()).hexdigest()
    if key not in _ENVS:
        from celora.fl.backbone import Phases
        from celora.fl.prepare import check_names, prepare
        from celora.fl.sites import prepare_site

        cfg = _config(toml_text, node_config)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        _ENVS.clear()
        if cfg.data.sites is not None:
            prepared: Any = prepare_site(check_names(cfg), _partition_of(node_config, cfg.num_clients), site)
        else:
            prepared = prepare(cfg)
        bench = prepared.bench
        _ENVS[key] = _Env(cfg, bench, prepared.provider(), Phases(cfg, bench))
    return _ENVS[key]


def _partition(context: Context, num_clients: int) -> int:
    """Client id = node config ``partition-id`` (checked against ``num-partitions`` and the config)."""
    return _partition_of(context.node_config, num_clients)


def _partition_of(nc: Any, num_clients: int) -> int:
    if "partition-id" not in nc:
        raise CeloraError("node config lacks partition-id (start the SuperNode with --node-config 'partition-id=N')")
    pid = int(nc["partition-id"])
    parts = int(nc.get("num-partitions", num_clients))
    if parts != num_clients:
        raise CeloraError(f"node config num-partitions={parts} but the experiment has num_clients={num_clients}")
    if not 0 <= pid < num_clients:
        raise CeloraError(f"partition-id {pid} out of range for num_clients={num_clients}")
    return pid


def _runtime(context: Context, toml_text: str | None = None) -> Any:
    """This node's ``ClientRuntime`` with the private state kept in ``context.state``."""
    from celora.fl.client import ClientRuntime

    if toml_text is None:
        meta = context.state.get(_META)
        if not isinstance(meta, ConfigRecord) or "toml" not in meta:
            raise CeloraError("this node has not received the experiment config (setup message missing)")
        toml_text = str(meta["toml"])
    env = _env(toml_text, context.node_config)
    i = _partition(context, env.cfg.num_clients)
    if _TASK_SETUP in context.state:  # a site's combined task set-up (the process may be fresh)
        from celora.fl.sites import apply_setup_blob

        rec = context.state[_TASK_SETUP]
        assert isinstance(rec, ArrayRecord)
        apply_setup_blob(env.bench.task, env.bench.loaded, record_blob(rec))
    state = None
    if _STATE in context.state:
        rec = context.state[_STATE]
        assert isinstance(rec, ArrayRecord)
        state = {k: torch.from_numpy(a.numpy().copy()) for k, a in rec.items()}
    rt = ClientRuntime(env.cfg, env.bench, env.provider.client(i), env.phases, state)
    if _OPT in context.state:  # AdamW moments kept across rounds (train.keep_optimizer)
        from celora.fl.run_folder import state_from_blob

        opt = context.state[_OPT]
        assert isinstance(opt, ArrayRecord)
        rt.optimizer_state = state_from_blob(record_blob(opt))[1]
    return rt


def _disk(context: Context, toml_text: str, i: int) -> Path | None:
    """This client's folder on the node's disk (node config ``state-dir``), or None."""
    root = str(context.node_config.get("state-dir", "") or "")
    if not root:
        return None
    return Path(root).expanduser() / f"{hashlib.sha256(toml_text.encode()).hexdigest()[:12]}-client_{i}"


def _toml(context: Context) -> str:
    meta = context.state.get(_META)
    return str(meta["toml"]) if isinstance(meta, ConfigRecord) and "toml" in meta else ""


def _save_state(context: Context, rt: Any, rnd: int | None = None) -> None:
    """Keep the state in ``context.state`` and (after round ``rnd``) on the node's disk."""
    from celora.fl.run_folder import save_client_state, state_blob

    context.state[_STATE] = ArrayRecord.from_torch_state_dict(rt.state)
    if rt.optimizer_state is not None:
        context.state[_OPT] = blob_record(state_blob({}, rt.optimizer_state))
    folder = _disk(context, _toml(context), rt.id)
    if folder is not None and rnd is not None:
        save_client_state(folder, rnd, rt.state, rt.optimizer_state)


def _restore(context: Context, toml_text: str, i: int, upto: int) -> int:
    """Restore the newest on-disk state saved after a round ≤ ``upto``; the round it is from (−1: none)."""
    from celora.fl.run_folder import load_client_state, state_blob

    folder = _disk(context, toml_text, i)
    expect = _env(toml_text, context.node_config).bench.init_state  # a state of other tensors is refused
    found = load_client_state(folder, upto, expect) if folder is not None else None
    for key in (_STATE, _OPT):
        if key in context.state:
            del context.state[key]
    if found is None:
        return -1
    rnd, state, optimizer = found
    context.state[_STATE] = ArrayRecord.from_torch_state_dict(state)
    if optimizer is not None:
        context.state[_OPT] = blob_record(state_blob({}, optimizer))
    return rnd


def _deliver(rt: Any, msg: Message, how: str, reply: ConfigRecord, metrics: MetricRecord) -> None:
    """Apply the server's message (``how`` = 'eval': evaluate after it; 'missed': just apply it)."""
    if how == "none":
        return
    if "down" not in msg.content:
        raise CeloraError(f"server announced a message ({how}) but sent none")
    blob = record_blob(arrays_of(msg.content, "down"))
    reply["received"] = digest(blob)
    layout_round = int(number(msg.content["celora"], "layout"))  # the sender's layout
    score, loss = rt.receive(blob, layout_round, evaluate=how == "eval")
    if how == "eval":
        metrics["score_agg"], metrics["loss_agg"] = float(score), float(loss)
        metrics.update({EXTRA_AGG + k: float(v) for k, v in rt.agg_extras.items()})


def _receive_pending(msg: Message, context: Context) -> tuple[Any, Any, ConfigRecord, MetricRecord]:
    """This node's runtime, the message's config, and the reply/metrics records after applying the pending
    server message (train and evaluate messages both start this way)."""
    rt = _runtime(context)
    conf = config_of(msg.content)
    reply = ConfigRecord({"partition-id": rt.id})
    metrics = MetricRecord()
    _deliver(rt, msg, str(conf["deliver"]), reply, metrics)
    return rt, conf, reply, metrics


@app.query("labels")
def labels(msg: Message, context: Context) -> Message:
    """``data.sites``: read this node's own file and answer with its label names only."""
    from celora.fl.sites import SiteLoader

    cfg = _config(str(config_of(msg.content)["config"]))
    i = _partition(context, cfg.num_clients)
    names = SiteLoader(cfg, i, _site_path(context.node_config)).label_message().decode("utf-8")
    return Message(RecordDict({"celora": ConfigRecord({"partition-id": i, "labels": names})}), reply_to=msg)


@app.query("task_setup")
def task_setup(msg: Message, context: Context) -> Message:
    """``data.sites``: keep the combined task set-up the server sent (applied whenever the model loads)."""
    context.state[_TASK_SETUP] = arrays_of(msg.content, "setup")
    rt = _runtime(context)
    reply = ConfigRecord({"partition-id": rt.id, "received": digest(record_blob(arrays_of(msg.content, "setup")))})
    return Message(RecordDict({"celora": reply}), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """Receive the experiment config; answer with the partition id, counts (and the data summary if asked)."""
    conf = config_of(msg.content)
    toml_text = str(conf["config"])
    context.state[_META] = ConfigRecord({"toml": toml_text})
    i = _partition(context, _env(toml_text, context.node_config).cfg.num_clients)
    resume_round = int(number(conf, "resume-round")) if "resume-round" in conf else 0
    state_round = _restore(context, toml_text, i, resume_round) if resume_round > 0 else -1
    if resume_round == 0:  # a fresh run starts from the shared init
        for key in (_STATE, _OPT):
            if key in context.state:
                del context.state[key]
    rt = _runtime(context, toml_text)
    info = {**rt.info(), "meta": rt.data.meta}
    reply = ConfigRecord({"partition-id": rt.id, "info": json.dumps(info), "state-round": state_round})
    content = RecordDict({"celora": reply})
    if bool(conf["summary"]):
        content["summary"] = blob_record(rt.summary_blob())
    if rt.cfg.data.sites is not None:
        from celora.fl.sites import statistics_blob

        with rt.bench.placement.autocast():
            stats = statistics_blob(rt.bench.task, rt.bench.loaded, rt.data)
        if stats:
            content["stats"] = blob_record(stats)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Apply the pending server message, train locally, upload what the method shares."""
    rt, conf, reply, metrics = _receive_pending(msg, context)
    content = RecordDict({"celora": reply})
    if bool(conf["fit"]):
        up, rec = rt.fit(int(number(conf, "round")))
        metrics.update({"score": rec.score, "loss": rec.loss, "train_loss": rec.train_loss, "n_train": rec.n_train})
        metrics.update({EXTRA + k: float(v) for k, v in rec.metrics.items()})
        if up is not None:
            content["up"] = blob_record(up)
    _save_state(context, rt, int(number(conf, "round")))
    content["metrics"] = metrics
    return Message(content, reply_to=msg)


@app.evaluate()
def final(msg: Message, context: Context) -> Message:
    """Last message: apply it, evaluate on the global test set, export the adapter on this node."""
    from celora.adapters.export import PeftExporter

    rt, conf, reply, metrics = _receive_pending(msg, context)
    _save_state(context, rt, int(number(conf, "layout")) + 1)
    cfg = rt.cfg
    if rt.id in global_eval_clients(cfg.num_clients, cfg.eval.global_clients, cfg.seed):  # eval.global_clients
        metrics["score_global"] = rt.evaluate_global()
    target = str(context.node_config.get("adapters-dir", "") or conf.get("adapters-dir", ""))
    if target:
        loaded = rt.bench.loaded
        exporter = PeftExporter(loaded.model, rt.bench.spec, loaded.head_modules, loaded.source)
        reply["adapter"] = str(exporter.save(rt.state, Path(target) / f"client_{rt.id}"))
    return Message(RecordDict({"celora": reply, "metrics": metrics}), reply_to=msg)
