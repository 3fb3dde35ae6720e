import struct

import pytest
import torch

from celora.fl.payload import Layout, PayloadError, decode, encode, expected_size, framing_bytes


def _c_tensors(layers=12, r=8):
    g = torch.Generator().manual_seed(0)
    return {
        f"bert.encoder.layer.{i}.attention.self.{m}.lora_C": torch.randn(r, r, generator=g)
        for i in range(layers // 2)
        for m in ("query", "value")
    }


def test_round_trip_fp32_exact_and_framing_small():
    t = _c_tensors()
    lay = Layout.of(t)
    blob = encode(t, lay, "fp32")
    out = decode(blob, lay, "fp32")
    assert all(torch.equal(out[k], t[k]) for k in t)
    assert len(blob) - framing_bytes(blob) == 12 * 64 * 4
    assert framing_bytes(blob) < 120  # one stacked entry, not 12 headers
    assert lay.tensor_bytes("fp32") == 12 * 64 * 4


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("int8", 2e-2)])
def test_reduced_precision_round_trip(dtype, tol):
    t = _c_tensors()
    lay = Layout.of(t)
    blob = encode(t, lay, dtype)
    out = decode(blob, lay, dtype)
    for k in t:
        assert (out[k] - t[k]).abs().max() <= tol * t[k].abs().max()
    assert len(blob) < len(encode(t, lay, "fp32"))


def test_mixed_factors_are_grouped():
    t = {
        "l.lora_A": torch.ones(6, 2),
        "l.lora_C": torch.eye(2),
        "l.lora_B": torch.ones(2, 5),
        "classifier.weight": torch.ones(3, 6),
        "classifier.bias": torch.zeros(3),
    }
    lay = Layout.of(t)
    assert set(lay.groups()) == {"A:6x2", "C:2x2", "B:2x5", "head:3x6", "head:3"}
    out = decode(encode(t, lay), lay)
    assert all(torch.equal(out[k], t[k]) for k in t)


def test_rejects_wrong_shape():
    t = _c_tensors()
    lay = Layout.of(t)
    bad = {k: torch.zeros(7, 7) for k in t}
    with pytest.raises(PayloadError, match="unknown tensor 'C:7x7'"):
        decode(encode(bad, Layout.of(bad)), lay)
    # the right entry name with a wrong stacked shape (one layer short)
    from safetensors.torch import save

    blob = save({"C:8x8": torch.zeros(11, 8, 8)}, metadata={"wire": "fp32"})
    with pytest.raises(PayloadError, match="expected fp32 \\(12, 8, 8\\)"):
        decode(blob, lay)


def test_rejects_nan_and_inf():
    t = _c_tensors()
    lay = Layout.of(t)
    for val in (float("nan"), float("inf")):
        t2 = dict(t)
        k = next(iter(t2))
        t2[k] = t2[k].clone()
        t2[k][0, 0] = val
        with pytest.raises(PayloadError, match="NaN or Inf"):
            decode(encode(t2, lay), lay)


def test_rejects_unknown_and_missing_keys():
    t = _c_tensors()
    lay = Layout.of(t)
    extra = dict(t)
    extra["evil.lora_A"] = torch.zeros(3, 3)
    with pytest.raises(PayloadError, match="unknown tensor"):
        decode(encode(extra, Layout.of(extra)), lay)
    fewer = dict(list(t.items())[:2])
    with pytest.raises(PayloadError, match="expected|lacks"):
        decode(encode(fewer, Layout.of(fewer)), lay)


def test_rejects_oversize_malformed_and_wrong_dtype():
    t = _c_tensors()
    lay = Layout.of(t)
    blob = encode(t, lay)
    with pytest.raises(PayloadError, match="oversize"):
        decode(blob + b"\0" * 10_000, lay, max_bytes=expected_size(lay, "fp32") * 2)
    with pytest.raises(PayloadError, match="malformed"):
        decode(b"garbage!", lay)
    with pytest.raises(PayloadError, match="malformed"):
        decode(struct.pack("<Q", 10**9) + b"{}", lay)
    with pytest.raises(PayloadError, match="wire dtype"):
        decode(encode(t, lay, "fp16"), lay, "fp32")


def test_encode_requires_all_names():
    t = _c_tensors()
    lay = Layout.of(t)
    with pytest.raises(PayloadError, match="lacks"):
        encode(dict(list(t.items())[:1]), lay)
