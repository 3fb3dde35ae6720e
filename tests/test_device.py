"""train.device / train.precision: resolution, one-line errors, fp32 kept where it trains, and no tensor created
without a device in the task and batch code (fast, tiny random models)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from celora import cli
from celora.config import build_config
from celora.errors import CeloraError
from celora.fl.client import evaluate_metrics, pooled_features, train_local
from celora.fl.simulation import Prepared, check_names, prepare, run_experiment
from celora.models import device as dev
from celora.models.device import Placement, resolve_placement

CELORA_DIR = str(Path(dev.__file__).resolve().parents[1])
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
FACTORIES = {
    torch.zeros,
    torch.ones,
    torch.full,
    torch.empty,
    torch.tensor,
    torch.as_tensor,
    torch.arange,
    torch.eye,
    torch.rand,
    torch.randn,
    torch.randint,
    torch.linspace,
}


def _other_device() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def _tiny(name: str, **train: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"rounds": 1, "num_clients": 2, "train": {"batch_size": 8, "max_steps": 2, "threads": 1}}
    base["train"].update(train)
    if name == "tiny-bert":
        return {**base, "model": {"name": name, "rank": 2, "max_length": 32}, "data": {"max_samples": 60}}
    if name == "tiny-dinov2":
        return {**base, "model": {"name": name, "rank": 2}, "data": {"name": "digits", "max_samples": 40}}
    if name == "tiny-vlm":
        data = {"name": "digits", "max_samples": 24, "image_size": 28}
        return {**base, "model": {"name": name, "rank": 2, "max_length": 160}, "data": data}
    raise AssertionError(f"no tiny config for {name}")


# --------------------------------------------------------------------------- config and resolution
@pytest.mark.parametrize(
    "train,needle",
    [
        ({"device": "gpu"}, "train.device"),
        ({"device": "cuda:x"}, "train.device"),
        ({"precision": "fp64"}, "train.precision"),
    ],
)
def test_bad_device_or_precision_names_the_field(train: dict[str, str], needle: str) -> None:
    with pytest.raises(CeloraError, match=needle) as err:
        build_config({"train": train})
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["celora", "run", "configs/quickstart.toml", "--set", "train.device=cuda"])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    out = capsys.readouterr()
    assert ex.value.code == 2 and out.out == ""  # nothing printed before the error
    assert out.err.strip().splitlines() == [out.err.strip()] and "train.device = 'cuda'" in out.err
    with pytest.raises(CeloraError, match=r"train.device = 'cuda:3'"):
        check_names(build_config({"train": {"device": "cuda:3"}}))


def test_placement_auto_keeps_todays_cpu_behaviour(monkeypatch: pytest.MonkeyPatch) -> None:
    if _other_device() is None:  # auto = CPU here: fp32, no autocast, except bf16 weights where the CPU has them
        assert resolve_placement("auto", "auto") == Placement(torch.device("cpu"), torch.float32, None)
    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: True)
    assert resolve_placement("cpu", "auto", bf16_on_cpu=True) == Placement(torch.device("cpu"), torch.bfloat16)
    assert resolve_placement("cpu", "auto", bf16_on_cpu=False).weights == torch.float32
    bf16 = resolve_placement("cpu", "bf16")
    assert (bf16.weights, bf16.compute, bf16.grad_scaler()) == (torch.bfloat16, torch.bfloat16, None)
    assert resolve_placement("cpu", "fp16").grad_scaler() is not None
    assert resolve_placement("cpu", "fp32").compute is None


def test_bf16_stores_the_base_in_bf16_and_trains_in_fp32() -> None:
    p = prepare(build_config(_tiny("tiny-bert", device="cpu", precision="bf16")))
    params = dict(p.loaded.model.named_parameters())
    assert params["bert.embeddings.word_embeddings.weight"].dtype == torch.bfloat16
    trained = {n: t.requires_grad_(True) for n, t in params.items() if ".lora_" in n or n.startswith("classifier.")}
    assert trained and all(t.dtype == torch.float32 for t in trained.values())
    res = train_local(
        p.loaded.model,
        p.encoded,
        p.split.clients[0].train_idx,
        list(trained.values()),
        task=p.task,
        epochs=1,
        batch_size=8,
        lr=1e-2,
        max_steps=2,
        placement=p.placement,
    )
    assert res.steps == 2 and np.isfinite(res.loss)
    assert all(t.dtype == torch.float32 and t.grad is not None for t in trained.values())  # fp32 grads: fp32 Adam


def test_explicit_cpu_fp32_equals_the_default() -> None:
    a = run_experiment(build_config(_tiny("tiny-bert")), None)
    b = run_experiment(build_config(_tiny("tiny-bert", device="cpu", precision="fp32")), None)
    for key in ("acc_mean", "acc_mean_agg", "acc_global"):
        assert a.summary[key] == b.summary[key]
    for i, state in a.states.items():
        assert all(torch.equal(state[k], b.states[i][k]) for k in state)


# --------------------------------------------------------------------------- no device-less tensors
class DeviceLessFactories(TorchFunctionMode):
    """Records every tensor factory called from celora's own code without an explicit ``device``."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            while caller.f_back is not None and caller.f_code.co_filename.startswith(TORCH_DIR):
                caller = caller.f_back  # the first frame outside torch made the call
            if caller.f_code.co_filename.startswith(CELORA_DIR):
                self.found.append(f"{Path(caller.f_code.co_filename).name}:{caller.f_lineno} torch.{func.__name__}")
        return func(*args, **kwargs)


