"""Reference perturbation ops (VILLA_SPEC section 2), written with plain torch ops."""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-8


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def perturb_init_scale_(noise: Tensor, mask: Tensor | None, *, init_mag: float, norm_type: str) -> Tensor:
    """Turn uniform(-1, 1) draws into the masked init, in place.

    noise: [B, P, D]; mask: [B, P] or None (1 = valid position).
    l2:   noise * mask * init_mag / sqrt(len * D), len = sum_p mask (rows with len == 0 become 0);
    linf: noise * mask * init_mag.
    """
    b, p, d = noise.shape
    m = noise.new_ones(b, p) if mask is None else mask.to(noise.dtype)
    if norm_type == "l2":
        dims = m.sum(1) * d
        scale = torch.where(dims > 0, init_mag / dims.clamp(min=1e-30).sqrt(), torch.zeros_like(dims))
        noise.mul_(m.unsqueeze(2) * scale.view(b, 1, 1))
    elif norm_type == "linf":
        noise.mul_(m.unsqueeze(2) * init_mag)
    else:
        raise ValueError(f"norm_type must be 'l2' or 'linf', got {norm_type!r}")
    return noise


def perturb_init(
    like: Tensor,
    mask: Tensor | None = None,
    *,
    init_mag: float,
    norm_type: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Initial perturbation shaped like ``like`` ([B, P, D]); zeros when init_mag == 0."""
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if init_mag == 0 or like.numel() == 0:
        return torch.zeros(like.shape, dtype=dtype, device=like.device)
    noise = torch.empty(like.shape, dtype=dtype, device=like.device).uniform_(-1, 1, generator=generator)
    return perturb_init_scale_(
        noise.view(like.shape[0], -1, like.shape[-1]),
        mask if mask is None else mask.reshape(like.shape[0], -1),
        init_mag=init_mag,
        norm_type=norm_type,
    ).view(like.shape)


def perturb_update_(
    delta: Tensor,
    grad: Tensor,
    *,
    lr: float,
    norm_type: str,
    max_norm: float = 0.0,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """One normalised ascent step with projection, in place on ``delta``; returns the skipped-row count.

    Per example (dim 0), over all other dims: g = grad / grad_scale;
    delta += lr * g / max(||g||, 1e-8) (l2 or linf norm); then, when max_norm > 0,
    l2: rows with ||delta||_2 > max_norm are rescaled to max_norm; linf: clamp to [-max_norm, max_norm].
    Rows whose g is not finite are left unchanged and counted, and so are rows whose norm is not finite (an l2
    norm past float32's range, elements beyond about 1e19 / sqrt(n): the step would round to zero).
    """
    acc = _acc_dtype(delta)
    b = delta.shape[0]
    if b == 0:  # no example: nothing to update (reshape(0, -1) has no size to infer)
        return torch.zeros((), dtype=torch.int64, device=delta.device)
    g = grad.reshape(b, -1).to(acc)
    finite = torch.ones(b, dtype=torch.bool, device=delta.device)
    if grad_scale is not None:
        scale = grad_scale.reshape(()).to(acc)
        g = g / scale
        # a zero or non-finite loss scale leaves no trustworthy gradient in any row
        finite = finite & torch.isfinite(scale) & (scale != 0)
    finite = finite & torch.isfinite(g).all(dim=1)
    g = torch.where(finite[:, None], g, torch.zeros_like(g))
    if norm_type == "l2":
        n = g.norm(p=2, dim=1)
    elif norm_type == "linf":
        # an empty row has norm 0 (amax refuses an empty dim)
        n = g.abs().amax(dim=1) if g.shape[1] else g.new_zeros(b)
    else:
        raise ValueError(f"norm_type must be 'l2' or 'linf', got {norm_type!r}")
    finite = finite & torch.isfinite(n)
    d = delta.reshape(b, -1).to(acc)
    new = d + lr * g / n.clamp(min=_EPS)[:, None]
    if max_norm > 0:
        if norm_type == "l2":
            nd = new.norm(p=2, dim=1)
            over = nd > max_norm
            new = torch.where(over[:, None], new * (max_norm / nd.clamp(min=1e-30))[:, None], new)
        else:
            new = new.clamp(-max_norm, max_norm)
    new = torch.where(finite[:, None], new, d)
    delta.copy_(new.view(delta.shape).to(delta.dtype))
    return (~finite).sum()
