"""celora payloads inside Flower messages: one safetensors blob per ArrayRecord, counted by Flower.

The blob is stored verbatim as the data of a single ``Array`` (``stype = "celora.safetensors"``), so
``ArrayRecord.count_bytes()`` is exactly ``len(blob) + len(key)``: the bytes celora counts plus the
record key. The blob's tensor names are the layout's stacking groups (``C:4x4``, ``A:4x32`` …), which
the message log records so that a test can prove that A and B never travel.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord

from celora.fl.payload import PayloadError

STYPE = "celora.safetensors"
KEY = "blob"


def blob_record(blob: bytes) -> ArrayRecord:
    """Wrap a celora blob as a one-entry ArrayRecord (no copy into numpy, no re-encoding)."""
    rec = ArrayRecord()
    rec[KEY] = Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)
    return rec


def record_blob(rec: ArrayRecord) -> bytes:
    """The blob inside an ArrayRecord built by ``blob_record`` (PayloadError if it is anything else)."""
    if set(rec) != {KEY}:
        raise PayloadError(f"Flower record has entries {sorted(rec)}, expected ['{KEY}']")
    arr = rec[KEY]
    if arr.stype != STYPE:
        raise PayloadError(f"Flower array stype {arr.stype!r}, expected {STYPE!r}")
    return bytes(arr.data)


def digest(blob: bytes) -> str:
    """Short content hash of a blob (what the client says it received)."""
    return hashlib.sha256(blob).hexdigest()[:16]


def blob_keys(blob: bytes) -> list[str]:
    """Tensor entries of a safetensors blob, read from its header only (e.g. ``['C:4x4']``)."""
    try:
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
    except (struct.error, ValueError):
        return ["<unparseable>"]
    return sorted(k for k in header if k != "__metadata__")


def message_bytes(msg: Message) -> dict[str, int]:
    """Bytes of a message's content as Flower counts them: array records, and config + metric records."""
    arrays = control = 0
    if not msg.has_content():
        return {"arrays": 0, "control": 0}
    for rec in msg.content.values():
        if isinstance(rec, ArrayRecord):
            arrays += rec.count_bytes()
        elif isinstance(rec, ConfigRecord | MetricRecord):
            control += rec.count_bytes()
    return {"arrays": arrays, "control": control}


def describe(msg: Message) -> dict[str, Any]:
    """What a message carries, for the message log: record names, and the tensor entries of every blob."""
    out: dict[str, Any] = {"records": {}, "tensors": {}}
    if not msg.has_content():
        return out
    for name, rec in msg.content.items():
        out["records"][name] = type(rec).__name__
        if isinstance(rec, ArrayRecord):
            entries: list[str] = []
            for key, arr in rec.items():
                entries += blob_keys(bytes(arr.data)) if arr.stype == STYPE else [f"{key}:{arr.stype}"]
            out["tensors"][name] = entries
    return out


def config_of(content: Any, name: str = "celora") -> ConfigRecord:
    """The ConfigRecord ``name`` of a message's content (PayloadError if absent or of another kind)."""
    rec = content.get(name)
    if not isinstance(rec, ConfigRecord):
        raise PayloadError(f"Flower message lacks the config record {name!r}")
    return rec


def metrics_of(content: Any, name: str = "metrics") -> MetricRecord:
    """The MetricRecord ``name`` of a message's content (PayloadError if absent or of another kind)."""
    rec = content.get(name)
    if not isinstance(rec, MetricRecord):
        raise PayloadError(f"Flower message lacks the metric record {name!r}")
    return rec


def arrays_of(content: Any, name: str) -> ArrayRecord:
    """The ArrayRecord ``name`` of a message's content (PayloadError if absent or of another kind)."""
    rec = content.get(name)
    if not isinstance(rec, ArrayRecord):
        raise PayloadError(f"Flower message lacks the array record {name!r}")
    return rec


EXTRA = "x."  # MetricRecord prefix of a task's extra metrics after local training (exact_match, nll, …)
EXTRA_AGG = "xa."  # … and after the server's message (one reply can carry both, of different rounds)


def task_extras(rec: Any, prefix: str = EXTRA) -> dict[str, float]:
    """The task's extra metrics a client reported under ``prefix``, as floats."""
    return {k.removeprefix(prefix): number(rec, k) for k in rec if k.startswith(prefix)}


def number(rec: Any, key: str) -> float:
    """A scalar of a Config/MetricRecord as float (PayloadError if missing or not a number)."""
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise PayloadError(f"Flower record entry {key!r} is {type(v).__name__}, expected a number")
    return float(v)
