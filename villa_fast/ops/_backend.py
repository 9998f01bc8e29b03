"""Backend choice for every villa_fast op, in one place.

Automatic order, by the tensor's device and what is installed:
CUDA extension -> Triton -> C++ extension -> reference (plain PyTorch).
``VILLA_FAST_BACKEND=reference|cpp|triton|cuda|auto`` overrides it for every op, and
``VILLA_FAST_BACKEND_<OP>`` (e.g. ``VILLA_FAST_BACKEND_ADD_LAYER_NORM=auto``; the ops PERTURB_UPDATE, which
perturb_update_multi_ follows too, PERTURB_INIT, SYM_KL, ADD_LAYER_NORM, ADD_IF, ADAMW_STEP, or the public
names with their trailing underscore) for one op, taking precedence (a variable naming no op is warned
about); an explicit backend that cannot run raises an error naming what is missing, while an automatic
choice that cannot load falls back quietly (logged at debug level).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

import torch
from torch import Tensor

log = logging.getLogger("villa_fast.ops")

BACKENDS = ("cuda", "triton", "cpp", "reference")
_ENV = "VILLA_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this tensor or this installation."""


# the variables of each op: VILLA_FAST_BACKEND_<OP>, also spelt as the public function (ADD_IF_, ...);
# perturb_update_multi_ is perturb_update's
_OP_VARS: dict[str, tuple[str, ...]] = {
    "perturb_update": ("PERTURB_UPDATE", "PERTURB_UPDATE_", "PERTURB_UPDATE_MULTI", "PERTURB_UPDATE_MULTI_"),
    "perturb_init": ("PERTURB_INIT",),
    "sym_kl": ("SYM_KL",),
    "add_layer_norm": ("ADD_LAYER_NORM",),
    "add_if": ("ADD_IF", "ADD_IF_"),
    "adamw_step": ("ADAMW_STEP", "ADAMW_STEP_"),
}
_KNOWN_VARS = frozenset(f"{_ENV}_{v}" for vs in _OP_VARS.values() for v in vs)
_warned: set[str] = set()
_env_size = -1


def _warn_unknown_vars() -> None:
    """A VILLA_FAST_BACKEND_<NAME> that names no op would be ignored: say so, once per name. The environment
    is scanned again only when its size changes (ops call this every time; a scan costs tens of us)."""
    global _env_size
    if len(os.environ) == _env_size:
        return
    _env_size = len(os.environ)
    for k in os.environ:
        if k.startswith(_ENV + "_") and k not in _KNOWN_VARS and k not in _warned:
            _warned.add(k)
            names = ", ".join(f"{_ENV}_{vs[0]}" for vs in _OP_VARS.values())
            log.warning("%s names no villa_fast op and is ignored; the per-op variables are %s", k, names)


def _env_name(op: str | None) -> str:
    """The variable that decides for ``op``: its own when set, else VILLA_FAST_BACKEND."""
    if op is not None:
        for suffix in _OP_VARS.get(op, (op.upper(),)):
            if f"{_ENV}_{suffix}" in os.environ:
                return f"{_ENV}_{suffix}"
    return _ENV


def requested_backend(op: str | None = None) -> str:
    """The backend asked for by VILLA_FAST_BACKEND_<OP> (for ``op``) or VILLA_FAST_BACKEND ('auto' when unset)."""
    _warn_unknown_vars()
    name = _env_name(op)
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value != "auto" and value not in BACKENDS:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(('auto',) + BACKENDS)}")
    return value


@functools.cache
def _load_ext() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("villa_fast._C"), ""
    except ImportError as exc:  # pure-Python install, or a build for another torch
        log.debug("villa_fast._C not loaded: %s", exc)
        return None, str(exc)


def extension() -> ModuleType | None:
    """The compiled extension module, or None when it is not installed."""
    return _load_ext()[0]


def ext_with_cuda() -> bool:
    ext = extension()
    return bool(ext is not None and getattr(ext, "with_cuda", False))


