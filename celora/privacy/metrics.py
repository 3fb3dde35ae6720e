"""Reconstruction metrics: ROUGE (rouge-score), token F1, PSNR / SSIM (scikit-image), mean with a 95 % interval."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["image_scores", "mean_ci", "summarize", "text_scores", "token_f1"]

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")
_SCORER: Any = None


def _scorer() -> Any:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    return _SCORER


def token_f1(reference: Sequence[int], hypothesis: Sequence[int]) -> float:
    """F1 of the token multisets: ``2 |ref ∩ hyp| / (|ref| + |hyp|)`` (1.0 when both are empty)."""
    if not reference and not hypothesis:
        return 1.0
    overlap = sum((Counter(reference) & Counter(hypothesis)).values())
    return 2.0 * overlap / (len(reference) + len(hypothesis))


def text_scores(reference: str, hypothesis: str, ref_ids: Sequence[int], hyp_ids: Sequence[int]) -> dict[str, float]:
    """ROUGE-1/2/L F1 of the decoded texts (rouge-score) and token F1 of the ids."""
    s = _scorer().score(reference, hypothesis)
    out = {k: float(s[k].fmeasure) for k in ROUGE_KEYS}
    out["token_f1"] = token_f1(ref_ids, hyp_ids)
    return out


def image_scores(reference: np.ndarray, reconstruction: np.ndarray) -> dict[str, float]:
    """PSNR (dB) and SSIM of two grayscale images in [0, 1] (scikit-image, data_range 1)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = np.clip(np.asarray(reference, dtype=np.float64), 0, 1)
    rec = np.clip(np.asarray(reconstruction, dtype=np.float64), 0, 1)
    psnr = float(peak_signal_noise_ratio(ref, rec, data_range=1.0))
    return {"psnr": min(psnr, 100.0), "ssim": float(structural_similarity(ref, rec, data_range=1.0))}


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean and the half-width of its 95 % Student-t interval (0 for one value): ``t_{0.975, n-1} s / sqrt(n)``."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    if x.size == 1:
        return {"mean": float(x[0]), "ci95": 0.0, "n": 1}
    from scipy.stats import t

    half = float(t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return {"mean": float(x.mean()), "ci95": half, "n": int(x.size)}


def summarize(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{key: mean_ci([row[key] for row in rows])}`` over the keys present in the rows."""
    return {k: mean_ci([r[k] for r in rows if k in r]) for k in keys if any(k in r for r in rows)}
