"""Reference residual add + LayerNorm: y = LayerNorm(x + residual) * weight + bias over the last dim."""

from __future__ import annotations

import torch
from torch import Tensor


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats(h: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    mean = h.mean(-1)
    var = (h - mean.unsqueeze(-1)).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """Differentiable ``LayerNorm(x + residual) * weight + bias`` (autograd through torch ops).

    x, residual: [..., H]; weight, bias: [H]. The sum and the statistics are computed in float32
    (float64 when x or residual is float64); the output has dtype ``promote_types(x, residual)``.
    """
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    acc = _acc(out_dtype)
    h = x.to(acc) + residual.to(acc)
    mean, rstd = _stats(h, eps)
    y = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc)
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(out_dtype)


def add_layer_norm_fwd(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-12
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): the output and the per-row statistics [...] the backward needs.

    mean = sum_j h_j / H and rstd = 1 / sqrt(sum_j (h_j - mean)^2 / H + eps) with h = x + residual,
    in float32 (float64 for float64 inputs).
    """
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    acc = _acc(out_dtype)
    with torch.no_grad():
        h = x.to(acc) + residual.to(acc)
        mean, rstd = _stats(h, eps)
        y = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1) * weight.to(acc)
        if bias is not None:
            y = y + bias.to(acc)
    return y.to(out_dtype), mean, rstd


def add_layer_norm_bwd(
    grad_y: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients in closed form: (dh, dweight, dbias) with dh = dL/dx = dL/dresidual, all in the compute dtype.

    With xhat = (h - mean) * rstd and g = grad_y * weight, averaging over the last dim:
    dh = rstd * (g - mean(g) - xhat * mean(g * xhat));  dweight = sum_rows grad_y * xhat;  dbias = sum_rows grad_y.
    """
    acc = mean.dtype
    with torch.no_grad():
        h = x.to(acc) + residual.to(acc)
        xhat = (h - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        dy = grad_y.to(acc)
        g = dy * weight.to(acc)
        dh = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
        rows = dy.reshape(-1, dy.shape[-1])
        dw = (rows * xhat.reshape(rows.shape)).sum(0)
        db = rows.sum(0)
    return dh, dw, db
