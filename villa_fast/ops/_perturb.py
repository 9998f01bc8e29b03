"""Perturbation ops: masked init and the normalised, projected ascent step (VILLA_SPEC section 2)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from villa_fast import reference
from villa_fast.ops import _check
from villa_fast.ops._backend import choose, extension

_DELTA_DTYPES = (torch.float32, torch.float64)
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ----------------------------------------------------------------------------------------------- update


@torch.library.custom_op("villa_fast::perturb_update_", mutates_args=("deltas",))
def _perturb_update_op(
    deltas: list[Tensor],
    grads: list[Tensor],
    lrs: list[float],
    norm_type: str,
    max_norm: float,
    grad_scale: Tensor | None,
    backend: str,
) -> Tensor:
    if backend == "reference":
        counts = [
            reference.perturb_update_(d, g, lr=lr, norm_type=norm_type, max_norm=max_norm, grad_scale=grad_scale)
            for d, g, lr in zip(deltas, grads, lrs, strict=True)
        ]
        return torch.stack(counts).to(torch.int64)
    if backend == "triton":
        kernel = importlib.import_module("villa_fast.kernels.perturb_update")
        return kernel.perturb_update(
            deltas=deltas, grads=grads, lrs=lrs, norm_type=norm_type, max_norm=max_norm, grad_scale=grad_scale
        )
    return extension().perturb_update_(deltas, grads, lrs, 0 if norm_type == "l2" else 1, max_norm, grad_scale)


@_perturb_update_op.register_fake
def _(deltas, grads, lrs, norm_type, max_norm, grad_scale, backend):
    return deltas[0].new_empty((len(deltas),), dtype=torch.int64)


def perturb_update_multi_(
    deltas: list[Tensor] | tuple[Tensor, ...],
    grads: list[Tensor] | tuple[Tensor, ...],
    *,
    lrs: list[float] | tuple[float, ...],
    norm_type: str,
    max_norm: float = 0.0,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """:func:`perturb_update_` over several (delta, grad) pairs sharing one kernel launch on the GPU.

    Returns an int64 tensor [len(deltas)] on the deltas' device: skipped rows per pair.
    """
    if not isinstance(deltas, (list, tuple)) or not isinstance(grads, (list, tuple)):
        raise TypeError("deltas and grads must be lists of tensors")
    if not isinstance(lrs, (list, tuple)):
        raise TypeError(f"lrs must be a list of numbers, got {type(lrs).__name__}")
    if len(deltas) == 0 or len(deltas) != len(grads) or len(deltas) != len(lrs):
        raise ValueError(
            f"deltas, grads and lrs must be non-empty and of equal length; got {len(deltas)}, "
            f"{len(grads)} and {len(lrs)}"
        )
    _check.choice("norm_type", norm_type, _check.NORM_TYPES)
    max_norm = _check.real("max_norm", max_norm)
    lrs = [_check.real(f"lrs[{i}]" if len(lrs) > 1 else "lr", lr) for i, lr in enumerate(lrs)]
    ds, gs, copies = [], [], []
    for i, (d, g) in enumerate(zip(deltas, grads, strict=True)):
        dn, gn = ("delta", "grad") if len(deltas) == 1 else (f"deltas[{i}]", f"grads[{i}]")
        _check.tensor(dn, d)
        _check.tensor(gn, g)
        _check.floating(dn, d, _DELTA_DTYPES)
        _check.floating(gn, g, _GRAD_DTYPES)
        if d.dim() < 1 or d.shape[0] == 0 and d.numel() != 0:
            raise ValueError(f"{dn} must have a batch dimension 0, got shape {tuple(d.shape)}")
        if g.shape != d.shape:
            raise ValueError(f"{gn} must have the shape of {dn} {tuple(d.shape)}, got {tuple(g.shape)}")
        _check.same_device(dn, d, gn, g)
        if i:
            _check.same_device("deltas[0]", deltas[0], dn, d)
        if g.dtype == torch.float64 and d.dtype != torch.float64:
            g = g.to(d.dtype)
        elif d.dtype == torch.float64 and g.dtype != torch.float64:
            g = g.to(torch.float64)
        if d.is_contiguous():
            ds.append(d)
        else:
            c = d.contiguous()
            copies.append((d, c))
            ds.append(c)
        gs.append(g.contiguous())
    if not torch.compiler.is_compiling():
        # the pairs are updated by concurrent segments of one launch on a GPU: deltas that share memory (one
        # delta twice, overlapping views) or a grad inside a delta would race
        one = len(deltas) == 1
        clash = _check.memory_clash(
            [("delta" if one else "deltas", list(deltas))],
            [("grad" if one else "grads", list(grads), None)],
            indexed=not one,
        )
        if clash:
            raise ValueError(clash)
    if grad_scale is not None:
        _check.tensor("grad_scale", grad_scale)
        _check.floating("grad_scale", grad_scale, (torch.float32, torch.float64))
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must hold one element, got shape {tuple(grad_scale.shape)}")
        _check.same_device("grad_scale", grad_scale, "delta", ds[0])
        grad_scale = grad_scale.reshape(1)
    dtypes = {d.dtype for d in ds}
    if len(dtypes) > 1:
        raise TypeError(f"deltas must share one dtype, got {sorted(str(d) for d in dtypes)}")
    backend = choose("perturb_update", ds[0].device.type, str(ds[0].dtype))
    counts = _perturb_update_op(ds, gs, lrs, norm_type, max_norm, grad_scale, backend)
    for orig, contig in copies:
        orig.copy_(contig)
    return counts


def perturb_update_(
    delta: Tensor,
    grad: Tensor,
    *,
    lr: float,
    norm_type: str,
    max_norm: float = 0.0,
    grad_scale: Tensor | None = None,
) -> Tensor:
    """One VILLA ascent step on ``delta``, in place; returns a 0-dim int64 count of skipped rows.

    Per example (dim 0), over all other dims, with g = grad / grad_scale:
    ``delta += lr * g / max(||g||, 1e-8)`` (l2 or linf norm of g), then, when ``max_norm > 0``,
    l2 rescales rows with ``||delta||_2 > max_norm`` to ``max_norm`` and linf clamps to ``[-max_norm, max_norm]``.

    Args:
        delta: float32 (or float64) [B, ...], updated in place.
        grad: gradient of the loss w.r.t. delta, same shape; float32, bfloat16, float16 or float64.
        lr: step size >= 0.
        norm_type: "l2" or "linf".
        max_norm: projection radius; 0 disables the projection.
        grad_scale: optional one-element device tensor (e.g. a loss scale) that divides ``grad``
            on the device, without a host sync.
    Rows whose g is not finite, or whose l2 norm overflows float32 (elements beyond about 1e19 / sqrt(n): the step
    would round to zero), keep their delta unchanged and are counted in the result.
    """
    return perturb_update_multi_(
        [delta], [grad], lrs=[lr], norm_type=norm_type, max_norm=max_norm, grad_scale=grad_scale
    )[0]


# ------------------------------------------------------------------------------------------------- init


_MASK_VALUES = "mask must be bool or 0/1 integers (1 = valid position)"


def _validity_mask(mask: Tensor) -> None:
    """Refuse a non-bool mask holding anything but 0 and 1 (an additive attention mask, a 0/255 byte mask): it
    would silently scale or zero the perturbation, or make it NaN. The values are read only where that costs no
    host sync and no graph break: a plain CPU tensor in eager mode (not traced, faked or under a transform)."""
    if mask.dtype == torch.bool or mask.device.type != "cpu" or not mask.numel():
        return
    dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
    transforms = getattr(torch._C, "_are_functorch_transforms_active", None)
    if (
        type(mask) not in (Tensor, torch.nn.Parameter)
        or torch.compiler.is_compiling()
        or (dispatch_modes is not None and dispatch_modes())
        or (transforms is not None and transforms())
    ):
        return
    bad = (mask != 0) & (mask != 1)  # NaN is neither
    if bad.any():
        value = mask[bad][0].item()
        if mask.is_floating_point():
            raise ValueError(
                f"{_MASK_VALUES}; an additive attention mask (0 / -inf) is not a validity mask (mask holds {value})"
            )
        raise ValueError(f"{_MASK_VALUES}; mask holds {value}")


@torch.library.custom_op("villa_fast::perturb_init_", mutates_args=("noise",))
def _perturb_init_op(noise: Tensor, mask: Tensor | None, init_mag: float, norm_type: str, backend: str) -> None:
    if backend == "reference":
        reference.perturb_init_scale_(noise, mask, init_mag=init_mag, norm_type=norm_type)
    elif backend == "triton":
        kernel = importlib.import_module("villa_fast.kernels.perturb_init")
        kernel.perturb_init(noise=noise, mask=mask, init_mag=init_mag, norm_type=norm_type)
    else:
        extension().perturb_init_(noise, mask, init_mag, 0 if norm_type == "l2" else 1)


@_perturb_init_op.register_fake
def _(noise, mask, init_mag, norm_type, backend):
    return None


def perturb_init(
    like: Tensor,
    mask: Tensor | None = None,
    *,
    init_mag: float,
    norm_type: str,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Initial perturbation for embeddings shaped like ``like`` ([B, ..., D]), float32 (float64 for float64).

    Zeros when ``init_mag == 0`` (the released VILLA loop). Otherwise the masked uniform init:
    l2: ``uniform(-1, 1) * mask * init_mag / sqrt(len * D)`` with ``len`` the number of valid positions
    of the example (rows without valid positions are zero); linf: ``uniform(-init_mag, init_mag) * mask``.
    The uniform draws come from torch's generator (``generator`` or the default one), so every backend
    gives the same result for the same generator state; only the masking and scaling are fused.

    Args:
        like: [B, P..., D] tensor whose shape, device (and float64-ness) the perturbation takes.
        mask: optional [B, P...] validity mask, 1 / True = valid position: bool, or integers (or floats) holding
            only 0 and 1. Any other value (an additive attention mask 0 / -1e4 or 0 / -inf, a uint8 255) is
            refused with a ValueError on a CPU mask; on a CUDA mask the values are not checked (that would need a
            host sync): pass a bool mask there (``mask > 0`` of a 0/1 mask).
    An empty ``like`` (B = 0, a zero-sized position dim, or D = 0) gives an empty result.
    """
    _check.tensor("like", like)
    init_mag = _check.real("init_mag", init_mag)
    _check.choice("norm_type", norm_type, _check.NORM_TYPES)
    if like.dim() < 2:
        raise ValueError(f"like must be at least 2-D [B, ..., D], got shape {tuple(like.shape)}")
    if mask is not None:
        _check.tensor("mask", mask)
        if mask.is_complex():
            raise TypeError(f"{_MASK_VALUES}; got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(like.shape[:-1]):
            raise ValueError(
                f"mask must have shape {tuple(like.shape[:-1])} (like without its last dim), got {tuple(mask.shape)}"
            )
        _check.same_device("mask", mask, "like", like)
        _validity_mask(mask)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if init_mag == 0 or like.numel() == 0:
        # nothing to draw for an empty batch, no positions or D = 0
        return torch.zeros(like.shape, dtype=dtype, device=like.device)
    noise = torch.empty(like.shape, dtype=dtype, device=like.device).uniform_(-1, 1, generator=generator)
    b, d = like.shape[0], like.shape[-1]
    flat = noise.view(b, -1, d)
    m = None if mask is None else mask.reshape(b, -1).to(dtype).contiguous()
    backend = choose("perturb_init", noise.device.type, str(dtype))
    _perturb_init_op(flat, m, init_mag, norm_type, backend)
    return noise
