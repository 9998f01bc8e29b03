"""CPU cases of the op benchmark as a pytest-benchmark suite: ``pytest bench --benchmark-only``.

Each op runs through the C++ backend (when built) and as the released code's eager math,
so pytest-benchmark's table compares them in one run.
"""

import pytest
import torch

from bench.bench_ops import eager_init, eager_sym_kl, eager_update, update_inputs
from villa_fast import ops

BACKENDS = [b for b in ("cpp", "reference") if b in ops.available_backends("cpu")]


@pytest.fixture
def fused(request, monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND", request.param)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# max_norm 0: the released configs' update; 1.0: every row starts on the sphere and is projected back every call
# (bench_ops.update_inputs), so the in-place state does not drift into other work
@pytest.mark.parametrize("fused", BACKENDS, indirect=True)
@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_perturb_update_fused(benchmark, fused, max_norm):
    (dt, gt), (di, gi) = update_inputs(32, "cpu", radius=max_norm)
    benchmark(
        lambda: ops.perturb_update_multi_([dt, di], [gt, gi], lrs=[1e-3, 1e-2], norm_type="l2", max_norm=max_norm)
    )


@pytest.mark.parametrize("max_norm", [0.0, 1.0])
def test_perturb_update_eager(benchmark, max_norm):
    (dt, gt), (di, gi) = update_inputs(32, "cpu", radius=max_norm)
    benchmark(lambda: (eager_update(dt, gt, 1e-3, max_norm), eager_update(di, gi, 1e-2, max_norm)))


@pytest.mark.parametrize("fused", BACKENDS, indirect=True)
@pytest.mark.parametrize("classes", [3129, 28996])
def test_sym_kl_fused(benchmark, fused, classes):
    a = torch.randn(128, classes, requires_grad=True)
    b = torch.randn(128, classes, requires_grad=True)
    benchmark(lambda: torch.autograd.grad(ops.sym_kl(a, b, "mean"), (a, b)))


@pytest.mark.parametrize("classes", [3129, 28996])
def test_sym_kl_eager(benchmark, classes):
    a = torch.randn(128, classes, requires_grad=True)
    b = torch.randn(128, classes, requires_grad=True)
    benchmark(lambda: torch.autograd.grad(eager_sym_kl(a, b), (a, b)))


@pytest.mark.parametrize("fused", BACKENDS, indirect=True)
def test_perturb_init_fused(benchmark, fused):
    like = torch.empty(32, 36, 2048)
    mask = (torch.rand(32, 36) > 0.2).float()
    benchmark(lambda: ops.perturb_init(like, mask, init_mag=0.1, norm_type="l2"))


def test_perturb_init_eager(benchmark):
    like = torch.empty(32, 36, 2048)
    mask = (torch.rand(32, 36) > 0.2).float()
    benchmark(lambda: eager_init(like, mask, 0.1))
