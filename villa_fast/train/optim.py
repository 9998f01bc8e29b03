"""Optimizer with the official parameter groups, and the warmup-then-linear-decay schedule."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["NO_DECAY", "WarmupLinear", "build_optimizer", "set_dropout", "warmup_linear"]

#: parameter-name fragments without weight decay, as in the authors' optimizer setup
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def _is_head(name: str) -> bool:
    return not name.startswith("uniter.")


def param_groups(model: nn.Module, weight_decay: float, lr_mul: float) -> list[dict[str, Any]]:
    """Four groups: head with decay, head without, encoder with decay, encoder without.

    The head (everything outside ``model.uniter``) gets ``lr_mul`` times the scheduled learning
    rate; names containing one of :data:`NO_DECAY` get no weight decay.
    """
    groups = {(h, d): [] for h in (True, False) for d in (True, False)}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = not any(nd in name for nd in NO_DECAY)
        groups[(_is_head(name), decay)].append(p)
    out = []
    for (head, decay), params in groups.items():
        out.append(
            {
                "params": params,
                "weight_decay": weight_decay if decay else 0.0,
                "lr_mul": lr_mul if head else 1.0,
                "name": f"{'head' if head else 'encoder'}{'' if decay else '_no_decay'}",
            }
        )
    return out


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW (eps 1e-6, decoupled weight decay), Adam or Adamax over :func:`param_groups`."""
    groups = param_groups(model, cfg["weight_decay"], cfg["lr_mul"])
    betas = tuple(cfg["betas"])
    lr = cfg["learning_rate"]
    name = cfg["optim"]
    dev = next(model.parameters()).device
    fused = {"fused": True} if dev.type == "cuda" else {}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6, **fused)
    if name == "adam":
        # the authors' Adam: L2 weight decay folded into the gradient
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=1e-6, **fused)
    if name == "adamax":
        return torch.optim.Adamax(groups, lr=lr, betas=betas, eps=1e-6)
    raise ValueError(f"unknown optimizer {name!r}")


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (1-based)."""
    if step < warmup:
        return step / warmup
    if total <= warmup:
        return 1.0 if step <= total else 0.0
    return max(0.0, (total - step) / (total - warmup))


class WarmupLinear:
    """Sets each group's lr to ``peak * warmup_linear(step) * group['lr_mul']`` before step ``step``.

    The state is the step count, so a resumed run sets exactly the learning rates of an
    uninterrupted one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, warmup: int, total: int):
        self.optimizer = optimizer
        self.peak_lr = peak_lr
        self.warmup = warmup
        self.total = total
        self.step_count = 0

    def lr_at(self, step: int) -> float:
        return self.peak_lr * warmup_linear(step, self.warmup, self.total)

    def step(self) -> float:
        """Advance to the next optimizer step and set its learning rates; returns the base lr."""
        self.step_count += 1
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            value = lr * group.get("lr_mul", 1.0)
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(value)
            else:
                group["lr"] = value
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "peak_lr": self.peak_lr, "warmup": self.warmup, "total": self.total}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout layer's probability to ``p`` (the config's ``dropout``)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = p
        # attention that calls scaled_dot_product_attention keeps its probability as a float
        if isinstance(getattr(m, "dropout_p", None), float):
            m.dropout_p = p


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
