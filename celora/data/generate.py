"""The generative task: instruction → free-text response on a causal LM (``data.task = "generate"``).

Row layout (right-padded): chat-templated prompt (optional system turn, earlier turns, the user turn) |
response tokens | end token | padding. ``target`` holds the response and end tokens, IGNORE elsewhere, so the
training loss is the causal-LM NLL of the response only:

    L = −(1/T) Σ_t log p(y_t | prompt, y_<t)        over the T response + end tokens of the batch.

Truncation is explicit: a row longer than ``model.max_length`` loses tokens from its user turn (then from the
start of its prompt), never from its response; a row whose response is longer than ``data.max_response_tokens``
(or cannot fit with the prompt's framing) is skipped and counted. A tokenizer without a chat template gets the
plain template ``PLAIN_TEMPLATE`` documents.

Metrics (``spec``): ROUGE-L F1 of the greedy answer against the reference (primary, rouge-score, stemmed),
exact match (whitespace- and case-normalised), response NLL (the mean over a row's response tokens, averaged
over rows) and perplexity exp(NLL) per client. Generation is greedy, batched and left-padded on the model's
device, at most ``eval.max_new_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from celora.data.formats import as_generative
from celora.data.sources import Dataset
from celora.data.tasks import (
    IGNORE,
    PLACEHOLDER,
    Batch,
    LabelledRows,
    PromptTask,
    Task,
    TaskData,
    answer_rows,
    masked_mean,
    register_task,
    row_index,
    token_ids,
)
from celora.errors import CeloraError
from celora.eval import MetricSpec, rouge_l

PLAIN_TEMPLATE = (
    "Without a chat template: '{system}\\n\\n' (when there is one), then per earlier turn "
    "'### User:\\n{user}\\n\\n### Assistant:\\n{assistant}\\n\\n', then '### User:\\n{user}\\n\\n### Assistant:\\n'"
)
SAMPLES_PER_CLIENT = 3


def prompt_text_parts(tokenizer: Any, system: str, history: Sequence[Sequence[str]]) -> tuple[str, str]:
    """The prompt text before and after the user turn: the tokenizer's chat template with a generation prompt,
    or the plain template (``PLAIN_TEMPLATE``)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": r, "content": c} for r, c in history]
        messages.append({"role": "user", "content": PLACEHOLDER})
        text = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    else:
        text = f"{system}\n\n" if system else ""
        for role, content in history:
            text += f"### User:\n{content}\n\n" if role == "user" else f"### Assistant:\n{content}\n\n"
        text += f"### User:\n{PLACEHOLDER}\n\n### Assistant:\n"
    before, sep, after = text.partition(PLACEHOLDER)
    if not sep:
        raise CeloraError("data.task 'generate': the tokenizer's chat template dropped the user message")
    return before, after


def end_and_pad(tokenizer: Any) -> tuple[int, int]:
    """(end token, pad token) ids: eos (else sep) ends a response; pad defaults to the end token."""
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end_id is None:
        raise CeloraError("data.task 'generate': the tokenizer has no eos or sep token to end a response")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    return int(end_id), int(pad_id)


@dataclass
class EncodedRow:
    """One example's tokens: prompt (already cut to fit) and response (without the end token)."""

    prompt: list[int]
    response: list[int]


def encode_row(
    tokenizer: Any,
    parts: tuple[str, str],
    user: str,
    response: str,
    max_length: int,
    max_response_tokens: int,
    cache: dict[str, list[int]],
) -> EncodedRow | None:
    """prompt + response + end within ``max_length``: the user turn is cut first, then the prompt's start;
    None when the response is longer than ``max_response_tokens`` or cannot fit beside the framing."""

    def ids(text: str) -> list[int]:
        if text not in cache:
            cache[text] = token_ids(tokenizer, text)
        return cache[text]

    resp = token_ids(tokenizer, response)
    pre, post = ids(parts[0]), ids(parts[1])
    if not resp or len(resp) > max_response_tokens or len(post) + len(resp) + 1 > max_length:
        return None
    room = max_length - len(resp) - 1 - len(post)  # for pre + user
    user_ids = token_ids(tokenizer, user)
    keep_user = max(0, min(len(user_ids), room - len(pre)))
    head = (pre + user_ids[:keep_user])[-room:] if room > 0 else []
    return EncodedRow(head + post, resp)


