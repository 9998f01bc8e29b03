"""Multi-tensor add under a device flag: how the adversarial step accumulates checked gradients."""

from __future__ import annotations

import importlib

import torch
from torch import Tensor

from villa_fast import reference
from villa_fast.ops import _check
from villa_fast.ops._backend import bump_versions, choose, extension, plain_eager

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _add_if_impl(accs: list[Tensor], vals: list[Tensor], ok: Tensor, backend: str) -> None:
    if backend == "reference":
        reference.add_if_(accs, vals, ok)
    elif backend == "triton":
        # one launch per pair (a multi-tensor launch would need the addresses in device memory)
        importlib.import_module("villa_fast.kernels.add_if").add_if(accs=accs, vals=vals, ok=ok)
    else:
        extension().add_if_(accs, vals, ok)


_add_if_op = torch.library.custom_op("villa_fast::add_if_", mutates_args=("accs",))(_add_if_impl)


def _run(accs: list[Tensor], vals: list[Tensor], ok: Tensor, backend: str) -> None:
    if plain_eager(accs, vals, (ok,)):
        _add_if_impl(accs, vals, ok, backend)
        bump_versions(accs)
    else:
        _add_if_op(accs, vals, ok, backend)


@_add_if_op.register_fake
def _(accs, vals, ok, backend):
    return None


def add_if_(accs: list[Tensor] | tuple[Tensor, ...], vals: list[Tensor] | tuple[Tensor, ...], ok: Tensor) -> None:
    """In place: ``accs[i] += vals[i]`` for every pair when ``ok`` is true; otherwise nothing changes.

    The adversarial step adds each step's parameter gradients to the running sums with it, ``ok``
    being the step's finiteness flag: with the CUDA extension that is one launch per 40 tensors
    (instead of a masked fill and an add per parameter), and a step flagged bad is not even read,
    so its NaN or inf values never reach ``accs``. Runs on the device, no host sync.

    Args:
        accs: tensors updated in place (float32, float16, bfloat16 or float64); no two may share memory.
        vals: one tensor per ``accs[i]``, same shape, dtype and device; none may share memory with an
            entry of ``accs`` other than its own (``accs[i] += accs[i]`` is allowed).
        ok: a one-element bool tensor on the same device.
    """
    accs, vals = list(accs), list(vals)
    if len(accs) != len(vals):
        raise ValueError(f"accs has {len(accs)} tensors but vals has {len(vals)}")
    ok = _check.tensor("ok", ok)
    if ok.dtype != torch.bool or ok.numel() != 1:
        raise ValueError(f"ok must be a one-element bool tensor, got dtype {ok.dtype} and shape {tuple(ok.shape)}")
    if not _pairs_ok(accs, vals, ok.device):
        _check_pairs(accs, vals, ok)
    _check.no_grad_leaves("add_if_", {"accs": accs})
    if not accs:
        return
    dtypes = {str(a.dtype) for a in accs}
    backends = {choose("add_if", ok.device.type, d) for d in dtypes}
    backend = backends.pop() if len(backends) == 1 else "reference"
    if backend != "reference":
        # the kernels take contiguous pairs; any other pair goes through the reference
        rest = [
            i for i, (a, v) in enumerate(zip(accs, vals, strict=True)) if not (a.is_contiguous() and v.is_contiguous())
        ]
        if rest:
            odd = set(rest)
            _run([accs[i] for i in rest], [vals[i] for i in rest], ok, "reference")
            accs = [a for i, a in enumerate(accs) if i not in odd]
            vals = [v for i, v in enumerate(vals) if i not in odd]
            if not accs:
                return
    _run(accs, vals, ok, backend)


def _pairs_ok(accs: list, vals: list, device: torch.device) -> bool:
    """The checks of :func:`_check_pairs` in bulk, without naming anything: the common case, kept cheap."""
    if not (all(isinstance(t, Tensor) for t in accs) and all(isinstance(t, Tensor) for t in vals)):
        return False
    if any(t.device != device for t in accs) or any(t.device != device for t in vals):
        return False
    pairs = zip(accs, vals, strict=True)
    if not all(a.dtype in _DTYPES and v.dtype == a.dtype and v.shape == a.shape for a, v in pairs):
        return False
    if torch.compiler.is_compiling():  # traced tensors have no addresses to compare
        return True
    return _clash(accs, vals) is None


def _clash(accs: list, vals: list) -> str | None:
    return _check.memory_clash([("accs", accs)], [("vals", vals, accs)])


def _check_pairs(accs: list, vals: list, ok: Tensor) -> None:
    """Every pair, one by one: the first problem raises an error naming the tensor."""
    for i, (a, v) in enumerate(zip(accs, vals, strict=True)):
        _check.tensor(f"accs[{i}]", a)
        _check.tensor(f"vals[{i}]", v)
        _check.floating(f"accs[{i}]", a, _DTYPES)
        if v.dtype != a.dtype:
            raise TypeError(f"vals[{i}] has dtype {v.dtype} but accs[{i}] has {a.dtype}")
        if v.shape != a.shape:
            raise ValueError(f"vals[{i}] has shape {tuple(v.shape)} but accs[{i}] has {tuple(a.shape)}")
        _check.same_device(f"accs[{i}]", a, "ok", ok)
        _check.same_device(f"vals[{i}]", v, "ok", ok)
    if not torch.compiler.is_compiling():  # traced tensors have no addresses to compare
        clash = _clash(accs, vals)
        if clash:
            raise ValueError(clash)
