"""Configuration of the adversarial step (VILLA_SPEC sections 2 and 3)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

MODALITIES = ("text", "image", "text+image", "alter")
NORM_TYPES = ("l2", "linf")
KL_REDUCTIONS = ("batchmean", "mean", "sum")
CLEAN_BACKWARD = ("once", "per_step", "recompute")
AMP_DTYPES = (None, torch.bfloat16, torch.float16)


def _real(name: str, value: object, *, minimum: float = 0.0, positive: bool = False) -> float:
    """``value`` as a finite float >= ``minimum`` (``positive``: > 0), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if positive and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not math.isfinite(v) or v < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return v


def _choice(name: str, value: object, options: tuple) -> Any:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}")
    return value


@dataclass(frozen=True)
class AdversarialConfig:
    """Hyper-parameters of one VILLA adversarial step.

    Attributes:
        steps: K, the number of adversarial steps (forward/backward passes) per micro-batch, >= 1.
        lr_txt, lr_img: ascent step sizes of the text and image perturbations.
        norm_type: "l2" or "linf": the per-example norm that normalises the ascent step (and the projection).
        max_norm: projection radius after each update; 0 disables the projection (the released configs).
        init_mag: magnitude of the masked uniform init; 0 starts from zero (the released loop).
        kl_weight: alpha, the weight of the symmetric KL between perturbed and clean logits.
        modality: "text", "image", "text+image" (both deltas in one forward) or "alter"
            (a text-perturbed and an image-perturbed forward per step, each loss divided by 2K).
        kl_reduction: "batchmean" (sum over classes, mean over rows), "mean" (mean over all elements) or "sum"
            (sum over rows and classes: a task whose loss sums over its examples).
        clean_backward: "once" back-propagates the clean pass once with the summed upstream gradients
            (same gradients, 12F instead of 16F for K = 3); "per_step" retains the clean graph and
            back-propagates it at every step, as the released loop does; "recompute" is "once" without
            keeping the clean pass's activations through the K steps: the clean forward is run again (same
            dropout masks) just before its one backward, which trades one more forward (13F) for one
            forward's worth of activation memory (GraphedVillaStep captures it too, the clean pass drawing from
            its own registered generator states).
        amp_dtype: None (run in the model's dtype), torch.bfloat16 or torch.float16 autocast.
        skip_nonfinite: leave a step whose loss or gradients are not finite out of the parameter gradients
            and of the delta update (checked on the device). Costs one read of every parameter gradient
            per step (the flagged add itself costs what a plain add does); turn off only when non-finite
            values cannot occur.
    """

    steps: int = 3
    lr_txt: float = 1e-3
    lr_img: float = 1e-3
    norm_type: str = "l2"
    max_norm: float = 0.0
    init_mag: float = 0.0
    kl_weight: float = 1.5
    modality: str = "text"
    kl_reduction: str = "batchmean"
    clean_backward: str = "once"
    amp_dtype: torch.dtype | None = None
    skip_nonfinite: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        for name in ("lr_txt", "lr_img", "max_norm", "init_mag", "kl_weight"):
            object.__setattr__(self, name, _real(name, getattr(self, name)))
        _choice("norm_type", self.norm_type, NORM_TYPES)
        _choice("modality", self.modality, MODALITIES)
        _choice("kl_reduction", self.kl_reduction, KL_REDUCTIONS)
        _choice("clean_backward", self.clean_backward, CLEAN_BACKWARD)
        if self.amp_dtype is not None and not isinstance(self.amp_dtype, torch.dtype):
            raise ValueError(f"amp_dtype must be None, torch.bfloat16 or torch.float16; got {self.amp_dtype!r}")
        _choice("amp_dtype", self.amp_dtype, AMP_DTYPES)
        if not isinstance(self.skip_nonfinite, bool):
            raise ValueError(f"skip_nonfinite must be a bool, got {self.skip_nonfinite!r}")

    @property
    def perturb_text(self) -> bool:
        return self.modality != "image"

    @property
    def perturb_image(self) -> bool:
        return self.modality != "text"

    def replace(self, **changes: Any) -> AdversarialConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_villa_config(cls, config: Mapping[str, Any], **overrides: Any) -> AdversarialConfig:
        """Read the adversarial keys of an official VILLA JSON config (other keys are ignored).

        Keys: adv_steps, adv_lr_txt, adv_lr_img, norm_type, adv_max_norm, adv_init_mag, adv_kl_weight,
        adv_modality (a list such as ["text"], ["text", "image"] or ["text", "image", "alter"], or a
        string). ``fp16: true`` selects float16 autocast. Keyword ``overrides`` take precedence.
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"config must be a mapping of VILLA config keys, got {type(config).__name__}")
        keys = {
            "adv_steps": "steps",
            "adv_lr_txt": "lr_txt",
            "adv_lr_img": "lr_img",
            "norm_type": "norm_type",
            "adv_max_norm": "max_norm",
            "adv_init_mag": "init_mag",
            "adv_kl_weight": "kl_weight",
        }
        kwargs: dict[str, Any] = {field: config[key] for key, field in keys.items() if key in config}
        if "adv_modality" in config:
            kwargs["modality"] = _modality_from_list(config["adv_modality"])
        if config.get("fp16"):
            kwargs["amp_dtype"] = torch.float16
        kwargs.update(overrides)
        return cls(**kwargs)


def _modality_from_list(value: object) -> str:
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ValueError(f"adv_modality must be a list of strings such as ['text', 'image'], got {value!r}")
    if len(items) == 1 and items[0] in MODALITIES:
        return items[0]
    names = set(items)
    if not names or not names <= {"text", "image", "alter"} or len(names) != len(items):
        raise ValueError(f"adv_modality has an unknown or repeated entry: {value!r}")
    if "alter" in names:
        if names != {"text", "image", "alter"}:
            raise ValueError(f"adv_modality 'alter' needs both 'text' and 'image', got {value!r}")
        return "alter"
    return "text+image" if names == {"text", "image"} else items[0]