def _exercise(p: Prepared) -> None:
    """Train, evaluate (with the task's extra metrics), pool features and run the one-time set-up."""
    model = p.loaded.model
    idx = p.split.clients[0].train_idx
    params = [q for q in model.parameters() if q.requires_grad]
    train_local(model, p.encoded, idx, params, task=p.task, epochs=1, batch_size=4, lr=1e-3, max_steps=1)
    evaluate_metrics(model, p.encoded, p.split.clients[0].test_idx, 4, task=p.task, extras=True)
    pooled_features(model, p.encoded, idx[:4], 4, task=p.task)
    p.task.setup(model, p.encoded, [idx[:4]])


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-dinov2", "tiny-vlm", "prompt-multi", "prompt-single"])
def test_task_and_batch_code_creates_no_tensor_without_a_device(model: str, tmp_path: Path) -> None:
    if model.startswith("prompt"):
        words = ["no", "yes"] if model == "prompt-multi" else ["n", "y"]  # multi-token words: candidate scoring
        rows = "\n".join(f"{['bad', 'good'][i % 2]} thing {i},{words[i % 2]}" for i in range(24))
        (tmp_path / "d.csv").write_text("text,label\n" + rows + "\n")
        cfg: dict[str, Any] = {
            **_tiny("tiny-bert"),
            "model": {"name": "tiny-llama", "rank": 2, "max_length": 96},
            "data": {"path": str(tmp_path / "d.csv"), "task": "prompt", "verbalizers": words},
        }
    else:
        cfg = _tiny(model)
    p = prepare(build_config(cfg))
    with DeviceLessFactories() as mode:
        _exercise(p)
    assert mode.found == []


def test_the_checker_sees_a_device_less_tensor() -> None:
    with DeviceLessFactories() as mode:
        torch.zeros(3, device="cpu")
        torch.zeros(3)  # this file is not celora's: not recorded
        dev.to_device({"x": torch.ones(1, device="cpu")}, torch.device("cpu"))
    assert mode.found == []
    code = compile("torch.arange(3)\ntorch.full((2,), 0, device=d)", f"{CELORA_DIR}/data/fake.py", "exec")
    with DeviceLessFactories() as mode:  # the same calls made from a (fake) celora source file
        exec(code, {"torch": torch, "d": torch.device("cpu")})
    assert mode.found == ["fake.py:1 torch.arange"]


# --------------------------------------------------------------------------- a real accelerator, where there is one
@pytest.mark.skipif(_other_device() is None, reason="no CUDA or MPS device on this machine")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_evaluate_export_on_an_accelerator(precision: str, tmp_path: Path) -> None:
    from peft import PeftModel

    from celora.models.zoo import load_model

    name = _other_device()
    out = tmp_path / "run"
    res = run_experiment(build_config(_tiny("tiny-bert", device=name, precision=precision)), out)
    assert np.isfinite(res.summary["acc_mean"]) and np.isfinite(res.summary["acc_global"])
    assert all(t.device.type == "cpu" for st in res.states.values() for t in st.values())  # states come back
    p = prepare(build_config(_tiny("tiny-bert", device=name, precision=precision)))
    assert {q.device.type for q in p.loaded.model.parameters()} == {name}
    with DeviceLessFactories() as mode:
        _exercise(p)
    assert mode.found == []
    base = load_model("tiny-bert", num_labels=len(p.dataset.label_names), seed=0).model
    peft = PeftModel.from_pretrained(base, str(out / "adapters" / "client_0"))
    assert sum(1 for n, _ in peft.named_parameters() if "lora_A" in n) > 0


def test_each_supernode_picks_its_own_device_in_its_node_config() -> None:
    pytest.importorskip("flwr")
    from celora.config import apply_overrides
    from celora.fl.flower.client_app import node_overrides

    node = {"partition-id": 0, "num-partitions": 2, "device": "cpu", "precision": "bf16"}
    cfg = build_config(apply_overrides({"train": {"device": "cuda:1"}}, node_overrides(node)))
    assert (cfg.train.device, cfg.train.precision) == ("cpu", "bf16")
    assert node_overrides({"partition-id": 1}) == []
    with pytest.raises(CeloraError, match="train.device"):
        build_config(apply_overrides({}, node_overrides({"device": "tpu"})))
