"""The authors' AdamW step over many parameters in one fused, sync-free op (villa_fast.train.optim.AdamW)."""

from __future__ import annotations

import importlib
import numbers

import torch
from torch import Tensor

from villa_fast import reference
from villa_fast.ops import _check
from villa_fast.ops._backend import bump_versions, choose, extension, plain_eager

_PARAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)
_SCALAR_DTYPES = (torch.float32, torch.float64)


def _adamw_step_impl(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    hyper = {"beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": weight_decay, "correct_bias": correct_bias}
    if backend == "reference":
        reference.adamw_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr=lr if lr_tensor is None else lr_tensor,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **hyper,
        )
    elif backend == "triton":
        # one launch per tensor (a multi-tensor launch would need the addresses in device memory)
        importlib.import_module("villa_fast.kernels.adamw_step").adamw_step(
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            steps=steps,
            lr=lr,
            lr_tensor=lr_tensor,
            grad_scale=grad_scale,
            found_inf=found_inf,
            **hyper,
        )
    else:
        extension().adamw_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            steps,
            lr,
            lr_tensor,
            beta1,
            beta2,
            eps,
            weight_decay,
            correct_bias,
            grad_scale,
            found_inf,
        )


_adamw_step_op = torch.library.custom_op(
    "villa_fast::adamw_step_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "steps")
)(_adamw_step_impl)


def _run(params, grads, exp_avgs, exp_avg_sqs, steps, *rest) -> None:
    """The op, called directly in plain eager mode (see :func:`plain_eager`), else through its registration."""
    scalars = [t for t in (rest[1], rest[-3], rest[-2]) if t is not None]  # lr_tensor, grad_scale, found_inf
    if plain_eager(params, grads, exp_avgs, exp_avg_sqs, steps, scalars):
        _adamw_step_impl(params, grads, exp_avgs, exp_avg_sqs, steps, *rest)
        bump_versions([*params, *exp_avgs, *exp_avg_sqs, *steps])
    else:
        _adamw_step_op(params, grads, exp_avgs, exp_avg_sqs, steps, *rest)


@_adamw_step_op.register_fake
def _(*args):
    return None


def _one_element(name: str, t: object, device: torch.device) -> Tensor:
    _check.tensor(name, t)
    if t.numel() != 1 or t.dtype not in _SCALAR_DTYPES:
        raise ValueError(
            f"{name} must be a one-element float32 or float64 tensor, got dtype {t.dtype} and shape {tuple(t.shape)}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but params are on {device}; they must share a device")
    return t


