"""Argument checks shared by the ops: every message names the argument and what was expected."""

from __future__ import annotations

import bisect
import math
import numbers

import torch
from torch import Tensor

NORM_TYPES = ("l2", "linf")
REDUCTIONS = ("batchmean", "mean", "sum")


def tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(name: str, t: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must have dtype {names}; got {str(t.dtype).replace('torch.', '')}")


def same_device(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; they must share a device")


def real(name: str, value: object, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return v


def positive(name: str, value: object) -> float:
    """A finite real number > 0."""
    v = real(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def choice(name: str, value: object, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value  # type: ignore[return-value]


def no_grad_leaves(op: str, lists: dict[str, list]) -> None:
    """An in-place op on a leaf that requires grad, with grad mode on, raises as torch's own in-place ops do,
    whichever backend runs (a kernel called directly would change it silently)."""
    if not torch.is_grad_enabled():
        return
    for name, ts in lists.items():
        for i, t in enumerate(ts):
            if isinstance(t, Tensor) and t.requires_grad and t.is_leaf:
                raise RuntimeError(
                    f"{op}: {name}[{i}] is a leaf tensor that requires grad, changed in place while grad mode is on; "
                    "call it under torch.no_grad() (as an optimizer step does)"
                )


def _same_view(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()


def _spans(
    groups: list[tuple[str, list[Tensor]]], *, written: bool = False
) -> tuple[list[tuple[int, int, int, int]], tuple[int, int, str] | None]:
    """(first byte, end byte, group, index) of every non-empty tensor, sorted: the bytes a contiguous tensor
    covers; a strided one's first element. With them the first tensor that cannot be judged, as (group, index,
    why), or None: a meta tensor (no memory), or, when ``written``, an expanded view (one element at many
    indices)."""
    spans = []
    for gi, (_, ts) in enumerate(groups):
        for i, t in enumerate(ts):
            n = t.numel()
            if not n:
                continue
            if not t.is_contiguous():
                if written and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape, strict=True)):
                    return spans, (gi, i, "expanded")
                # the kernels take contiguous tensors; a strided one runs through the reference one tensor at
                # a time (or as a contiguous copy), where interleaved views cannot race: only its first
                # element is claimed, which still catches the same view twice
                n = 1
            lo = t.data_ptr()
            if lo == 0 and t.is_meta:  # a non-empty tensor with memory never starts at address 0
                return spans, (gi, i, "meta")
            spans.append((lo, lo + n * t.element_size(), gi, i))
    spans.sort()
    return spans, None


_UNJUDGED = {
    "expanded": "is an expanded view (stride 0): every tensor an op writes must have memory of its own",
    "meta": "is a meta tensor: meta tensors are not supported (they hold no data to compute on)",
}


def memory_clash(
    written: list[tuple[str, list[Tensor]]],
    read: list[tuple[str, list[Tensor], list[Tensor] | None]] | tuple = (),
    *,
    indexed: bool = True,
) -> str | None:
    """Why an op that writes the ``written`` tensors while it reads the ``read`` ones would race, or None.

    Both are lists of groups, ``(name, tensors)``, the read ones with a third item: the written list whose
    same-index tensor is each read tensor's own partner (or None). On a GPU the tensors of one call are
    updated by concurrent blocks, so two written tensors must not share a byte (the same tensor twice, or
    overlapping views of one buffer; disjoint slices are fine), and a read tensor must not share a byte with
    any written one, except with its partner when both are the same view (an element reads itself before it
    is written: ``a += a``). Contiguous tensors are judged by the bytes they cover; a strided view, which the
    ops run apart (reference or contiguous copy), only by its first element. Empty tensors hold no memory.
    A written tensor must not be an expanded view (a stride-0 dim of size > 1: one element at many indices), and
    no tensor may be a meta tensor (no memory to judge, nothing to compute on): both are reported as well.
    Names are ``name[i]`` (``name`` alone when ``indexed`` is false). O(n log n) in the number of tensors.
    """

    def name(group: str, i: int) -> str:
        return f"{group}[{i}]" if indexed else group

    spans, bad = _spans(written, written=True)
    if bad:
        return f"{name(written[bad[0]][0], bad[1])} {_UNJUDGED[bad[2]]}"
    for (_, hi_a, ga, ia), (lo_b, _, gb, ib) in zip(spans, spans[1:], strict=False):
        if lo_b < hi_a:
            a, b = written[ga][1][ia], written[gb][1][ib]
            what = "is the same tensor as" if _same_view(a, b) else "shares memory with"
            return (
                f"{name(written[gb][0], ib)} {what} {name(written[ga][0], ia)}; "
                "every tensor an op writes must have memory of its own"
            )
    if not read:
        return None
    starts = [s[0] for s in spans]
    read_spans, bad = _spans([(g[0], g[1]) for g in read])
    if bad:
        return f"{name(read[bad[0]][0], bad[1])} {_UNJUDGED[bad[2]]}"
    for r_lo, r_hi, rg, ri in read_spans:
        # written spans are disjoint and sorted: those overlapping [r_lo, r_hi) end the prefix left of r_hi
        j = bisect.bisect_left(starts, r_hi) - 1
        while j >= 0 and spans[j][1] > r_lo:
            _, _, wg, wi = spans[j]
            t, w, partners = read[rg][1][ri], written[wg][1][wi], read[rg][2]
            if not (partners is written[wg][1] and wi == ri and _same_view(t, w)):
                return (
                    f"{name(read[rg][0], ri)} shares memory with {name(written[wg][0], wi)}, "
                    f"which the op writes while it reads {name(read[rg][0], ri)}"
                )
            j -= 1
    return None
