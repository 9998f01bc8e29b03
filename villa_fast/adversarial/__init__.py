"""The VILLA adversarial step: eager (:class:`VillaStep`) and captured in a CUDA graph (:class:`GraphedVillaStep`).

It knows no model and no data format: perturbations enter through hooks on the modules the caller names.
"""

from villa_fast.adversarial.config import AdversarialConfig
from villa_fast.adversarial.graphed import GraphedVillaStep, clip_grad_norm_capturable_
from villa_fast.adversarial.step import StepResult, VillaStep

__all__ = ["AdversarialConfig", "GraphedVillaStep", "StepResult", "VillaStep", "clip_grad_norm_capturable_"]
