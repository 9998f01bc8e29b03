"""One step of the authors' AdamW rule over a list of parameters (plain PyTorch, the oracle of adamw_step_)."""

from __future__ import annotations

import torch
from torch import Tensor


def adamw_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
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
    """In place on ``params``, ``exp_avgs``, ``exp_avg_sqs`` and ``steps`` (one-element float32 counts).

    Per parameter, with ``t = step + 1`` and ``g = grad / grad_scale``::

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        p = p - size * (m / (sqrt(v) + eps)),  size = lr * sqrt(1 - b2^t) / (1 - b1^t)  (lr without correct_bias)
        p = p * (1 - lr * weight_decay)  (when weight_decay > 0)

    Elementwise math in float32 (float64 for float64 parameters); ``size`` and ``1 - lr * weight_decay`` are
    computed in float64 and rounded once. ``lr`` is a number or a one-element tensor on the parameters' device.
    When the one-element ``found_inf`` is non-zero, every tensor keeps its values bitwise (NaN or inf gradients
    included): the new values are selected with ``torch.where`` on the device, so there is no host sync.
    """
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    lr64 = lr.reshape(()).to(torch.float64) if isinstance(lr, Tensor) else float(lr)
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        math = torch.float64 if p.dtype == torch.float64 else torch.float32
        grad = g.to(math)
        if grad_scale is not None:
            grad = grad / grad_scale.reshape(()).to(math)
        t = step + 1.0

        m_new = m.to(math) * beta1 + (1.0 - beta1) * grad
        v_new = v.to(math) * beta2 + (1.0 - beta2) * (grad * grad)
        denom = v_new.sqrt() + eps

        size = lr64
        if correct_bias:
            t64 = t.reshape(()).to(torch.float64)
            size = lr64 * torch.sqrt(1.0 - beta2**t64) / (1.0 - beta1**t64)
        p_new = p.to(math) - _rounded(size, math) * (m_new / denom)
        if weight_decay > 0.0:
            p_new = p_new * _rounded(1.0 - lr64 * weight_decay, math)

        for old, new in ((p, p_new), (m, m_new), (v, v_new), (step, t)):
            old.copy_(new if skip is None else torch.where(skip, old, new.to(old.dtype)))


def _rounded(x: float | Tensor, math: torch.dtype) -> float | Tensor:
    """A float64 number, or 0-dim tensor, rounded once to ``math`` (a Python float is rounded by the op using it:
    no tensor is made from a host number, which would be a host-to-device copy)."""
    return x.to(math) if isinstance(x, Tensor) else x
