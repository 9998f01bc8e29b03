"""Optimizer with the official parameter groups, and the warmup-then-linear-decay schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from villa_fast.ops import adamw_step_
from villa_fast.ops._backend import choose

__all__ = [
    "LR_FLOOR",
    "NO_DECAY",
    "AdamW",
    "WarmupLinear",
    "build_optimizer",
    "set_dropout",
    "warmup_linear",
    "zero_grads_of_stepped",
]

#: parameter-name fragments without weight decay, as in the authors' optimizer setup. This follows their
#: naming rule, not the module types: the weight of a layer norm whose name lacks "LayerNorm"
#: (``img_layer_norm.weight``, ``pos_layer_norm.weight``) gets weight decay, as in the authors' code.
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(model: nn.Module, weight_decay: float, lr_mul: float) -> list[dict[str, Any]]:
    """Four groups: head with decay, head without, encoder with decay, encoder without.

    The head (everything outside ``model.uniter`` in a task model; nothing in a model without a ``uniter``
    encoder, such as a bare :class:`~villa_fast.models.UniterModel`) gets ``lr_mul`` times the scheduled
    learning rate; names containing one of :data:`NO_DECAY` get no weight decay.
    """
    groups = {(h, d): [] for h in (True, False) for d in (True, False)}
    has_head = isinstance(getattr(model, "uniter", None), nn.Module)
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        decay = not any(nd in name for nd in NO_DECAY)
        groups[(has_head and not name.startswith("uniter."), decay)].append(p)
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


class AdamW(torch.optim.Optimizer):
    """AdamW with the update rule of the UNITER/VILLA code (the BERT-era AdamW), multi-tensor.

    Per parameter, at its step t (counted per parameter, from 1)::

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        p = p - lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
        p = p - lr * weight_decay * p    (after the Adam update, on the updated weights)

    It differs from ``torch.optim.AdamW`` in two places: eps is added to ``sqrt(v)`` before the bias
    correction is folded into the step size (torch adds it after, which makes the effective eps
    ``sqrt(1 - b2^t)`` times smaller: 7x at the first step with b2 = 0.98), and the weight decay is
    applied after the update (torch applies it before). ``correct_bias=False`` drops both bias corrections.
    The state per parameter is ``step`` (an int, or a 0-dim float32 device tensor, see below), ``exp_avg``
    and ``exp_avg_sq``.

    The step runs as the fused op :func:`villa_fast.ops.adamw_step_` (one pass over the parameters: the C++
    kernel on the CPU, the CUDA or Triton one on a GPU) unless the backend choice for the parameters is the
    reference (``VILLA_FAST_BACKEND[_ADAMW_STEP]=reference``, no compiled kernel, or parameters of a dtype the
    kernels do not take): then it is the multi-tensor (foreach) rule below.

    ``capturable=True`` keeps every step count on the parameter's device (a 0-dim float32 tensor) and
    accepts a 0-dim device tensor as ``lr`` (set it in place, e.g. by the schedule), so that a step never
    reads a number back to the host and can be captured in a CUDA graph (GraphedVillaStep).

    Loss scaling: with ``_step_supports_amp_scaling``, ``torch.amp.GradScaler.step`` neither unscales the
    gradients nor reads its inf check back to the host: it sets ``grad_scale`` (the scale, or None after an
    explicit ``scaler.unscale_``) and ``found_inf`` on the optimizer around ``step()``, which divides the
    gradients by the scale on the fly and, when ``found_inf`` is non-zero, changes nothing (weights, moments,
    step counts), decided on the device: ``scaler.step(optimizer)`` never syncs with the host. Step counts
    then have to live on the device: with ``capturable=False`` they become 0-dim float32 tensors on the
    parameter's device at the first such step and stay so (``state_dict`` holds them as tensors;
    ``load_state_dict`` takes counts of either form in either mode). A later step through the foreach rule
    without the scaler turns them back into ints, reading each once.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        capturable: bool = False,
    ) -> None:
        if isinstance(lr, Tensor):
            if lr.numel() != 1 or not lr.is_floating_point():
                raise ValueError(f"AdamW: a tensor lr must be one floating-point number, got shape {tuple(lr.shape)}")
            if not capturable:
                raise ValueError("AdamW: a tensor lr needs capturable=True (it is read on the device)")
        elif not (isinstance(lr, float | int) and lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"AdamW: lr must be a finite number >= 0, got {lr!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW: betas must be two numbers in [0, 1), got {betas!r}")
        if not (eps > 0.0 and math.isfinite(eps)):
            # eps = 0 divides 0 by 0 for a parameter whose gradient is zero
            raise ValueError(f"AdamW: eps must be a finite number > 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"AdamW: weight_decay must be >= 0, got {weight_decay!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        defaults["correct_bias"] = bool(correct_bias)
        defaults["capturable"] = bool(capturable)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load moments, step counts and hyper-parameters, keeping this optimizer's ``capturable`` choice and
        its lr tensors (filled with the loaded values): how a step runs is not part of the training state."""
        keep = [(g["capturable"], g["lr"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for g, (capturable, lr) in zip(self.param_groups, keep, strict=True):
            g["capturable"] = capturable
            if isinstance(lr, Tensor):
                with torch.no_grad():
                    lr.fill_(float(g["lr"]))
                g["lr"] = lr

    def _buckets(self, group: dict) -> dict[tuple, tuple[list[Tensor], ...]]:
        """(params, grads, exp_avgs, exp_avg_sqs) per (device, dtype) of the group's parameters with a
        gradient, for one multi-tensor call each; state is created on first use (the step count an int 0, or a
        0-dim float32 device tensor under ``capturable``). Gradients are as they are (each path converts what it
        must); step counts are neither converted nor advanced here."""
        buckets: dict[tuple, tuple[list[Tensor], ...]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device) if group["capturable"] else 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            ps, gs, ms, vs = buckets.setdefault((p.device, p.dtype), ([], [], [], []))
            ps.append(p)
            gs.append(p.grad)
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        return buckets

    def _device_steps(self, ps: list[Tensor]) -> list[Tensor]:
        """The step counts of ``ps`` as 0-dim float32 tensors on their parameters' devices, kept in the state.
        An int count becomes a device tensor filled on the device (no copy, no sync)."""
        out = []
        for p in ps:
            st = self.state[p]
            step = st["step"]
            if not isinstance(step, Tensor):
                st["step"] = torch.full((), float(step), dtype=torch.float32, device=p.device)
            elif step.device != p.device or step.dtype != torch.float32 or step.dim() != 0:
                st["step"] = step.reshape(()).to(device=p.device, dtype=torch.float32, non_blocking=True)
            out.append(st["step"])
        return out

    def _host_steps(self, ps: list[Tensor]) -> None:
        """The step counts of ``ps`` as ints in the state (a device count is read back once)."""
        for p in ps:
            st = self.state[p]
            if isinstance(st["step"], Tensor):
                st["step"] = int(st["step"].item())

    @staticmethod
    def _moments(ms: list[Tensor], vs: list[Tensor], gs: list[Tensor], b1: float, b2: float, eps: float):
        """m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2 in place; returns sqrt(v) + eps."""
        torch._foreach_mul_(ms, b1)
        torch._foreach_add_(ms, gs, alpha=1.0 - b1)
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - b2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        return denom

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # set by torch.amp.GradScaler.step around this call (see the class docstring); absent otherwise
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        scaled = grad_scale is not None or found_inf is not None
        for group in self.param_groups:
            for (device, dtype), (ps, gs, ms, vs) in self._buckets(group).items():
                if scaled or choose("adamw_step", device.type, str(dtype)) != "reference":
                    self._step_fused(group, device, ps, gs, ms, vs, grad_scale, found_inf)
                elif group["capturable"]:
                    self._step_capturable(group, device, dtype, ps, [g.to(dtype) for g in gs], ms, vs)
                else:
                    self._step_plain(group, ps, [g.to(dtype) for g in gs], ms, vs)
        return loss

    def _step_fused(
        self,
        group: dict,
        device: torch.device,
        ps: list[Tensor],
        gs: list[Tensor],
        ms: list[Tensor],
        vs: list[Tensor],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        """One :func:`villa_fast.ops.adamw_step_` call; lr, grad_scale and found_inf stay on the device."""
        half = (torch.float16, torch.bfloat16)
        gs = [
            g if g.dtype == p.dtype or (p.dtype == torch.float32 and g.dtype in half) else g.to(p.dtype)
            for p, g in zip(ps, gs, strict=True)
        ]
        host_counts = not group["capturable"] and found_inf is None
        host_counts = host_counts and not any(isinstance(self.state[p]["step"], Tensor) for p in ps)
        if host_counts:
            # int counts stay ints: the op advances a copy on the device (one asynchronous host-to-device copy
            # from pinned memory), the ints here
            pin = device.type == "cuda"
            counts = torch.tensor([float(self.state[p]["step"]) for p in ps], dtype=torch.float32, pin_memory=pin)
            steps = list(counts.to(device, non_blocking=True).unbind())
        else:
            steps = self._device_steps(ps)
        lr = group["lr"]
        if isinstance(lr, Tensor):
            if lr.device != device or lr.dtype not in (torch.float32, torch.float64):
                lr = lr.to(device=device, dtype=torch.float32, non_blocking=True)
        else:
            lr = float(lr)
        b1, b2 = group["betas"]
        adamw_step_(
            ps,
            gs,
            ms,
            vs,
            steps,
            lr=lr,
            beta1=b1,
            beta2=b2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            correct_bias=group["correct_bias"],
            grad_scale=_on(grad_scale, device),
            found_inf=_on(found_inf, device),
        )
        if host_counts:
            for p in ps:
                self.state[p]["step"] += 1

    def _step_plain(self, group: dict, ps: list[Tensor], gs: list[Tensor], ms: list[Tensor], vs: list[Tensor]) -> None:
        """The foreach rule with int step counts and the step sizes computed on the host."""
        self._host_steps(ps)
        b1, b2 = group["betas"]
        lr, eps, wd = float(group["lr"]), group["eps"], group["weight_decay"]
        sizes = []
        for p in ps:
            self.state[p]["step"] += 1
            t = self.state[p]["step"]
            size = lr * math.sqrt(1.0 - b2**t) / (1.0 - b1**t) if group["correct_bias"] else lr
            sizes.append(-size)
        denom = self._moments(ms, vs, gs, b1, b2, eps)
        torch._foreach_addcdiv_(ps, ms, denom, sizes)
        if wd > 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * wd)

    def _step_capturable(
        self,
        group: dict,
        device: torch.device,
        dtype: torch.dtype,
        ps: list[Tensor],
        gs: list[Tensor],
        ms: list[Tensor],
        vs: list[Tensor],
    ) -> None:
        """The foreach rule with step counts, bias corrections and lr on the device: no host read-back."""
        b1, b2 = group["betas"]
        eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
        steps = self._device_steps(ps)
        # a tensor lr stays on the device; a float one is a kernel argument (frozen into a captured graph)
        lr_t = lr.to(device=device, dtype=dtype) if isinstance(lr, Tensor) else float(lr)
        torch._foreach_add_(steps, 1.0)
        denom = self._moments(ms, vs, gs, b1, b2, eps)
        upd = torch._foreach_div(ms, denom)
        if group["correct_bias"]:
            # size_i = lr * sqrt(1 - b2^t_i) / (1 - b1^t_i), each a 0-dim tensor on the device
            t = [s.to(dtype) for s in steps]
            bc1 = torch._foreach_pow(b1, t)
            torch._foreach_neg_(bc1)
            torch._foreach_add_(bc1, 1.0)
            bc2 = torch._foreach_pow(b2, t)
            torch._foreach_neg_(bc2)
            torch._foreach_add_(bc2, 1.0)
            torch._foreach_sqrt_(bc2)
            torch._foreach_div_(bc2, bc1)
            torch._foreach_mul_(bc2, lr_t)
            torch._foreach_mul_(upd, bc2)
        else:
            torch._foreach_mul_(upd, lr_t)
        torch._foreach_sub_(ps, upd)
        if wd > 0.0:
            torch._foreach_mul_(ps, 1.0 - lr_t * wd)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    """``t`` on ``device`` (GradScaler keeps its scale and inf flag on one device); None stays None."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Over :func:`param_groups`: ``adamw`` is the authors' AdamW rule (:class:`AdamW`, eps 1e-6),
    ``adamw_torch`` PyTorch's AdamW (fused on CUDA; eps and decay placed differently, see :class:`AdamW`),
    ``adam`` PyTorch's Adam with L2 decay, ``adamax`` PyTorch's Adamax (both with torch's eps 1e-8, as the
    authors build them)."""
    groups = param_groups(model, cfg["weight_decay"], cfg["lr_mul"])
    betas = tuple(cfg["betas"])
    lr = cfg["learning_rate"]
    name = cfg["optim"]
    dev = next(model.parameters()).device
    fused = {"fused": True} if dev.type == "cuda" else {}
    if name == "adamw":
        return AdamW(groups, lr=lr, betas=betas, eps=1e-6)
    if name == "adamw_torch":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6, **fused)
    if name == "adam":
        # the authors' Adam: L2 weight decay folded into the gradient
        return torch.optim.Adam(groups, lr=lr, betas=betas, eps=1e-8, **fused)
    if name == "adamax":
        return torch.optim.Adamax(groups, lr=lr, betas=betas, eps=1e-8)
    raise ValueError(f"unknown optimizer {name!r}")


def zero_grads_of_stepped(optimizer: torch.optim.Optimizer) -> int:
    """Give a zero ``.grad`` to every parameter that has optimizer state (it was stepped before) but no gradient
    now; returns how many. The authors' ``optimizer.zero_grad()`` (torch 1.x, and apex's under fp16) zeroes
    gradients in place, so a parameter keeps being stepped with a zero gradient once it has had one: its
    moments keep moving it and weight decay applies. This matters in pre-training, where the heads of the tasks
    not drawn for a step get no gradient; a parameter never used keeps none, in both."""
    n = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None and optimizer.state.get(p):
                p.grad = torch.zeros_like(p)
                n += 1
    return n


def warmup_linear(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (1-based)."""
    if step < warmup:
        return step / warmup
    if total <= warmup:
        return 1.0 if step <= total else 0.0
    return max(0.0, (total - step) / (total - warmup))


#: the learning rate where the schedule reaches 0 (the last step and beyond), as the authors' ``get_lr_sched``
LR_FLOOR = 1e-8


class WarmupLinear:
    """Sets each group's lr to ``peak * warmup_linear(step) * group['lr_mul']`` before step ``step``; where
    ``peak * warmup_linear(step)`` is not positive (the last step), :data:`LR_FLOOR` takes its place.

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
        lr = self.peak_lr * warmup_linear(step, self.warmup, self.total)
        return lr if lr > 0 else LR_FLOOR

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
    """Every dropout layer's probability to ``p`` (the config's ``dropout``), as the authors' ``set_dropout``:
    their ``nn.Dropout`` modules, the encoder's attention-probability dropout among them (an ``nn.Dropout``
    there, a float of the attention here). NLVR2 paired-attn's ``nn.MultiheadAttention`` blocks keep their own
    probability (``attention_probs_dropout_prob``): theirs hold it as a float, which their ``set_dropout``
    does not reach."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        # attention that calls scaled_dot_product_attention keeps its probability as a float
        if isinstance(getattr(m, "dropout_p", None), float):
            m.dropout_p = p


def trainable(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    return [p for p in params if p.requires_grad]
