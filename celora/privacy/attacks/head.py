"""Head leakage (iDLG / Inverting Gradients' fully-connected-layer result).

For a linear head z = W h + b under cross-entropy, ∇b = (1/B) Σ_i (p_i − y_i) and ∇W = (1/B) Σ_i (p_i − y_i) h_iᵀ.
At B = 1 the only negative entry of ∇b is the label (p_y − 1 < 0 ≤ p_k), and every row k gives the pooled
feature exactly: h = ∇W_k / ∇b_k (the row with the largest |∇b_k| is used). For B > 1 the labels present are
the negative entries of ∇b (a class whose summed p − y is negative), and ∇W_k / ∇b_k for such a k is a weighted
mean of the features of the examples of class k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["HeadLeak", "head_leak"]


@dataclass
class HeadLeak:
    labels: list[int]  # classes with a negative bias gradient, most negative first
    feature: torch.Tensor  # ∇W_k / ∇b_k for the most negative k (B = 1: the pooled feature)


def head_leak(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> HeadLeak:
    """Labels and the pooled feature from a linear head's gradient (K × h weight, K bias)."""
    g = bias_grad.detach().to(torch.float64).flatten()
    w = weight_grad.detach().to(torch.float64)
    order = torch.argsort(g)
    labels = [int(k) for k in order.tolist() if g[k] < 0] or [int(order[0])]
    k = labels[0]
    return HeadLeak(labels, (w[k] / g[k]).to(torch.float32))
