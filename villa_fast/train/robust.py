"""Robust evaluation: a task's metrics (accuracy; recall@k for retrieval) under a K-step attack in
the embedding space.

The attack is VILLA's perturbation turned against a fixed model: a delta added to the word
embeddings (and/or the raw region features, before the image linear layer), K steps of
normalised gradient ascent on the loss the task names (``Task.attack_loss``: the task loss, or for
retrieval the listwise ranking loss of the query's ground truth), projected onto a per-example
(per-row) l2 ball of radius ``eps`` (or an l-inf box), in eval mode. Hooks attach only for the
duration of one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from villa_fast.ops import perturb_update_

__all__ = ["EmbeddingAttack"]


class EmbeddingAttack:
    """``attack(forward_fn, loss_fn, batch) -> logits`` under the strongest perturbation found.

    Args:
        text_embedding: module whose output [B, L, H] gets the text delta (the word embeddings).
        image_input: module whose first input [B, N, D] gets the image delta (the image linear layer).
        steps: K gradient steps.
        eps: radius of the per-example ball (l2 over all of a row's elements, or l-inf per element).
        lr: ascent step size (default ``2.5 * eps / steps``).
        modalities: any of "text", "image".
        norm_type: "l2" or "linf".
    """

    def __init__(
        self,
        text_embedding: nn.Module,
        image_input: nn.Module,
        *,
        steps: int = 3,
        eps: float = 1.0,
        lr: float | None = None,
        modalities: Sequence[str] = ("text",),
        norm_type: str = "l2",
    ):
        if steps < 1 or eps < 0:
            raise ValueError("attack needs steps >= 1 and eps >= 0")
        self.text_embedding = text_embedding
        self.image_input = image_input
        self.steps = steps
        self.eps = eps
        self.lr = 2.5 * eps / steps if lr is None else lr
        self.modalities = tuple(modalities)
        self.norm_type = norm_type
        self._deltas: dict[str, Tensor | None] = {}

    def _txt_hook(self, module, inputs, output):
        d = self._deltas.get("text")
        if d is None:
            d = torch.zeros(output.shape, dtype=torch.float32, device=output.device, requires_grad=True)
            self._deltas["text"] = d
        return (output.float() + d).to(output.dtype)

    def _img_hook(self, module, inputs):
        x = inputs[0]
        d = self._deltas.get("image")
        if d is None:
            d = torch.zeros(x.shape, dtype=torch.float32, device=x.device, requires_grad=True)
            self._deltas["image"] = d
        return ((x.float() + d).to(x.dtype), *inputs[1:])

    def __call__(self, forward_fn: Callable[[Any], Tensor], loss_fn: Callable[[Tensor, Any], Tensor], batch) -> Tensor:
        self._deltas = {}
        handles = []
        if "text" in self.modalities:
            handles.append(self.text_embedding.register_forward_hook(self._txt_hook))
        if "image" in self.modalities:
            handles.append(self.image_input.register_forward_pre_hook(self._img_hook))
        try:
            for _ in range(self.steps):
                with torch.enable_grad():
                    logits = forward_fn(batch)
                    loss = loss_fn(logits, batch)
                    names = [k for k, v in self._deltas.items() if v is not None]
                    grads = torch.autograd.grad(loss, [self._deltas[k] for k in names], allow_unused=True)
                with torch.no_grad():
                    for name, g in zip(names, grads, strict=True):
                        if g is None:
                            continue
                        d = self._deltas[name]
                        perturb_update_(d.detach(), g, lr=self.lr, norm_type=self.norm_type, max_norm=self.eps)
            with torch.no_grad():
                return forward_fn(batch)
        finally:
            for h in handles:
                h.remove()
            self._deltas = {}
