"""Residual add fused into LayerNorm: the ``LayerNorm(dense(x) + residual)`` of every BERT/UNITER layer."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from villa_fast import reference
from villa_fast.ops import _check
from villa_fast.ops._backend import BackendUnavailableError, choose, requested_backend

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# the Triton kernel holds a row in registers (MAX_HIDDEN in kernels/add_layer_norm.py); repeated
# here so that the check imports no Triton
_MAX_TRITON_HIDDEN = 16384


def _stat_dtype(out_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if out_dtype == torch.float64 else torch.float32


def _kernel():
    return importlib.import_module("villa_fast.kernels.add_layer_norm")


@torch.library.custom_op("villa_fast::add_layer_norm", mutates_args=())
def _add_layer_norm_op(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "triton":
        return _kernel().add_layer_norm_fwd(x=x, residual=residual, weight=weight, bias=bias, eps=eps)
    return reference.add_layer_norm_fwd(x, residual, weight, bias, eps)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, backend):
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    stats = x.new_empty(x.shape[:-1], dtype=_stat_dtype(out_dtype))
    return x.new_empty(x.shape, dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("villa_fast::add_layer_norm_backward", mutates_args=())
def _add_layer_norm_bwd_op(
    grad_y: Tensor,
    x: Tensor,
    residual: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias); dresidual is empty when residual has x's dtype (its gradient
    is dx), dbias is empty without a bias, dweight and dbias have weight's dtype."""
    if backend == "triton":
        dx, dr, dw, db = _kernel().add_layer_norm_bwd(
            grad_y=grad_y, x=x, residual=residual, weight=weight, mean=mean, rstd=rstd
        )
    else:
        dh, dw, db = reference.add_layer_norm_bwd(grad_y, x, residual, weight, mean, rstd)
        dx = dh.to(x.dtype)
        dr = dh.to(residual.dtype) if residual.dtype != x.dtype else None
    dr = dr if dr is not None else x.new_empty(0)
    db = db.to(weight.dtype) if need_bias else weight.new_empty(0)
    return dx, dr, dw.to(weight.dtype), db


@_add_layer_norm_bwd_op.register_fake
def _(grad_y, x, residual, weight, mean, rstd, need_bias, backend):
    dr = torch.empty_like(residual) if residual.dtype != x.dtype else x.new_empty(0)
    db = torch.empty_like(weight) if need_bias else weight.new_empty(0)
    return torch.empty_like(x), dr, torch.empty_like(weight), db


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, _eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    dx, dr, dw, db = _add_layer_norm_bwd_op(
        grad_y.contiguous(), x, residual, weight, mean, rstd, ctx.has_bias, ctx.backend
    )
    # one gradient serves both summands: x + residual passes dL/dh to each unchanged
    dr = dr if residual.dtype != x.dtype else dx
    db = db.to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dr, dw, db, None, None


_add_layer_norm_op.register_autograd(_backward, setup_context=_setup_context)


def add_layer_norm(
    x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None = None, eps: float = 1e-12
) -> Tensor:
    """``LayerNorm(x + residual) * weight + bias`` over the last dimension, in one pass.

    Args:
        x, residual: [..., H] of one shape, float32, bfloat16, float16 or float64 (dtypes may differ;
            e.g. a bf16 dense output and an fp32 residual under autocast).
        weight: [H]; bias: [H] or None.
        eps: added to the variance, >= 0.
    Returns:
        [..., H] of dtype ``promote_types(x.dtype, residual.dtype)``. The sum and the statistics are
        computed in float32 (float64 for float64 inputs on the reference backend). Gradients flow
        into x, residual, weight and bias.
    """
    x = _check.tensor("x", x)
    residual = _check.tensor("residual", residual)
    weight = _check.tensor("weight", weight)
    if bias is not None:
        bias = _check.tensor("bias", bias)
    eps = _check.real("eps", eps)
    _check.floating("x", x, _DTYPES)
    _check.floating("residual", residual, _DTYPES)
    _check.floating("weight", weight, _DTYPES)
    if bias is not None:
        _check.floating("bias", bias, _DTYPES)
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape [..., H] with H >= 1, got shape {tuple(x.shape)}")
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight must have shape [H] = ({h},), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (h,):
        raise ValueError(f"bias must have shape [H] = ({h},), got {tuple(bias.shape)}")
    _check.same_device("x", x, "residual", residual)
    _check.same_device("x", x, "weight", weight)
    if bias is not None:
        _check.same_device("x", x, "bias", bias)
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    backend = choose("add_layer_norm", x.device.type, str(out_dtype))
    if backend == "triton" and h > _MAX_TRITON_HIDDEN:
        if requested_backend("add_layer_norm") != "auto":
            raise BackendUnavailableError(
                f"backend triton requested: the triton add_layer_norm takes H <= {_MAX_TRITON_HIDDEN}, got H={h}"
            )
        backend = "reference"
    y, _, _ = _add_layer_norm_op(x, residual, weight, bias, eps, backend)
    return y
