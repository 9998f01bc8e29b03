"""Triton kernel of add_if_: acc += val when a device flag is true (one launch per tensor pair)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 4096


@triton.jit
def _add_if_kernel(acc_ptr, val_ptr, ok_ptr, n, BLOCK: tl.constexpr):
    """acc[i] += val[i] over one tensor when ok_ptr[0] is true; nothing is read or written otherwise."""
    ok = tl.load(ok_ptr).to(tl.int1)
    if ok:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        a = tl.load(acc_ptr + offs, mask=m, other=0.0)
        v = tl.load(val_ptr + offs, mask=m, other=0.0)
        if a.dtype == tl.float64 or a.dtype == tl.float32:
            s = a + v
        else:
            # half types: the sum in float32, rounded to nearest even (as torch's add_ rounds)
            s = (a.to(tl.float32) + v.to(tl.float32)).to(a.dtype, fp_downcast_rounding="rtne")
        tl.store(acc_ptr + offs, s, mask=m)


def add_if(*, accs: list[Tensor], vals: list[Tensor], ok: Tensor) -> None:
    """In place on contiguous pairs of one shape and dtype; ok: a one-element bool tensor on their device."""
    if not accs:
        return
    ctx = torch.cuda.device(ok.device) if ok.is_cuda else contextlib.nullcontext()
    with ctx:
        for a, v in zip(accs, vals, strict=True):
            n = a.numel()
            if n == 0:
                continue
            _add_if_kernel[(triton.cdiv(n, _BLOCK),)](a, v, ok, n, BLOCK=_BLOCK, num_warps=8)
