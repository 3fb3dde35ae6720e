"""The generative task (celora.data.generate, celora.data.formats): rows, loss, generation, formats, bad input,
saved adapters (celora eval / generate, PEFT reload), any HF decoder folder with all-linear targets, Flower."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from celora import cli
from celora.config import build_config, load_config
from celora.data.formats import load_generative_file
from celora.data.generate import GenerateTask, GenerativeData, encode_row, prompt_text_parts
from celora.data.sources import Dataset
from celora.data.tasks import IGNORE, get_task
from celora.errors import CeloraError
from celora.fl.simulation import Simulation, check_names, prepare
from celora.models.zoo import load_model

GEN = get_task("generate")
assert isinstance(GEN, GenerateTask)
PAIRS = [("add 1 2", "3"), ("add 2 2", "4"), ("add 5 1", "6"), ("add 3 4", "7"), ("add 0 9", "9"), ("add 4 4", "8")]


def _rows(n: int = 36) -> list[dict[str, str]]:
    return [{"prompt": f"sum {i % 5} {i % 3}", "response": str(i % 5 + i % 3), "site": f"s{i % 2}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _toy() -> Dataset:
    n = len(PAIRS)
    return Dataset(
        "toy",
        [p for p, _ in PAIRS],
        np.zeros(n, dtype=np.int64),
        ["all"],
        responses=[r for _, r in PAIRS],
        systems=["answer"] * n,
        histories=[[] for _ in range(n)],
    )


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny-llama", 2, seed=0, head="lm")


@pytest.fixture(scope="module")
def toy(lm) -> GenerativeData:
    data = GEN.build(_toy(), lm.tokenizer, 48)
    assert isinstance(data, GenerativeData)
    return data


# --------------------------------------------------------------------------- rows and loss
def test_targets_are_the_response_and_end_tokens_only(lm, toy):
    for r, (_, resp) in enumerate(PAIRS):
        p = int(toy.prompt_len[r])
        want = lm.tokenizer(resp, add_special_tokens=False)["input_ids"] + [toy.end_id]
        got = toy.target[r][toy.target[r] != IGNORE].tolist()
        assert got == want
        assert (toy.target[r, :p] == IGNORE).all() and toy.input_ids[r, p : p + len(want)].tolist() == want


def test_loss_is_the_mean_nll_of_the_response_tokens(lm, toy):
    batch = toy.batch(np.arange(len(toy)))
    with torch.no_grad():
        loss = GEN.loss(lm.model, batch)
        logits = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = logits.log_softmax(-1)
    nll = []
    for r in range(len(toy)):
        for t in range(1, batch["target"].shape[1]):
            y = int(batch["target"][r, t])
            if y != IGNORE:
                nll.append(-float(logp[r, t - 1, y]))
    assert float(loss) == pytest.approx(float(np.mean(nll)), abs=1e-5)


def test_changing_a_prompt_token_changes_no_target(lm, toy):
    batch = toy.batch(np.arange(len(toy)))
    other = dict(batch)
    ids = batch["input_ids"].clone()
    ids[:, 1] = (ids[:, 1] + 5) % 40  # a prompt position of every row
    other["input_ids"] = ids
    assert torch.equal(other["target"], batch["target"])  # the targets do not depend on the prompt's ids
    with torch.no_grad():
        assert float(GEN.loss(lm.model, other)) != pytest.approx(float(GEN.loss(lm.model, batch)), abs=1e-7)


def test_the_prompt_is_cut_never_the_response_and_long_responses_are_skipped(lm):
    parts = prompt_text_parts(lm.tokenizer, "sys", [])
    cache: dict[str, list[int]] = {}
    row = encode_row(lm.tokenizer, parts, "x" * 200, "abc", 40, 8, cache)
    assert row is not None and len(row.prompt) + len(row.response) + 1 == 40
    assert row.response == lm.tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert encode_row(lm.tokenizer, parts, "q", "y" * 9, 40, 8, cache) is None  # response over max_response_tokens
    ds = _toy()
    ds = Dataset(
        ds.name,
        ds.texts,
        ds.labels,
        ds.label_names,
        responses=[*ds.responses[:-1], "z" * 30],
        systems=ds.systems,
        histories=ds.histories,
    )
    kept = GenerateTask(max_response_tokens=8).prepare_rows(ds, lm.tokenizer, 48)
    assert len(kept) == len(ds) - 1 and kept.skipped_rows == 1
    with pytest.raises(CeloraError, match="every response is too long"):
        GenerateTask(max_response_tokens=1).prepare_rows(dataclasses_replace_responses(ds, "zz"), lm.tokenizer, 48)


def dataclasses_replace_responses(ds: Dataset, text: str) -> Dataset:
    import dataclasses

    return dataclasses.replace(ds, responses=[text] * len(ds))


def test_plain_template_without_a_chat_template_and_the_chat_template_when_there_is_one(lm):
    before, after = prompt_text_parts(lm.tokenizer, "be brief", [["user", "hi"], ["assistant", "hello"]])
    assert before == "be brief\n\n### User:\nhi\n\n### Assistant:\nhello\n\n### User:\n"
    assert after == "\n\n### Assistant:\n"

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            body = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
            return body + ("<assistant>" if add_generation_prompt else "")

    before, after = prompt_text_parts(Chat(), "sys", [])
    assert before == "<system>sys</system><user>" and after == "</user><assistant>"


# --------------------------------------------------------------------------- generation and metrics
def test_greedy_generation_is_deterministic_and_metrics_are_the_tasks(lm, toy):
    batch = toy.batch(np.arange(len(toy)))
    with torch.no_grad():
        a, b = GEN.answers(lm.model, batch), GEN.answers(lm.model, batch)
        rouge, nll, extra = GEN.evaluate(lm.model, toy, batch, True)
    assert a == b and all(len(x) <= GEN.max_new_tokens for x in a)
    assert 0.0 <= rouge <= len(toy) and nll > 0 and extra["nll"] == pytest.approx(nll)
    m = GEN.finish_metrics({"nll": 2.0})
    assert m["ppl"] == pytest.approx(math.exp(2.0))
    assert GEN.spec.primary == "rougeL" and GEN.spec.higher_is_better


def test_training_raises_rouge_and_lowers_nll(lm):
    from celora.adapters.inject import AdapterSpec, inject_adapters, set_trainable
    from celora.fl.client import evaluate_metrics, train_local

    fresh = load_model("tiny-llama", 2, seed=0, head="lm")
    inject_adapters(fresh.model, AdapterSpec(rank=4, alpha=4.0, targets=("q_proj", "v_proj", "o_proj"), seed=0))
    params = set_trainable(fresh.model, {"A", "B", "C"}, ())
    data = GEN.build(_toy(), fresh.tokenizer, 48)
    idx = np.arange(len(data))
    before = evaluate_metrics(fresh.model, data, idx, task=GEN, extras=True)
    torch.manual_seed(0)
    train_local(fresh.model, data, idx, params, task=GEN, epochs=300, batch_size=6, lr=3e-2)
    after = evaluate_metrics(fresh.model, data, idx, task=GEN, extras=True)
    assert after["nll"] < before["nll"] - 0.4
    assert before["score"] == 0.0 and after["score"] > 0.5 and after["exact_match"] > 0.5  # answers learned


# --------------------------------------------------------------------------- formats and bad input
def test_the_three_formats_give_the_same_examples(tmp_path):
    cols = _write_jsonl(tmp_path / "c.jsonl", [{"q": "hi", "a": "hello", "s": "be kind"}])
    alpaca = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "hi", "input": "there", "output": "hello"}])
    chat = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "be kind"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "and?"},
                    {"role": "assistant", "content": "bye"},
                ]
            }
        ],
    )
    c = load_generative_file(cols, prompt_column="q", response_column="a", system_column="s")
    assert (c.texts, c.responses, c.systems) == (["hi"], ["hello"], ["be kind"])
    a = load_generative_file(alpaca)
    assert (a.texts, a.responses) == (["hi\n\nthere"], ["hello"])
    m = load_generative_file(chat)  # one example per assistant turn, the earlier turns as history
    assert m.texts == ["hi", "and?"] and m.responses == ["hello", "bye"] and m.systems == ["be kind"] * 2
    assert m.histories == [[], [["user", "hi"], ["assistant", "hello"]]]


@pytest.mark.parametrize(
    "rows,sets,needle",
    [
        ([{"prompt": "a", "answer": "b"}], [], "data.response_column 'response' not found"),
        ([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": " "}], [], "row 2: empty response"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], [], "row 1: field 'messages' has no assistant turn"),
        ([{"prompt": "a", "response": "b" * 400}], [], "every response is too long"),
        ([{"prompt": "a", "response": "b"}], ["data.format=jsonish"], "data.format"),
    ],
)
def test_bad_generative_input_is_one_line_and_leaves_no_finished_run(tmp_path, monkeypatch, capsys, rows, sets, needle):
    f = _write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    args = [
        "run",
        "--set",
        "model.name=tiny-llama",
        "--set",
        "data.task=generate",
        "--set",
        f"data.path={f}",
        "--set",
        "num_clients=1",
        "--set",
        "rounds=1",
        "--out",
        str(out),
    ]
    for s in sets:
        args += ["--set", s]
    monkeypatch.setattr(sys, "argv", ["celora", *args])
    with pytest.raises(SystemExit) as ex:
        cli.main()
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2 and needle in err and len(err.splitlines()) == 1, err
    if "data.format" not in needle:
        assert str(f) in err or "bad.jsonl" in err
    assert not (out / "summary.json").exists() and not (out / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- a run, its folder, its adapters
@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    """A finished 2-client generative run on the tiny LLaMA: (run folder, RunResult, Prepared)."""
    d = tmp_path_factory.mktemp("gen")
    f = _write_jsonl(d / "rows.jsonl", _rows())
    out = d / "run"
    cfg = load_config(
        None,
        [
            "model.name=tiny-llama",
            "model.rank=4",
            "model.max_length=32",
            "num_clients=2",
            "rounds=2",
            "data.task=generate",
            f"data.path={f}",
            "data.partition=natural",
            "data.column=site",
            "data.max_response_tokens=4",
            "train.batch_size=8",
            "train.lr=5e-3",
            "train.threads=1",
        ],
    )
    p = prepare(cfg)
    return out, Simulation(cfg, out, prepared=p).run(), p


@pytest.fixture(scope="module")
def run_dir(gen_run) -> Path:
    return gen_run[0]


def test_run_folder_is_keyed_by_the_primary_metric(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["primary_metric"] == {
        "name": "rougeL",
        "direction": "max",
        "metrics": ["rougeL", "exact_match", "nll", "ppl"],
    }
    for key in (
        "rougeL_mean",
        "rougeL_worst10",
        "rougeL_mean_agg",
        "exact_match_mean",
        "nll_mean",
        "ppl_mean",
        "nll_agg_mean",
    ):
        assert key in summary and not math.isnan(summary[key]), key
    assert "acc_mean" not in summary and "acc_majority" not in summary
    assert summary["zero_shot"]["nll_mean"] > summary["nll_mean"]  # training lowered the response NLL
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "rougeL" in rows[-1]["clients"][0] and "rougeL_agg" in rows[-1]["clients"][0]
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["client"] for s in samples} == {0, 1}
    assert all(set(s) == {"client", "prompt", "reference", "zero_shot", "final"} for s in samples)


def test_celora_eval_reprints_the_final_metrics(run_dir):
    from celora.fl.saved import evaluate_saved

    res = evaluate_saved(run_dir)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {c["id"]: c for c in rows[-1]["clients"]}
    for c in res.clients:
        assert c["rougeL"] == pytest.approx(last[c["client"]]["rougeL_agg"], abs=1e-6)
        assert c["nll"] == pytest.approx(last[c["client"]]["metrics"]["nll_agg"], abs=1e-4)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert res.means["rougeL_mean"] == pytest.approx(summary["rougeL_mean_agg"], abs=1e-6)
    one = evaluate_saved(run_dir / "adapters" / "client_1")
    assert [c["client"] for c in one.clients] == [1] and one.clients[0]["nll"] == pytest.approx(res.clients[1]["nll"])
    on_file = evaluate_saved(run_dir, data_file=str(run_dir.parent / "rows.jsonl"))
    assert [c["n_test"] for c in on_file.clients] == [36, 36]  # every row of the file, for each client's adapter
    base = evaluate_saved(run_dir, base=True)
    assert base.means["nll_mean"] == pytest.approx(summary["zero_shot"]["nll_mean"], abs=1e-4)


def test_peft_reload_generates_the_same_tokens(gen_run):
    """A client's final in-run tri-matrix adapter and its exported folder reloaded in PEFT answer alike."""
    from peft import PeftModel

    from celora.fl.client import batch_on

    out, result, p = gen_run
    data = p.provider().client(0)
    p.bench.load(result.states[0])
    batch = batch_on(p.bench.model, data.data, data.test_idx)
    task = p.task
    assert isinstance(task, GenerateTask)
    with torch.no_grad():
        ours = task.answers(p.bench.model, batch)
        base = load_model("tiny-llama", 1, seed=0, head="lm").model
        peft = PeftModel.from_pretrained(base, str(out / "adapters" / "client_0")).eval()
        theirs = task.answers(peft, batch)
    assert ours == theirs and any(ours)


