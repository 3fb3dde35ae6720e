"""Generative rows from your own files: prompt/response columns, Alpaca rows and chat ``messages``.

Every format becomes the same :class:`~celora.data.sources.Dataset` of examples, one per response to learn:
``texts[i]`` the user turn, ``responses[i]`` the answer, ``systems[i]`` an optional system instruction and
``histories[i]`` the earlier turns of a conversation (role, content), rendered into the prompt as context.

- ``columns``: ``data.prompt_column`` → ``data.response_column`` (+ ``data.system_column``), CSV/JSONL/Parquet.
- ``alpaca``: ``instruction`` (+ optional ``input``, appended after a blank line) → ``output``.
- ``chat``: ``messages`` = [{role, content}, …] with roles system / user / assistant; every assistant turn is
  one example whose prompt is the conversation before it (so training covers every assistant turn).
- ``auto`` (default): ``chat`` when the file has a ``messages`` column, else ``alpaca`` when it has
  ``instruction`` and ``output``, else ``columns``.

Bad rows stop the run with one line naming the file, the row (1-based record) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from celora.config import DataConfig
from celora.data.sources import Dataset, clean_text, read_data_file
from celora.data.tasks import DEFAULT_INSTRUCTION
from celora.errors import CeloraError

FORMATS = ("auto", "columns", "alpaca", "chat")
ONE_CLASS = "all"  # generative rows carry no label: one class (for splits and data summaries)
ROLES = ("system", "user", "assistant")


def detect_format(columns: Sequence[str], prompt_column: str, response_column: str) -> str:
    """``auto`` resolved from a file's column names (see the module docstring)."""
    if "messages" in columns:
        return "chat"
    if "instruction" in columns and "output" in columns and prompt_column not in columns:
        return "alpaca"
    return "columns"


def _need(path: Path, columns: dict[str, list[Any]], name: str, field: str) -> list[Any]:
    if name not in columns:
        shown = ", ".join(list(columns)[:20]) or "none"
        raise CeloraError(f"data file '{path}': {field} '{name}' not found (available: {shown})")
    return columns[name]


def _text(path: Path, row: int, value: Any, field: str, *, required: bool = True) -> str:
    text = clean_text(value)
    if text is None and required:
        raise CeloraError(f"data file '{path}' row {row}: empty {field}")
    return text or ""


def _chat_examples(path: Path, row: int, raw: Any) -> list[tuple[str, str, list[list[str]], str]]:
    """(system, user turn, history, assistant turn) for every assistant turn of one ``messages`` row."""
    where = f"data file '{path}' row {row}: field 'messages'"
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raise CeloraError(f"{where} is not a JSON list of {{role, content}}") from None
    if isinstance(raw, np.ndarray):
        raw = raw.tolist()
    if not isinstance(raw, list) or not raw:
        raise CeloraError(f"{where} must be a non-empty list of {{role, content}}")
    system, turns = "", list[tuple[str, str]]()
    for k, msg in enumerate(raw):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise CeloraError(f"{where}[{k}] must be an object with 'role' and 'content'")
        role, content = str(msg["role"]).strip().lower(), clean_text(msg["content"])
        if role not in ROLES:
            raise CeloraError(f"{where}[{k}]: unknown role '{msg['role']}' (known: {', '.join(ROLES)})")
        if content is None:
            raise CeloraError(f"{where}[{k}]: empty content")
        if role == "system":
            if turns:
                raise CeloraError(f"{where}[{k}]: a system message must come first")
            system = content
        else:
            turns.append((role, content))
    out = []
    for k, (role, content) in enumerate(turns):
        if role != "assistant":
            continue
        if k == 0 or turns[k - 1][0] != "user":
            raise CeloraError(f"{where}: assistant turn {k} does not answer a user turn")
        out.append((system, turns[k - 1][1], [list(t) for t in turns[: k - 1]], content))
    if not out:
        raise CeloraError(f"{where} has no assistant turn")
    return out