@dataclass
class GenerativeData(LabelledRows):
    """Tokenized generative rows (right-padded): ``target`` = the response + end tokens, IGNORE elsewhere."""

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    target: torch.Tensor  # (N, L)
    prompt_len: torch.Tensor  # (N,)
    labels_t: torch.Tensor  # (N,) class ids (one class unless the rows came from a labelled set)
    references: list[str]  # the response texts
    prompts: list[str]  # the user turns (for samples.jsonl)
    end_id: int
    pad_id: int
    decode: Callable[[list[int]], str]

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        index = row_index(idx, self.input_ids)
        return {**answer_rows(self, index, self.attention_mask[index]), "rows": index}


def normalise(text: str) -> str:
    """Exact match compares texts lower-cased with whitespace collapsed."""
    return " ".join(text.lower().split())


class GenerateTask(Task):
    """Instruction → response with a causal LM; loss on the response tokens only (see the module docstring)."""

    name = "generate"
    head = "lm"
    model_kinds = frozenset({"decoder"})
    zero_shot = True
    rows = "generative"
    spec = MetricSpec("rougeL", True, ("rougeL", "exact_match", "nll", "ppl"))
    summary_views = ("input", "input+response")
    greedy = staticmethod(PromptTask.greedy_answers)

    def __init__(self, max_response_tokens: int = 24, max_new_tokens: int | None = None) -> None:
        self.max_response_tokens = max_response_tokens
        self.max_new_tokens = max_new_tokens or max_response_tokens + 1

    def configured(self, cfg: Any) -> Task:
        """A fresh instance with the run's limits (data.max_response_tokens, eval.max_new_tokens)."""
        return type(self)(cfg.data.max_response_tokens, cfg.eval.max_new_tokens)

    # ----------------------------------------------------------------- rows
    def prepare_rows(self, dataset: Dataset, processor: Any, max_length: int) -> Dataset:
        """The dataset as generative rows, without the rows whose response cannot fit (counted in
        ``skipped_rows``); CeloraError naming the file when no row is left."""
        ds = as_generative(dataset)
        assert ds.responses is not None and ds.systems is not None and ds.histories is not None
        keep = [i for i, row in enumerate(self._encode(ds, processor, max_length)) if row is not None]
        if not keep:
            where = f"data file '{ds.origin}'" if ds.origin else f"dataset '{ds.name}'"
            longest = max(len(token_ids(processor, r)) for r in ds.responses)
            raise CeloraError(
                f"{where}: every response is too long (data.max_response_tokens = {self.max_response_tokens}, "
                f"model.max_length = {max_length}; the longest has {longest} tokens)"
            )
        if len(keep) == len(ds):
            return ds
        out = ds.subset(np.asarray(keep, dtype=np.int64))
        return dataclasses.replace(out, skipped_rows=ds.skipped_rows + len(ds) - len(keep))

    def _encode(self, ds: Dataset, tokenizer: Any, max_length: int) -> list[EncodedRow | None]:
        assert ds.responses is not None and ds.systems is not None and ds.histories is not None
        parts: dict[str, tuple[str, str]] = {}
        cache: dict[str, list[int]] = {}
        rows: list[EncodedRow | None] = []
        for user, response, system, history in zip(ds.texts, ds.responses, ds.systems, ds.histories, strict=True):
            key = repr((system, history))
            if key not in parts:
                parts[key] = prompt_text_parts(tokenizer, system, history)
            rows.append(encode_row(tokenizer, parts[key], user, response, max_length, self.max_response_tokens, cache))
        return rows

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        """Encode every row once (rows must fit: :meth:`prepare_rows` drops the others before the split)."""
        ds = as_generative(dataset)
        assert ds.responses is not None
        end_id, pad_id = end_and_pad(processor)
        rows = self._encode(ds, processor, max_length)
        if None in rows:
            k = rows.index(None)
            raise CeloraError(
                f"dataset '{ds.name}' row {k + 1}: the response does not fit (data.max_response_tokens = "
                f"{self.max_response_tokens}, model.max_length = {max_length}); prepare_rows() drops such rows"
            )
        n = len(rows)
        ids = torch.full((n, max_length), pad_id, dtype=torch.long)
        mask = torch.zeros((n, max_length), dtype=torch.long)
        target = torch.full((n, max_length), IGNORE, dtype=torch.long)
        plens = []
        for r, row in enumerate(rows):
            assert row is not None  # prepare_rows kept only the rows that fit
            full = row.prompt + row.response + [end_id]
            ids[r, : len(full)] = torch.tensor(full)
            mask[r, : len(full)] = 1
            target[r, len(row.prompt) : len(full)] = torch.tensor(row.response + [end_id])
            plens.append(len(row.prompt))

        def decode(tokens: list[int]) -> str:
            return str(processor.decode(tokens, skip_special_tokens=True))

        return GenerativeData(
            ids,
            mask,
            target,
            torch.tensor(plens, dtype=torch.long),
            torch.as_tensor(ds.labels, dtype=torch.long),
            list(ds.responses),
            list(ds.texts),
            end_id,
            pad_id,
            decode,
        )

    # ----------------------------------------------------------------- model
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = PromptTask.decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        return -PromptTask.target_logprobs(model, hidden, batch["target"]).mean()

    def row_nll(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(b,) mean NLL of each row's response + end tokens."""
        target = batch["target"]
        hidden = PromptTask.decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        lp = PromptTask.target_logprobs(model, hidden, target)
        owner = (target[:, 1:] != IGNORE).nonzero(as_tuple=True)[0]
        b = target.shape[0]
        return lp.new_zeros(b).index_add_(0, owner, -lp) / torch.bincount(owner, minlength=b).clamp_min(1)

    def answers(self, model: nn.Module, batch: Batch) -> list[list[int]]:
        """Greedy answers (token ids, cut before the end token) of a batch's prompts."""
        return self.greedy(model, batch, self.max_new_tokens)

    def score(self, model: nn.Module, batch: Batch) -> tuple[float, float]:
        raise CeloraError("data.task 'generate' scores through evaluate() (it needs the rows' references)")

    def evaluate(
        self, model: nn.Module, data: TaskData, batch: Batch, extras: bool
    ) -> tuple[float, float, dict[str, float]]:
        """Σ ROUGE-L F1 of the greedy answers, Σ row NLL; with ``extras`` Σ exact match and Σ NLL."""
        assert isinstance(data, GenerativeData)
        nll = self.row_nll(model, batch)
        refs = [data.references[r] for r in batch["rows"].tolist()]
        outs = [data.decode(a) for a in self.answers(model, batch)]
        rouge = sum(rouge_l(ref, out) for ref, out in zip(refs, outs, strict=True))
        nll_sum = float(nll.double().sum().item())
        if not extras:
            return rouge, nll_sum, {}
        exact = float(sum(normalise(ref) == normalise(out) for ref, out in zip(refs, outs, strict=True)))
        return rouge, nll_sum, {"exact_match": exact, "nll": nll_sum}

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """ppl = exp(nll) of the client's rows (when nll was evaluated)."""
        if "nll" in metrics:
            metrics["ppl"] = math.exp(min(metrics["nll"], 700.0))
        return metrics

    def samples(self, model: nn.Module, data: TaskData, batch: Batch) -> list[dict[str, str]]:
        """What a person looks at: the user turn, the reference and the greedy answer of each row of ``batch``."""
        assert isinstance(data, GenerativeData)
        rows = batch["rows"].tolist()
        outs = [data.decode(a) for a in self.answers(model, batch)]
        return [
            {"prompt": data.prompts[r], "reference": data.references[r], "output": o}
            for r, o in zip(rows, outs, strict=True)
        ]

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """Mean of the decoder's last hidden states over the prompt tokens (the response excluded)."""
        return PromptTask().features(model, batch)

    def summary_features(self, model: nn.Module, batch: Batch, view: str = "input") -> np.ndarray:
        """``input``: :meth:`features`; ``input+response``: ½ (mean_t∈prompt h_t + mean_t∈response h_t), the last
        hidden states of one forward (the response's end token included)."""
        if view != "input+response":
            return super().summary_features(model, batch, view)
        hidden = PromptTask.decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        return (PromptTask.prompt_mean(hidden, batch) + masked_mean(hidden, batch["target"] != IGNORE)) / 2


register_task(GenerateTask())
