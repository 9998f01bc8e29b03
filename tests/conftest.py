"""Shared test setup.

Without a GPU, Triton kernels run only under its interpreter, and the variable
must be set before any module defining @triton.jit functions is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from villa_fast.ops import _backend  # noqa: E402

_DEVICE_OF = {
    "reference": "cpu",
    "cpp": "cpu",
    "triton": "cuda" if torch.cuda.is_available() else "cpu",
    "cuda": "cuda",
}


def backend_device(name: str) -> str:
    return _DEVICE_OF[name]


@pytest.fixture(
    params=[pytest.param(b, marks=pytest.mark.gpu) if _DEVICE_OF[b] == "cuda" else b for b in _backend.BACKENDS]
)
def backend(request, monkeypatch):
    """Each backend in turn, forced through VILLA_FAST_BACKEND; skipped with the reason when it cannot run.
    The cases on a CUDA device (cuda, and triton where a GPU is present) carry the ``gpu`` marker."""
    name = request.param
    why = _backend._why_not(name, torch.device(_DEVICE_OF[name]))
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    monkeypatch.setenv("VILLA_FAST_BACKEND", name)
    return name


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny models: the thread pool's overhead dominates them,
    and grows large on a busy machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Caches the library keeps between runs (an image db's region counts) go to a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VILLA_FAST_CACHE", str(tmp_path_factory.mktemp("villa_fast_cache")))
        yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_tf32():
    """The trainer turns TF32 on for float32 matmuls under fp16/bf16 autocast on CUDA (the ``tf32`` key), a
    process-wide switch: put it back after every test so that float32 comparisons later stay float32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
