"""Export a client's tri-matrix adapter as a standard PEFT LoRA folder.

Merged factors: A′ = A C, B′ = B, so s · (A′ B′)ᵀ = ΔW. In PEFT's layout lora_A.weight = A′ᵀ (r × in)
and lora_B.weight = B′ᵀ (out × r), with the same scaling lora_alpha / r. The head travels as
``modules_to_save``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from celora.adapters.inject import AdapterSpec, adapter_layers
from celora.adapters.trilora import TriLoraLinear


def _strip_adapters(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every TriLoraLinear replaced by its frozen base linear."""
    clean = copy.deepcopy(model)
    for name, layer in list(adapter_layers(clean).items()):
        parent_name, _, child = name.rpartition(".")
        parent = clean.get_submodule(parent_name) if parent_name else clean
        setattr(parent, child, layer.base)
    return clean


class PeftExporter:
    """Builds one PEFT-wrapped copy of the frozen base, then writes any client's adapter into it."""

    def __init__(
        self, model: nn.Module, spec: AdapterSpec, head_modules: Sequence[str], base_path: str | None = None
    ) -> None:
        self.layers = list(adapter_layers(model))
        self.head_modules = list(head_modules)
        config = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT computes alpha / r in float
            lora_dropout=spec.dropout,
            target_modules=list(spec.targets),
            modules_to_save=self.head_modules or None,
            init_lora_weights=False,
            bias="none",
        )
        self.peft: PeftModel = get_peft_model(_strip_adapters(model), config)  # type: ignore[assignment]
        self.peft.peft_config["default"].base_model_name_or_path = base_path
        self._params = dict(self.peft.named_parameters())
        self._card: str | None = None  # PEFT's README.md model card: the same for every client

    def _param(self, suffix: str) -> torch.nn.Parameter:
        key = "base_model.model." + suffix
        if key not in self._params:
            raise KeyError(f"PEFT model has no parameter {key}")
        return self._params[key]

    @torch.no_grad()
    def load(self, tensors: dict[str, torch.Tensor]) -> PeftModel:
        """Write a client's view (all of A, B, C and head) into the PEFT model: A′ = A C, B′ = B."""
        for mod in self.layers:
            a, c, b = (tensors[f"{mod}.lora_{f}"] for f in ("A", "C", "B"))
            self._param(f"{mod}.lora_A.default.weight").copy_((a @ c).T)
            self._param(f"{mod}.lora_B.default.weight").copy_(b.T)
        for head in self.head_modules:
            wrapper: nn.Module = self.peft.base_model.model.get_submodule(head)  # type: ignore[operator,union-attr]
            original: nn.Module = wrapper.original_module  # type: ignore[assignment]
            for pname, _ in original.named_parameters():
                self._param(f"{head}.modules_to_save.default.{pname}").copy_(tensors[f"{head}.{pname}"])
        return self.peft

    def save(self, tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write adapter_config.json + adapter_model.safetensors (+ PEFT's README.md card) for this client's adapter.

        The model card does not depend on the client: PEFT renders it once (≈ 0.1 s), later saves copy it."""
        peft = self.load(tensors)
        if self._card is not None:
            peft.create_or_update_model_card = self._copy_card  # type: ignore[method-assign]
        peft.save_pretrained(str(out_dir))
        card = Path(out_dir) / "README.md"
        if self._card is None and card.is_file():
            self._card = card.read_text(encoding="utf-8")
        return Path(out_dir)

    def _copy_card(self, output_dir: str) -> None:
        (Path(output_dir) / "README.md").write_text(self._card or "", encoding="utf-8")


def merged_factors(layer: TriLoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """(A′, B′) = (A C, B): the ordinary LoRA pair equal to this tri-matrix adapter."""
    return (layer.lora_A @ layer.lora_C).detach(), layer.lora_B.detach()
