"""Reference symmetric KL: KL(softmax(b) || softmax(a)) + KL(softmax(a) || softmax(b))."""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _divisor(n: int, c: int, reduction: str) -> int:
    if reduction == "batchmean":
        return n
    if reduction == "mean":
        return n * c
    if reduction == "sum":
        return 1
    raise ValueError(f"reduction must be 'batchmean', 'mean' or 'sum', got {reduction!r}")


def _parts(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    acc = _acc(a) if a.dtype == torch.float64 or b.dtype == torch.float64 else torch.float32
    lp = torch.log_softmax(a.to(acc), dim=-1)
    lq = torch.log_softmax(b.to(acc), dim=-1)
    both_neg_inf = torch.isneginf(a) & torch.isneginf(b)
    d = torch.where(both_neg_inf, torch.zeros_like(lp), lp - lq)
    return lp.exp(), lq.exp(), d, both_neg_inf


def sym_kl(a: Tensor, b: Tensor, reduction: str = "batchmean") -> Tensor:
    """Differentiable symmetric KL of two [N, C] logit tensors (autograd through torch ops)."""
    n, c = a.shape
    p, q, d, _ = _parts(a, b)
    return ((p - q) * d).sum() / _divisor(n, c, reduction)


def sym_kl_fwd(a: Tensor, b: Tensor, reduction: str = "batchmean") -> tuple[Tensor, Tensor, Tensor]:
    """Loss and both gradients in closed form: (loss, dloss/da, dloss/db), gradients in the input dtypes.

    With d = log p - log q, Ep = sum p d and Eq = sum q d per row:
    dL/da = p (d - Ep) + p - q;  dL/db = q (Eq - d) + q - p.
    """
    n, c = a.shape
    div = _divisor(n, c, reduction)
    p, q, d, _ = _parts(a, b)
    ep = (p * d).sum(-1, keepdim=True)
    eq = (q * d).sum(-1, keepdim=True)
    loss = ((p - q) * d).sum() / div
    ga = (p * (d - ep) + p - q) / div
    gb = (q * (eq - d) + q - p) / div
    return loss, ga.to(a.dtype), gb.to(b.dtype)
