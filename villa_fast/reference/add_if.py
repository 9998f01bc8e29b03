"""acc += val for a list of tensors, only when a device flag says so (plain PyTorch)."""

from __future__ import annotations

import torch
from torch import Tensor


def add_if_(accs: list[Tensor], vals: list[Tensor], ok: Tensor) -> None:
    """In place: ``accs[i] += vals[i]`` for every pair when the one-element bool ``ok`` is true.

    When ``ok`` is false every ``accs[i]`` keeps its values, whatever ``vals[i]`` holds (NaN and inf
    included): the values added are ``where(ok, vals[i], 0)``. No host sync.
    """
    keep = ok.reshape(())
    for a, v in zip(accs, vals, strict=True):
        a.add_(torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device)))
