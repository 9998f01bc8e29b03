"""Triton kernels for the residual add fused into LayerNorm, forward and backward.

Forward, one row per program: h = x + residual is formed in registers and never written, so the op
reads x and residual once and writes y once (plus two floats of statistics per row).
Backward, one group of rows per program: the row gradient is written once for x (and, only when
the dtypes differ, once for residual); dweight and dbias are summed in registers over the group
and each program writes one partial row, which a fixed-order sum then reduces (no atomics, so the
result does not depend on the order programs run in).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# a row lives in registers; past this width the backward's six row vectors spill
MAX_HIDDEN = 16384


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    stride_xm,
    stride_rm,
    stride_ym,
    H,
    eps,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = (h - mean) * rstd * w + b for one row, with h = x + r and, over the H columns,
    mean = sum_j h_j / H,  rstd = 1 / sqrt(sum_j (h_j - mean)^2 / H + eps).

    mean and rstd are stored (float32 math) for the backward.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_rm + offs, mask=mask, other=0.0).to(tl.float32)
    h = x + r
    mean = tl.sum(h, axis=0) / H
    # padding lanes would add mean^2 each to the variance: zero them
    d = tl.where(mask, h - mean, 0.0)
    var = tl.sum(d * d, axis=0) / H
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = d * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + offs, y, mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _add_layer_norm_bwd_kernel(
    dy_ptr,
    x_ptr,
    r_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    dx_ptr,
    dr_ptr,
    dw_part_ptr,
    db_part_ptr,
    stride_dym,
    stride_xm,
    stride_rm,
    stride_dxm,
    stride_drm,
    M,
    H,
    rows_per_prog,
    SEPARATE_DR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """For the rows [pid * rows_per_prog, ...) with xhat = (h - mean) * rstd and g = dy * w:

    dh = rstd * (g - sum_j g_j / H - xhat * sum_j g_j xhat_j / H)   (= dL/dx = dL/dresidual)
    dw_part[pid] = sum_rows dy * xhat,  db_part[pid] = sum_rows dy.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    # weight is read once per program, not once per row
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for row in range(start, end):
        # h is recomputed from x and residual: reading them costs fewer bytes than writing h
        # in the forward and reading it back here, and the forward keeps no extra activation
        x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + row * stride_rm + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row * stride_dym + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + row).to(tl.float32)
        rstd = tl.load(rstd_ptr + row).to(tl.float32)
        xhat = tl.where(mask, (x + r - mean) * rstd, 0.0)
        g = dy * w
        c_xhat = tl.sum(g * xhat, axis=0) / H
        c_one = tl.sum(g, axis=0) / H
        dh = (g - c_one - xhat * c_xhat) * rstd
        tl.store(dx_ptr + row * stride_dxm + offs, dh, mask=mask)
        if SEPARATE_DR:
            tl.store(dr_ptr + row * stride_drm + offs, dh, mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + pid * H + offs, dw_acc, mask=mask)
    tl.store(db_part_ptr + pid * H + offs, db_acc, mask=mask)


def _rows(t: Tensor, h: int) -> Tensor:
    """A 2-D [M, H] view with unit column stride (rows may be strided), copying only when needed."""
    t2 = t.reshape(-1, h)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else (8 if block <= 4096 else 16)


def _device_ctx(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def add_layer_norm_fwd(
    *, x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd) for x, residual [..., H] and weight, bias [H].

    y has dtype promote_types(x, residual) and x's shape; mean and rstd [...] are float32
    (float64 for float64 inputs, holding float32-accurate values).
    """
    h = x.shape[-1]
    if h > MAX_HIDDEN:
        raise ValueError(f"the Triton add_layer_norm takes H <= {MAX_HIDDEN}, got H={h}")
    out_dtype = torch.promote_types(x.dtype, residual.dtype)
    stat_dtype = torch.float64 if out_dtype == torch.float64 else torch.float32
    x2, r2 = _rows(x, h), _rows(residual, h)
    m = x2.shape[0]
    y = torch.empty((m, h), dtype=out_dtype, device=x.device)
    mean = torch.empty(m, dtype=stat_dtype, device=x.device)
    rstd = torch.empty(m, dtype=stat_dtype, device=x.device)
    if m > 0:
        block = triton.next_power_of_2(h)
        w = weight.contiguous()
        b = bias.contiguous() if bias is not None else w
        with _device_ctx(x):
            _add_layer_norm_fwd_kernel[(m,)](
                x2,
                r2,
                w,
                b,
                y,
                mean,
                rstd,
                x2.stride(0),
                r2.stride(0),
                y.stride(0),
                h,
                eps,
                HAS_BIAS=bias is not None,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def _sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device; None for the CPU (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


def _groups(m: int, device: torch.device) -> int:
    """Programs of the backward: eight per SM. Each program walks its rows one after the other, so one
    program per SM would leave each SM a single block of a few warps waiting on memory; eight keep enough
    loads in flight while the partial buffer stays small (8 x 132 x 768 floats = 3.2 MB on an H100)."""
    sms = _sm_count(device)
    if sms is not None:
        return max(1, min(m, 8 * sms))
    return max(1, min(m, 4))


def add_layer_norm_bwd(
    *, grad_y: Tensor, x: Tensor, residual: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """(dx, dresidual, dweight, dbias) for the forward above; grad_y has x's shape.

    dx has x's dtype; dresidual is None when residual has x's dtype (its gradient is dx itself),
    else the same values in residual's dtype. dweight and dbias are float32.
    """
    h = x.shape[-1]
    x2, r2, dy2 = _rows(x, h), _rows(residual, h), _rows(grad_y, h)
    m = x2.shape[0]
    separate = residual.dtype != x.dtype
    dx = torch.empty((m, h), dtype=x.dtype, device=x.device)
    dr = torch.empty((m, h), dtype=residual.dtype, device=x.device) if separate else None
    groups = _groups(m, x.device)
    rows_per_prog = triton.cdiv(m, groups)
    groups = triton.cdiv(m, rows_per_prog) if m > 0 else 1
    dw_part = torch.zeros((groups, h), dtype=torch.float32, device=x.device)
    db_part = torch.zeros((groups, h), dtype=torch.float32, device=x.device)
    if m > 0:
        block = triton.next_power_of_2(h)
        with _device_ctx(x):
            _add_layer_norm_bwd_kernel[(groups,)](
                dy2,
                x2,
                r2,
                weight.contiguous(),
                mean.reshape(-1),
                rstd.reshape(-1),
                dx,
                dr if separate else dx,
                dw_part,
                db_part,
                dy2.stride(0),
                x2.stride(0),
                r2.stride(0),
                dx.stride(0),
                dr.stride(0) if separate else dx.stride(0),
                m,
                h,
                rows_per_prog,
                SEPARATE_DR=separate,
                BLOCK=block,
                num_warps=_num_warps(block),
            )
    # a fixed-order sum over the per-program partials keeps dweight and dbias deterministic
    dw, db = dw_part.sum(0), db_part.sum(0)
    return dx.view(x.shape), (dr.view(x.shape) if separate else None), dw, db
