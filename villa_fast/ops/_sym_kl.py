"""Symmetric KL consistency loss with fused gradients (VILLA_SPEC section 2)."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from villa_fast import reference
from villa_fast.ops import _check
from villa_fast.ops._backend import SYM_KL_EXT_MAX_CLASSES, choose_sym_kl, extension

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# the most classes the C++ extension's kernels take (CPU and CUDA); more run on the Triton or reference backend
MAX_CLASSES = SYM_KL_EXT_MAX_CLASSES


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("villa_fast::sym_kl", mutates_args=())
def _sym_kl_op(a: Tensor, b: Tensor, reduction: str, need_grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    if backend == "reference":
        loss, ga, gb = reference.sym_kl_fwd(a, b, reduction)
    elif backend == "triton":
        kernel = importlib.import_module("villa_fast.kernels.sym_kl")
        loss, ga, gb = kernel.sym_kl(a=a, b=b, reduction=reduction, need_grad=need_grad)
    else:
        loss, ga, gb = extension().sym_kl_fwd(a, b, 0 if reduction == "batchmean" else 1)
    if not need_grad:
        ga, gb = a.new_empty(0), b.new_empty(0)
    return loss.to(_loss_dtype(a.dtype)), ga, gb


@_sym_kl_op.register_fake
def _(a, b, reduction, need_grad, backend):
    loss = a.new_empty((), dtype=_loss_dtype(a.dtype))
    if need_grad:
        return loss, torch.empty_like(a), torch.empty_like(b)
    return loss, a.new_empty(0), b.new_empty(0)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])


class _FirstOrderOnly(torch.autograd.Function):
    """The saved gradient, as is; differentiating through it raises (its dependence on the logits is not in the
    graph: a second derivative would silently be zero)."""

    @staticmethod
    def forward(ctx, g: Tensor) -> Tensor:
        return g.clone()

    @staticmethod
    def backward(ctx, _grad: Tensor):
        raise RuntimeError(
            "villa_fast.ops.sym_kl has no second derivative: its gradients come from the fused forward; "
            "differentiate villa_fast.reference.sym_kl for higher-order gradients"
        )


def _backward(ctx, grad_loss, _grad_ga, _grad_gb):
    # the fused forward already produced both gradients: backward only scales them, one multiply each (float16
    # never gets here: sym_kl runs it in float32; bfloat16 has float32's range, and the scale is rounded to it)
    ga, gb = ctx.saved_tensors
    if torch.is_grad_enabled():
        # backward with create_graph=True: first derivatives as usual (also with respect to grad_loss); a second
        # derivative through the logits raises instead of coming out zero
        ga, gb = _FirstOrderOnly.apply(ga), _FirstOrderOnly.apply(gb)
    return ga * grad_loss.to(ga.dtype), gb * grad_loss.to(gb.dtype), None, None, None


_sym_kl_op.register_autograd(_backward, setup_context=_setup_context)


def sym_kl(
    logits_a: Tensor, logits_b: Tensor, reduction: str = "batchmean", *, row_mask: Tensor | None = None
) -> Tensor:
    """Symmetric KL ``KL(softmax(b) || softmax(a)) + KL(softmax(a) || softmax(b))`` of [N, C] logits.

    Args:
        logits_a, logits_b: [N, C] with N >= 1 and C >= 2, float32, bfloat16, float16 (or float64);
            the math is done in float32 (float64 for float64 inputs). Gradients flow into both. The cpp and cuda
            backends take C <= 32768 (``MAX_CLASSES``); more classes (a vocabulary head, C = 50265) run on Triton
            on a CUDA device where it is installed, else on the reference (an explicit
            VILLA_FAST_BACKEND=cpp|cuda raises BackendUnavailableError for them).
        reduction: "batchmean" sums over classes and averages over rows; "mean" averages over all elements;
            "sum" sums over both (the kernels' batchmean times the rows).
        row_mask: optional bool [N]: only the rows where it is true count, as if the others were not there
            (averaged over, or with "sum" summed over, the true rows; the other rows get zero gradient, whatever
            their values).
            For logits padded to a fixed row count (a CUDA graph needs fixed shapes): no host sync; with no
            true row the loss is 0.
    Returns:
        a 0-dim float32 tensor (float64 for float64 inputs).
    """
    a = _check.tensor("logits_a", logits_a)
    b = _check.tensor("logits_b", logits_b)
    _check.choice("reduction", reduction, _check.REDUCTIONS)
    _check.floating("logits_a", a, _LOGIT_DTYPES)
    _check.floating("logits_b", b, _LOGIT_DTYPES)
    if a.dim() != 2:
        raise ValueError(f"logits_a must be 2-D [N, C], got shape {tuple(a.shape)}")
    if b.shape != a.shape:
        raise ValueError(f"logits_b must have the shape of logits_a {tuple(a.shape)}, got {tuple(b.shape)}")
    n, c = a.shape
    if n < 1:
        raise ValueError("logits_a must have at least one row (N >= 1)")
    if c < 2:
        raise ValueError(f"logits_a must have at least 2 classes (2 <= C), got C={c}")
    _check.same_device("logits_a", a, "logits_b", b)
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    if a.dtype == torch.float16:
        # float16 gradients scaled by 1 / N (or 1 / (N C)) fall below its range before a loss scale can lift
        # them: the op runs on float32 copies, whose gradients autograd casts back after the upstream scale
        a, b = a.float(), b.float()
    keep = None
    if row_mask is not None:
        keep = _check.tensor("row_mask", row_mask)
        if keep.dtype != torch.bool:
            raise TypeError(f"row_mask must have dtype bool; got {str(keep.dtype).replace('torch.', '')}")
        if keep.shape != (n,):
            raise ValueError(f"row_mask must have shape [N] = ({n},) like the logits' rows, got {tuple(keep.shape)}")
        _check.same_device("logits_a", a, "row_mask", keep)
        # equal rows (both zero) add exactly zero to the sum, and torch.where sends them no gradient
        col = keep.unsqueeze(1)
        a, b = torch.where(col, a, 0), torch.where(col, b, 0)
    backend = choose_sym_kl(a.device.type, str(a.dtype), c)
    need_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    kernel_reduction = "batchmean" if reduction == "sum" else reduction
    loss, _, _ = _sym_kl_op(a.contiguous(), b.contiguous(), kernel_reduction, need_grad, backend)
    if reduction == "sum":
        # masked rows add exactly zero: the sum is the average over all N rows times N
        return loss * n
    if keep is not None:
        # the kernel averaged over all N rows: rescale to the kept rows' count (on the device, no sync)
        loss = loss * (n / keep.sum().clamp(min=1).to(loss.dtype))
    return loss
