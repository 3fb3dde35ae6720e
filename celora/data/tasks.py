"""Tasks: records → model inputs, plus the loss, score and pooled features of one batch.

A task turns a :class:`~celora.data.sources.Dataset` into a :class:`TaskData` (``len``, ``labels``,
``batch(idx) -> dict`` of tensors) and knows how the model consumes a batch. The engine only calls
``loss`` (training), ``score`` (evaluation), ``features`` (data summaries) and ``extra_metrics``.

- ``classify``: a sequence classifier (encoder or decoder with a ``classifier``/``score`` head);
  L = −(1/|b|) Σ log softmax(f(x))_y.
- ``prompt``: a causal LM answers an instruction with a label word (verbalizer); the loss is the
  token cross-entropy on the answer tokens only; accuracy = argmax_k Σ_t log p(v_k,t | prompt, v_k,<t)
  over the label words v_k; ``exact_match`` = greedy generation equals the gold word.

Add a task with :func:`register_task` (e.g. image classification).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from celora.data.sources import Dataset
from celora.errors import CeloraError
from celora.eval import ACCURACY, MetricSpec
from celora.registry import Registry

Batch = dict[str, torch.Tensor]
IGNORE = -100  # target value of positions without loss


class TaskData(Protocol):
    """A dataset in model-input form: one row per example, batches as dicts of tensors."""

    @property
    def labels(self) -> np.ndarray: ...

    def __len__(self) -> int: ...

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch: ...


class Task(ABC):
    """How records become model inputs and how a batch is trained, scored and pooled."""

    name: ClassVar[str]
    head: ClassVar[str] = "classifier"  # which model the zoo builds: "classifier" | "lm"
    model_kinds: ClassVar[frozenset[str]] = frozenset({"encoder", "decoder"})
    zero_shot: ClassVar[bool] = False  # is the un-adapted model meaningful (evaluated before round 1)?
    spec: ClassVar[MetricSpec] = ACCURACY  # the metrics it declares; ``score`` sums the primary one
    rows: ClassVar[str] = "labelled"  # what a data file holds: "labelled" (text/label) | "generative" (prompts)
    summary_views: ClassVar[tuple[str, ...]] = ("input",)  # the data.summary_features values it can pool

    def configured(self, cfg: Any) -> Task:
        """The task with a run's settings (an ``ExperimentConfig``); tasks without settings return themselves."""
        return self

    def prepare_rows(self, dataset: Dataset, processor: Any, max_length: int) -> Dataset:
        """The rows this task can use, before the data is split (e.g. without responses that cannot fit);
        all of them by default."""
        return dataset

    def evaluates_zero_shot(self, model: nn.Module) -> bool:
        """Whether this model's un-adapted form is evaluated before round 1 (``zero_shot`` unless a task says)."""
        return self.zero_shot

    @abstractmethod
    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        """Encode every example once (``processor``: the model's tokenizer or image processor)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Mean training loss of one batch (a scalar with grad)."""

    @abstractmethod
    def score(self, model: nn.Module, batch: Batch) -> tuple[float, float]:
        """(Σ per-example primary metric — accuracy: correct predictions —, Σ per-example loss) over the batch."""

    @abstractmethod
    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """One pooled feature vector per example, (b, hidden) float32."""

    def summary_features(self, model: nn.Module, batch: Batch, view: str = "input") -> np.ndarray:
        """The vectors a client's data summary is fitted on (``data.summary_features``): :meth:`features`."""
        if view not in self.summary_views:
            raise ValueError(f"data.summary_features = '{view}': task '{self.name}' pools {self.summary_views}")
        return self.features(model, batch)

    def extra_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """Task-specific metrics summed over the batch (divided by n by the caller); none by default."""
        return {}

    def evaluate(
        self, model: nn.Module, data: TaskData, batch: Batch, extras: bool
    ) -> tuple[float, float, dict[str, float]]:
        """(Σ primary metric, Σ loss, Σ extra metrics if ``extras``) of one batch of ``data``'s rows:
        :meth:`score` and :meth:`extra_metrics` unless a task needs the rows themselves (e.g. references)."""
        s, loss = self.score(model, batch)
        return s, loss, self.extra_metrics(model, batch) if extras else {}

    def samples(self, model: nn.Module, data: TaskData, batch: Batch) -> list[dict[str, str]]:
        """Examples a person reads (prompt, reference, output) for a batch's rows; none by default."""
        return []

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the per-example means of one client's rows (e.g. perplexity = exp(NLL)); none by
        default."""
        return metrics

    def site_statistics(self, model: nn.Module, data: TaskData, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """Client side, once before round 1: what one site uploads for the task's shared set-up, computed
        from its own rows ``idx`` only (named tensors; nothing else of its data travels). None by default."""
        return {}

    def combine_statistics(self, stats: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Server side: the shared set-up from the sites' statistics (sent back to every site). None by default."""
        return {}

    def apply_setup(self, model: nn.Module, setup: dict[str, torch.Tensor]) -> None:
        """Every site: install the shared set-up (from :meth:`combine_statistics`) in its model. Nothing by default."""
        return None

    def setup(self, model: nn.Module, data: TaskData, clients: Sequence[np.ndarray]) -> int:
        """One-time federated set-up in one process: every client's statistics → combined → applied;
        returns the tensor bytes each client uploads for it (fp32, the largest client's; 0 when none)."""
        stats = [self.site_statistics(model, data, idx) for idx in clients]
        if not any(stats):
            return 0
        self.apply_setup(model, self.combine_statistics(stats))
        return max(4 * sum(int(t.numel()) for t in s.values()) for s in stats)


