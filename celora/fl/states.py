"""Where the in-process engine keeps each client's private adapter state (A, B, C, head): ``engine.state``.

- ``memory``: a dict of CPU tensors per client (N × one adapter view in RAM).
- ``disk``: one safetensors file per client in a temporary folder (inside the run folder when there is one;
  written to a temporary name, then renamed), read back when the client runs next; only the most recently
  used client's state stays in memory, so RAM does not grow with N (1,000 SmolLM2 clients at r = 8 on q, v
  would otherwise hold ~2 GB). A client that has not run yet reads as the shared initial state without a
  file. The folder is removed when the store is closed or garbage-collected (the run's adapters are exported
  separately).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

from celora.errors import CeloraError

Tensors = dict[str, torch.Tensor]
StateKind = Literal["memory", "disk"]


class StateStore(ABC):
    """Client id → adapter view; ``get`` returns the initial state for a client that has none yet."""

    def __init__(self, initial: Callable[[], Tensors]) -> None:
        self.initial = initial

    @abstractmethod
    def get(self, i: int) -> Tensors: ...

    @abstractmethod
    def put(self, i: int, state: Tensors) -> None: ...

    def close(self) -> None:  # noqa: B027  (optional hook: a memory store has nothing to release)
        """Release what the store holds outside this process's memory (nothing by default)."""


class MemoryStates(StateStore):
    """Every client's state in a dict (the default)."""

    def __init__(self, initial: Callable[[], Tensors]) -> None:
        super().__init__(initial)
        self._states: dict[int, Tensors] = {}

    def get(self, i: int) -> Tensors:
        if i not in self._states:
            self._states[i] = self.initial()
        return self._states[i]

    def put(self, i: int, state: Tensors) -> None:
        self._states[i] = state


class DiskStates(StateStore):
    """One ``client_<i>.safetensors`` per client in a fresh folder under ``parent`` (default: the system's
    temporary folder); the most recently used state is cached."""

    def __init__(self, initial: Callable[[], Tensors], parent: str | Path | None = None) -> None:
        super().__init__(initial)
        try:
            if parent is not None:
                Path(parent).mkdir(parents=True, exist_ok=True)
            self.folder = Path(tempfile.mkdtemp(prefix="client-states-", dir=parent))
        except OSError as err:
            where = parent or "the temp dir"
            raise CeloraError(f"engine.state = 'disk': cannot create a folder in {where}: {err}") from None
        self._cached: tuple[int, Tensors] | None = None
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.folder), True)

    def path(self, i: int) -> Path:
        return self.folder / f"client_{i}.safetensors"

    def get(self, i: int) -> Tensors:
        if self._cached is not None and self._cached[0] == i:
            return self._cached[1]
        if not self._cleanup.alive:
            raise CeloraError("engine.state = 'disk': the client states were removed (store closed)")
        file = self.path(i)
        state = load_file(str(file)) if file.is_file() else self.initial()
        self._cached = (i, state)
        return state

    def put(self, i: int, state: Tensors) -> None:
        file = self.path(i)
        tmp = file.with_suffix(".tmp")
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
            os.replace(tmp, file)
        except OSError as err:
            raise CeloraError(f"engine.state = 'disk': cannot write {file}: {err}") from None
        self._cached = (i, state)

    def close(self) -> None:
        """Remove the folder and its state files."""
        self._cached = None
        self._cleanup()


def make_store(kind: StateKind, initial: Callable[[], Tensors], parent: str | Path | None = None) -> StateStore:
    """The store ``engine.state`` asks for (``parent``: where ``disk`` makes its folder; default the temp dir)."""
    if kind == "memory":
        return MemoryStates(initial)
    if kind == "disk":
        return DiskStates(initial, parent)
    raise CeloraError(f"engine.state = '{kind}': expected memory or disk")


class StatesView(Mapping[int, Tensors]):
    """A read-only mapping client id → state over a store (states are read when asked for, not all at once)."""

    def __init__(self, store: StateStore, ids: list[int]) -> None:
        self.store, self.ids = store, ids

    def __getitem__(self, i: int) -> Tensors:
        if i not in self.ids:
            raise KeyError(i)
        return self.store.get(i)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)
