"""Triton kernel for the perturbation update: normalised ascent step plus projection, per example."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Rows up to this many elements are held in registers: grad and delta are read once, delta written once.
# Longer rows stream in chunks; the second read of grad is meant to hit L2.
_MAX_SINGLE = 16384
_CHUNK = 4096


@triton.jit
def _row_stats(g, NORM_L2: tl.constexpr):
    # per-chunk partial results: norm part of g and non-finite count
    finite = (g == g) & (tl.abs(g) != float("inf"))
    bad = tl.sum((~finite).to(tl.int32), axis=0)
    gz = tl.where(finite, g, 0.0)
    if NORM_L2:
        gn = tl.sum(gz * gz, axis=0)
    else:
        gn = tl.max(tl.abs(gz), axis=0)
    return bad, gn


@triton.jit
def _perturb_update_kernel(
    d0_ptr,
    g0_ptr,
    d1_ptr,
    g1_ptr,
    rows0,
    n0,
    n1,
    lr0,
    lr1,
    scale_ptr,
    skip_ptr,
    max_norm,
    HAS_SCALE: tl.constexpr,
    NORM_L2: tl.constexpr,
    PROJECT: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """delta[r] += lr * g[r] / max(||g[r]||, 1e-8), g = grad / scale; then project (l2 rescale or linf clamp).

    Programs [0, rows0) update tensor 0, the rest tensor 1, so text and image deltas share one launch.
    Rows with a non-finite g, or whose l2 norm overflows float32 (the step would round to zero), are left
    untouched and counted in skip_ptr[segment].
    """
    pid = tl.program_id(0).to(tl.int64)
    if pid < rows0:
        seg = 0
        row = pid
        n = n0
        lr = lr0
        d_row = d0_ptr + row * n0
        g_row = g0_ptr + row * n0
    else:
        seg = 1
        row = pid - rows0
        n = n1
        lr = lr1
        d_row = d1_ptr + row * n1
        g_row = g1_ptr + row * n1
    # g = grad / scale in round-to-nearest division (as the reference and the CUDA kernel; a plain `/` or a
    # reciprocal compiles to an approximation on the GPU)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
        # an infinite scale would turn every gradient into zeros: make it poison the row instead
        scale = tl.where(tl.abs(scale) == float("inf"), float("nan"), scale)
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        m = offs < n
        g = tl.load(g_row + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = tl.div_rn(g, scale)
        d = tl.load(d_row + offs, mask=m, other=0.0).to(tl.float32)
        bad, gn = _row_stats(g, NORM_L2)
        if NORM_L2:
            gn = tl.sqrt_rn(gn)
        if gn == float("inf"):
            bad += 1
        if bad == 0:
            step = tl.div_rn(lr, tl.maximum(gn, 1e-8))
            new = d + step * g
            if PROJECT:
                if NORM_L2:
                    nd = tl.sqrt_rn(tl.sum(new * new, axis=0))
                    if nd > max_norm:
                        new = new * tl.div_rn(max_norm, nd)
                else:
                    new = tl.minimum(tl.maximum(new, -max_norm), max_norm)
            tl.store(d_row + offs, new, mask=m)
        else:
            tl.atomic_add(skip_ptr + seg, 1)
    else:
        bad = 0
        gn = 0.0
        for start in range(0, n, BLOCK):
            o = start + offs
            m = o < n
            g = tl.load(g_row + o, mask=m, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = tl.div_rn(g, scale)
            b_, gn_ = _row_stats(g, NORM_L2)
            bad += b_
            if NORM_L2:
                gn += gn_
            else:
                gn = tl.maximum(gn, gn_)
        if NORM_L2:
            gn = tl.sqrt_rn(gn)
        if gn == float("inf"):
            bad += 1
        if bad == 0:
            step = tl.div_rn(lr, tl.maximum(gn, 1e-8))
            # the update, with the updated row's squared norm summed as it is written (the norm of d + s g from
            # partial sums of d and g would cancel when the step nearly undoes d); a row outside the l2 ball is
            # rescaled in a third pass
            nsq = 0.0
            for start in range(0, n, BLOCK):
                o = start + offs
                m = o < n
                g = tl.load(g_row + o, mask=m, other=0.0).to(tl.float32)
                if HAS_SCALE:
                    g = tl.div_rn(g, scale)
                d = tl.load(d_row + o, mask=m, other=0.0).to(tl.float32)
                new = d + step * g
                if PROJECT and not NORM_L2:
                    new = tl.minimum(tl.maximum(new, -max_norm), max_norm)
                nsq += tl.sum(tl.where(m, new * new, 0.0), axis=0)
                tl.store(d_row + o, new, mask=m)
            if PROJECT and NORM_L2:
                nd = tl.sqrt_rn(nsq)
                if nd > max_norm:
                    shrink = tl.div_rn(max_norm, nd)
                    tl.debug_barrier()  # the row's stores above are visible to every thread of the program
                    for start in range(0, n, BLOCK):
                        o = start + offs
                        m = o < n
                        d = tl.load(d_row + o, mask=m, other=0.0)
                        tl.store(d_row + o, d * shrink, mask=m)
        else:
            tl.atomic_add(skip_ptr + seg, 1)


def perturb_update(
    *,
    deltas: list[Tensor],
    grads: list[Tensor],
    lrs: list[float],
    norm_type: str,
    max_norm: float,
    grad_scale: Tensor | None,
) -> Tensor:
    """Launch the update over one or two (delta, grad) pairs; returns int64 skipped-row counts per pair.

    deltas: contiguous float32 [B_i, ...]; grads: same shapes, contiguous, float32/float16/bfloat16.
    """
    skipped = torch.zeros(len(deltas), dtype=torch.int32, device=deltas[0].device)
    i = 0
    while i < len(deltas):
        # two pairs per launch when their grads share a dtype (pointer types must agree)
        j = i + 2 if i + 1 < len(deltas) and grads[i].dtype == grads[i + 1].dtype else i + 1
        pair_d, pair_g, pair_lr = deltas[i:j], grads[i:j], lrs[i:j]
        if len(pair_d) == 1:
            pair_d, pair_g, pair_lr = pair_d * 2, pair_g * 2, pair_lr * 2
            rows1 = 0
        else:
            rows1 = pair_d[1].shape[0]
        rows0 = pair_d[0].shape[0]
        n0 = pair_d[0].numel() // max(rows0, 1)
        n1 = pair_d[1].numel() // max(pair_d[1].shape[0], 1)
        longest = max(n0, n1 if rows1 else 0)
        single = longest <= _MAX_SINGLE
        block = max(triton.next_power_of_2(longest), 16) if single else _CHUNK
        num_warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
        counter = torch.zeros(2, dtype=torch.int32, device=skipped.device)
        grid = (rows0 + rows1,)
        if grid[0] > 0:
            with _on_device(pair_d[0]):
                _perturb_update_kernel[grid](
                    pair_d[0],
                    pair_g[0],
                    pair_d[1],
                    pair_g[1],
                    rows0,
                    n0,
                    n1,
                    float(pair_lr[0]),
                    float(pair_lr[1]),
                    grad_scale if grad_scale is not None else pair_d[0],
                    counter,
                    float(max_norm),
                    HAS_SCALE=grad_scale is not None,
                    NORM_L2=norm_type == "l2",
                    PROJECT=max_norm > 0,
                    SINGLE=single,
                    BLOCK=block,
                    num_warps=num_warps,
                )
        skipped[i:j] += counter[: j - i]
        i = j
    return skipped.to(torch.int64)


def _on_device(t: Tensor):
    """Launch under the tensor's CUDA device; a no-op context on the CPU (interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