TASKS: Registry[Task] = Registry("task", "data.task")


def register_task(task: Task) -> Task:
    """Add a task instance under ``task.name`` (a name registered twice is an error)."""
    return TASKS.add(task.name, task)


def get_task(name: str) -> Task:
    """The registered task ``name`` (CeloraError naming data.task otherwise)."""
    if name not in TASKS:
        raise CeloraError(f"unknown data.task '{name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]


def row_index(idx: np.ndarray | torch.Tensor, storage: torch.Tensor) -> torch.Tensor:
    """Row indices as a long tensor on the device of the rows they index (``storage``)."""
    if isinstance(idx, torch.Tensor):
        return idx.to(storage.device, torch.long)
    return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=storage.device)


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A (detached) tensor as float32 numpy, copied to the CPU once whatever its device."""
    return t.detach().float().cpu().numpy()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """Σ_t m_t h_t / Σ_t m_t per row, as float32 numpy (b, hidden)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return to_numpy((hidden * m).sum(1) / m.sum(1).clamp_min(1))


def count_and_sum(correct: torch.Tensor, loss_sum: torch.Tensor) -> tuple[float, float]:
    """(correct predictions, summed loss) of a batch, moved to the CPU in one transfer."""
    c, s = torch.stack([correct.double(), loss_sum.double()]).tolist()
    return float(c), float(s)


# --------------------------------------------------------------------------- classify
class LabelledRows:
    """Mixin of the task datasets: ``labels`` (np view of ``labels_t``) and ``len`` = number of rows."""

    labels_t: torch.Tensor

    @property
    def labels(self) -> np.ndarray:
        return self.labels_t.cpu().numpy()

    def __len__(self) -> int:
        return int(self.labels_t.shape[0])


@dataclass
class Encoded(LabelledRows):
    """A tokenized classification dataset: (N, L) ids and mask, (N,) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels_t: torch.Tensor

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        """Rows ``idx``, trimmed to the longest sequence in the batch (right padding)."""
        index = row_index(idx, self.input_ids)
        mask = self.attention_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        return {
            "input_ids": self.input_ids[index, :length],
            "attention_mask": mask[:, :length],
            "labels": self.labels_t[index],
        }


def encode_texts(tokenizer: Any, texts: Sequence[str], labels: np.ndarray, max_length: int) -> Encoded:
    """Tokenize every text once, right-padded to ``max_length``."""
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


class ClassifyTask(Task):
    """Text → label with a classification head: L = −(1/|b|) Σ log softmax(f(x))_y."""

    name = "classify"

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        return encode_texts(processor, dataset.texts, dataset.labels, max_length)

    def _logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(self._logits(model, batch), batch["labels"])

    def score(self, model: nn.Module, batch: Batch) -> tuple[float, float]:
        logits, y = self._logits(model, batch), batch["labels"]
        return count_and_sum((logits.argmax(-1) == y).sum(), nn.functional.cross_entropy(logits, y, reduction="sum"))

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """Masked mean of the backbone's last hidden states."""
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        return masked_mean(out.hidden_states[-1], batch["attention_mask"])


