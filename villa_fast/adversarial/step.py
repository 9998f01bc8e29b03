"""The eager VILLA adversarial step (VILLA_SPEC section 2), drop-in for any PyTorch model.

Gradient bookkeeping. Each loss_k is differentiated with ``torch.autograd.grad`` with respect to the
parameters, the deltas and (``clean_backward="once"``) a leaf copy of the clean logits. The fresh
parameter gradients of step k play the part of the temporary buffer: they are checked for non-finite
values on the device (one multi-tensor norm), then added to the running sums by
:func:`villa_fast.ops.add_if_` under that device flag (no host sync): a bad step is not even read, so
its NaN never reaches the sums, and the add is one multi-tensor launch with the CUDA extension instead of
a masked fill and an add per parameter. The first contribution is kept as is (zeroed in place if its
step was bad), so the accumulation costs what ``backward()`` into ``.grad`` costs plus the check's one
read of the gradients (``skip_nonfinite=False`` drops it). The caller's ``.grad`` is touched once, at
the end, so a step that raises half-way leaves ``.grad`` as it was. Under :class:`GraphedVillaStep`,
whose gradients live in fixed ``.grad`` tensors, each checked step is added to them directly instead,
which saves the second gradient-sized buffer (a replay cannot stop half-way).

With ``clean_backward="once"`` the upstream gradients of the clean logits are summed over the K steps and
the clean pass is back-propagated once at the end (backward is linear in its upstream gradient), so the
clean graph is not retained across steps; ``"per_step"`` retains it and back-propagates it every step.
``"recompute"`` runs the clean forward under ``torch.utils.checkpoint`` (non-reentrant, RNG state
preserved): only its inputs are kept through the K steps, and the final backward runs the forward again
with the same dropout masks, so the gradients are those of ``"once"`` at the price of one more forward.
Eagerly the masks come back by resetting the generator's state; under :class:`GraphedVillaStep` the clean
pass draws from its own registered generator states instead (:mod:`villa_fast.adversarial.rng`), which a
graph can replay.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from villa_fast.adversarial.config import AdversarialConfig
from villa_fast.adversarial.hooks import Injector
from villa_fast.adversarial.rng import ForkedRng
from villa_fast.ops import add_if_, perturb_init, perturb_update_, perturb_update_multi_, sym_kl

_MODALITY_INDEX = {"text": 0, "image": 1}
# per modality: the step's mask argument, its shape's letters and where the injection point sees the tensor
_MASK_ARGS = {"text": ("txt_mask", "[B, L]", "output"), "image": ("img_mask", "[B, N]", "first input")}
_SCALER_TYPES = tuple(
    t for t in (getattr(torch.amp, "GradScaler", None), getattr(torch.cuda.amp, "GradScaler", None)) if t is not None
)


@dataclass
class StepResult:
    """What one adversarial step returns; every tensor stays on the device (no host sync).

    Attributes:
        loss: detached total loss, the sum over the K steps of loss_k (each already divided by K or 2K).
        logits: detached clean logits [N, C] (float32, float64 for a float64 model).
        deltas: final perturbations by modality ("text": [B, L, H], "image": [B, N, D]), detached.
        skipped_rows: int64 [2], rows (text, image) whose delta update was skipped for a non-finite gradient
            (a skipped step skips all its rows).
        skipped_steps: int64 0-dim, adversarial steps left out of the parameter gradients and of the delta update
            because their loss or gradients were not finite. With clean_backward "once" or "recompute", a
            non-finite clean backward leaves the whole micro-batch's gradient out (K + 1: the K steps and the
            clean backward), as "per_step" does (there every step is non-finite); the deltas have already moved
            by then, and under GraphedVillaStep, whose steps add to ``.grad`` as they come, the K steps' own
            gradients stay in ``.grad`` (a replay cannot take them back). With a loss scaler a count above 0 makes
            the optimizer step be skipped and the scale backed off (:meth:`VillaStep.skip_if_left_out`).
        perturbation_survival: by modality, the fraction of non-zero delta elements that survive in the dtype
            the perturbed tensor leaves the injection point with, measured in the last adversarial forward (a
            later matrix product under autocast rounds again: bench/perturbation_survival.py measures that).
    """

    loss: Tensor
    logits: Tensor
    deltas: dict[str, Tensor]
    skipped_rows: Tensor
    skipped_steps: Tensor
    perturbation_survival: dict[str, Tensor] = field(default_factory=dict)

    @property
    def skipped(self) -> Tensor:
        """Total skipped delta rows (text + image), a 0-dim int64 device tensor."""
        return self.skipped_rows.sum()


def _loss_dtype(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def find_parameters(roots: Iterable[Tensor], exclude: Iterable[Tensor] = ()) -> list[Tensor]:
    """The leaf tensors requiring grad that the autograd graphs of ``roots`` reach, in a fixed order."""
    skip = {id(t) for t in exclude}
    seen_nodes: set = set()
    seen: set[int] = set()
    found: list[Tensor] = []
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen_nodes:
            continue
        seen_nodes.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, Tensor):
            if id(var) not in skip and id(var) not in seen:
                seen.add(id(var))
                found.append(var)
            continue
        stack.extend(nxt for nxt, _ in reversed(node.next_functions))
    return found


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _check_params(params: Iterable[Tensor]) -> list[Tensor]:
    """``params`` as a list, each a distinct leaf tensor requiring grad; raises naming the first bad entry."""
    if isinstance(params, Tensor):
        params = [params]  # one tensor, as torch.nn.utils.clip_grad_norm_ takes it
    elif isinstance(params, nn.Module):
        raise TypeError("params must be an iterable of tensors (e.g. list(model.parameters())), got a module")
    try:
        found = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    if not found:
        raise ValueError("params is empty (an iterator already consumed, e.g. by the optimizer?): pass a list")
    first: dict[int, int] = {}
    for i, p in enumerate(found):
        if isinstance(p, dict):
            raise TypeError(f"params[{i}] is a dict: pass the tensors themselves, not optimizer parameter groups")
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad")
        if not p.is_leaf:
            raise ValueError(
                f"params[{i}] is not a leaf tensor (computed from others, e.g. a cast or a view of a parameter): "
                "its gradient would never reach .grad; pass the parameter itself"
            )
        j = first.setdefault(id(p), i)
        if j != i:
            raise ValueError(f"params[{i}] is params[{j}]: pass each tensor once (its gradient would be counted twice)")
    return found


def _checked_loss(loss: object) -> Tensor:
    """What loss_fn returned, checked to be a floating-point scalar tensor (a one-element tensor is flattened)."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor (0-dim); got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor (0-dim); got a tensor of shape {tuple(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point scalar tensor; got {loss.dtype}")
    return loss if loss.dim() == 0 else loss.reshape(())


