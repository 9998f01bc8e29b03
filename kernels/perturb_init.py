"""Triton kernel for the masked perturbation init (the deterministic scaling of uniform draws)."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _perturb_init_kernel(
    x_ptr,
    mask_ptr,
    P,
    D,
    init_mag,
    HAS_MASK: tl.constexpr,
    NORM_L2: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """x[b, p, :] *= mask[b, p] * s_b, with s_b = init_mag / sqrt(len_b * D) (l2) or init_mag (linf).

    len_b = sum_p mask[b, p]; rows with len_b == 0 become zero instead of NaN.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * P * D
    if HAS_MASK:
        po = tl.arange(0, BLOCK_P)
        mrow = tl.load(mask_ptr + row * P + po, mask=po < P, other=0.0).to(tl.float32)
        length = tl.sum(mrow, axis=0)
    else:
        length = P * 1.0
    if NORM_L2:
        dims = length * D
        scale = tl.where(dims > 0, init_mag / tl.sqrt(tl.maximum(dims, 1e-30)), 0.0)
    else:
        scale = init_mag * 1.0
    offs = tl.arange(0, BLOCK)
    n = P * D
    for start in range(0, n, BLOCK):
        o = start + offs
        m = o < n
        x = tl.load(x_row + o, mask=m, other=0.0)
        if HAS_MASK:
            w = tl.load(mask_ptr + row * P + o // D, mask=m, other=0.0) * scale
        else:
            w = scale
        tl.store(x_row + o, x * w, mask=m)


def perturb_init(*, noise: Tensor, mask: Tensor | None, init_mag: float, norm_type: str) -> Tensor:
    """In place on contiguous noise [B, P, D] (uniform(-1, 1) draws); mask: [B, P] in noise's dtype or None."""
    b, p, d = noise.shape
    if noise.numel() == 0:
        return noise
    block = min(triton.next_power_of_2(p * d), 4096)
    ctx = torch.cuda.device(noise.device) if noise.is_cuda else contextlib.nullcontext()
    with ctx:
        _perturb_init_kernel[(b,)](
            noise,
            mask if mask is not None else noise,
            p,
            d,
            float(init_mag),
            HAS_MASK=mask is not None,
            NORM_L2=norm_type == "l2",
            BLOCK_P=max(triton.next_power_of_2(p), 2),
            BLOCK=max(block, 16),
            num_warps=4,
        )
    return noise
