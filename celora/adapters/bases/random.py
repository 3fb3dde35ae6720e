"""`random` (the paper's): A random, B = 0, C = I; A, B train locally (unless a method freezes them).

A is kaiming-uniform as PEFT's LoRA (bound 1/√in) or N(0, 1e-3²) (``init = "paper"``). ΔW = 0 at start.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from celora.adapters.bases.base import AdapterBasis, register_basis

if TYPE_CHECKING:
    from celora.adapters.trilora import TriLoraLinear


@register_basis
class RandomBasis(AdapterBasis):
    name = "random"
    description = "A random (kaiming or N(0, 1e-3²)), B = 0, C = I; A, B train"

    def init_layer(self, layer: TriLoraLinear, *, seed: int, init: str) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        a = torch.empty(layer.lora_A.shape)
        if init == "paper":
            a.normal_(0.0, 1e-3, generator=gen)
        else:
            # kaiming_uniform_(a=sqrt(5)) on PEFT's (r × in) weight: bound = 1/sqrt(in)
            bound = 1.0 / math.sqrt(layer.lora_A.shape[0])
            a.uniform_(-bound, bound, generator=gen)
        layer.lora_A.copy_(a.to(layer.lora_A))
        layer.lora_C.copy_(torch.eye(layer.rank))
        layer.lora_B.zero_()
