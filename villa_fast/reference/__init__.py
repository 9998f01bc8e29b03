"""Plain-PyTorch versions of every villa_fast op.

They are the fallback backend and the oracle the fast kernels are tested
against. They import nothing from the rest of villa_fast, and they compute in
float64 when given float64, so tests can compare the fused kernels (and the
adversarial step) to them at tight tolerances.
"""

from villa_fast.reference.adamw_step import adamw_step_
from villa_fast.reference.add_if import add_if_
from villa_fast.reference.add_layer_norm import add_layer_norm, add_layer_norm_bwd, add_layer_norm_fwd
from villa_fast.reference.perturb import perturb_init, perturb_init_scale_, perturb_update_
from villa_fast.reference.sym_kl import sym_kl, sym_kl_fwd

__all__ = [
    "adamw_step_",
    "add_if_",
    "add_layer_norm",
    "add_layer_norm_bwd",
    "add_layer_norm_fwd",
    "perturb_init",
    "perturb_init_scale_",
    "perturb_update_",
    "sym_kl",
    "sym_kl_fwd",
]
