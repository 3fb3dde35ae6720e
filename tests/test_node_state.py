"""A node's on-disk state (celora.fl.run_folder.load_client_state): a truncated file or one of another run's
tensors is refused with one line, and the previous good state (or the shared initial one) is used."""

from __future__ import annotations

import logging

import torch

from celora.fl.run_folder import load_client_state, save_client_state


def test_truncated_and_foreign_states_are_refused(tmp_path, caplog):
    expect = {"l.lora_A": torch.zeros(4, 2), "l.lora_C": torch.eye(2)}
    good = {"l.lora_A": torch.ones(4, 2), "l.lora_C": torch.eye(2) * 2}
    save_client_state(tmp_path, 1, good, keep=10)
    save_client_state(tmp_path, 2, {"l.lora_A": torch.ones(8, 2), "l.lora_C": torch.eye(2)}, keep=10)  # shapes
    save_client_state(tmp_path, 3, {"other.weight": torch.ones(3)}, keep=10)  # another model
    save_client_state(tmp_path, 4, good, keep=10)
    path4 = tmp_path / "state-000004.safetensors"
    path4.write_bytes(path4.read_bytes()[:50])  # cut off mid-write
    with caplog.at_level(logging.WARNING, logger="celora"):
        rnd, state, _ = load_client_state(tmp_path, 10, expect)
    assert rnd == 1 and torch.equal(state["l.lora_A"], good["l.lora_A"])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in m for m in lines)
    assert "unusable" in lines[0] and "shape (8, 2), expected (4, 2)" in lines[2] and "other tensors" in lines[1]
    (tmp_path / "state-000001.safetensors").unlink()
    assert load_client_state(tmp_path, 10, expect) is None  # nothing usable: the node starts from the shared init
