"""Experiment configuration: pydantic models, TOML loading and ``--set key=value`` overrides.

Every error is one line that names the field (``data.alpha: ...``) or the file.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from celora.errors import CeloraError

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str) -> str:
    """Validate the spelling of ``train.device`` (whether the device exists is checked when a run starts)."""
    if not DEVICE_PATTERN.match(name):
        raise ValueError(f"'{name}' is not a device: expected auto, cpu, cuda, cuda:N or mps")
    return name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field("minilm", description="model zoo name (`celora models`) or a local Hugging Face model folder")
    rank: int = Field(8, ge=1, le=1024, description="adapter rank r (C is r×r)")
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = rank (scaling 1)")
    targets: list[str] | Literal["all-linear"] | None = Field(
        None,
        description='module names to adapt, or "all-linear" (every linear layer of the blocks, not the LM head or '
        "a task head); default per model",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input x (0 = off)")
    init: Literal["kaiming", "paper"] = Field(
        "kaiming", description="init of A: kaiming-uniform as PEFT's LoRA, or N(0, 1e-3²) as in the authors' code"
    )
    basis: Literal["random", "svd", "orthogonal", "gradient"] = Field(
        "random",
        description="how A, B, C start: random, svd (of W0), orthogonal or gradient (these two freeze A, B)",
    )
    heads: int = Field(
        1, ge=1, le=256, description="orthogonal basis: split the rank into h heads, each with a trainable scale"
    )
    gradient_samples: int = Field(
        64, ge=1, le=100_000, description="gradient basis: examples in the server's public proxy set (no client data)"
    )
    train_ab: bool = Field(True, description="train A and B locally (false: only C and the head train)")
    train_c: bool = Field(True, description="train C (false: C stays at its init, I for the random basis: a control)")
    max_length: int = Field(128, ge=8, le=4096, description="maximum tokens per example (longer inputs are cut)")
    projector_hidden: int | None = Field(
        None, ge=1, le=65536, description="VLM only: width of the projector's hidden layer (default: the LM's hidden)"
    )
    projector: Literal["fedavg", "pretrained"] = Field(
        "fedavg",
        description="VLM only: the projector trains on the clients and is FedAvg'd, or is pre-aligned once on "
        "public images (model.projector_data) and frozen, so it never travels",
    )
    projector_data: str | None = Field(
        None,
        description="pretrained projector: the public image dataset (default: mnist5k for digits, else the rows "
        "of data.name the run does not load)",
    )
    projector_steps: int = Field(
        100, ge=1, le=100_000, description="pretrained projector: optimizer steps (batch train.batch_size, lr train.lr)"
    )

    @model_validator(mode="after")
    def _check_combinations(self) -> ModelConfig:
        if self.rank % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide rank ({self.rank})")
        if self.projector_data is not None and self.projector != "pretrained":
            raise ValueError("model.projector_data needs model.projector = 'pretrained'")
        return self


class MixtureComponent(_Section):
    """One component of a task mixture: a dataset (or file) in its own format, spread over its own clients."""

    name: str | None = Field(None, description="a shipped dataset (`celora datasets`)")
    path: str | None = Field(None, description="or your own file (its format: the keys below)")
    label: str | None = Field(None, description="the component's name in results (default: name or file stem)")
    clients: int = Field(1, ge=1, description="clients holding this component (its rows split iid among them)")
    max_samples: int | None = Field(None, ge=2, description="a seeded subset of this size")
    format: Literal["auto", "columns", "alpaca", "chat"] = Field("auto", description="generate task: as data.format")
    prompt_column: str = Field("prompt", description="generate task: as data.prompt_column")
    response_column: str = Field("response", description="generate task: as data.response_column")
    system_column: str | None = Field(None, description="generate task: as data.system_column")
    text_column: str = Field("text", description="classification: as data.text_column")
    label_column: str = Field(
        "label", description="classification: as data.label_column; on a shipped set, one of its columns to predict"
    )
    instruction: str | None = Field(None, description="the component's instruction (classification sets as prompts)")

    @model_validator(mode="after")
    def _one_source(self) -> MixtureComponent:
        if (self.name is None) == (self.path is None):
            raise ValueError("data.mixture: give each component exactly one of name or path")
        return self

    @property
    def title(self) -> str:
        return self.label or self.name or Path(str(self.path)).stem


class DataConfig(_Section):
    name: str = Field("bbcnews", description="shipped dataset (`celora datasets`); ignored when data.path is set")
    partition: Literal["iid", "dirichlet", "pathological", "natural"] = Field(
        "dirichlet",
        description="how one dataset is split into clients: iid, Dirichlet label skew, k classes each, or by a column",
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration over labels (smaller = more skewed)")
    classes_per_client: int = Field(2, ge=1, description="pathological partition: labels per client")
    column: str | None = Field(None, description="natural partition: the column whose values define the clients")
    path: str | None = Field(None, description="your own data: a CSV, JSONL or Parquet file (see docs/tasks.md)")
    text_column: str = Field("text", description="data.path: the column holding the input text")
    label_column: str = Field("label", description="data.path: the column holding the label")
    image_column: str | None = Field(None, description="column of image file paths (relative to data.path)")
    image_size: int = Field(56, ge=14, le=518, description="images are resized to image_size² (ViT patch 14)")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of each client's data held out as its test split")
    global_test_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the dataset held out as the global test set (before partitioning)"
    )
    train_per_client: int | None = Field(None, ge=1, description="cap on each client's train split (stratified)")
    test_per_client: int | None = Field(None, ge=1, description="cap on each client's test split (stratified)")
    max_samples: int | None = Field(None, ge=2, description="use a seeded, label-stratified subset of this size")
    task: str | None = Field(
        None, description="classify | prompt | generate | … (celora.data.tasks, `celora datasets`); default per model"
    )
    format: Literal["auto", "columns", "alpaca", "chat"] = Field(
        "auto",
        description="generate task, own files: columns (data.prompt_column → data.response_column), alpaca "
        "(instruction, input, output), chat (messages); auto detects it from the columns",
    )
    prompt_column: str = Field("prompt", description="generate task, format columns: the column holding the prompt")
    response_column: str = Field(
        "response", description="generate task, format columns: the column holding the response to learn"
    )
    system_column: str | None = Field(None, description="generate task: an optional column of system instructions")
    max_response_tokens: int = Field(
        24, ge=1, description="generate task: rows whose response is longer (in tokens) are skipped and counted"
    )
    summary_features: Literal["input", "input+response"] = Field(
        "input",
        description="what each client's data summary is fitted on: input (the frozen model's pooled features of "
        "the inputs; a decoder's: the prompt tokens) or input+response (generate task: the mean of the prompt-token "
        "and the response-token means, so tasks with the same inputs and different outputs separate)",
    )
    instruction: str | None = Field(None, description="prompt task: the instruction ({labels} = the label words)")
    verbalizers: list[str] | None = Field(None, min_length=2, description="prompt task: one answer word per label")
    sites: list[str] | None = Field(
        None,
        min_length=1,
        description="site-local data: one file per client (.csv/.jsonl/.json/.parquet, the columns of data.path), "
        "each read only by its own client; replaces data.name/data.path and the partition; num_clients = their number",
    )
    labels: list[str] | None = Field(
        None,
        min_length=2,
        description="with data.sites: the declared label space (class ids in this order); default: the union "
        "of the sites' label names, agreed in the setup message",
    )
    mixture: list[MixtureComponent] | None = Field(
        None,
        min_length=2,
        description="a task mixture, one [[data.mixture]] table per component (keys: docs/tasks.md); each client "
        "holds one component; num_clients = Σ clients",
    )
    mixture_alpha: float | None = Field(
        None,
        gt=0,
        description="with data.mixture: clients that mix tasks; each of the Σ clients draws its share of every "
        "component from Dirichlet(α) (smaller = purer clients); default: each client holds one component",
    )
    global_test_path: str | None = Field(
        None,
        description="with data.sites: an optional shared global test file (same columns) for the global score; "
        "without it there is no global test set",
    )

    @property
    def source(self) -> str:
        """Where the rows come from, for banners and logs: the sites' files, the mixture's components, or a
        dataset (or file) and its partition."""
        if self.sites:
            return f"{len(self.sites)} site files (data.sites)"
        if self.mixture:
            return f"mixture of {', '.join(c.title for c in self.mixture)}"
        return f"{self.path or self.name} ({self.partition})"

    @model_validator(mode="after")
    def _check_sites(self) -> DataConfig:
        if self.labels is not None:
            seen: set[str] = set()
            for name in self.labels:
                if not name.strip():
                    raise ValueError("data.labels: empty label name")
                if name in seen:
                    raise ValueError(f"data.labels: label '{name}' is listed twice")
                seen.add(name)
        if self.mixture is not None:
            if self.sites is not None or self.path is not None:
                raise ValueError("data.mixture replaces data.path and data.sites; give one")
            titles = [c.title for c in self.mixture]
            if len(set(titles)) < len(titles):
                raise ValueError(f"data.mixture: component names {titles} repeat (set label)")
        if self.summary_features != "input" and self.task not in (None, "generate"):
            raise ValueError(f"data.summary_features = '{self.summary_features}' needs data.task = 'generate'")
        if self.mixture_alpha is not None and self.mixture is None:
            raise ValueError("data.mixture_alpha needs data.mixture (the components the clients mix)")
        if self.sites is None:
            for key in ("labels", "global_test_path"):
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key} needs data.sites (one file per client)")
            return self
        if self.path is not None:
            raise ValueError("data.sites and data.path both given: data.sites replaces data.path; give one")
        seen = set()
        for k, site in enumerate(self.sites):
            if not site.strip():
                raise ValueError(f"data.sites[{k}]: empty path")
            if site in seen:
                raise ValueError(f"data.sites[{k}]: '{site}' is listed twice (one file per client)")
            seen.add(site)
        return self


class TrainConfig(_Section):
    local_epochs: int = Field(1, ge=1, description="passes over the client's train split per round")
    batch_size: int = Field(16, ge=1, description="training batch size")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the adapter factors")
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head; default = lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per client and round")
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule within each local training: constant, or cosine to 0"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps at the start of each local training")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")
    keep_optimizer: bool = Field(
        False, description="keep each client's AdamW moments across rounds (default: a fresh optimizer per round)"
    )
    threads: int | None = Field(None, ge=1, description="torch threads; default = all cores")
    device: str = Field(
        "auto",
        description="where the frozen base runs: auto (CUDA if available, else CPU) | cpu | cuda | cuda:N | mps",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler; adapters, head and optimizer state stay "
        "fp32) | auto (CPU: fp32, bf16 weights for SmolLM2 only where the CPU has native bf16; CUDA: bf16 where "
        "supported, else fp32; MPS: fp32)",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_device_name(value)


class AggregationConfig(_Section):
    beta: float = Field(0.5, ge=0, le=1, description="weight of data similarity vs parameter similarity")
    lam: float = Field(1.0, ge=0, description="strength of similarity in the learned weights (0 = FedAvg)")
    head: Literal["local", "shared"] | None = Field(
        None,
        description="the task head: local (stays on the client) or shared (travels, mixed like C); default per method",
    )
    distance_method: Literal["exact", "fast", "auto"] = Field(
        "auto", description="OT solver for the data distance: exact (ot.emd2), fast (same values, batched), auto = fast"
    )
    warmup_rounds: int = Field(0, ge=0, description="first k rounds run warmup_method (e.g. FedIT to align A, B)")
    warmup_method: str = Field("fedit", description="method of the warm-up rounds (aggregation.warmup_rounds > 0)")
    max_norm_ratio: float | None = Field(
        None,
        ge=1,
        description="reject an upload whose update norm ‖x_i − x_i^sent‖ exceeds k × the round's median (logged, "
        "counted as rejected); default off",
    )
    clip_norm: float | None = Field(
        None, gt=0, description="clip every update x_i − x_i^sent to this L2 norm before combining; default off"
    )


class PayloadConfig(_Section):
    dtype: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="wire precision of what travels, both ways (int8: one float32 scale per tensor)"
    )
    max_bytes_factor: float = Field(2.0, ge=1.0, description="reject uploads larger than this × expected")


class PrivacyConfig(_Section):
    summary_epsilon: float | None = Field(
        None, gt=0, description="(ε, δ)-DP data summaries (analytic Gaussian mechanism, any ε > 0); none = off"
    )
    summary_delta: float = Field(1e-5, gt=0, lt=1, description="δ of the DP data summaries")
    summary_clip: float = Field(10.0, gt=0, description="L2 clip radius of the pooled features before the summary")
    update_clip: float | None = Field(
        None, gt=0, description="DP on the shared update: L2 clip of (upload − what the client was sent); none = off"
    )
    update_noise: float | None = Field(
        None, ge=0, description="noise multiplier z of the shared update (std z·update_clip); 0 = clip only"
    )
    update_epsilon: float | None = Field(
        None, gt=0, description="target ε of the shared update over the run (solves for update_noise)"
    )
    update_delta: float = Field(1e-5, gt=0, lt=1, description="δ at which the shared update's ε is reported")
    accountant: Literal["rdp", "pld"] = Field("rdp", description="dp-accounting accountant for the update's ε")

    @model_validator(mode="after")
    def _check_update(self) -> PrivacyConfig:
        if self.update_clip is None and (self.update_noise is not None or self.update_epsilon is not None):
            raise ValueError("update_clip is required with update_noise or update_epsilon")
        if self.update_clip is not None and (self.update_noise is None) == (self.update_epsilon is None):
            raise ValueError("with update_clip give exactly one of update_noise or update_epsilon")
        return self


class EvalConfig(_Section):
    batch_size: int = Field(
        64,
        ge=1,
        description="evaluation batch size, the largest that fits: a batch that runs out of memory is halved and "
        "retried (was train.eval_batch_size, still read)",
    )
    every: int = Field(
        1,
        ge=1,
        description="evaluate the task's metrics (local step and after aggregation) every k rounds (the final round "
        "always; other rounds: NaN); generation is the expensive part of a generative task's evaluation",
    )
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="generate task: greedy answers stop after this many tokens; default data.max_response_tokens + 1",
    )
    global_clients: int | None = Field(
        None,
        ge=1,
        description="clients whose final model is evaluated on the global test set: a seeded sample; default "
        "min(num_clients, 10) (summary.json: global_eval)",
    )


class EngineConfig(_Section):
    state: Literal["memory", "disk"] = Field(
        "memory",
        description="where the in-process engine keeps each client's private adapter state between rounds: memory "
        "| disk (one safetensors file per client in a temporary folder, inside the run folder if any: RAM does not "
        "grow with num_clients)",
    )
    parallel_clients: int | Literal["auto"] = Field(
        1,
        description="sampled clients the in-process engine trains and evaluates together (batches stacked, the base "
        "run once, each row its own client's adapter): 1 = one at a time; auto = what GPU memory holds (CPU: "
        "the fastest K timed on the run's own groups)",
    )

    @field_validator("parallel_clients", mode="before")
    @classmethod
    def _clients_or_auto(cls, v: Any) -> Any:
        if v != "auto" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{v!r} is not a number of clients (>= 1) or 'auto'")
        return v


class ExperimentConfig(_Section):
    method: str = Field("celora", description="federated method (see the methods table in the README)")
    seed: int = Field(0, description="seed of the partition, the shared adapter init and training")
    rounds: int = Field(3, ge=1, description="federated rounds")
    num_clients: int = Field(10, ge=1, description="number of clients the dataset is split into")
    clients_per_round: int | None = Field(None, ge=1, description="clients sampled per round; default = all")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the model and its adapters")
    data: DataConfig = Field(default_factory=DataConfig, description="the dataset and its partition into clients")
    train: TrainConfig = Field(default_factory=TrainConfig, description="local training on each client")
    aggregation: AggregationConfig = Field(
        default_factory=AggregationConfig, description="how the server combines what travels"
    )
    payload: PayloadConfig = Field(default_factory=PayloadConfig, description="what travels on the wire")
    privacy: PrivacyConfig = Field(
        default_factory=PrivacyConfig, description="differential privacy of the data summaries and the shared update"
    )
    checkpoint_every: int = Field(
        1,
        ge=0,
        description="write an atomic checkpoint to <run>/checkpoints every k rounds (0 = never); "
        "`celora run --resume RUN_DIR` continues from the last complete one",
    )
    dropout: float = Field(
        0.0, ge=0, le=1, description="probability that a sampled client fails after local training (upload lost)"
    )
    dropout_before: float = Field(
        0.0, ge=0, le=1, description="probability that a sampled client fails before local training"
    )
    min_clients: int | None = Field(
        None, ge=1, description="Flower: start once this many SuperNodes are connected (default: all num_clients)"
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="what is evaluated, how often, in what batches")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="the in-process engine's resources")

    @model_validator(mode="before")
    @classmethod
    def _clients_from_sites(cls, data: Any) -> Any:
        """With data.sites, num_clients is the number of files (a conflicting explicit value is an error)."""
        if not isinstance(data, dict):
            return data
        section = data.get("data")
        sites = section.get("sites") if isinstance(section, dict) else getattr(section, "sites", None)
        mixture = section.get("mixture") if isinstance(section, dict) else getattr(section, "mixture", None)
        if isinstance(mixture, list) and mixture and not sites:
            total = sum(int(c.get("clients", 1) if isinstance(c, dict) else c.clients) for c in mixture)
            given = data.get("num_clients")
            if given is not None and given != total:
                raise ValueError(f"num_clients = {given} but data.mixture's components hold {total} clients")
            return {**data, "num_clients": total}
        if not isinstance(sites, list) or not sites:
            return data
        given = data.get("num_clients")
        if given is not None and given != len(sites):
            raise ValueError(f"num_clients = {given} but data.sites lists {len(sites)} files (one client per file)")
        return {**data, "num_clients": len(sites)}

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) > num_clients ({self.num_clients})")
        if self.min_clients is not None and self.min_clients > self.num_clients:
            raise ValueError(f"min_clients ({self.min_clients}) > num_clients ({self.num_clients})")
        for key in ("dropout", "dropout_before"):
            if getattr(self, key) >= 1.0:
                raise ValueError(f"{key} = 1.0: every sampled client fails, nobody would ever upload (use < 1)")
        k = self.eval.global_clients
        if k is not None and k > self.num_clients:
            raise ValueError(f"eval.global_clients ({k}) > num_clients ({self.num_clients})")
        return self

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients


def _type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``int | None``, ``"iid" | "dirichlet"``, ``list[str]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, type(int | None)):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default_text(value: Any) -> str:
    """A default as it would be written in TOML (``None``: unset, the description says what happens)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def config_reference() -> list[dict[str, str]]:
    """Every key of an experiment config, in declaration order: section, key (dotted), type, default, description.

    Generated from the pydantic models: the descriptions are written once, in ``Field(description=...)``.
    """
    rows: list[dict[str, str]] = []

    def walk(model: type[BaseModel], section: str) -> None:
        for name, field in model.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                walk(field.annotation, name)
                continue
            rows.append(
                {
                    "section": section,
                    "key": f"{section}.{name}" if section else name,
                    "type": _type_name(field.annotation),
                    "default": _default_text(field.get_default(call_default_factory=True)),
                    "description": field.description or "",
                }
            )

    walk(ExperimentConfig, "")
    return rows