def _beta(name: str, value: object) -> float:
    v = _check.real(name, value)
    if not v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def adamw_step_(
    params: list[Tensor] | tuple[Tensor, ...],
    grads: list[Tensor] | tuple[Tensor, ...],
    exp_avgs: list[Tensor] | tuple[Tensor, ...],
    exp_avg_sqs: list[Tensor] | tuple[Tensor, ...],
    steps: list[Tensor] | tuple[Tensor, ...],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    correct_bias: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One step of the authors' AdamW rule (:class:`villa_fast.train.optim.AdamW`) for every parameter, in place.

    Per parameter, with ``t`` its step count after advancing it by one and ``g = grad / grad_scale``::

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        p = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)    (lr alone when not correct_bias)
        p = p * (1 - lr * weight_decay)                                    (after the update)

    ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``steps`` change in place (each with memory of its own: no
    shared or expanded views); ``grads`` are read only. Every argument is checked before anything changes. When the
    one-element ``found_inf`` is non-zero nothing at all changes (parameters, moments, step counts), whatever the
    gradients hold. ``lr``, ``grad_scale`` and ``found_inf`` are read on the device: no host sync, and the op can
    be captured in a CUDA graph (the values at each replay are used). These are the ``grad_scale`` and
    ``found_inf`` that ``torch.amp.GradScaler.step`` hands an optimizer with ``_step_supports_amp_scaling``.

    Math in float32 (float64 for float64 parameters); the step size and ``1 - lr * weight_decay`` of each tensor
    in float64 (the CUDA kernel: in float32 with ``1 - b^t = -expm1(t log b)``, a few ulp), rounded once.

    Cost: one read of p, g, m, v and one write of p, m, v per element, 28 bytes per float32 parameter with float32
    gradients (24 with bfloat16 ones), against about 84 for the multi-tensor (foreach) rule, which makes eight
    passes over the parameters (ten, about 100 bytes, with device step counts). With the CUDA extension one
    launch pair covers 64 tensors. Prediction for UNITER-base VQA (168 tensors, 115.9M parameters) on an H100
    (about 3 TB/s): 3.2 GB moved in about 1.1 ms, near the bandwidth bound, against about 3.3 ms for the foreach
    rule (9.7 GB): about 3x. The Triton kernel launches once per tensor. The C++ kernel (SSE) on a 2-core CPU:
    82 ms against 396 ms for the foreach rule over the same 168 tensors (bench/RESULTS.md).

    Args:
        params: float32 tensors (the master weights; float64 too, and float16/bfloat16 through the reference).
        grads: one per parameter, same shape and device; the parameter's dtype, or float16/bfloat16 with
            float32 parameters.
        exp_avgs, exp_avg_sqs: the first and second moments, the parameter's shape, dtype and device.
        steps: one-element float32 tensors on the device, each parameter's step count.
        lr: a number >= 0, or a one-element float32/float64 tensor on the device.
        beta1, beta2: in [0, 1). eps: > 0 (0 would make a zero gradient's step 0 / 0 = NaN).
        weight_decay: >= 0. correct_bias: apply the two bias corrections.
        grad_scale: None or a one-element float32/float64 tensor on the device: the gradients are divided by it.
        found_inf: None or a one-element float32/float64 tensor on the device: non-zero skips the step.
    """
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
    params, grads, exp_avgs, exp_avg_sqs, steps = (list(v) for v in lists.values())
    for name, value in lists.items():
        if len(value) != len(params):
            raise ValueError(f"{name} has {len(value)} tensors but params has {len(params)}")
    beta1, beta2 = _beta("beta1", beta1), _beta("beta2", beta2)
    # eps > 0: with eps = 0 a zero gradient on a zero second moment gives 0 / 0 = NaN in the parameter
    eps, weight_decay = _check.positive("eps", eps), _check.real("weight_decay", weight_decay)
    if not isinstance(correct_bias, (bool, numbers.Integral)):
        raise TypeError(f"correct_bias must be a bool, got {type(correct_bias).__name__}")
    correct_bias = bool(correct_bias)
    if not params:
        if isinstance(lr, Tensor):
            _check.tensor("lr", lr)
        else:
            _check.real("lr", lr)
        return
    device = _check.tensor("params[0]", params[0]).device
    lr_tensor = None
    if isinstance(lr, Tensor):
        lr_tensor, lr = _one_element("lr", lr, device), 0.0
    else:
        lr = _check.real("lr", lr)
    if grad_scale is not None:
        _one_element("grad_scale", grad_scale, device)
    if found_inf is not None:
        _one_element("found_inf", found_inf, device)
    if not _tensors_ok(params, grads, exp_avgs, exp_avg_sqs, steps, device):
        _check_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, device)
    _check.no_grad_leaves(
        "adamw_step_", {"params": params, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    )
    dtypes = {str(p.dtype) for p in params}
    backends = {choose("adamw_step", device.type, d) for d in dtypes}
    backend = backends.pop() if len(backends) == 1 else "reference"
    hyper = (beta1, beta2, eps, weight_decay, correct_bias)
    names = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if backend != "reference":
        # the kernels take contiguous tensors; any other parameter goes through the reference
        odd = {
            i
            for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True))
            if not (p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous())
        }
        if odd:
            pick = sorted(odd)
            odd_lists = [[lst[i] for i in pick] for lst in names]
            _run(*odd_lists, lr, lr_tensor, *hyper, grad_scale, found_inf, "reference")
            keep = [i for i in range(len(params)) if i not in odd]
            names = tuple([lst[i] for i in keep] for lst in names)
            if not names[0]:
                return
    _run(*names, lr, lr_tensor, *hyper, grad_scale, found_inf, backend)


def _tensors_ok(params, grads, exp_avgs, exp_avg_sqs, steps, device: torch.device) -> bool:
    """The checks of :func:`_check_tensors` in bulk, without naming anything: the common case, kept cheap
    (an optimizer step passes a few hundred tensors)."""
    every = (params, grads, exp_avgs, exp_avg_sqs, steps)
    if not all(isinstance(t, Tensor) for lst in every for t in lst):
        return False
    if {t.device for lst in every for t in lst} != {device}:
        return False
    f32 = torch.float32
    quads = zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)
    if not all(
        p.dtype in _PARAM_DTYPES
        and m.dtype == p.dtype
        and v.dtype == p.dtype
        and (g.dtype == p.dtype or (p.dtype == f32 and g.dtype in _HALF))
        and p.shape == g.shape == m.shape == v.shape
        for p, g, m, v in quads
    ):
        return False
    if not all(s.dtype == f32 and s.numel() == 1 for s in steps):
        return False
    if torch.compiler.is_compiling():  # traced tensors have no addresses to compare
        return True
    return _clash(params, grads, exp_avgs, exp_avg_sqs, steps) is None


def _clash(params, grads, exp_avgs, exp_avg_sqs, steps) -> str | None:
    written = [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)]
    return _check.memory_clash(written, [("grads", grads, None)])


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs, steps, device: torch.device) -> None:
    """Every tensor argument, one by one: the first problem raises an error naming the tensor."""
    for i, (p, g, m, v, s) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True)):
        for name, t in ((f"params[{i}]", p), (f"grads[{i}]", g), (f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            _check.tensor(name, t)
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but params[0] is on {device}; they must share a device")
        _check.floating(f"params[{i}]", p, _PARAM_DTYPES)
        if not (g.dtype == p.dtype or (p.dtype == torch.float32 and g.dtype in _HALF)):
            raise TypeError(
                f"grads[{i}] has dtype {g.dtype} but params[{i}] has {p.dtype} "
                "(float16 or bfloat16 gradients need float32 parameters)"
            )
        for name, t in ((f"grads[{i}]", g), (f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            if t.shape != p.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but params[{i}] has {tuple(p.shape)}")
        for name, t in ((f"exp_avgs[{i}]", m), (f"exp_avg_sqs[{i}]", v)):
            if t.dtype != p.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but params[{i}] has {p.dtype}")
        _check.tensor(f"steps[{i}]", s)
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(
                f"steps[{i}] must be a one-element float32 tensor, got dtype {s.dtype} and shape {tuple(s.shape)}"
            )
        if s.device != device:
            raise ValueError(f"steps[{i}] is on {s.device} but params[0] is on {device}; they must share a device")
    if not torch.compiler.is_compiling():  # traced tensors have no addresses to compare
        clash = _clash(params, grads, exp_avgs, exp_avg_sqs, steps)
        if clash:
            raise ValueError(clash)