@functools.cache
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _why_not(backend: str, device: torch.device) -> str:
    """Empty string when ``backend`` can run on ``device``, else the reason it cannot."""
    if backend == "reference":
        return ""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False)"
    if backend == "cpp":
        if extension() is None:
            return f"the compiled extension villa_fast._C is not installed ({_load_ext()[1]})"
        if device.type == "cuda":
            return "the cpp backend runs on CPU tensors only (use 'cuda' for CUDA tensors)"
        if device.type != "cpu":
            return f"the cpp backend does not support device {device}"
        return ""
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got a tensor on {device}"
        if extension() is None:
            return f"the compiled extension villa_fast._C is not installed ({_load_ext()[1]})"
        if not ext_with_cuda():
            return "villa_fast._C was built without CUDA kernels (rebuild with a CUDA toolkit or FORCE_CUDA=1)"
        return ""
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return ""
        if device.type == "cpu":
            return "" if _interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        return f"the triton backend does not support device {device}"
    raise ValueError(f"unknown backend {backend!r}")


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def plain_eager(*tensor_lists: list[Tensor]) -> bool:
    """Whether an in-place multi-tensor op may call its kernel directly instead of through its ``torch.library``
    registration: plain eager execution (no torch.compile tracing, no dispatch or torch-function mode such as
    FakeTensorMode, no functorch transform, no profiler) on plain tensors. The registration costs about
    1 us per tensor argument in Python (over 1 ms for an AdamW step over 168 parameters); the direct call
    bumps the version counters of what it mutates, as the registration does."""
    if (
        torch.compiler.is_compiling()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch._C._are_functorch_transforms_active()
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return False
    return all(type(t) in _PLAIN_TYPES for ts in tensor_lists for t in ts)


def bump_versions(tensors: list[Tensor]) -> None:
    """Advance the autograd version counters of tensors an op changed in place without the dispatcher."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch < 2.5 takes one tensor at a time
        for t in tensors:
            torch.autograd.graph.increment_version(t)


_ORDER_CUDA = ("cuda", "triton", "cpp", "reference")
_ORDER_CPU = ("cpp", "reference")


def backend_for(tensor: Tensor, op: str | None = None) -> str:
    """The backend that would run on ``tensor``, honouring the environment variables.

    With ``op`` (``"sym_kl"``, ``"perturb_update_multi_"``, ... the public names or the short ones), the one that
    op would run with for this tensor's device and dtype (an op without that backend's kernel or dtype takes the
    next one, as it does when called; for sym_kl a [N, C] tensor's class count counts too); without, the device's
    choice under VILLA_FAST_BACKEND alone.
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if op is None:
        return _pick(tensor.device)
    if not isinstance(op, str):
        raise TypeError(f"op must be a str naming an op, got {type(op).__name__}")
    key = op[:-1] if op.endswith("_") else op  # the public names end in one underscore: add_if_, adamw_step_
    key = "perturb_update" if key == "perturb_update_multi" else key
    if key not in SUPPORTED_DTYPES:
        known = ", ".join(sorted((*SUPPORTED_DTYPES, "perturb_update_multi")))
        raise ValueError(f"op must be one of {known} (or the name with one trailing underscore); got {op!r}")
    dtype = str(tensor.dtype)
    if key == "perturb_init" and dtype != _F64:
        dtype = _F32  # its deltas are float32 (float64 for float64 tensors) whatever the tensor's dtype
    if key == "sym_kl" and tensor.dim() == 2:
        return choose_sym_kl(tensor.device.type, dtype, tensor.shape[1])
    return choose(key, tensor.device.type, dtype)


def _pick(device: torch.device, op: str | None = None) -> str:
    req = requested_backend(op)
    if req != "auto":
        why = _why_not(req, device)
        if why:
            raise BackendUnavailableError(f"{_env_name(op)}={req} cannot run: {why}")
        return req
    order = _ORDER_CUDA if device.type == "cuda" else _ORDER_CPU
    for backend in order:
        why = _why_not(backend, device)
        if not why:
            return backend
        log.debug("backend %s skipped for %s: %s", backend, device, why)
    return "reference"


# dtypes each backend takes, per op (the reference takes every floating dtype). A backend missing
# from an op's entry does not exist for that op: auto mode passes over it, an explicit request raises.
# add_layer_norm has Triton and reference backends only: no C++/CUDA extension kernel.
_F64, _F32, _F16, _BF16 = "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16"
SUPPORTED_DTYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "perturb_update": {"cuda": (_F32,), "triton": (_F32,), "cpp": (_F32, _F64)},
    "perturb_init": {"cuda": (_F32,), "triton": (_F32, _F64), "cpp": (_F32, _F64)},
    "sym_kl": {"cuda": (_F32, _F16, _BF16), "triton": (_F32, _F16, _BF16, _F64), "cpp": (_F32, _F16, _BF16, _F64)},
    "add_layer_norm": {"triton": (_F32, _F16, _BF16, _F64)},
    "add_if": {"cuda": (_F32, _F16, _BF16), "triton": (_F32, _F16, _BF16, _F64), "cpp": (_F32, _F16, _BF16, _F64)},
    # by the parameters' dtype (float32 ones take float32, float16 or bfloat16 gradients)
    "adamw_step": {"cuda": (_F32,), "triton": (_F32,), "cpp": (_F32, _F64)},
}
# ops whose Triton kernel takes float64 tensors but computes in float32: chosen for float64 only on request
_TRITON_FLOAT32_MATH = frozenset({"sym_kl", "perturb_init", "add_layer_norm"})


