"""Public fused ops of villa_fast: the perturbation init and update, the symmetric KL, the residual
add fused into LayerNorm, the multi-tensor add under a device flag, and the fused AdamW step.

Every op validates its arguments here (clear ValueError/TypeError naming the
argument), picks a backend in :mod:`villa_fast.ops._backend`, and runs as a
``torch.library`` custom op with a fake implementation, so it traces under
``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.
"""

from villa_fast.ops._adamw_step import adamw_step_
from villa_fast.ops._add_if import add_if_
from villa_fast.ops._add_layer_norm import add_layer_norm
from villa_fast.ops._backend import BACKENDS, BackendUnavailableError, available_backends, backend_for
from villa_fast.ops._perturb import perturb_init, perturb_update_, perturb_update_multi_
from villa_fast.ops._sym_kl import sym_kl

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "adamw_step_",
    "add_if_",
    "add_layer_norm",
    "available_backends",
    "backend_for",
    "perturb_init",
    "perturb_update_",
    "perturb_update_multi_",
    "sym_kl",
]
