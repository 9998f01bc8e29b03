"""Triton kernel of adamw_step_: the authors' AdamW rule, one launch per parameter tensor.

The step counts are advanced first by one multi-tensor add on the device (by 0 when found_inf is non-zero),
then each tensor's kernel reads its count: one kernel cannot both read and advance a count that several of
its programs read. Each program computes the step size in float64 from the count (1 - b^t as 1 - exp(t log b),
accurate where 1 - b^t from a float32 b would lose up to 1e-5 of it), then updates BLOCK elements in float32,
reading p, g, m, v once and writing p, m, v once. A non-zero found_inf makes every program return before
reading anything. The scalars that enter the float64 step size (lr, log beta1, log beta2, weight_decay) are
declared float64: Triton would pass a Python float as float32, rounding them before that math.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 2048


@triton.jit
def _adamw_update(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    lr_ptr,
    scale_ptr,
    n,
    lr,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1,
    log_beta2,
    eps,
    weight_decay,
    HAS_LR_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    CORRECT_BIAS: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= size * m / (sqrt(v) + eps); p *= 1 - lr * wd."""
    if HAS_LR_PTR:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    else:
        lr64 = tl.cast(lr, tl.float64)
    size = lr64
    if CORRECT_BIAS:
        t = tl.load(step_ptr).to(tl.float64)
        bc1 = 1.0 - tl.exp(t * tl.cast(log_beta1, tl.float64))
        bc2 = 1.0 - tl.exp(t * tl.cast(log_beta2, tl.float64))
        size = lr64 * tl.sqrt(bc2) / bc1
    size32 = size.to(tl.float32)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(scale_ptr).to(tl.float32))
    m = beta1 * m + one_minus_beta1 * g
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.sqrt_rn(v) + eps
    w = w - size32 * tl.div_rn(m, denom)
    if HAS_DECAY:
        w = w * (1.0 - lr64 * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    tl.store(p_ptr + offs, w, mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _adamw_step_kernel(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    step_ptr,
    lr_ptr,
    scale_ptr,
    found_inf_ptr,
    n,
    lr: tl.float64,
    beta1,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    log_beta1: tl.float64,
    log_beta2: tl.float64,
    eps,
    weight_decay: tl.float64,
    HAS_LR_PTR: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    CORRECT_BIAS: tl.constexpr,
    HAS_DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One BLOCK of one parameter tensor; nothing is read or written when found_inf_ptr[0] is non-zero."""
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) == 0:
            _adamw_update(
                p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, scale_ptr, n, lr, beta1, beta2, one_minus_beta1,
                one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, HAS_LR_PTR, HAS_SCALE, CORRECT_BIAS,
                HAS_DECAY, BLOCK,
            )  # fmt: skip
    else:
        _adamw_update(
            p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, lr_ptr, scale_ptr, n, lr, beta1, beta2, one_minus_beta1,
            one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, HAS_LR_PTR, HAS_SCALE, CORRECT_BIAS,
            HAS_DECAY, BLOCK,
        )  # fmt: skip


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0.0 else -math.inf  # beta 0: 1 - 0^t = 1


def adamw_step(
    *,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """In place on contiguous float32 params and moments (grads float32/float16/bfloat16), all on one device;
    steps: one-element float32 tensors; lr_tensor, grad_scale, found_inf: None or one-element tensors there."""
    if not params:
        return
    if found_inf is None:
        torch._foreach_add_(steps, 1.0)
    else:
        torch._foreach_add_(steps, (found_inf.reshape(()) == 0).to(torch.float32))
    dev = params[0].device
    ctx = torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()
    with ctx:
        for p, g, m, v, s in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
            n = p.numel()
            if n == 0:
                continue
            _adamw_step_kernel[(triton.cdiv(n, _BLOCK),)](
                p,
                g,
                m,
                v,
                s,
                s if lr_tensor is None else lr_tensor,
                s if grad_scale is None else grad_scale,
                s if found_inf is None else found_inf,
                n,
                float(lr),
                float(beta1),
                float(beta2),
                1.0 - beta1,
                1.0 - beta2,
                _log(beta1),
                _log(beta2),
                float(eps),
                float(weight_decay),
                HAS_LR_PTR=lr_tensor is not None,
                HAS_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                CORRECT_BIAS=bool(correct_bias),
                HAS_DECAY=weight_decay > 0.0,
                BLOCK=_BLOCK,
                num_warps=8,
            )