def test_celora_generate_answers_one_prompt(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(
        sys,
        "argv",
        ["celora", "generate", str(run_dir / "adapters" / "client_0"), "--prompt", "sum 1 1", "--max-new-tokens", "3"],
    )
    cli.main()
    first = capsys.readouterr().out
    cli.main()
    assert capsys.readouterr().out == first  # greedy: the same answer twice


# --------------------------------------------------------------------------- any HF decoder folder
def _write_folder(tmp: Path, family: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from celora.models.zoo import char_tokenizer

    tok = char_tokenizer()
    tok.eos_token = "[SEP]"  # in the vocabulary (a saved tokenizer without one gets a new, out-of-vocabulary eos)
    common = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**common)) if family == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))
    folder = tmp / family
    model.save_pretrained(folder)
    if family == "qwen2":  # a chat template from the tokenizer's folder
        tok.chat_template = (
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}"
        )
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_any_decoder_folder_with_all_linear_targets(tmp_path, family):
    from celora.adapters.inject import adapter_layers
    from celora.fl.comm import comm_table

    folder = _write_folder(tmp_path, family)
    f = _write_jsonl(tmp_path / "rows.jsonl", _rows(12))
    cfg = load_config(
        None,
        [
            f"model.name={folder}",
            "model.rank=2",
            "model.targets=all-linear",
            "model.max_length=32",
            "num_clients=2",
            "rounds=1",
            "data.task=generate",
            f"data.path={f}",
            "data.partition=iid",
            "data.max_response_tokens=4",
            "train.batch_size=8",
            "train.threads=1",
        ],
    )
    p = prepare(cfg)
    names = {n.rpartition(".")[2] for n in adapter_layers(p.loaded.model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert "lm_head" not in "".join(adapter_layers(p.loaded.model))
    res = Simulation(cfg, prepared=p, export_adapters=False).run()
    assert not math.isnan(res.summary["rougeL_mean"])
    rows = {r["method"]: r for r in comm_table(str(folder), 2, ["all-linear"])}
    assert rows["celora"]["params"] == 2 * 7 * 2 * 2  # C: r×r per adapted layer, 7 per block, 2 blocks


# --------------------------------------------------------------------------- Flower
def test_flower_runtime_gives_the_in_process_metrics(tmp_path):
    pytest.importorskip("flwr")
    from flower_helpers import MemoryGrid, read_jsonl

    from celora.fl.flower.server import CeloraFlowerStrategy

    f = _write_jsonl(tmp_path / "rows.jsonl", _rows(24))
    sets = [
        "model.name=tiny-llama",
        "model.rank=4",
        "model.max_length=32",
        "num_clients=2",
        "rounds=2",
        "data.task=generate",
        f"data.path={f}",
        "data.partition=iid",
        "data.max_response_tokens=4",
        "train.batch_size=8",
        "train.lr=5e-3",
        "train.threads=1",
    ]
    cfg = load_config(None, sets)
    ref = Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run()
    out = tmp_path / "flower"
    summary = CeloraFlowerStrategy(load_config(None, sets), out, round_timeout=5, node_wait=1, export=False).run(
        MemoryGrid(2)
    )
    rows = read_jsonl(out / "metrics.jsonl")
    for a, b in zip(ref.rounds, rows, strict=True):
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            for key in ("rougeL", "rougeL_agg", "loss", "loss_agg"):
                assert ca[key] == pytest.approx(cb[key], abs=1e-6), (key, ca[key], cb[key])
            assert ca["metrics"] == pytest.approx(cb["metrics"], abs=1e-6), (a["round"], ca["metrics"], cb["metrics"])
            assert (ca["bytes_up"], ca["bytes_down"]) == (cb["bytes_up"], cb["bytes_down"])
    assert summary["rougeL_mean"] == pytest.approx(ref.summary["rougeL_mean"], abs=1e-6)


# --------------------------------------------------------------------------- sites, the VLM
def test_sites_in_their_own_formats_run_the_generative_task(tmp_path):
    alpaca = _write_jsonl(
        tmp_path / "a.jsonl", [{"instruction": f"sum {i % 4} 1", "output": str(i % 4 + 1)} for i in range(12)]
    )
    chat = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": f"sum {i % 3} 2"},
                    {"role": "assistant", "content": str(i % 3 + 2)},
                ]
            }
            for i in range(12)
        ],
    )
    cfg = load_config(
        None,
        [
            "model.name=tiny-llama",
            "model.rank=4",
            "model.max_length=32",
            "rounds=1",
            "data.task=generate",
            f"data.sites=['{alpaca}', '{chat}']",
            "data.max_response_tokens=4",
            "train.batch_size=8",
            "train.threads=1",
        ],
    )
    res = Simulation(cfg, prepared=prepare(cfg), export_adapters=False).run()
    assert [c["n_train"] for c in res.rounds[-1]["clients"]] == [10, 10]  # each site's own rows, split 80/20
    assert not math.isnan(res.summary["rougeL_mean"]) and not math.isnan(res.summary["nll_mean"])