def load_generative_file(
    path: str | Path,
    *,
    fmt: str = "auto",
    prompt_column: str = "prompt",
    response_column: str = "response",
    system_column: str | None = None,
    extra_columns: Sequence[str] = (),
) -> Dataset:
    """A file of prompt → response examples in ``fmt`` (one class ``all``; ``extra_columns`` kept per example,
    e.g. a natural-partition key). CeloraError naming the file, row and field on bad input."""
    path = Path(path)
    if fmt not in FORMATS:
        raise CeloraError(f"data.format '{fmt}' is unknown (known: {', '.join(FORMATS)})")
    columns, n_rows = read_data_file(path)
    if n_rows == 0:
        raise CeloraError(f"data file '{path}' has no rows")
    if fmt == "auto":
        fmt = detect_format(list(columns), prompt_column, response_column)
    extras = {c: _need(path, columns, c, "data.column") for c in extra_columns}
    systems: list[str] = []
    users: list[str] = []
    histories: list[list[list[str]]] = []
    responses: list[str] = []
    owner: list[int] = []
    if fmt == "chat":
        messages = _need(path, columns, "messages", "field")
        for r in range(n_rows):
            for system, user, history, answer in _chat_examples(path, r + 1, messages[r]):
                systems.append(system)
                users.append(user)
                histories.append(history)
                responses.append(answer)
                owner.append(r)
    else:
        if fmt == "alpaca":
            p_col, r_col, s_col = "instruction", "output", system_column
            inputs = columns.get("input")
        else:
            p_col, r_col, s_col, inputs = prompt_column, response_column, system_column, None
        prompts = _need(path, columns, p_col, "field" if fmt == "alpaca" else "data.prompt_column")
        answers = _need(path, columns, r_col, "field" if fmt == "alpaca" else "data.response_column")
        sys_col = _need(path, columns, s_col, "data.system_column") if s_col else None
        for r in range(n_rows):
            user = _text(path, r + 1, prompts[r], f"prompt ('{p_col}')")
            if inputs is not None and (extra := _text(path, r + 1, inputs[r], "input", required=False)):
                user = f"{user}\n\n{extra}"
            responses.append(_text(path, r + 1, answers[r], f"response ('{r_col}')"))
            systems.append(_text(path, r + 1, sys_col[r], "system", required=False) if sys_col else "")
            users.append(user)
            histories.append([])
            owner.append(r)
    keep = np.asarray(owner, dtype=np.int64)
    return Dataset(
        name=path.stem,
        texts=users,
        labels=np.zeros(len(users), dtype=np.int64),
        label_names=[ONE_CLASS],
        columns={c: np.asarray([v[r] for r in keep], dtype=object) for c, v in extras.items()},
        responses=responses,
        systems=systems,
        histories=histories,
        origin=str(path),
    )


def generative_reader(data: DataConfig) -> Callable[[str, tuple[str, ...]], Dataset]:
    """``load_dataset``'s reader for a generative task's own files, with the ``data.format`` / ``*_column`` keys."""

    def read(path: str, extra: tuple[str, ...]) -> Dataset:
        return load_generative_file(
            path,
            fmt=data.format,
            prompt_column=data.prompt_column,
            response_column=data.response_column,
            system_column=data.system_column,
            extra_columns=extra,
        )

    return read


def as_generative(ds: Dataset) -> Dataset:
    """A labelled (classification) dataset as instruction → label word: the system turn is its instruction
    (``{labels}`` = the label words), the user turn its text (empty for an image set: the image is the user
    turn), the response the label word of its class."""
    if ds.responses is not None:
        return ds
    words = ds.verbalizers or [str(v) for v in ds.label_names]
    if len(words) != ds.num_classes:
        raise CeloraError(f"data.verbalizers: {len(words)} label words for {ds.num_classes} classes")
    instruction = (ds.instruction or DEFAULT_INSTRUCTION).format(labels=", ".join(words))
    n = len(ds)
    return Dataset(
        name=ds.name,
        texts=list(ds.texts) if ds.images is None else [""] * n,
        labels=ds.labels,
        label_names=list(ds.label_names),
        columns=dict(ds.columns),
        skipped_rows=ds.skipped_rows,
        images=ds.images,
        responses=[words[int(y)] for y in ds.labels],
        systems=[instruction] * n,
        histories=[[] for _ in range(n)],
        origin=ds.origin,
    )
