"""Fault soak (issue 24): a real SuperLink + N SuperNodes on loopback (tiny random model) over R rounds while a
seeded schedule SIGKILLs and restarts random SuperNodes and, once, the whole server side (SuperLink, ServerApp,
``flwr run``), which is then restarted and resumed from its newest checkpoint (``resume=true``).

At the end it checks that
- the run completed (``summary.json``, R rows);
- every client's newest state file on its node is whole (loads, this run's tensors) and is the one of the last
  round the server accepted from that client (its final message, or its last reply);
- no checkpoint or state file is half-written (each loads; no ``.*.tmp`` left);
- no process it started is left (by process id, descendants included);
and prints ``kills survived: K, server restarts: S, lost rows: L, processes left: P`` with the final metrics next
to the same run without faults (the in-process engine, which equals an uninterrupted Flower run). Exit 1 when a
check fails, 2 on a usage error.

    python benchmarks/fault_soak.py                       # 4 nodes, 14 rounds, 10 node kills, 1 server kill
    python benchmarks/fault_soak.py --node-kills 3 --rounds 6 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import psutil  # noqa: E402

from celora.config import ExperimentConfig, dump_config, load_config  # noqa: E402
from celora.fl.flower.deploy import LocalDeployment, Proc, descendants, write_app  # noqa: E402
from celora.fl.run_folder import load_client_state, read_checkpoint, read_rows  # noqa: E402

TINY = ("model.name=tiny-bert", "model.rank=4", "model.max_length=48", "data.max_samples=200", "train.threads=1")
TINY += ("train.batch_size=16", "train.lr=3e-2", "train.head_lr=5e-2", "data.partition=dirichlet", "data.alpha=0.3")


def soak_config(nodes: int, rounds: int, seed: int) -> ExperimentConfig:
    """The soak's experiment: celora on the tiny model, every client sampled every round."""
    return load_config(None, [*TINY, f"num_clients={nodes}", f"rounds={rounds}", f"seed={seed}"])


def reference(cfg: ExperimentConfig) -> dict[str, Any]:
    """The same run without faults (in-process engine: equal to an uninterrupted Flower run)."""
    from celora.fl.simulation import Simulation, prepare

    return Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run().summary


class Soak:
    """One deployment under a seeded kill schedule; remembers every process id it ever started."""

    def __init__(self, work: Path, cfg: ExperimentConfig, round_timeout: float, log: Any) -> None:
        self.work, self.cfg, self.out = work, cfg, work / "run"
        self.dep = LocalDeployment(work / "dep", cfg.num_clients)
        self.app = write_app(work / "app", dump_config(cfg))
        self.round_timeout = round_timeout
        self.pids: set[int] = set()
        self.log = log

    def track(self, proc: Proc) -> Proc:
        self.pids.add(proc.popen.pid)
        return proc

    def track_tree(self) -> None:
        for proc in self.dep.procs.values():
            self.pids.update(p.pid for p in descendants(proc.popen.pid))

    def submit(self, resume: bool) -> Proc:
        run_config = {"config": "experiment.toml", "out": str(self.out), "export": False}
        run_config |= {"round-timeout": self.round_timeout, "node-wait": 120.0, "resume": resume}
        self.dep.run_app(self.app, run_config, timeout=0)
        return self.track(self.dep.procs["flwr-run"])

    def start(self) -> Proc:
        self.dep.start_superlink()
        self.track(self.dep.procs["superlink"])
        for i in range(self.cfg.num_clients):
            self.track(self.dep.start_supernode(i))
        return self.submit(resume=False)

    def done_rounds(self) -> int:
        return len(read_rows(self.out / "metrics.jsonl"))

    def ckpt_round(self) -> int:
        markers = (self.out / "checkpoints").glob("ckpt-*.json")  # (names only: cheap to poll)
        return max((int(m.stem.removeprefix("ckpt-")) for m in markers), default=0)

    def kill_node(self, i: int) -> None:
        self.track_tree()
        self.dep.kill(f"supernode-{i}")

    def restart_node(self, i: int) -> None:
        self.track(self.dep.start_supernode(i))

    def kill_server(self) -> None:
        """SIGKILL the server side: ``flwr run``, the SuperLink and everything below it (the ServerApp)."""
        self.track_tree()
        for name in ("flwr-run", "superlink"):
            self.dep.kill(name)

    def restart_server(self) -> Proc:
        """A fresh SuperLink on the same address (its state database kept), SuperNodes that gave up restarted,
        and the run resubmitted with ``resume=true``."""
        self.dep.start_superlink()
        self.track(self.dep.procs["superlink"])
        for i in range(self.cfg.num_clients):
            if not self.dep.procs[f"supernode-{i}"].alive():
                self.restart_node(i)
        return self.submit(resume=True)

    def stop(self) -> int:
        """Stop everything; the number of started processes still alive afterwards."""
        self.track_tree()
        self.dep.stop()
        left = []
        for pid in self.pids:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                continue
        for p in left:
            p.send_signal(signal.SIGKILL)
        return len(left)