# --------------------------------------------------------------------------- prompt
PLACEHOLDER = "\x00TEXT\x00"
DEFAULT_INSTRUCTION = "Classify the text. Answer with one of: {labels}."


@dataclass
class PromptData(LabelledRows):
    """Prompt + answer token rows, right-padded: ``target`` holds the answer tokens, IGNORE elsewhere.

    Row layout: prompt (``prompt_len`` tokens) | label word | end token | padding.
    """

    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)
    target: torch.Tensor  # (N, L): input_ids on answer positions, IGNORE elsewhere
    prompt_len: torch.Tensor  # (N,)
    labels_t: torch.Tensor  # (N,) class ids
    verbalizers: list[str]
    verbalizer_ids: list[list[int]]  # tokens of each label word (without the end token)
    end_id: int
    pad_id: int

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        index = row_index(idx, self.input_ids)
        mask = self.attention_mask[index]
        width = max(len(v) for v in self.verbalizer_ids)
        dev = self.input_ids.device
        verb = torch.tensor([v + [-1] * (width - len(v)) for v in self.verbalizer_ids], dtype=torch.long, device=dev)
        return {**answer_rows(self, index, mask), "verbalizer_ids": verb}


class AnswerRows(Protocol):
    """Right-padded prompt + answer rows (the prompt and generative tasks' encoded data)."""

    input_ids: torch.Tensor
    target: torch.Tensor
    prompt_len: torch.Tensor
    labels_t: torch.Tensor
    end_id: int
    pad_id: int


def answer_rows(data: AnswerRows, index: torch.Tensor, mask: torch.Tensor) -> Batch:
    """Rows ``index`` (their attention ``mask``), trimmed to the longest row, with the end and pad token ids."""
    length = max(1, int(mask.sum(dim=1).max()))
    dev = data.input_ids.device
    return {
        "input_ids": data.input_ids[index, :length],
        "attention_mask": mask[:, :length],
        "target": data.target[index, :length],
        "prompt_len": data.prompt_len[index],
        "labels": data.labels_t[index],
        "end_id": torch.tensor(data.end_id, device=dev),
        "pad_id": torch.tensor(data.pad_id, device=dev),
    }


