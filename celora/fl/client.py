"""Client-side work on the shared frozen model: local training, evaluation, feature pooling.

Inputs are tokenized once for the whole dataset (``Encoded``); a client is a set of row indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


@dataclass
class Encoded:
    """A tokenized dataset: (N, L) ids and mask, (N,) labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, idx: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``idx``, trimmed to the longest sequence in the batch (right padding)."""
        index = torch.as_tensor(idx, dtype=torch.long)
        mask = self.attention_mask[index]
        length = max(1, int(mask.sum(dim=1).max()))
        return self.input_ids[index, :length], mask[:, :length], self.labels[index]


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], labels: np.ndarray, max_length: int
) -> Encoded:
    """Tokenize every text once, right-padded to ``max_length``."""
    tokenizer.padding_side = "right"
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(enc["input_ids"], enc["attention_mask"], torch.as_tensor(labels, dtype=torch.long))


@dataclass
class TrainResult:
    loss: float
    steps: int


def train_local(
    model: nn.Module,
    data: Encoded,
    idx: np.ndarray,
    params: list[nn.Parameter],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    head_params: Sequence[nn.Parameter] = (),
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    max_steps: int | None = None,
    seed: int = 0,
) -> TrainResult:
    """AdamW on ``params`` (head at ``head_lr``) for ``epochs`` passes over the client's rows.

    Minimises the mean cross-entropy L = −(1/|b|) Σ log softmax(f(x))_y per batch.
    """
    head_ids = {id(p) for p in head_params}
    groups = [{"params": [p for p in params if id(p) not in head_ids], "lr": lr}]
    if head_params:
        groups.append({"params": list(head_params), "lr": head_lr or lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    gen = np.random.default_rng(seed)
    model.train()
    losses: list[float] = []
    steps = 0
    for _ in range(epochs):
        order = gen.permutation(idx)
        for start in range(0, len(order), batch_size):
            ids, mask, y = data.batch(order[start : start + batch_size])
            out = model(input_ids=ids, attention_mask=mask)
            loss = nn.functional.cross_entropy(out.logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: Encoded, idx: np.ndarray, batch_size: int = 64) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the model on rows ``idx``."""
    if len(idx) == 0:
        return float("nan"), float("nan")
    model.eval()
    correct, loss_sum = 0, 0.0
    for start in range(0, len(idx), batch_size):
        ids, mask, y = data.batch(idx[start : start + batch_size])
        logits = model(input_ids=ids, attention_mask=mask).logits
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
    return correct / len(idx), loss_sum / len(idx)


@torch.no_grad()
def pooled_features(model: nn.Module, data: Encoded, idx: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """One vector per example: masked mean of the backbone's last hidden states, (n, hidden)."""
    model.eval()
    out = []
    for start in range(0, len(idx), batch_size):
        ids, mask, _ = data.batch(idx[start : start + batch_size])
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * m).sum(1) / m.sum(1).clamp_min(1)).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)
