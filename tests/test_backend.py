import os
import subprocess
import sys

import pytest
import torch

from villa_fast import ops
from villa_fast.ops import _backend


def test_auto_on_cpu_prefers_cpp_then_reference(monkeypatch):
    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    want = "cpp" if _backend.extension() is not None else "reference"
    assert ops.backend_for(torch.zeros(1)) == want


def test_explicit_reference(monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND", "reference")
    assert ops.backend_for(torch.zeros(1)) == "reference"


def test_explicit_cuda_on_cpu_tensor_names_what_is_missing(monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="needs CUDA tensors"):
        ops.backend_for(torch.zeros(1))
    with pytest.raises(ops.BackendUnavailableError, match="VILLA_FAST_BACKEND=cuda"):
        ops.sym_kl(torch.randn(2, 3), torch.randn(2, 3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_gpu_backends_without_a_cuda_device_say_so(monkeypatch):
    """A CUDA build (of torch and of villa_fast._C) on a machine without a GPU: the GPU backends are unavailable
    for that reason, whatever the extension holds, and nothing initialises CUDA to find out."""
    monkeypatch.setattr(_backend, "ext_with_cuda", lambda: True)
    for name in ("cuda", "triton"):
        assert "no CUDA device" in _backend._why_not(name, torch.device("cuda"))
    assert _backend._why_not("reference", torch.device("cuda")) == ""


def test_explicit_triton_without_interpreter_on_cpu(monkeypatch):
    # import Triton (if present) first: it reads TRITON_INTERPRET when the kernels are defined
    _backend._triton_import_error()
    monkeypatch.setenv("VILLA_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="TRITON_INTERPRET=1|triton is not installed"):
        ops.backend_for(torch.zeros(1))


def test_explicit_backend_with_unsupported_dtype(monkeypatch):
    if "triton" not in ops.available_backends("cpu"):
        pytest.skip("triton cannot run here")
    monkeypatch.setenv("VILLA_FAST_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="float64"):
        ops.perturb_update_(torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3), lr=0.1, norm_type="l2")


def test_auto_keeps_float64_off_the_float32_triton_kernels(monkeypatch):
    """Where auto mode picks Triton (a GPU without the CUDA extension), float64 tensors of the ops whose Triton
    kernel computes in float32 go to the reference (float64 math); add_if's Triton kernel adds in float64."""
    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "_pick", lambda device, op: "triton")
    for op in ("sym_kl", "perturb_init", "add_layer_norm"):
        assert _backend.choose(op, "cuda", "torch.float64") == "reference"
        assert _backend.choose(op, "cuda", "torch.float32") == "triton"
    assert _backend.choose("add_if", "cuda", "torch.float64") == "triton"


def test_unknown_backend_value(monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VILLA_FAST_BACKEND='fastest'"):
        ops.backend_for(torch.zeros(1))


def test_missing_extension_is_reported(monkeypatch):
    monkeypatch.setattr(_backend, "_load_ext", lambda: (None, "No module named 'villa_fast._C'"))
    monkeypatch.setenv("VILLA_FAST_BACKEND", "cpp")
    with pytest.raises(ops.BackendUnavailableError, match="villa_fast._C is not installed"):
        ops.backend_for(torch.zeros(1))
    monkeypatch.setenv("VILLA_FAST_BACKEND", "auto")
    assert ops.backend_for(torch.zeros(1)) == "reference"


def test_available_backends_lists_reference():
    assert "reference" in ops.available_backends("cpu")


def _run(code: str, **env) -> str:
    full = dict(os.environ, **env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_initialises_no_cuda_and_loads_nothing_heavy():
    code = (
        "import sys, torch, villa_fast\n"
        "light = 'villa_fast.ops' not in sys.modules\n"
        "import villa_fast.ops, villa_fast.reference\n"
        "m = sys.modules\n"
        "print(light, torch.cuda.is_initialized(), 'villa_fast._C' in m, 'villa_fast.kernels' in m)\n"
    )
    assert _run(code) == "True False False False"


def test_pure_python_mode_works(tmp_path):
    # VILLA_FAST_NO_EXT=1 is a build switch; at run time the equivalent is an import without the extension
    code = (
        "import sys; sys.modules['villa_fast._C'] = None\n"
        "import torch, villa_fast.ops as ops\n"
        "a = torch.randn(3, 5, requires_grad=True)\n"
        "ops.sym_kl(a, torch.randn(3, 5)).backward()\n"
        "d = torch.zeros(3, 4); ops.perturb_update_(d, torch.randn(3, 4), lr=0.1, norm_type='l2')\n"
        "print(ops.backend_for(a), bool(torch.isfinite(a.grad).all()), round(float(d.norm(dim=1)[0]), 6))\n"
    )
    assert _run(code, VILLA_FAST_BACKEND="auto") == "reference True 0.1"


def test_per_op_variable_overrides_the_global_one(monkeypatch):
    """VILLA_FAST_BACKEND_<OP> decides for that op alone: a global cpp choice need not break an op without a
    C++ kernel, and one op can be pinned while the others stay automatic."""
    x = torch.randn(2, 4)
    w = torch.ones(4)
    monkeypatch.setenv("VILLA_FAST_BACKEND", "reference")
    monkeypatch.setenv("VILLA_FAST_BACKEND_SYM_KL", "auto")
    assert _backend.choose("sym_kl", "cpu", "torch.float32") == (
        "cpp" if "cpp" in ops.available_backends() else "reference"
    )
    assert _backend.choose("perturb_update", "cpu", "torch.float32") == "reference"
    if "cpp" in ops.available_backends("cpu"):
        monkeypatch.setenv("VILLA_FAST_BACKEND", "cpp")
        with pytest.raises(ops.BackendUnavailableError, match="VILLA_FAST_BACKEND_ADD_LAYER_NORM"):
            ops.add_layer_norm(x, x, w)
        monkeypatch.setenv("VILLA_FAST_BACKEND_ADD_LAYER_NORM", "auto")
        torch.testing.assert_close(
            ops.add_layer_norm(x, x, w), torch.nn.functional.layer_norm(2 * x, (4,), w, eps=1e-12)
        )
        assert _backend.choose("perturb_update", "cpu", "torch.float32") == "cpp"
    monkeypatch.setenv("VILLA_FAST_BACKEND_SYM_KL", "fastest")
    with pytest.raises(ValueError, match="VILLA_FAST_BACKEND_SYM_KL='fastest'"):
        _backend.choose("sym_kl", "cpu", "torch.float32")


def test_per_op_variables_take_the_public_names_and_an_unknown_one_is_warned(monkeypatch, caplog):
    import logging

    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADD_IF_", "reference")
    monkeypatch.setenv("VILLA_FAST_BACKEND_PERTURB_UPDATE_MULTI_", "reference")
    assert _backend.choose("add_if", "cpu", "torch.float32") == "reference"
    assert _backend.choose("perturb_update", "cpu", "torch.float32") == "reference"
    monkeypatch.setenv("VILLA_FAST_BACKEND_SYMKL", "reference")  # a typo: no such op
    with caplog.at_level(logging.WARNING, logger="villa_fast.ops"):
        _backend.choose("sym_kl", "cpu", "torch.float32")
    assert "VILLA_FAST_BACKEND_SYMKL names no villa_fast op" in caplog.text


def test_backend_for_an_op_follows_its_kernels_dtypes_and_variable(monkeypatch):
    for var in [k for k in __import__("os").environ if k.startswith("VILLA_FAST_BACKEND")]:
        monkeypatch.delenv(var)
    x = torch.zeros(2, 3)
    cpp = "cpp" in ops.available_backends("cpu")
    assert ops.backend_for(x, "sym_kl") == ("cpp" if cpp else "reference")
    # add_layer_norm has no C++ kernel: the device's choice (cpp) is not what it runs
    assert ops.backend_for(x, "add_layer_norm") == "reference"
    assert ops.backend_for(x.double(), "perturb_update_multi_") == ("cpp" if cpp else "reference")
    assert ops.backend_for(x.half(), "adamw_step_") == "reference"  # no float16 parameters in the C++ kernel
    monkeypatch.setenv("VILLA_FAST_BACKEND_SYM_KL", "reference")
    assert ops.backend_for(x, "sym_kl") == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        ops.backend_for(x, "softmax")


def test_backend_for_perturb_init_judges_its_float32_deltas():
    like = torch.zeros(2, 3, dtype=torch.bfloat16)
    assert ops.backend_for(like, "perturb_init") == _backend.choose("perturb_init", "cpu", "torch.float32")