def section_descriptions() -> dict[str, str]:
    """Section name → its description ("" for the top-level keys)."""
    out = {"": "top-level keys"}
    for name, field in ExperimentConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            out[name] = field.description or ""
    return out


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(msg if loc == "config" or msg.startswith(f"{loc}.") else f"{loc}: {msg}")
    return "invalid config: " + "; ".join(parts)


def parse_value(text: str) -> Any:
    """A ``--set`` value as TOML (numbers, booleans, lists, quoted strings); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a raw config dict (validation happens afterwards)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CeloraError(f"--set {item!r}: expected key=value (e.g. data.alpha=0.1)")
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise CeloraError(f"--set {key}: '{p}' is not a section")
            node = child
        node[leaf] = parse_value(raw.strip())
    return out


ADAPTER_KEYS = (
    "rank",
    "alpha",
    "targets",
    "dropout",
    "init",
    "basis",
    "heads",
    "gradient_samples",
    "train_ab",
    "train_c",
)


def _merge_adapter_section(data: dict[str, Any]) -> dict[str, Any]:
    """``[adapter]`` is another name for the adapter keys of ``[model]`` (rank, basis, train_ab, …)."""
    if "adapter" not in data:
        return data
    section = data["adapter"]
    if not isinstance(section, dict):
        raise CeloraError("invalid config: adapter: expected a section ([adapter] with rank, basis, …)")
    model = dict(data.get("model") or {})
    for key, value in section.items():
        if key not in ADAPTER_KEYS:
            raise CeloraError(f"invalid config: adapter.{key}: unknown key (adapter keys: {', '.join(ADAPTER_KEYS)})")
        if key in model:
            raise CeloraError(f"invalid config: adapter.{key} and model.{key} are the same setting; give one")
        model[key] = value
    return {**{k: v for k, v in data.items() if k != "adapter"}, "model": model}


def _migrate_eval_batch_size(data: dict[str, Any]) -> dict[str, Any]:
    """``train.eval_batch_size`` moved to ``eval.batch_size``: read it there (with a one-line warning)."""
    train = data.get("train")
    if not isinstance(train, dict) or "eval_batch_size" not in train:
        return data
    section = data.get("eval") or {}
    if not isinstance(section, dict):
        return data  # validation names the bad [eval] section
    if "batch_size" in section:
        raise CeloraError(
            "invalid config: train.eval_batch_size and eval.batch_size are the same setting; give eval.batch_size"
        )
    value = train["eval_batch_size"]
    logging.getLogger("celora").warning(
        "train.eval_batch_size is now eval.batch_size (read as eval.batch_size = %s)", value
    )
    train = {k: v for k, v in train.items() if k != "eval_batch_size"}
    return {**data, "train": train, "eval": {**section, "batch_size": value}}


def build_config(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an ExperimentConfig (CeloraError naming the field on failure)."""
    data = _migrate_eval_batch_size(_merge_adapter_section(data))
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise CeloraError(_one_line(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML file (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CeloraError(f"config file not found: {p}")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise CeloraError(f"{p}: not valid TOML ({err})") from None
    overrides = overrides or []
    keys = {item.partition("=")[0].strip() for item in overrides}
    if "data.sites" in keys and "num_clients" not in keys:  # the sites replace the file's data source
        data = {k: v for k, v in data.items() if k != "num_clients"}
    return build_config(apply_overrides(data, overrides))


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (None values omitted)."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(exclude_none=True))
