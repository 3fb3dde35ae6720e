"""engine.state stores (memory | disk) and the evaluation batch that fits (fast, no model)."""

from __future__ import annotations

import pytest
import torch

from celora.errors import CeloraError
from celora.fl.states import DiskStates, MemoryStates, StatesView, make_store
from celora.models.device import BatchFit


def _initial() -> dict[str, torch.Tensor]:
    return {"layer.lora_C": torch.eye(3), "classifier.weight": torch.zeros(2, 3)}


@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_store_round_trip_and_initial_state(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = make_store(kind, _initial, tmp_path)  # type: ignore[arg-type]
    assert torch.equal(store.get(5)["layer.lora_C"], torch.eye(3))  # never ran: the shared initial state
    s1 = {"layer.lora_C": torch.full((3, 3), 1.5), "classifier.weight": torch.ones(2, 3)}
    s2 = {"layer.lora_C": torch.full((3, 3), 2.5), "classifier.weight": -torch.ones(2, 3)}
    store.put(1, s1)
    store.put(2, s2)
    assert torch.equal(store.get(1)["layer.lora_C"], s1["layer.lora_C"])  # read back (not the cached one)
    assert torch.equal(store.get(2)["classifier.weight"], s2["classifier.weight"])
    view = StatesView(store, [1, 2])
    assert list(view) == [1, 2] and len(view) == 2 and torch.equal(view[1]["layer.lora_C"], s1["layer.lora_C"])
    with pytest.raises(KeyError):
        view[3]
    store.close()


def test_disk_store_keeps_one_state_in_memory_and_cleans_up(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = DiskStates(_initial, tmp_path)
    for i in range(4):
        store.put(i, {k: v + i for k, v in _initial().items()})
    files = sorted(p.name for p in store.folder.iterdir())
    assert files == [f"client_{i}.safetensors" for i in range(4)] and store.folder.parent == tmp_path
    assert store._cached is not None and store._cached[0] == 3  # only the last one is held
    assert float(store.get(0)["layer.lora_C"][0, 1]) == 0.0 and float(store.get(2)["layer.lora_C"][0, 0]) == 3.0
    store.close()
    assert not store.folder.exists()
    with pytest.raises(CeloraError, match="engine.state = 'disk'"):
        store.get(1)
    assert isinstance(make_store("memory", _initial), MemoryStates)
    with pytest.raises(CeloraError, match="engine.state = 'tape'"):
        make_store("tape", _initial)  # type: ignore[arg-type]


def test_batch_fit_halves_on_out_of_memory_and_remembers() -> None:
    seen: list[int] = []

    def run(start: int, stop: int) -> int:
        if stop - start > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(stop - start)
        return stop - start

    fit = BatchFit(64)
    assert sum(fit.map(run, 100)) == 100 and fit.size == 16 and fit.halvings == 2
    assert max(seen) == 16
    assert fit.map(run, 20) == [16, 4]  # the size that fits is kept for the next call
    with pytest.raises(ValueError):
        BatchFit(8).map(lambda a, b: (_ for _ in ()).throw(ValueError("not memory")), 10)
    with pytest.raises(torch.OutOfMemoryError):
        BatchFit(2).map(lambda a, b: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), 4)