def check_files(soak: Soak) -> list[str]:
    """Half-written files, and client states other than the one of the last message the server accepted from the
    client (its newest state file must be of that round and whole; the final message's C̄_i must be the one it
    confirmed). Empty list: all good."""
    from celora.fl.simulation import prepare

    problems = [f"half-written file left: {tmp}" for tmp in soak.work.rglob(".*.tmp")]
    for marker in sorted((soak.out / "checkpoints").glob("ckpt-*.json")):
        try:
            read_checkpoint(marker)
        except (OSError, ValueError, KeyError, TypeError) as err:
            problems.append(f"checkpoint {marker.name} does not load: {err}")
    expect = prepare(soak.cfg).bench.init_state
    log = read_rows(soak.out / "flower" / "messages.jsonl")
    for i in range(soak.cfg.num_clients):
        ups = [x for x in log if x["dir"] == "up" and x["client"] == i and x["type"] in ("train", "evaluate")]
        finals = [x for x in log if x["dir"] == "down" and x["client"] == i and x["type"] == "evaluate"]
        folders = list((soak.dep.folder / "nodes" / f"node_{i}").glob(f"*-client_{i}"))
        if len(folders) != 1 or not ups:
            problems.append(f"client {i}: {len(folders)} state folders, {len(ups)} accepted replies")
            continue
        rounds = sorted(int(p.stem.removeprefix("state-")) for p in folders[0].glob("state-*.safetensors"))
        for rnd in rounds:
            found = load_client_state(folders[0], rnd, expect)
            if found is None or found[0] != rnd:
                problems.append(f"client {i}: state-{rnd:06d} does not load as this run's state")
        if rounds[-1] != ups[-1]["round"]:
            problems.append(f"client {i}: newest state is of round {rounds[-1]}, last accepted {ups[-1]['round']}")
        if ups[-1]["type"] != "evaluate":
            problems.append(f"client {i}: never answered the final message")
        elif finals and finals[-1]["deliver"] != "none" and ups[-1]["received"] != finals[-1]["digest"]:
            problems.append(f"client {i}: confirmed another final message than the server sent")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=14)
    ap.add_argument("--node-kills", type=int, default=10)
    ap.add_argument("--server-kills", type=int, default=1, choices=(0, 1))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--round-timeout", type=float, default=90.0, help="seconds the server waits for a node's reply")
    ap.add_argument("--timeout", type=float, default=1500.0, help="the whole soak stops (and fails) after this")
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    args = ap.parse_args()
    if args.nodes < 2 or args.rounds < 3 or args.node_kills < 0:
        print("fault_soak: --nodes >= 2, --rounds >= 3, --node-kills >= 0", file=sys.stderr)
        return 2
    work = args.out or Path(tempfile.mkdtemp(prefix="celora-soak-"))
    if work.exists() and any(work.iterdir()):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = soak_config(args.nodes, args.rounds, args.seed)
    rng = random.Random(args.seed)
    # a node kill once each of these rounds has closed (a row is written one round later, so the kill lands in a
    # round ≤ R − 1 and the node is back for the final message); the server kill once round R/2 is checkpointed
    kill_at = sorted(rng.choices(range(1, max(2, args.rounds - 2)), k=args.node_kills))
    server_at = args.rounds // 2 if args.server_kills else -1

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    t0 = time.monotonic()
    soak = Soak(work, cfg, args.round_timeout, say)
    kills = restarts = 0
    failures: list[str] = []
    try:
        say(
            f"{args.nodes} SuperNodes, {args.rounds} rounds; node kills after rounds {kill_at}; server kill after "
            f"checkpoint {server_at}"
        )
        run = soak.start()
        down: dict[int, float] = {}  # node → when to restart it
        hold = 0  # after a server restart, node kills wait until the resumed run has closed a round past this
        while True:
            if time.monotonic() - t0 > args.timeout:
                failures.append(f"the soak did not finish within {args.timeout:g}s")
                break
            if run.popen.poll() is not None:
                if (soak.out / "summary.json").is_file():
                    break
                failures.append(f"flwr run exited without a summary: {run.tail(8)[-600:]}")
                break
            done = soak.done_rounds()
            if restarts < args.server_kills and soak.ckpt_round() >= server_at:
                hold = soak.ckpt_round() + 1
                say(f"SIGKILL the server side (checkpoint round {hold - 1})")
                soak.kill_server()
                time.sleep(rng.uniform(1.0, 4.0))
                run = soak.restart_server()
                restarts += 1
                say("server side restarted, run resumed")
                continue
            while kill_at and kill_at[0] <= done and done > hold:
                kill_at.pop(0)
                alive = [i for i in range(args.nodes) if soak.dep.procs[f"supernode-{i}"].alive() and i not in down]
                if len(alive) < 2:  # keep one node training: try again after the next round
                    kill_at = sorted([*kill_at, done + 1])
                    break
                i = rng.choice(alive)
                soak.kill_node(i)
                kills += 1
                down[i] = time.monotonic() + rng.uniform(0.5, 8.0)
                say(f"SIGKILL supernode-{i} after round {done} (kill {kills})")
            for i, when in list(down.items()):
                if time.monotonic() >= when:
                    if not soak.dep.procs[f"supernode-{i}"].alive():  # (a server restart may have started it)
                        soak.restart_node(i)
                    del down[i]
                    say(f"restarted supernode-{i}")
            time.sleep(0.5)
    finally:
        left = soak.stop()
    rows = read_rows(soak.out / "metrics.jsonl")
    if len(rows) != args.rounds:
        failures.append(f"{len(rows)} rows, expected {args.rounds}")
    if not failures:
        failures += check_files(soak)
    if left:
        failures.append(f"{left} started processes were still alive at the end")
    lost_rows = sum(len(r.get("lost", [])) for r in rows)
    print(f"kills survived: {kills}, server restarts: {restarts}, lost rows: {lost_rows}, processes left: {left}")
    if (soak.out / "summary.json").is_file():
        s = json.loads((soak.out / "summary.json").read_text())
        ref = reference(cfg)
        for key in ("acc_mean", "acc_weighted", "acc_worst10", "bytes_up_total", "bytes_down_total"):
            print(f"{key}: with faults {s[key]:.4f} · without faults {ref[key]:.4f}")
    print(f"wall {time.monotonic() - t0:.0f}s · work folder {work}")
    for f in failures:
        print(f"FAILED: {f}")
    if args.out is None and not failures:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