@torch.compiler.assume_constant_result
def choose(op: str, device_type: str, dtype: str) -> str:
    """The backend that runs ``op`` on a tensor of ``dtype`` (a str such as 'torch.float32') on ``device_type``.

    Auto mode passes over backends the op has no kernel for (add_layer_norm: cuda, cpp) and
    falls back to the reference when the chosen backend does not take the dtype, or is Triton for a float64
    tensor of an op whose Triton kernel computes in float32 (sym_kl, perturb_init, add_layer_norm); an explicit
    backend that lacks the op or the dtype raises. Under torch.compile this runs once at trace time.
    """
    device = torch.device(device_type)
    table = SUPPORTED_DTYPES[op]
    if requested_backend(op) != "auto":
        backend = _pick(device, op)
        if backend == "reference" or dtype in table.get(backend, ()):
            return backend
        name = _env_name(op)
        if backend not in table:
            have = ", ".join((*table, "reference"))
            raise BackendUnavailableError(
                f"{name}={backend}: {op} has no {backend} backend (it has {have}); "
                f"{_ENV}_{op.upper()}=auto|reference|... chooses for this op alone"
            )
        raise BackendUnavailableError(f"{name}={backend}: the {backend} backend of {op} does not take {dtype} tensors")
    backend = _pick(device, op)
    if backend != "reference" and backend not in table:
        # the op has no kernel of this kind: take the next backend in the automatic order that it has
        order = _ORDER_CUDA if device.type == "cuda" else _ORDER_CPU
        rest = [b for b in order[order.index(backend) + 1 :] if b == "reference" or b in table]
        backend = next(b for b in rest if not _why_not(b, device))
    if backend == "triton" and dtype == _F64 and op in _TRITON_FLOAT32_MATH:
        return "reference"  # float64 inputs get float64 math unless the Triton backend is asked for
    if backend == "reference" or dtype in table[backend]:
        return backend
    return "reference"


# the most classes the C++ extension's sym_kl_fwd takes (kMaxClasses in csrc/sym_kl.cpp)
SYM_KL_EXT_MAX_CLASSES = 32768


def choose_sym_kl(device_type: str, dtype: str, classes: int) -> str:
    """:func:`choose` for sym_kl on [N, ``classes``] logits: the C++ extension's sym_kl (its CPU and CUDA kernels
    alike, csrc/sym_kl.cpp) takes at most SYM_KL_EXT_MAX_CLASSES classes, the Triton and reference ones any
    number. Past that, auto mode takes Triton on a CUDA device where it can run, else the reference; an explicit
    cpp or cuda request raises."""
    backend = choose("sym_kl", device_type, dtype)
    if backend not in ("cpp", "cuda") or classes <= SYM_KL_EXT_MAX_CLASSES:
        return backend
    other = _past_ext_classes(device_type)
    if not other:
        raise BackendUnavailableError(
            f"{_env_name('sym_kl')}={backend}: the {backend} sym_kl takes C <= {SYM_KL_EXT_MAX_CLASSES} classes, "
            f"got C={classes} (the triton and reference backends take any C)"
        )
    return other


@torch.compiler.assume_constant_result
def _past_ext_classes(device_type: str) -> str:
    """The sym_kl backend for more classes than the extension takes: "" under an explicit request."""
    if requested_backend("sym_kl") != "auto":
        return ""
    if device_type == "cuda" and not _why_not("triton", torch.device(device_type)):
        return "triton"
    return "reference"


def _as_device(device: object) -> torch.device:
    """``device`` as a torch.device; an int names a CUDA device even where no accelerator is present (where
    torch.device(0) raises)."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"device must be a torch.device, a str or an int, got {type(device).__name__}")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        if isinstance(device, int) and device >= 0:
            return torch.device("cuda", device)
        raise ValueError(f"device {device!r} is not a device: {exc}") from None


def available_backends(
    device: torch.device | str | int = "cpu", *, reasons: bool = False
) -> list[str] | dict[str, str]:
    """Every backend that can run on ``device`` here, fastest first.

    With ``reasons``, a dict of every backend instead: "" for those that can run, else why not (for a CUDA device
    on a machine without one: "no CUDA device is available ..."). An int is a CUDA device index.
    """
    device = _as_device(device)
    why = {b: _why_not(b, device) for b in BACKENDS}
    return why if reasons else [b for b in BACKENDS if not why[b]]
