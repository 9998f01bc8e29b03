"""Bad and edge-case inputs of the ops: a clear error naming what is wrong (raised before anything changes), or the
right answer, never a crash inside a kernel, a silent NaN or a half-applied update."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import backend_device
from villa_fast import ops, reference
from villa_fast.ops import _backend
from villa_fast.ops._sym_kl import MAX_CLASSES

# ------------------------------------------------------------------------------------ sym_kl: many classes


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_sym_kl_takes_more_classes_than_the_extension(monkeypatch, reduction):
    """A vocabulary-sized head (C > 32768, e.g. 50265) runs on a backend without the extension's limit."""
    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    monkeypatch.delenv("VILLA_FAST_BACKEND_SYM_KL", raising=False)
    g = torch.Generator().manual_seed(0)
    c = MAX_CLASSES + 5
    a = torch.randn(2, c, generator=g, dtype=torch.float64)
    b = torch.randn(2, c, generator=g, dtype=torch.float64)
    xa, xb = a.float().requires_grad_(), b.float().requires_grad_()
    got = ops.sym_kl(xa, xb, reduction)
    got.backward()
    want, wga, wgb = reference.sym_kl_fwd(a, b, reduction)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(xa.grad.double(), wga, atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(xb.grad.double(), wgb, atol=1e-9, rtol=1e-4)


def test_backend_for_sym_kl_past_the_extension_limit(monkeypatch):
    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    monkeypatch.delenv("VILLA_FAST_BACKEND_SYM_KL", raising=False)
    assert ops.backend_for(torch.zeros(1, MAX_CLASSES + 1), "sym_kl") == "reference"
    assert ops.backend_for(torch.zeros(1, MAX_CLASSES), "sym_kl") == ops.backend_for(torch.zeros(1, 8), "sym_kl")


def test_sym_kl_explicit_cpp_past_the_limit_says_why(monkeypatch):
    if "cpp" not in ops.available_backends("cpu"):
        pytest.skip("the C++ extension is not installed")
    monkeypatch.setenv("VILLA_FAST_BACKEND", "cpp")
    x = torch.zeros(1, MAX_CLASSES + 1)
    with pytest.raises(ops.BackendUnavailableError, match=r"C <= 32768 classes, got C=32769"):
        ops.sym_kl(x, x)


def test_sym_kl_still_needs_two_classes():
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        ops.sym_kl(torch.zeros(2, 1), torch.zeros(2, 1))


# ------------------------------------------------------------------------------------ perturb_init: empty


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 3, 0), (2, 0, 4), (0, 4)])
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_perturb_init_of_an_empty_like_is_empty(backend, shape, norm_type, with_mask):
    dev = backend_device(backend)
    like = torch.zeros(shape, device=dev)
    mask = torch.ones(shape[:-1], dtype=torch.bool, device=dev) if with_mask else None
    d = ops.perturb_init(like, mask, init_mag=1.0, norm_type=norm_type)
    assert d.shape == like.shape and d.dtype == torch.float32 and d.device == like.device
    # the public reference too (the wrapper returns before reaching it)
    r = reference.perturb_init(like, mask, init_mag=1.0, norm_type=norm_type)
    assert r.shape == like.shape and r.dtype == torch.float32 and r.device == like.device


# ------------------------------------------------------------------------------------ perturb_init: masks


@pytest.mark.parametrize(
    "fill, match",
    [
        (-1e4, r"an additive attention mask \(0 / -inf\) is not a validity mask"),
        (float("-inf"), r"an additive attention mask \(0 / -inf\) is not a validity mask"),
        (float("nan"), r"an additive attention mask \(0 / -inf\) is not a validity mask"),
        (0.5, r"mask must be bool or 0/1 integers \(1 = valid position\)"),
    ],
)
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_perturb_init_refuses_a_float_mask_that_is_not_0_1(fill, match, norm_type):
    mask = torch.zeros(2, 3)
    mask[1, 2] = fill
    with pytest.raises(ValueError, match=match):
        ops.perturb_init(torch.zeros(2, 3, 4), mask, init_mag=1.0, norm_type=norm_type)


