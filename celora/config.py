"""Experiment configuration: pydantic models, TOML loading and ``--set key=value`` overrides.

Every error is one line that names the field (``data.alpha: ...``) or the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from celora.errors import CeloraError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "minilm"
    rank: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, description="LoRA alpha; default = rank (scaling 1)")
    targets: list[str] | None = Field(None, min_length=1, description="module names to adapt; default per model")
    dropout: float = Field(0.0, ge=0, lt=1)
    init: Literal["kaiming", "paper"] = "kaiming"
    basis: Literal["random", "svd"] = "random"
    train_ab: bool = Field(True, description="train A and B locally (false: only C and the head train)")
    train_c: bool = Field(True, description="train C (false: C stays at its init, I for the random basis: a control)")
    max_length: int = Field(128, ge=8, le=4096)
    projector_hidden: int | None = Field(
        None, ge=1, le=65536, description="VLM only: width of the projector's hidden layer (default: the LM's hidden)"
    )


class DataConfig(_Section):
    name: str = "bbcnews"
    partition: Literal["iid", "dirichlet", "pathological", "natural"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)
    column: str | None = None
    path: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    image_column: str | None = Field(None, description="column of image file paths (relative to data.path)")
    image_size: int = Field(56, ge=14, le=518, description="images are resized to image_size² (ViT patch 14)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    global_test_fraction: float = Field(0.1, gt=0, lt=1)
    train_per_client: int | None = Field(None, ge=1)
    test_per_client: int | None = Field(None, ge=1, description="cap on each client's test split (stratified)")
    max_samples: int | None = Field(None, ge=2)
    task: str | None = Field(None, description="classify | prompt | … (celora.data.tasks); default per model")
    instruction: str | None = Field(None, description="prompt task: the instruction ({labels} = the label words)")
    verbalizers: list[str] | None = Field(None, min_length=2, description="prompt task: one answer word per label")


class TrainConfig(_Section):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    head_lr: float | None = Field(None, gt=0, description="learning rate of the task head; default = lr")
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1, description="cap on optimizer steps per client and round")
    eval_batch_size: int = Field(64, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads; default = all cores")


class AggregationConfig(_Section):
    beta: float = Field(0.5, ge=0, le=1, description="weight of data similarity vs parameter similarity")
    lam: float = Field(1.0, ge=0, description="strength of similarity in the learned weights (0 = FedAvg)")
    head: Literal["local", "shared"] | None = Field(None, description="head policy; default per method")
    distance_method: Literal["exact", "fast", "auto"] = "auto"
    warmup_rounds: int = Field(0, ge=0, description="first k rounds run warmup_method (e.g. FedIT to align A, B)")
    warmup_method: str = "fedit"


class PayloadConfig(_Section):
    dtype: Literal["fp32", "fp16", "int8"] = "fp32"
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


class ExperimentConfig(_Section):
    method: str = "celora"
    seed: int = 0
    rounds: int = Field(3, ge=1)
    num_clients: int = Field(10, ge=1)
    clients_per_round: int | None = Field(None, ge=1)
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    payload: PayloadConfig = Field(default_factory=PayloadConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)

    @model_validator(mode="after")
    def _check(self) -> ExperimentConfig:
        if self.clients_per_round is not None and self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) > num_clients ({self.num_clients})")
        return self

    @property
    def sampled_per_round(self) -> int:
        return self.clients_per_round or self.num_clients


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "config"
        msg = e["msg"].replace("Value error, ", "")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
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


ADAPTER_KEYS = ("rank", "alpha", "targets", "dropout", "init", "basis", "train_ab", "train_c")


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


def build_config(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a raw dict into an ExperimentConfig (CeloraError naming the field on failure)."""
    data = _merge_adapter_section(data)
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
    return build_config(apply_overrides(data, overrides or []))


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (None values omitted)."""
    import tomli_w

    return tomli_w.dumps(cfg.model_dump(exclude_none=True))
