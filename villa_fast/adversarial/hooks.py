"""Perturbation injection by module hooks (VILLA_SPEC section 1), so that any model works without surgery.

The text delta is added to the *output* of the text-embedding module (the word lookup, before position
embeddings and LayerNorm); the image delta to the *first input* of the image-input module (the raw region
features, before the feature projection). When that module is a plain ``nn.Linear`` (UNITER's ``img_linear``;
not a subclass, which has a forward of its own, and with no other hooks) the product is split, ``W (f + delta)
+ b = (W f + b) + W delta``: the module runs on the features alone and ``W delta``, computed from the delta
alone (outside autocast, in the delta's dtype), is added to its output. Same function, same gradients (the
delta's is ``W^T g`` either way, the weight's ``g (f + delta)^T`` as two products), one more matrix product of
the projection's size per perturbed forward; but the perturbation, about 1e-6 of a feature per element, is no
longer rounded against the features by a TF32 or low-precision projection (10 mantissa bits keep almost none
of it: bench/perturbation_survival.py). The hooks stay registered but do nothing unless a step is inside one
of its forward calls, so the model can be used normally in between.

Precision (VILLA_SPEC section 9): the add is done in the delta's dtype (float32, or float64 for a float64
model). Under autocast the sum is returned in float32: the ops that follow either promote (the position
add) or run in float32 anyway (LayerNorm), and matrix multiplies cast it themselves, so nothing is lost at
the injection point. Outside autocast, and for a module whose weights are bfloat16 or float16 (a model kept in
that dtype, whose next ops take that dtype only), the sum is cast back to the activation's dtype, keeping the
model's dtype contract (small perturbations are then rounded away; the survival figure shows it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def inject(x: Tensor, delta: Tensor, *, keep_wide: bool = True) -> Tensor:
    """``x + delta`` computed in ``delta.dtype``; stays there under autocast when ``keep_wide`` (the model's
    weights are float32 or wider, so autocast manages the casts that follow), else back to ``x.dtype``."""
    y = x.to(delta.dtype) + delta
    if x.dtype != delta.dtype and not (keep_wide and torch.is_autocast_enabled(x.device.type)):
        y = y.to(x.dtype)
    return y


def _wide_weights(module: nn.Module | None) -> bool:
    """Whether ``module``'s floating parameters are float32 or wider (True when it has none): a model kept in
    bfloat16 or float16 takes its activations in that dtype, even under autocast (a float32 input to its
    LayerNorm or an index_put fails), so the perturbed sum goes back to the activation's dtype there."""
    if module is None:
        return True
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype in (torch.float32, torch.float64)
    return True