@pytest.mark.parametrize("dtype, value", [(torch.uint8, 255), (torch.int64, 2), (torch.int32, -1)])
def test_perturb_init_refuses_an_integer_mask_that_is_not_0_1(dtype, value):
    mask = torch.ones(2, 3, dtype=dtype)
    mask[0, 1] = value
    match = rf"mask must be bool or 0/1 integers \(1 = valid position\); mask holds {value}"
    with pytest.raises(ValueError, match=match):
        ops.perturb_init(torch.zeros(2, 3, 4), mask, init_mag=1.0, norm_type="l2")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64, torch.float32, torch.float64])
def test_perturb_init_takes_0_1_masks_of_any_real_dtype_as_bool(dtype):
    valid = torch.tensor([[True, False, True], [False, False, False]])
    like = torch.zeros(2, 3, 4)
    torch.manual_seed(5)
    want = ops.perturb_init(like, valid, init_mag=1.0, norm_type="l2")
    torch.manual_seed(5)
    got = ops.perturb_init(like, valid.to(dtype), init_mag=1.0, norm_type="l2")
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------ adamw_step_: eps


@pytest.mark.parametrize("eps", [0, 0.0, -1e-8, float("nan"), float("inf")])
def test_adamw_step_needs_a_positive_eps(eps):
    p, g, m, v, s = torch.ones(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(())
    with pytest.raises(ValueError, match=r"eps must be a finite number"):
        ops.adamw_step_(
            [p], [g], [m], [v], [s], lr=0.1, beta1=0.9, beta2=0.99, eps=eps, weight_decay=0.0, correct_bias=True
        )
    assert torch.equal(p, torch.ones(3)) and float(s) == 0.0


# ------------------------------------------------------------------------------------ expanded written tensors


def test_perturb_update_refuses_an_expanded_delta(backend):
    dev = backend_device(backend)
    base = torch.zeros(1, 3, device=dev)
    with pytest.raises(ValueError, match=r"delta is an expanded view \(stride 0\)"):
        ops.perturb_update_(base.expand(2, 3), torch.ones(2, 3, device=dev), lr=0.1, norm_type="l2")
    assert torch.equal(base.cpu(), torch.zeros(1, 3))


def test_perturb_update_multi_refuses_an_expanded_delta_before_the_first_pair():
    d0 = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"deltas\[1\] is an expanded view \(stride 0\)"):
        ops.perturb_update_multi_(
            [d0, torch.zeros(3).expand(2, 3)], [torch.ones(2, 3)] * 2, lrs=[0.1, 0.1], norm_type="l2"
        )
    assert torch.equal(d0, torch.zeros(2, 3))


def test_perturb_update_reads_an_expanded_grad():
    d = torch.zeros(2, 3)
    ops.perturb_update_(d, torch.ones(1, 3).expand(2, 3), lr=0.1, norm_type="l2")
    torch.testing.assert_close(d, torch.full((2, 3), 0.1 / 3**0.5))


def test_add_if_refuses_an_expanded_acc_before_adding_anything(backend):
    dev = backend_device(backend)
    a, b = torch.zeros(2, 3, device=dev), torch.zeros(3, device=dev)
    ok = torch.tensor(True, device=dev)
    with pytest.raises(ValueError, match=r"accs\[1\] is an expanded view \(stride 0\)"):
        ops.add_if_([a, b.expand(2, 3)], [torch.ones(2, 3, device=dev)] * 2, ok)
    assert not a.any() and not b.any()


def test_add_if_reads_an_expanded_val():
    a = torch.zeros(2, 3)
    ops.add_if_([a], [torch.ones(3).expand(2, 3)], torch.tensor(True))
    assert torch.equal(a, torch.ones(2, 3))