def chat_prompt_parts(tokenizer: Any, instruction: str) -> tuple[str, str]:
    """The prompt text before and after the example's text (chat template if the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": PLACEHOLDER}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"{instruction}\n{PLACEHOLDER}\nanswer: "
    before, sep, after = str(text).partition(PLACEHOLDER)
    if not sep:
        raise CeloraError("data.task 'prompt': the tokenizer's chat template dropped the user message")
    return before, after


def token_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompts(
    tokenizer: Any,
    texts: Sequence[str],
    labels: np.ndarray,
    verbalizers: Sequence[str],
    instruction: str,
    max_length: int,
) -> PromptData:
    """prompt(text) + verbalizer[label] + end token per example; the text is cut so that the row fits."""
    end_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end_id is None:
        raise CeloraError("data.task 'prompt': the tokenizer has no eos or sep token to end an answer")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_id
    verb_ids = [token_ids(tokenizer, v) for v in verbalizers]
    if any(not v for v in verb_ids):
        raise CeloraError("data.verbalizers: every label word must be non-empty")
    if len({tuple(v) for v in verb_ids}) < len(verb_ids):
        raise CeloraError(f"data.verbalizers: label words {list(verbalizers)} tokenize to duplicates")
    before, after = chat_prompt_parts(tokenizer, instruction.format(labels=", ".join(verbalizers)))
    pre, post = token_ids(tokenizer, before), token_ids(tokenizer, after)
    longest = max(len(v) for v in verb_ids) + 1
    budget = max_length - len(pre) - len(post) - longest
    if budget < 1:
        raise CeloraError(
            f"model.max_length {max_length} is too short for the prompt ({len(pre) + len(post) + longest} tokens "
            "without the text)"
        )
    rows, plens = [], []
    for text, y in zip(texts, labels, strict=True):
        prompt = pre + token_ids(tokenizer, text)[:budget] + post
        rows.append(prompt + verb_ids[int(y)] + [end_id])
        plens.append(len(prompt))
    n = len(rows)
    ids = torch.full((n, max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, max_length), dtype=torch.long)
    target = torch.full((n, max_length), IGNORE, dtype=torch.long)
    for r, (row, p) in enumerate(zip(rows, plens, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        target[r, p : len(row)] = torch.tensor(row[p:])
    return PromptData(
        ids,
        mask,
        target,
        torch.tensor(plens, dtype=torch.long),
        torch.as_tensor(labels, dtype=torch.long),
        list(verbalizers),
        verb_ids,
        int(end_id),
        int(pad_id),
    )


class PromptTask(Task):
    """Instruction → label word with a causal LM (no classifier head).

    Loss: −(1/T) Σ_t log p(y_t | y_<t) over the T answer tokens of the batch (label word + end token).
    Score: predicted class = argmax_k Σ_t log p(v_k,t | prompt, v_k,<t); loss_sum = Σ_examples of the
    mean answer-token NLL. Extra metric ``exact_match``: greedy decoding reproduces the gold word.
    """

    name = "prompt"
    head = "lm"
    model_kinds = frozenset({"decoder"})
    zero_shot = True

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        verbalizers = dataset.verbalizers or [str(v) for v in dataset.label_names]
        if len(verbalizers) != dataset.num_classes:
            raise CeloraError(
                f"data.verbalizers: {len(verbalizers)} label words for {dataset.num_classes} classes "
                f"({', '.join(dataset.label_names)})"
            )
        instruction = dataset.instruction or DEFAULT_INSTRUCTION
        return encode_prompts(processor, dataset.texts, dataset.labels, verbalizers, instruction, max_length)

    @staticmethod
    def decoder_hidden(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the decoder body (after its final norm), (b, L, hidden)."""
        return model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state  # type: ignore[operator]

    @staticmethod
    def target_logprobs(model: nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target_t | <t) for every position with a target (flattened, in row order)."""
        pos = (target[:, 1:] != IGNORE).nonzero(as_tuple=True)
        h = hidden[:, :-1][pos]  # hidden state that predicts the next token
        logits = model.get_output_embeddings()(h).float()  # type: ignore[operator]
        tok = target[:, 1:][pos]
        return logits.log_softmax(-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        hidden = self.decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        return -self.target_logprobs(model, hidden, batch["target"]).mean()

    def _candidate_scores(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """(b, K) summed log-likelihood of each label word after each example's prompt.

        Candidate row (r, k) = prompt of row r | label word k, right-padded with 0 (mask 0), built on the
        batch's device."""
        ids, plen, verb = batch["input_ids"], batch["prompt_len"], batch["verbalizer_ids"]
        b, k = ids.shape[0], verb.shape[0]
        vlen = (verb >= 0).sum(1)  # (K,) tokens of each word
        width = int(plen.max()) + int(vlen.max())
        pos = torch.arange(width, device=ids.device)
        prompt = ids.new_zeros((b, width))
        take = min(width, ids.shape[1])
        prompt[:, :take] = ids[:, :take]
        in_prompt = pos.unsqueeze(0) < plen.unsqueeze(1)  # (b, width)
        offset = (pos.unsqueeze(0) - plen.unsqueeze(1)).unsqueeze(1).expand(b, k, width)  # position in the word
        in_word = (offset >= 0) & (offset < vlen.view(1, k, 1))
        word = verb.unsqueeze(0).expand(b, k, verb.shape[1]).gather(2, offset.clamp(0, verb.shape[1] - 1))
        cand = torch.where(in_word, word, torch.where(in_prompt.unsqueeze(1), prompt.unsqueeze(1), 0))
        mask = (in_word | in_prompt.unsqueeze(1)).long()
        target = torch.where(in_word, word, IGNORE)
        cand, mask, target = (t.reshape(b * k, width) for t in (cand, mask, target))
        hidden = self.decoder_hidden(model, cand, mask)
        lp = self.target_logprobs(model, hidden, target)
        owner = (target[:, 1:] != IGNORE).nonzero(as_tuple=True)[0]
        return lp.new_zeros(b * k).index_add_(0, owner, lp).view(b, k)

    def score(self, model: nn.Module, batch: Batch) -> tuple[float, float]:
        verb = batch["verbalizer_ids"]
        hidden = self.decoder_hidden(model, batch["input_ids"], batch["attention_mask"])
        target = batch["target"]
        lp = self.target_logprobs(model, hidden, target)
        owner = (target[:, 1:] != IGNORE).nonzero(as_tuple=True)[0]
        b = target.shape[0]
        per_row = lp.new_zeros(b).index_add_(0, owner, -lp) / torch.bincount(owner, minlength=b).clamp_min(1)
        if verb.shape[1] == 1:  # every word is one token: the first answer position scores them all in one forward
            last = hidden[torch.arange(b, device=hidden.device), batch["prompt_len"] - 1]
            logp = model.get_output_embeddings()(last).float().log_softmax(-1)  # type: ignore[operator]
            scores = logp[:, verb[:, 0]]
        else:
            scores = self._candidate_scores(model, batch)
        return count_and_sum((scores.argmax(-1) == batch["labels"]).sum(), per_row.sum())

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """Mean of the decoder's last hidden states over the prompt tokens (the answer excluded)."""
        return self.prompt_mean(self.decoder_hidden(model, batch["input_ids"], batch["attention_mask"]), batch)

    @staticmethod
    def prompt_mean(hidden: torch.Tensor, batch: Batch) -> np.ndarray:
        """mean_t<prompt_len h_t per row (right-padded batch), (b, hidden) float32."""
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return masked_mean(hidden, positions < batch["prompt_len"].unsqueeze(1))

    def _greedy(self, model: nn.Module, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        return self.greedy_answers(model, batch, max_new_tokens)

    @staticmethod
    def greedy_answers(model: nn.Module, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt (left-padded batch), cut before the end token."""
        end_id, pad_id = (int(v) for v in torch.stack([batch["end_id"], batch["pad_id"]]).tolist())
        ids, plen = batch["input_ids"], batch["prompt_len"]
        width = int(plen.max())
        src = torch.arange(width, device=ids.device).unsqueeze(0) - (width - plen).unsqueeze(1)  # (b, width)
        mask = (src >= 0).long()  # left padding: row r's prompt fills the last plen[r] positions
        left = torch.where(src >= 0, ids.gather(1, src.clamp_min(0)), pad_id)
        out = model.generate(  # type: ignore[operator]
            input_ids=left,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=end_id,
        )[:, width:]
        answers = []
        for row in out.tolist():
            answers.append(row[: row.index(end_id)] if end_id in row else row)
        return answers

    @classmethod
    def greedy_answers_by_forward(cls, model: nn.Module, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of each prompt without a KV cache: every step runs the decoder over
        prompt + answer so far and appends argmax_v p(v | ·) (for models whose decoder is not a plain
        ``generate`` target, e.g. a VLM with bound images); cut before the end token."""
        end_id, pad_id = (int(v) for v in torch.stack([batch["end_id"], batch["pad_id"]]).tolist())
        dev = batch["input_ids"].device
        rows = [row[:p] for row, p in zip(batch["input_ids"].tolist(), batch["prompt_len"].tolist(), strict=True)]
        answers: list[list[int]] = [[] for _ in rows]
        open_rows = list(range(len(rows)))
        for _ in range(max_new_tokens):
            if not open_rows:
                break
            seqs = [rows[r] + answers[r] for r in range(len(rows))]  # every row: images bind per row
            width = max(len(seqs[r]) for r in open_rows)
            padded = [(x + [pad_id] * width)[:width] for x in seqs]
            lengths = [min(len(x), width) for x in seqs]
            ids = torch.tensor(padded, dtype=torch.long, device=dev)
            mask = (
                torch.arange(width, device=dev).unsqueeze(0) < torch.tensor(lengths, device=dev).unsqueeze(1)
            ).long()
            hidden = cls.decoder_hidden(model, ids, mask)
            last = hidden[torch.arange(len(rows), device=dev), mask.sum(1) - 1]
            nxt = model.get_output_embeddings()(last).argmax(-1).tolist()  # type: ignore[operator]
            for r in list(open_rows):
                if nxt[r] == end_id:
                    open_rows.remove(r)
                else:
                    answers[r].append(int(nxt[r]))
        return answers

    def extra_metrics(self, model: nn.Module, batch: Batch) -> dict[str, float]:
        """exact_match: greedy generation (up to the longest label word + 1 tokens) equals the gold word."""
        words = batch_verbalizers(batch)
        answers = self._greedy(model, batch, max(len(v) for v in words) + 1)
        hits = sum(a == words[y] for a, y in zip(answers, batch["labels"].tolist(), strict=True))
        return {"exact_match": float(hits)}


def batch_verbalizers(batch: Batch) -> list[list[int]]:
    """Label-word token ids carried in a prompt batch (``verbalizer_ids``, padded with −1)."""
    return [[t for t in row if t >= 0] for row in batch["verbalizer_ids"].tolist()]


register_task(ClassifyTask())
register_task(PromptTask())
