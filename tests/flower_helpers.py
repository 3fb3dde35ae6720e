"""Helpers for the Flower tests: an in-memory Grid that runs the real ClientApp, and message-log checks."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

from celora.errors import CeloraError

FLOWER = ("train.lr=3e-2", "train.head_lr=5e-2", "data.partition=dirichlet", "data.alpha=0.3")  # on conftest's TINY


class MemoryGrid(Grid):
    """Delivers each message to the ClientApp of its node in this process (one Context per node).

    ``dead`` maps a node id to the first group id (round) from which that node no longer answers;
    ``joins`` maps a node id to (partition id, the first group id from which it is connected);
    ``crash_at``: the server process "dies" (RuntimeError) when it sends that group's messages;
    ``node_config``: extra keys of every node's config (e.g. ``state-dir``); ``node_configs``: of the node
    serving partition i (e.g. its ``site-path``);
    ``tamper(msg, reply)`` may rewrite a reply before the server sees it.
    """

    def __init__(
        self,
        num_nodes: int,
        dead: dict[int, int] | None = None,
        *,
        joins: dict[int, tuple[int, int]] | None = None,
        crash_at: int | None = None,
        node_config: dict[str, Any] | None = None,
        node_configs: list[dict[str, Any]] | None = None,
        tamper: Callable[[Message, Message], Message] | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        from celora.fl.flower.client_app import app

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0  # what a ServerApp process has
        self.app = app
        self.joins = dict(joins or {})
        parts = {1000 + i: i for i in range(num_nodes) if 1000 + i not in self.joins}
        parts.update({node: part for node, (part, _) in self.joins.items()})
        self.nodes = [node for node in parts if node not in self.joins]
        total = num_nodes
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={
                    "partition-id": part,
                    "num-partitions": total,
                    **(node_config or {}),
                    **(node_configs[part] if node_configs else {}),
                },
                state=RecordDict(),
                run_config={},
            )
            for node, part in parts.items()
        }
        self.dead = dead or {}
        self.crash_at = crash_at
        self.tamper = tamper
        self.group = 0
        self.sent: list[Message] = []

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used
        pass

    @property
    def run(self) -> Any:  # pragma: no cover - not used
        raise AttributeError("no run")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        late = [node for node, (_, start) in self.joins.items() if self.group + 1 >= start]
        return list(self.nodes) + late

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            group = int(msg.metadata.group_id)
            if self.crash_at is not None and group >= self.crash_at:
                raise RuntimeError(f"server crashed in round {group}")
            self.group = max(self.group, group)
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.dead and self.group >= self.dead[node]:  # dead from then on (setup queries too)
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except CeloraError as err:  # as Flower does: the ClientApp's exception becomes an error reply
                reply = Message(error=Error(code=0, reason=f"{type(err)}:<'{err}'>"), reply_to=msg)
            replies.append(self.tamper(msg, reply) if self.tamper else reply)
        return replies


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def check_message_log(lines: list[dict[str, Any]], num_clients: int, rounds: int) -> None:
    """Every client got its own C̄_i (and head, celora's default) each round, confirmed it, and no message
    ever carried A or B."""
    for line in lines:
        for entries in line["tensors"].values():
            for e in entries:
                assert not e.startswith(("A:", "B:")), f"private factor on the wire: {line}"
                assert e.startswith(("C:", "head:", "summary.")), e
    downs = [x for x in lines if x["dir"] == "down" and x.get("deliver") == "eval"]
    ups = {(x["round"], x["client"]): x for x in lines if x["dir"] == "up"}
    for rnd in range(1, rounds + 1):
        got = [x for x in downs if x["of_round"] == rnd]
        assert sorted(x["client"] for x in got) == list(range(num_clients)), f"round {rnd}: {got}"
        assert len({x["digest"] for x in got}) == num_clients, "clients received identical C̄_i"
        for x in got:
            assert x["tensors"]["down"] and all(e.startswith(("C:", "head:")) for e in x["tensors"]["down"])
            assert ups[(x["round"], x["client"])]["received"] == x["digest"], "client got another message"


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it, also what re-parented away in its children's sessions."""
    import os
    import signal

    import psutil

    from celora.fl.flower.deploy import descendants

    procs = descendants(pid)
    with contextlib.suppress(psutil.NoSuchProcess):  # it may have ended already
        procs.append(psutil.Process(pid))
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for p in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