@pytest.mark.parametrize("which", ["params", "exp_avgs", "exp_avg_sqs"])
def test_adamw_step_refuses_an_expanded_state_before_any_step(backend, which):
    dev = backend_device(backend)
    lists = {
        "params": [torch.ones(2, 3, device=dev), torch.ones(2, 3, device=dev)],
        "grads": [torch.full((2, 3), 0.5, device=dev) for _ in range(2)],
        "exp_avgs": [torch.zeros(2, 3, device=dev) for _ in range(2)],
        "exp_avg_sqs": [torch.zeros(2, 3, device=dev) for _ in range(2)],
        "steps": [torch.zeros((), device=dev) for _ in range(2)],
    }
    lists[which][1] = torch.zeros(3, device=dev).expand(2, 3)
    before = {k: [t.clone() for t in v] for k, v in lists.items()}
    with pytest.raises(ValueError, match=rf"{which}\[1\] is an expanded view \(stride 0\): every tensor an op writes"):
        ops.adamw_step_(*lists.values(), lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, correct_bias=True)
    for k, ts in lists.items():
        for t, t0 in zip(ts, before[k], strict=True):
            assert torch.equal(t, t0), k  # params[0] was not stepped


# ------------------------------------------------------------------------------------ meta tensors


def test_perturb_update_on_meta_tensors_says_meta():
    d, g = torch.zeros(2, 3, device="meta"), torch.ones(2, 3, device="meta")
    with pytest.raises(ValueError, match="delta is a meta tensor: meta tensors are not supported"):
        ops.perturb_update_(d, g, lr=0.1, norm_type="l2")


def test_add_if_and_adamw_step_on_meta_tensors_say_meta():
    m = [torch.zeros(3, device="meta"), torch.zeros(3, device="meta")]
    with pytest.raises(ValueError, match=r"accs\[0\] is a meta tensor"):
        ops.add_if_(m[:1], m[1:], torch.tensor(True, device="meta"))
    t = [[torch.zeros(3, device="meta")] for _ in range(4)]
    with pytest.raises(ValueError, match=r"params\[0\] is a meta tensor"):
        ops.adamw_step_(
            *t,
            [torch.zeros((), device="meta")],
            lr=0.1,
            beta1=0.9,
            beta2=0.99,
            eps=1e-8,
            weight_decay=0.0,
            correct_bias=True,
        )


# ------------------------------------------------------------------------------------ backend_for, available


def test_backend_for_a_non_tensor_is_a_type_error():
    with pytest.raises(TypeError, match="tensor must be a torch.Tensor, got list"):
        ops.backend_for([1.0], "sym_kl")
    with pytest.raises(TypeError, match="op must be a str"):
        ops.backend_for(torch.zeros(1), 3)


@pytest.mark.parametrize("op", ["perturb_update__", "sym_kl__", "adamw", "add_if__", "perturb_update_multi__"])
def test_backend_for_unknown_op_names_lists_the_known(op):
    with pytest.raises(ValueError, match=r"op must be one of adamw_step, add_if, add_layer_norm, perturb_init"):
        ops.backend_for(torch.zeros(1), op)


@pytest.mark.parametrize("op", ["perturb_update_", "perturb_update_multi_", "add_if_", "adamw_step_", "sym_kl"])
def test_backend_for_takes_the_public_names(op):
    assert ops.backend_for(torch.zeros(2, 3), op) in ops.BACKENDS


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_available_backends_of_a_cuda_index_without_cuda():
    assert ops.available_backends(0) == ["reference"]
    why = ops.available_backends(0, reasons=True)
    assert set(why) == set(ops.BACKENDS) and why["reference"] == ""
    for b in ("cuda", "triton", "cpp"):
        assert "no CUDA device is available" in why[b]


def test_available_backends_of_a_bad_device():
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        ops.available_backends("gpu")
    with pytest.raises(TypeError, match="device must be"):
        ops.available_backends(1.5)
    assert ops.available_backends("cpu", reasons=True)["reference"] == ""
    assert _backend.available_backends(torch.device("cpu")) == ops.available_backends("cpu")