def _check_logits(z: object, clean: torch.Size | None = None) -> Tensor:
    """What forward_fn returned, checked to be logits [N, C] (N >= 1, C >= 2), shaped as on the clean pass."""
    if not isinstance(z, Tensor) or z.dim() != 2:
        raise RuntimeError(f"forward_fn must return logits [N, C], got {getattr(z, 'shape', type(z).__name__)}")
    if not z.is_floating_point():
        raise TypeError(f"forward_fn must return floating-point logits [N, C], got {z.dtype}")
    if clean is not None:
        if z.shape != clean:
            raise RuntimeError(
                f"forward_fn returned logits {tuple(z.shape)} on a perturbed pass but {tuple(clean)} on the clean "
                "pass; its output shape must not depend on randomness"
            )
        return z
    if z.shape[0] == 0:
        raise ValueError("forward_fn returned 0 logit rows (empty batch): an adversarial step needs at least one row")
    if z.shape[1] < 2:
        raise ValueError(
            f"forward_fn returned logits {tuple(z.shape)}: the consistency term (a symmetric KL between softmaxes over "
            "the classes) needs C >= 2 (over one class it is always 0); for a single-logit binary head return "
            "torch.cat([torch.zeros_like(z), z], 1) (its softmax is [1 - sigmoid(z), sigmoid(z)]) and let loss_fn "
            "read logits[:, 1]"
        )
    return z


