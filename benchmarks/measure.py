"""Wall time and peak memory of a command's whole process tree (psutil), and the machine's load.

Peak memory = the largest sum of RSS over the process and all its descendants, sampled every ``every`` s
(RSS counts pages shared between processes once per process, so a multi-process tree is over-counted
rather than under-counted; a one-process run is exact up to the sampling).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Measured:
    wall_s: float
    peak_rss_mb: float
    returncode: int
    output: str


def tree_rss(proc: psutil.Process) -> int:
    """Σ RSS (bytes) of ``proc`` and every live descendant."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(
    cmd: Sequence[str], env: dict[str, str] | None = None, cwd: str | Path | None = None, every: float = 0.1
) -> Measured:
    """Run ``cmd`` to completion; its wall time, the peak RSS of its process tree and its output."""
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"measure-{os.getpid()}-{time.time_ns()}.log"
    with log.open("w") as fh:
        t0 = time.perf_counter()
        popen = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        proc = psutil.Process(popen.pid)
        peak = 0
        while popen.poll() is None:
            try:
                peak = max(peak, tree_rss(proc))
            except psutil.NoSuchProcess:
                pass
            time.sleep(every)
        wall = time.perf_counter() - t0
    output = log.read_text(errors="replace")
    log.unlink()
    return Measured(wall, peak / 2**20, popen.returncode, output)


def load_note() -> str:
    """The machine's load while measuring (1-minute load average over the cores): timings depend on it."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {psutil.cpu_count()} cores"
