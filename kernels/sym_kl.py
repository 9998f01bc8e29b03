"""Triton kernel for the symmetric KL and both of its gradients, in one pass over each row."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor

# Rows up to this many classes are held in registers: each logit is read once and each gradient written once.
_MAX_SINGLE = 8192
_CHUNK = 2048


@triton.jit
def _sym_kl_kernel(
    a_ptr,
    b_ptr,
    ga_ptr,
    gb_ptr,
    loss_ptr,
    C,
    inv_div,
    NEED_GRAD: tl.constexpr,
    SINGLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """L_row = sum_c (p - q)(log p - log q) with p = softmax(a), q = softmax(b); loss_ptr[row] = L_row * inv_div.

    With d = log p - log q, Ep = sum p d, Eq = sum q d:
    dL/da = p (d - Ep) + p - q,  dL/db = q (Eq - d) + q - p  (times inv_div).
    Classes where a and b are both -inf contribute 0.
    """
    row = tl.program_id(0).to(tl.int64)
    a_row = a_ptr + row * C
    b_row = b_ptr + row * C
    offs = tl.arange(0, BLOCK)
    if SINGLE:
        m = offs < C
        a = tl.load(a_row + offs, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=m, other=0.0).to(tl.float32)
        # padding lanes become -inf only through tl.where, never as a load's `other`
        a = tl.where(m, a, float("-inf"))
        b = tl.where(m, b, float("-inf"))
        ma = tl.max(a, axis=0)
        mb = tl.max(b, axis=0)
        ea = tl.exp(a - ma)
        eb = tl.exp(b - mb)
        sa = tl.sum(ea, axis=0)
        sb = tl.sum(eb, axis=0)
        p = ea / sa
        q = eb / sb
        both = (a == float("-inf")) & (b == float("-inf"))
        # lanes that are -inf on both sides are zeroed before subtracting: no -inf - -inf is formed
        a0 = tl.where(both, 0.0, a)
        b0 = tl.where(both, 0.0, b)
        d = tl.where(both, 0.0, (a0 - ma - tl.log(sa)) - (b0 - mb - tl.log(sb)))
        ep = tl.sum(p * d, axis=0)
        eq = tl.sum(q * d, axis=0)
        # the loss as sum (p - q) d rather than Ep - Eq: where one side alone is -inf it is +inf (as in the
        # reference), while 0 * inf inside Eq would make Ep - Eq NaN
        tl.store(loss_ptr + row, tl.sum((p - q) * d, axis=0) * inv_div)
        if NEED_GRAD:
            ga = (p * (d - ep) + p - q) * inv_div
            gb = (q * (eq - d) + q - p) * inv_div
            tl.store(ga_ptr + row * C + offs, ga, mask=m)
            tl.store(gb_ptr + row * C + offs, gb, mask=m)
    else:
        # pass 1: online max and sum of exponentials of both rows
        ma = float("-inf")
        mb = float("-inf")
        sa = 0.0
        sb = 0.0
        for start in range(0, C, BLOCK):
            o = start + offs
            m = o < C
            a = tl.where(m, tl.load(a_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
            b = tl.where(m, tl.load(b_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
            na = tl.maximum(ma, tl.max(a, axis=0))
            nb = tl.maximum(mb, tl.max(b, axis=0))
            # shift by 0 while every class so far is -inf: -inf - -inf would make the sums NaN
            sha = tl.where(na == float("-inf"), 0.0, na)
            shb = tl.where(nb == float("-inf"), 0.0, nb)
            sa = sa * tl.exp(ma - sha) + tl.sum(tl.exp(a - sha), axis=0)
            sb = sb * tl.exp(mb - shb) + tl.sum(tl.exp(b - shb), axis=0)
            ma = na
            mb = nb
        la = ma + tl.log(sa)
        lb = mb + tl.log(sb)
        # pass 2: the two expectations of d
        ep = 0.0
        eq = 0.0
        loss = 0.0
        for start in range(0, C, BLOCK):
            o = start + offs
            m = o < C
            a = tl.where(m, tl.load(a_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
            b = tl.where(m, tl.load(b_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
            both = (a == float("-inf")) & (b == float("-inf"))
            d = tl.where(both, 0.0, (tl.where(both, 0.0, a) - la) - (tl.where(both, 0.0, b) - lb))
            pa = tl.exp(a - la)
            qb = tl.exp(b - lb)
            ep += tl.sum(pa * d, axis=0)
            eq += tl.sum(qb * d, axis=0)
            loss += tl.sum((pa - qb) * d, axis=0)  # +inf, not NaN, where one side alone is -inf
        tl.store(loss_ptr + row, loss * inv_div)
        if NEED_GRAD:
            # pass 3: both gradients
            for start in range(0, C, BLOCK):
                o = start + offs
                m = o < C
                a = tl.where(m, tl.load(a_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
                b = tl.where(m, tl.load(b_row + o, mask=m, other=0.0).to(tl.float32), float("-inf"))
                p = tl.exp(a - la)
                q = tl.exp(b - lb)
                both = (a == float("-inf")) & (b == float("-inf"))
                d = tl.where(both, 0.0, (tl.where(both, 0.0, a) - la) - (tl.where(both, 0.0, b) - lb))
                tl.store(ga_ptr + row * C + o, (p * (d - ep) + p - q) * inv_div, mask=m)
                tl.store(gb_ptr + row * C + o, (q * (eq - d) + q - p) * inv_div, mask=m)


def sym_kl(*, a: Tensor, b: Tensor, reduction: str, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dloss/da, dloss/db) for contiguous [N, C] logits of one dtype; gradients in that dtype.

    Without need_grad the gradient tensors are empty and nothing but the loss is written.
    """
    n, c = a.shape
    inv_div = 1.0 / (n if reduction == "batchmean" else n * c)
    rows = torch.empty(n, dtype=torch.float32, device=a.device)
    ga = torch.empty_like(a) if need_grad else a.new_empty(0)
    gb = torch.empty_like(b) if need_grad else b.new_empty(0)
    single = c <= _MAX_SINGLE
    block = triton.next_power_of_2(c) if single else _CHUNK
    num_warps = 4 if block <= 1024 else (8 if block <= 4096 else 16)
    ctx = torch.cuda.device(a.device) if a.is_cuda else contextlib.nullcontext()
    with ctx:
        _sym_kl_kernel[(n,)](
            a,
            b,
            ga if need_grad else a,
            gb if need_grad else b,
            rows,
            c,
            inv_div,
            NEED_GRAD=need_grad,
            SINGLE=single,
            BLOCK=block,
            num_warps=num_warps,
        )
    # a fixed-order sum of per-row losses keeps the result deterministic (no float atomics)
    return rows.sum(), ga, gb