def _all_finite(tensors: list[Tensor]) -> Tensor:
    """0-dim bool on the device: every element of every tensor is finite (NaN and inf propagate into the
    per-tensor 2-norms, accumulated in float32 (float64 for float64 tensors), so finite float16 or bfloat16
    gradients whose norm exceeds their own range still count as finite)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    norms = torch._foreach_norm(tensors, 2, dtype=dtype)
    return torch.isfinite(torch.stack(norms).sum())


class VillaStep:
    """One VILLA adversarial step per micro-batch, added to any model by hooks.

    Args:
        forward_fn: ``forward_fn(batch) -> logits`` [N, C]; the model must be in the mode the caller wants
            (train mode for dropout).
        loss_fn: ``loss_fn(logits, batch) -> scalar`` task loss; receives float32 logits (float64 stays).
        config: an :class:`AdversarialConfig`.
        text_embedding: module whose output [B, L, H] receives the text delta (e.g. the word-embedding
            ``nn.Embedding``); required unless modality is "image". Dim 0 must be the example: the step and
            the projection are per row of dim 0 (token ids flattened to [B * L] would make them per token).
        image_input: module whose first input [B, N, D] receives the image delta (e.g. the region-feature
            ``nn.Linear``); required unless modality is "text".
        scaler: optional ``torch.amp.GradScaler`` (float16): losses are scaled for backward, parameter
            gradients accumulate scaled (the caller's ``scaler.step`` unscales them) and delta gradients
            are unscaled on the device.
        params: the parameters to differentiate (distinct leaf tensors requiring grad, at least one of them reached
            by the loss); by default those that each step's graph reaches, found again at every step (a walk of
            the graph, about 0.5 ms of host time for UNITER-base), so a parameter unfrozen later, or a head a
            batch routes to, gets its gradient as in a plain backward. Pass them to skip the walk.
        generator: torch.Generator for the perturbation init when ``init_mag > 0``. The init is drawn after the
            clean forward (its shape is the injection point's, known only then); section 2 of the spec draws
            it first, so with dropout and the default generator the two orders draw different masks: pass a
            generator of its own to keep the init independent of the model's draws.
        kl_mask_fn: optional ``kl_mask_fn(batch) -> bool [N] | None``, the logit rows the consistency term
            counts (:func:`villa_fast.ops.sym_kl`'s ``row_mask``): for logits padded to a fixed row count,
            e.g. masked-token predictions padded so that a CUDA graph can hold them. The task loss sees
            every row (make it ignore the padding itself).

    The caller owns ``zero_grad``, clipping and the optimizer step, so several steps can accumulate.
    """

    def __init__(
        self,
        forward_fn: Callable[[Any], Tensor],
        loss_fn: Callable[[Tensor, Any], Tensor],
        config: AdversarialConfig,
        *,
        text_embedding: nn.Module | None = None,
        image_input: nn.Module | None = None,
        scaler: torch.amp.GradScaler | None = None,
        params: Iterable[Tensor] | None = None,
        generator: torch.Generator | None = None,
        kl_mask_fn: Callable[[Any], Tensor | None] | None = None,
    ) -> None:
        if not callable(forward_fn):
            raise TypeError("forward_fn must be callable: forward_fn(batch) -> logits")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable: loss_fn(logits, batch) -> scalar loss")
        if not isinstance(config, AdversarialConfig):
            raise TypeError(f"config must be an AdversarialConfig, got {type(config).__name__}")
        for name, mod in (("text_embedding", text_embedding), ("image_input", image_input)):
            if mod is not None and not isinstance(mod, nn.Module):
                raise TypeError(f"{name} must be an nn.Module, got {type(mod).__name__}")
        if config.perturb_text and text_embedding is None:
            raise ValueError(f"modality {config.modality!r} perturbs text: pass text_embedding=<module>")
        if config.perturb_image and image_input is None:
            raise ValueError(f"modality {config.modality!r} perturbs the image: pass image_input=<module>")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if kl_mask_fn is not None and not callable(kl_mask_fn):
            raise TypeError("kl_mask_fn must be callable: kl_mask_fn(batch) -> bool row mask [N] or None")
        if scaler is not None and not isinstance(scaler, _SCALER_TYPES):
            raise TypeError(
                f"scaler must be a torch.amp.GradScaler (or torch.cuda.amp.GradScaler), got {type(scaler).__name__}"
            )
        checked = _check_params(params) if params is not None else None
        self.kl_mask_fn = kl_mask_fn
        self.forward_fn = forward_fn
        self.loss_fn = loss_fn
        self.config = config
        self.scaler = scaler
        self.generator = generator
        self._params = checked
        #: params fixed (given, or kept from the first discovery by GraphedVillaStep, whose graphs hold them)
        self._fixed_params = checked is not None
        self._injector = Injector(
            text_embedding if config.perturb_text else None, image_input if config.perturb_image else None
        )
        # add each step's (checked) gradients to .grad as they come instead of summing them aside first:
        # saves one gradient-sized buffer when .grad already exists (GraphedVillaStep's fixed gradients),
        # at the price of a partly accumulated .grad if a step raises half-way (a graph replay cannot)
        self._grads_in_place = False
        # the clean pass's own random streams (ForkedRng), or None for the default generator; GraphedVillaStep
        # sets them while it captures clean_backward="recompute"
        self._clean_rng: ForkedRng | None = None

    # ------------------------------------------------------------------------------------------ public
    @property
    def params(self) -> list[Tensor] | None:
        """The parameters the step differentiates: those given, else those the last step found (None before)."""
        return self._params

    def discover_params(self, batch: Any) -> list[Tensor]:
        """Find the parameters from a clean forward and the task loss on ``batch`` (no gradient is written);
        they are then kept for every later step (not found again per step)."""
        if self._params is None or not self._fixed_params:
            self._check_call("VillaStep.discover_params")
            autocast = self._autocast(batch)
            z0 = self._clean(batch, autocast)
            found = find_parameters([_checked_loss(self.loss_fn(z0, batch)), z0])
            if not found:
                raise RuntimeError("no parameter requiring grad is reached by forward_fn and loss_fn")
            self._params = found
            self._fixed_params = True
        return self._params

    def remove_hooks(self) -> None:
        """Detach the hooks from the model; the step cannot run afterwards."""
        self._injector.remove()

    def step(self, batch: Any, txt_mask: Tensor | None = None, img_mask: Tensor | None = None) -> StepResult:
        """Run section 2 on one micro-batch and add its parameter gradients to ``.grad``.

        Args:
            batch: whatever ``forward_fn`` and ``loss_fn`` take.
            txt_mask: optional [B, L] (1 = real token), shapes only the random init.
            img_mask: optional [B, N] (1 = real region), shapes only the random init.
        """
        self._check_call("VillaStep.step", txt_mask, img_mask)
        return self._step(batch, txt_mask, img_mask)

    def skip_if_left_out(self, optimizer: torch.optim.Optimizer, skipped_steps: Tensor | int | None) -> None:
        """Before ``scaler.step(optimizer)``: a step left out as non-finite since the last optimizer step makes the
        scaler skip this optimizer step and back the scale off in ``scaler.update()``, exactly as an overflow in
        ``.grad`` would (the released loop's overflow reached its accumulated gradients, and apex skipped the
        step). The left-out steps never reach ``.grad``, so the scaler cannot see them itself.

        ``skipped_steps``: the sum of ``result.skipped_steps`` over the micro-batches (over the processes too);
        a device tensor (no host sync) or a Python int. Unscales the gradients first if the caller has not
        (``scaler.unscale_(optimizer)``), which records the inf flags this adds to. Then call ``scaler.step``
        and the plain ``scaler.update()``. Nothing to do without an enabled scaler."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled() or skipped_steps is None:
            return
        bad = self._count_tensor(skipped_steps)
        state = scaler._per_optimizer_states[id(optimizer)]
        if not state.get("found_inf_per_device"):
            scaler.unscale_(optimizer)
        bad = (bad > 0).to(torch.float32)
        for f in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            f.add_(bad.to(f.device, non_blocking=True))

    def _count_tensor(self, skipped_steps: Tensor | int) -> Tensor:
        if isinstance(skipped_steps, numbers.Integral) and not isinstance(skipped_steps, bool):
            scale = getattr(self.scaler, "_scale", None)
            return torch.as_tensor(int(skipped_steps), device=scale.device if scale is not None else None)
        if not isinstance(skipped_steps, Tensor):
            raise TypeError(
                "skipped_steps must be the summed result.skipped_steps (an integer tensor, or a Python int), "
                f"got {type(skipped_steps).__name__}"
            )
        if skipped_steps.numel() != 1:
            got = tuple(skipped_steps.shape)
            raise ValueError(f"skipped_steps must be one count (the sum of result.skipped_steps), got shape {got}")
        return skipped_steps.reshape(())

    def update_scaler(self, skipped_steps: Tensor | None = None) -> None:
        """``scaler.update()``, then back the scale off when a step was left out as non-finite.

        Call it instead of ``scaler.update()`` after ``scaler.step(optimizer)``, with the sum of
        ``result.skipped_steps`` over the micro-batches: the left-out steps never reach ``.grad``, so the
        scaler would not see their overflow. Runs on the device (no host sync); a Python integer (a count
        already read back) is taken as well. The optimizer step has been applied by then (the finite steps'
        gradients); :meth:`skip_if_left_out`, before ``scaler.step``, skips it instead, as the released loop.
        """
        if self.scaler is None:
            raise RuntimeError("update_scaler needs a scaler")
        scaler = self.scaler
        if skipped_steps is not None:
            skipped_steps = self._count_tensor(skipped_steps)
        if skipped_steps is None or not scaler.is_enabled():
            scaler.update()
            return
        bad = (skipped_steps > 0).to(torch.float32)
        # a left-out step counts as an overflow of this iteration: added to the inf flags scaler.step recorded,
        # so update() backs the scale off and restarts its growth count exactly as for an overflow in .grad
        flags = [f for st in scaler._per_optimizer_states.values() for f in st.get("found_inf_per_device", {}).values()]
        for f in flags:
            f.add_(bad.to(f.device, non_blocking=True))
        scaler.update()  # with no flag recorded (no scaler.step before), torch's own error says so

    # --------------------------------------------------------------------------------------- internals
    def _check_call(self, who: str, txt_mask: object = None, img_mask: object = None) -> None:
        """What can be checked before any forward: autograd on, the hooks still there, the masks' types."""
        if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            raise RuntimeError(f"{who} needs autograd: it was called under torch.no_grad() or torch.inference_mode()")
        if self._injector.removed:
            raise RuntimeError(f"{who}: the hooks were removed (remove_hooks()); create a new step to train again")
        for name, mask in (("text", txt_mask), ("image", img_mask)):
            arg, dims, _ = _MASK_ARGS[name]
            if mask is not None and not isinstance(mask, Tensor):
                raise TypeError(f"{arg} must be a tensor {dims} (1 = real position) or None, got {type(mask).__name__}")

    def _device_type(self, batch: Any) -> str:
        dev = self._injector.device()
        if dev is None:
            t = _first_tensor(batch)
            dev = t.device if t is not None else torch.device("cpu")
        return dev.type

    def _autocast(self, batch: Any) -> Callable[[], Any]:
        dtype = self.config.amp_dtype
        if dtype is None:
            return contextlib.nullcontext
        dev_type = self._device_type(batch)
        return lambda: torch.autocast(dev_type, dtype=dtype)

    def _forward(
        self, batch: Any, autocast: Any, text: Tensor | None, image: Tensor | None, clean: torch.Size
    ) -> Tensor:
        inj = self._injector
        inj.deltas["text"], inj.deltas["image"] = text, image
        try:
            with autocast():
                z = self.forward_fn(batch)
        finally:
            inj.deltas["text"] = inj.deltas["image"] = None
        return _loss_dtype(_check_logits(z, clean))

    def _clean(self, batch: Any, autocast: Any) -> Tensor:
        inj = self._injector
        inj.recorded = {"text": None, "image": None}
        inj.recording = True
        rng = self._clean_rng
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if rng is not None and not capturing:
            rng.resync()  # the recomputation starts where the first run starts (a capture keeps them in step)
        try:
            with autocast():
                if self.config.clean_backward == "recompute":
                    if rng is None:
                        if capturing:
                            # checkpoint restores the dropout masks by resetting the generator's state, which a
                            # graph cannot replay: the recomputed masks would differ from the first run's
                            raise RuntimeError(
                                "clean_backward='recompute' inside a CUDA graph needs the clean pass on its own "
                                "registered generator states (GraphedVillaStep sets them up); a plain capture "
                                "cannot restore the clean pass's dropout masks"
                            )
                        # the recomputation runs inside the final backward, with recording off and no delta set:
                        # the hooks add nothing, as in this first run
                        z0 = torch.utils.checkpoint.checkpoint(
                            self.forward_fn, batch, use_reentrant=False, preserve_rng_state=True
                        )
                    else:
                        # the first run draws from rng's "first" copy, the recomputation from its "again" copy:
                        # equal at the start of every step, so the masks are the same (and a graph can replay it)
                        z0 = torch.utils.checkpoint.checkpoint(
                            self.forward_fn,
                            batch,
                            use_reentrant=False,
                            preserve_rng_state=False,
                            context_fn=rng.contexts,
                        )
                elif rng is not None:
                    with rng.use("first"):
                        z0 = self.forward_fn(batch)
                else:
                    z0 = self.forward_fn(batch)
        finally:
            inj.recording = False
        z0 = _check_logits(z0)
        for name, mod in (("text", inj.text_module), ("image", inj.image_module)):
            if mod is not None and inj.recorded[name] is None:
                raise RuntimeError(f"the {name} injection module was not called by forward_fn")
        return _loss_dtype(z0)

    def _init_delta(self, name: str, mask: Tensor | None) -> Tensor:
        shape, dtype, device = self._injector.recorded[name]
        if mask is not None:
            arg, dims, where = _MASK_ARGS[name]
            want = tuple(shape[:-1])
            if not isinstance(mask, Tensor) or tuple(mask.shape) != want:
                got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise ValueError(
                    f"{arg} must be a tensor of shape {dims if len(want) == 2 else '[B, ...]'} = {want} (the {name} "
                    f"injection point's {where} {tuple(shape)} without its last dim), got {got}"
                )
            if mask.is_complex():
                raise TypeError(f"{arg} must be bool or real, got {mask.dtype}")
        cfg = self.config
        like = torch.empty((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device).expand(
            shape
        )
        if mask is not None and mask.device != device:
            mask = mask.to(device)
        d = perturb_init(like, mask, init_mag=cfg.init_mag, norm_type=cfg.norm_type, generator=self.generator)
        return d.requires_grad_()

    def _kl_rows(self, batch: Any, z0: Tensor) -> Tensor | None:
        if self.kl_mask_fn is None:
            return None
        rows = self.kl_mask_fn(batch)
        if rows is None:
            return None
        if not isinstance(rows, Tensor) or rows.dtype != torch.bool or rows.shape != z0.shape[:1]:
            got = f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, Tensor) else type(rows).__name__
            raise ValueError(f"kl_mask_fn must return a bool tensor [N] = [{z0.size(0)}] (the logits' rows), got {got}")
        return rows.to(z0.device, non_blocking=True)

    def _step(self, batch: Any, txt_mask: Tensor | None, img_mask: Tensor | None) -> StepResult:
        cfg = self.config
        K = cfg.steps
        once = cfg.clean_backward != "per_step"
        autocast = self._autocast(batch)
        inj = self._injector
        inj.survival = {}
        z0 = self._clean(batch, autocast)
        deltas: dict[str, Tensor] = {}
        if cfg.perturb_text:
            deltas["text"] = self._init_delta("text", txt_mask)
        if cfg.perturb_image:
            deltas["image"] = self._init_delta("image", img_mask)
        names = list(deltas)
        delta_list = [deltas[n] for n in names]
        lrs = [cfg.lr_txt if n == "text" else cfg.lr_img for n in names]
        z0_ref = z0.detach().requires_grad_() if once else z0
        device = z0.device
        scaler = self.scaler if self.scaler is not None and self.scaler.is_enabled() else None
        scale = scaler.scale(torch.ones((), dtype=torch.float32, device=device)) if scaler is not None else None

        params = self._params if self._fixed_params else None
        acc: list[Tensor | None] | None = None
        g_clean: Tensor | None = None
        total = torch.zeros((), dtype=z0.dtype, device=device)
        skipped_steps = torch.zeros((), dtype=torch.int64, device=device)
        skipped_rows = torch.zeros(2, dtype=torch.int64, device=device)
        rows_at = [_MODALITY_INDEX[n] for n in names]
        div = 2 * K if cfg.modality == "alter" else K
        kl_rows = self._kl_rows(batch, z0)

        for k in range(K):
            last = k == K - 1
            inj.measure = last
            try:
                if cfg.modality == "alter":
                    z1 = self._forward(batch, autocast, deltas["text"], None, z0.shape)
                    z2 = self._forward(batch, autocast, None, deltas["image"], z0.shape)
                    task = _checked_loss(self.loss_fn(z1, batch)) + _checked_loss(self.loss_fn(z2, batch))
                    kl = sym_kl(z1, z0_ref, cfg.kl_reduction, row_mask=kl_rows) + sym_kl(
                        z2, z0_ref, cfg.kl_reduction, row_mask=kl_rows
                    )
                else:
                    z = self._forward(batch, autocast, deltas.get("text"), deltas.get("image"), z0.shape)
                    task = _checked_loss(self.loss_fn(z, batch))
                    kl = sym_kl(z, z0_ref, cfg.kl_reduction, row_mask=kl_rows)
            finally:
                inj.measure = False
            loss = (task + cfg.kl_weight * kl) / div
            if params is None:
                params = find_parameters([loss, z0], exclude=[*delta_list, z0_ref])
                if not params:
                    raise RuntimeError("no parameter requiring grad is reached by the loss")
                self._params = params
            elif k == 0:
                _check_still_trainable(params)
            if acc is None:
                acc = [None] * len(params)
            extra = [z0_ref] if once else []
            out = loss if scaler is None else scaler.scale(loss)
            grads = torch.autograd.grad(
                out, [*params, *delta_list, *extra], allow_unused=True, retain_graph=not once and not last
            )
            if k == 0 and all(g is None for g in grads[: len(params)]):
                # nothing is written yet: every parameter gradient None would train nothing, silently
                raise RuntimeError(
                    f"none of params is reached by forward_fn/loss_fn (all {len(params)} gradients are None): pass "
                    "the parameters of the model forward_fn runs"
                )
            p_grads = _owned(list(grads[: len(params)]), grads[len(params) :])
            d_grads = list(grads[len(params) : len(params) + len(delta_list)])
            z_grad = grads[-1] if once else None
            ok = None
            if cfg.skip_nonfinite:
                # a bad step's parameter gradients are left out by add_if_ (not read when ok is false)
                ok = _all_finite([out.detach(), *(g for g in grads if g is not None)])
                bad = ~ok
                if z_grad is not None:
                    z_grad.masked_fill_(bad, 0.0)
                skipped_steps += bad
                total += torch.where(ok, loss.detach(), 0.0)
            else:
                total += loss.detach()
            if self._grads_in_place:
                _add_to_grad(params, p_grads, ok)
            else:
                _accumulate(acc, p_grads, ok)
            if z_grad is not None:
                g_clean = z_grad if g_clean is None else g_clean.add_(z_grad)
            if not last:
                gs = [g if g is not None else torch.zeros_like(d) for g, d in zip(d_grads, delta_list, strict=True)]
                gate = scale
                if ok is not None:
                    base = scale if scale is not None else torch.ones((), dtype=torch.float32, device=device)
                    gate = torch.where(ok, base, float("nan"))
                with torch.no_grad():
                    counts = _update_deltas(delta_list, gs, lrs, cfg, gate)
                if len(rows_at) == 2:
                    skipped_rows += counts
                else:
                    skipped_rows[rows_at[0]] += counts[0]
            # drop this step's graph before the next forward (per_step mode retains it until here)
            z = z1 = z2 = None
            del grads, p_grads, d_grads, z_grad, out, loss, task, kl

        clean_ok = None
        if once and g_clean is not None:
            grads = _owned(list(torch.autograd.grad(z0, params, grad_outputs=g_clean, allow_unused=True)), [])
            if cfg.skip_nonfinite:
                present = [g for g in grads if g is not None]
                if present:
                    clean_ok = _all_finite(present)
                    # the clean graph is part of every step's gradient ("per_step" finds all K steps bad then):
                    # the micro-batch is left out, the K steps and the clean backward counted
                    skipped_steps.copy_(torch.where(clean_ok, skipped_steps, K + 1))
                    total = torch.where(clean_ok, total, 0.0)
            if self._grads_in_place:
                _add_to_grad(params, grads, clean_ok)
            else:
                _accumulate(acc, grads, clean_ok)
        if not self._grads_in_place:
            _add_to_grad(params, acc, clean_ok)

        return StepResult(
            loss=total,
            logits=z0.detach(),
            deltas={n: d.detach() for n, d in deltas.items()},
            skipped_rows=skipped_rows,
            skipped_steps=skipped_steps,
            perturbation_survival=dict(inj.survival),
        )


def _update_deltas(deltas: list[Tensor], grads: list[Tensor], lrs: list[float], cfg, gate: Tensor | None) -> Tensor:
    """The ascent step of every delta, one launch for both when they share a dtype; the skipped-row counts [n]."""
    if len({d.dtype for d in deltas}) == 1:
        return perturb_update_multi_(
            deltas, grads, lrs=lrs, norm_type=cfg.norm_type, max_norm=cfg.max_norm, grad_scale=gate
        )
    # the injection points differ in dtype (a float64 image input beside a float32 text embedding): one each
    counts = [
        perturb_update_(d, g, lr=lr, norm_type=cfg.norm_type, max_norm=cfg.max_norm, grad_scale=gate).reshape(1)
        for d, g, lr in zip(deltas, grads, lrs, strict=True)
    ]
    return torch.cat(counts)


def _check_still_trainable(params: list[Tensor]) -> None:
    """Given parameters that stopped requiring grad since (frozen between steps) would fail inside autograd."""
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise RuntimeError(
                f"params[{i}] (shape {tuple(p.shape)}) no longer requires grad: pass the parameters to train again "
                "when freezing some (or leave params out: the step then finds them at every step)"
            )


def _owned(grads: list[Tensor | None], others: Iterable[Tensor | None]) -> list[Tensor | None]:
    """Gradients that can be written in place: autograd may hand the same buffer to several inputs (``a + b``)
    or an expanded view; those are copied, as AccumulateGrad would, so that in-place accumulation is safe."""
    taken = {t.untyped_storage().data_ptr() for t in others if t is not None}
    out: list[Tensor | None] = []
    for g in grads:
        if g is not None and g.layout != torch.strided:
            raise TypeError(
                f"a parameter's gradient is {g.layout} (shape {tuple(g.shape)}; e.g. nn.Embedding(sparse=True)): "
                "the step accumulates dense gradients; build the module with dense gradients (sparse=False)"
            )
        if g is not None:
            ptr = g.untyped_storage().data_ptr()
            if ptr in taken or not g.is_contiguous():
                g = g.clone(memory_format=torch.contiguous_format)
                ptr = g.untyped_storage().data_ptr()
            taken.add(ptr)
        out.append(g)
    return out


def _accumulate(acc: list[Tensor | None], grads: list[Tensor | None], ok: Tensor | None = None) -> None:
    """acc[i] += grads[i], all of it or (``ok`` given) only when the device flag ``ok`` is true.

    The first contribution is kept as is (no copy; zeroed in place when ``ok`` is false); later ones are
    added multi-tensor, by :func:`add_if_` under a flag, which does not even read them when it is false.
    """
    lhs, rhs = [], []
    bad = None if ok is None else ~ok
    for i, g in enumerate(grads):
        if g is None:
            continue
        if acc[i] is None:
            acc[i] = g if bad is None else g.masked_fill_(bad, 0.0)
        else:
            lhs.append(acc[i])
            rhs.append(g)
    _add(lhs, rhs, ok)


def _add_to_grad(params: list[Tensor], acc: list[Tensor | None], ok: Tensor | None = None) -> None:
    """p.grad += acc[i] for each parameter (all of it, or only when the device flag ``ok`` is true)."""
    lhs, rhs = [], []
    bad = None if ok is None else ~ok
    for p, a in zip(params, acc, strict=True):
        if a is None:
            continue
        if p.grad is None:
            p.grad = a if bad is None else a.masked_fill_(bad, 0.0)
        else:
            lhs.append(p.grad)
            rhs.append(a.to(p.grad.dtype))
    _add(lhs, rhs, ok)


def _add(lhs: list[Tensor], rhs: list[Tensor], ok: Tensor | None) -> None:
    if not lhs:
        return
    if ok is None:
        torch._foreach_add_(lhs, rhs)
    else:
        add_if_(lhs, rhs, ok)
