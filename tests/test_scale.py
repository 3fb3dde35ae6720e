"""Cost that scales with the work: eval.global_clients, eval.every, eval.batch_size, engine.state (fast, tiny)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from celora.config import build_config
from celora.errors import CeloraError
from celora.eval import global_eval_clients


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"eval": {"every": 0}}, "eval.every"),
        ({"eval": {"global_clients": 0}}, "eval.global_clients"),
        ({"num_clients": 4, "eval": {"global_clients": 5}}, "eval.global_clients (5) > num_clients (4)"),
        ({"eval": {"batch_size": 0}}, "eval.batch_size"),
        ({"engine": {"state": "tape"}}, "engine.state"),
        ({"train": {"eval_batch_size": 8}, "eval": {"batch_size": 16}}, "same setting"),
    ],
)
def test_bad_values_name_the_field(data: dict[str, Any], needle: str) -> None:
    with pytest.raises(CeloraError, match=needle.replace("(", r"\(").replace(")", r"\)")) as err:
        build_config(data)
    assert "\n" not in str(err.value)


def test_train_eval_batch_size_is_read_as_eval_batch_size(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="celora"):
        cfg = build_config({"train": {"eval_batch_size": 8}})
    assert cfg.eval.batch_size == 8 and "train.eval_batch_size is now eval.batch_size" in caplog.text
    assert build_config({}).eval.batch_size == 64


def test_global_eval_sample_is_seeded_and_defaults_to_ten() -> None:
    assert global_eval_clients(7, None, 0) == list(range(7))
    assert global_eval_clients(10, None, 3) == list(range(10))
    some = global_eval_clients(100, None, 0)
    assert len(some) == 10 == len(set(some)) and some == sorted(some) and some == global_eval_clients(100, None, 0)
    assert some != global_eval_clients(100, None, 1)
    assert len(global_eval_clients(100, 25, 0)) == 25 and global_eval_clients(5, 5, 0) == [0, 1, 2, 3, 4]