def test_image_generate_binds_each_rows_image(tmp_path):
    cfg = load_config(
        None,
        [
            "model.name=tiny-vlm",
            "model.rank=4",
            "model.max_length=160",
            "num_clients=2",
            "rounds=1",
            "data.name=digits",
            "data.task=image-generate",
            "data.max_samples=40",
            "data.image_size=28",
            "data.max_response_tokens=6",
            "train.batch_size=8",
            "train.threads=1",
        ],
    )
    p = prepare(cfg)
    data = p.provider().client(0).data
    batch = data.batch(np.arange(4))
    task = p.task
    with torch.no_grad():
        nll = task.evaluate(p.loaded.model, data, batch, True)[1]
        other = dict(batch, pixel_values=torch.zeros_like(batch["pixel_values"]))  # the same rows, blank images
        assert task.evaluate(p.loaded.model, data, other, True)[1] != pytest.approx(nll, abs=1e-6)
    res = Simulation(cfg, tmp_path / "run", prepared=p).run()
    assert res.summary["primary_metric"]["name"] == "rougeL" and "nll_mean" in res.summary
    words = {"zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["reference"] in words for s in samples)


def test_a_classification_set_runs_as_instruction_to_label_word(lm):
    ds = Dataset("toy", ["great fit", "fell apart"], np.array([1, 0]), ["neg", "pos"], instruction="rate: {labels}")
    data = GEN.build(ds, lm.tokenizer, 48)
    assert isinstance(data, GenerativeData)
    assert data.references == ["pos", "neg"] and data.labels.tolist() == [1, 0]  # the label word is the response
    before, _ = prompt_text_parts(lm.tokenizer, "rate: neg, pos", [])
    first = lm.tokenizer(before, add_special_tokens=False)["input_ids"]
    assert data.input_ids[0, : len(first)].tolist() == first  # the instruction is the system turn


# --------------------------------------------------------------------------- data summaries (data.summary_features)
def test_input_response_features_separate_same_prompts_with_different_responses(lm):
    prompts = [p for p, _ in PAIRS]
    n = len(prompts)

    def build(responses: list[str]) -> GenerativeData:
        ds = Dataset(
            "toy",
            prompts,
            np.zeros(n, dtype=np.int64),
            ["all"],
            responses=responses,
            systems=["answer"] * n,
            histories=[[] for _ in range(n)],
        )
        data = GEN.build(ds, lm.tokenizer, 96)  # room for both prompts uncut
        assert isinstance(data, GenerativeData)
        return data

    digits, words = build([r for _, r in PAIRS]), build(["a short title here"] * n)
    assert torch.equal(digits.input_ids[:, :4], words.input_ids[:, :4]) and torch.equal(
        digits.prompt_len, words.prompt_len
    )
    idx = np.arange(n)
    lm.model.eval()
    with torch.no_grad():
        f = {
            (name, view): GEN.summary_features(lm.model, d.batch(idx), view)
            for name, d in (("digits", digits), ("words", words))
            for view in ("input", "input+response")
        }
        batch = words.batch(idx)
        out = lm.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden = out.last_hidden_state.float()
    # the prompt-only view cannot tell the two tasks apart; prompt + response can
    np.testing.assert_allclose(f["digits", "input"], f["words", "input"], atol=1e-5)
    assert np.abs(f["digits", "input+response"] - f["words", "input+response"]).max() > 1e-3
    for r in range(n):  # ½ (prompt-token mean + response-token mean) of the last hidden states
        p = int(batch["prompt_len"][r])
        resp = (batch["target"][r] != IGNORE).nonzero().flatten()
        want = (hidden[r, :p].mean(0) + hidden[r, resp].mean(0)) / 2
        np.testing.assert_allclose(f["words", "input+response"][r], want.numpy(), atol=1e-4)


def test_input_response_summaries_need_the_generate_task(tmp_path):
    with pytest.raises(ValueError, match=r"data.summary_features = 'input\+response': task 'classify' pools"):
        get_task("classify").summary_features(None, {}, "input+response")  # type: ignore[arg-type]
    # data.task unset: the task the model resolves to (classify on an encoder) is checked before any data is read
    unset = build_config({"model": {"name": "tiny-bert"}, "data": {"summary_features": "input+response"}})
    with pytest.raises(CeloraError, match=r"summary_features = 'input\+response' needs.*this run's task: 'classify'"):
        check_names(unset)
    generate = build_config(
        {"model": {"name": "tiny-llama"}, "data": {"task": "generate", "summary_features": "input+response"}}
    )
    assert check_names(generate).data.summary_features == "input+response"
    cfg = tmp_path / "c.toml"
    cfg.write_text('[data]\ntask = "classify"\nsummary_features = "input+response"\n', encoding="utf-8")
    with pytest.raises(CeloraError, match=r"data.summary_features = 'input\+response' needs data.task = 'generate'"):
        load_config(cfg)


def test_round_lines_say_when_a_round_was_not_scored():
    """eval.every > 1 leaves rounds without scores: their line says so instead of printing nan."""
    from celora.eval import MetricSpec, score_headline

    spec = GenerateTask().spec.as_dict()
    scored = {"primary_metric": spec, "rougeL_mean": 0.5, "rougeL_mean_agg": 0.25, "rougeL_worst10": 0.125}
    assert score_headline(scored) == "rougeL mean 0.500 (after agg. 0.250), worst-10% 0.125"
    skipped = scored | {"rougeL_mean": math.nan, "rougeL_mean_agg": math.nan, "rougeL_worst10": math.nan}
    assert score_headline(skipped) == "rougeL not scored this round (eval.every)"
    assert MetricSpec.of(scored).primary == "rougeL"