def _plain_linear(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` itself, not a subclass (LoRA, quantised or scaled layers have a forward of their own) and
    with no hooks of its own: only there is ``module(f + d) = module(f) + W d`` known to hold."""
    if type(module) is not nn.Linear:
        return False
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    # another step's injector (the trainer's robust-evaluation attack beside its VillaStep) is not foreign: its
    # hooks add nothing outside its own steps
    return all(isinstance(getattr(h, "__self__", None), Injector) for h in hooks)


def survival(x: Tensor, delta: Tensor, y: Tensor, compute_dtype: torch.dtype) -> Tensor:
    """Fraction of the non-zero delta elements whose perturbed value, in ``compute_dtype``, differs from the
    unperturbed one (0-dim float32 on the device; 1.0 when delta is all zero: nothing to lose)."""
    with torch.no_grad():
        nonzero = delta != 0
        changed = (y.to(compute_dtype) != x.to(compute_dtype)) & nonzero
        n = nonzero.sum(dtype=torch.float32)
        frac = changed.sum(dtype=torch.float32) / n.clamp(min=1.0)
        return torch.where(n > 0, frac, torch.ones_like(frac))


class Injector:
    """Owns the hooks of one adversarial step: records shapes during the clean pass, adds deltas after."""

    def __init__(self, text_module: nn.Module | None, image_module: nn.Module | None) -> None:
        self.text_module = text_module
        self.image_module = image_module
        self.recording = False
        self.measure = False
        self.deltas: dict[str, Tensor | None] = {"text": None, "image": None}
        self.recorded: dict[str, tuple[torch.Size, torch.dtype, torch.device] | None] = {"text": None, "image": None}
        self.survival: dict[str, Tensor] = {}
        #: the image delta enters as W delta added to a Linear image module's output (see the module docstring);
        #: a subclass of nn.Linear, or one with hooks of its own, takes the delta at its input instead
        self.image_split = _plain_linear(image_module)
        #: set by :meth:`remove`: the step cannot run any more
        self.removed = False
        self._handles = []
        if text_module is not None:
            self._handles.append(text_module.register_forward_hook(self._text_hook))
        if image_module is not None:
            self._handles.append(image_module.register_forward_pre_hook(self._image_hook))
            if self.image_split:
                self._handles.append(image_module.register_forward_hook(self._image_out_hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.removed = True

    def device(self) -> torch.device | None:
        for m in (self.text_module, self.image_module):
            if m is None:
                continue
            for t in m.parameters():
                return t.device
            for t in m.buffers():
                return t.device
        return None

    # ------------------------------------------------------------------------------------------- hooks
    def _record(self, name: str, x: object) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2:
            raise RuntimeError(
                f"the {name} injection point must see a tensor [B, ..., D], got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
            )
        if not x.is_floating_point():
            where = "text_embedding's output" if name == "text" else "image_input's first input"
            raise TypeError(
                f"the {name} injection point ({where}) is {x.dtype}, not floating point: a perturbation cannot be "
                "added to it; hook the module whose "
                + ("output is the word embeddings" if name == "text" else "input is the region features")
            )
        prev = self.recorded[name]
        if prev is not None:
            # a second call would receive the same delta (same shape) or fail against it (another shape)
            a, b = tuple(prev[0]), tuple(x.shape)
            shapes = f"shapes {a} and {b}" if a != b else f"shape {b}"
            raise RuntimeError(
                f"the {name} injection point was called more than once in one forward ({shapes}); hook a module "
                "called once per forward"
            )
        self.recorded[name] = (x.shape, x.dtype, x.device)

    def _check_shape(self, name: str, x: object) -> None:
        delta = self.deltas[name]
        if not isinstance(x, Tensor) or x.shape != delta.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise RuntimeError(f"the {name} delta has shape {tuple(delta.shape)} but the injection point saw {got}")

    def _apply(self, name: str, x: object) -> Tensor | None:
        delta = self.deltas[name]
        if delta is None:
            return None
        self._check_shape(name, x)
        y = inject(x, delta, keep_wide=_wide_weights(self.text_module if name == "text" else self.image_module))
        if self.measure:
            if name == "image" and torch.is_autocast_enabled(x.device.type):
                # the image input feeds a projection that autocast runs in the low-precision dtype
                cd = torch.get_autocast_dtype(x.device.type)
            else:
                cd = y.dtype
            self.survival[name] = survival(x, delta, y, cd)
        return y

    def _text_hook(self, module: nn.Module, args: tuple, out: object) -> Tensor | None:
        if self.recording:
            self._record("text", out)
            return None
        return self._apply("text", out)

    def _image_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not self.recording and self.deltas["image"] is None:
            return None
        if not args:
            raise RuntimeError("the image input module must receive the features as its first positional argument")
        if self.recording:
            self._record("image", args[0])
            return None
        if self.image_split:
            self._check_shape("image", args[0])  # the delta itself enters at the output
            return None
        return (self._apply("image", args[0]), *args[1:])

    def _image_out_hook(self, module: nn.Linear, args: tuple, out: object) -> Tensor | None:
        delta = self.deltas["image"]
        if self.recording or delta is None or not self.image_split:
            return None
        if not isinstance(out, Tensor):
            raise RuntimeError(f"the image projection returned {type(out).__name__}, not a tensor")
        w = module.weight
        with torch.autocast(out.device.type, enabled=False):
            lin = F.linear(delta, w if w.dtype == delta.dtype else w.to(delta.dtype))
        y = inject(out, lin, keep_wide=w.dtype in (torch.float32, torch.float64))
        if self.measure:
            # the sum leaves here in its own dtype (float32 for a float32 delta): what the next op receives, as on
            # the text side (a LayerNorm keeps float32 under autocast; a matrix product would cast again)
            self.survival["image"] = survival(out, lin, y, y.dtype)
        return y
