import os

import pytest
import torch
import torch.nn.functional as F

from tests._tol import tol
from tests.conftest import backend_device
from villa_fast import ops, reference


def _kl_div_form(a, b, reduction):
    """The released code's form: two F.kl_div calls on log-softmaxes and softmaxes."""
    a, b = a.double(), b.double()
    t = F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="none") + F.kl_div(
        F.log_softmax(b, 1), F.softmax(a, 1), reduction="none"
    )
    return {"batchmean": t.sum() / a.shape[0], "mean": t.mean(), "sum": t.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_reference_matches_kl_div_form(reduction):
    a = torch.randn(9, 31, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 31, dtype=torch.float64, requires_grad=True)
    want = _kl_div_form(a, b, reduction)
    got = reference.sym_kl(a, b, reduction)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)
    gw = torch.autograd.grad(want, (a, b))
    _, ga, gb = reference.sym_kl_fwd(a.detach(), b.detach(), reduction)
    torch.testing.assert_close(ga, gw[0], atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(gb, gw[1], atol=1e-14, rtol=1e-12)


# (rows, classes): 2 and 3 classes, VQA's 3129, odd rows; 28996 (MLM vocab) with few rows
CASES = [(5, 2), (7, 3), (3, 3129), (2, 28996), (13, 257)]


@pytest.mark.parametrize("n, c", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_matches_reference(backend, n, c, dtype, reduction):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend takes float32, bfloat16 and float16 logits")
    if backend == "triton" and c > 4000 and dtype != torch.float32 and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("one dtype is enough for the slow interpreted long-row path (on a GPU every dtype runs)")
    dev = backend_device(backend)
    a = (torch.randn(n, c) * 3).to(dtype).to(dev).requires_grad_()
    b = (torch.randn(n, c) * 3).to(dtype).to(dev).requires_grad_()
    want, wga, wgb = reference.sym_kl_fwd(a.detach().double(), b.detach().double(), reduction)
    got = ops.sym_kl(a, b, reduction)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and got.dim() == 0
    got.backward()
    assert a.grad.dtype == dtype and b.grad.dtype == dtype
    atol, rtol = tol(dtype, backend)
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
    gscale = 1.0 / {"batchmean": n, "mean": n * c, "sum": 1}[reduction]  # gradient entries scale with it
    torch.testing.assert_close(a.grad.double().cpu(), wga, atol=atol * gscale * 10, rtol=rtol * 10)
    torch.testing.assert_close(b.grad.double().cpu(), wgb, atol=atol * gscale * 10, rtol=rtol * 10)


def test_upstream_gradient_scales(backend):
    dev = backend_device(backend)
    a = torch.randn(4, 10, device=dev, requires_grad=True)
    b = torch.randn(4, 10, device=dev)
    (ops.sym_kl(a, b) * 3.5).backward()
    g1 = a.grad.clone()
    a.grad = None
    ops.sym_kl(a, b).backward()
    torch.testing.assert_close(g1, a.grad * 3.5)


def test_create_graph_gives_first_derivatives_and_refuses_a_second(backend):
    """Backward with create_graph=True: the first derivatives are the usual ones (and differentiable in the
    upstream scale); differentiating through the logits again raises, where it came out silently zero."""
    dev = backend_device(backend)
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(3, 6, generator=g, dtype=torch.float64).to(dev).requires_grad_() for _ in range(2))
    scale = torch.tensor(2.0, dtype=torch.float64, device=dev, requires_grad=True)
    ga, gb = torch.autograd.grad(ops.sym_kl(a, b) * scale, (a, b), create_graph=True)
    want_a, want_b = torch.autograd.grad(reference.sym_kl(a, b) * 2.0, (a, b))
    torch.testing.assert_close(ga, want_a)
    torch.testing.assert_close(gb, want_b)
    (d_scale,) = torch.autograd.grad((ga * want_a).sum(), scale, retain_graph=True)
    torch.testing.assert_close(d_scale, (want_a * want_a).sum() / 2.0)
    with pytest.raises(RuntimeError, match="no second derivative.*reference.sym_kl"):
        torch.autograd.grad(ga.sum(), a)


def test_neg_inf_classes_on_both_sides_contribute_nothing(backend):
    dev = backend_device(backend)
    a = torch.randn(3, 6)
    b = torch.randn(3, 6)
    a[:, 4] = b[:, 4] = float("-inf")
    got = ops.sym_kl(a.to(dev), b.to(dev))
    want = reference.sym_kl(torch.cat([a[:, :4], a[:, 5:]], 1).double(), torch.cat([b[:, :4], b[:, 5:]], 1).double())
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_mixed_dtypes_promote():
    a = torch.randn(4, 7, dtype=torch.float16, requires_grad=True)
    b = torch.randn(4, 7, dtype=torch.float32, requires_grad=True)
    ops.sym_kl(a, b).backward()
    assert a.grad.dtype == torch.float16 and b.grad.dtype == torch.float32


def test_identical_inputs_give_zero():
    a = torch.randn(5, 11)
    assert ops.sym_kl(a, a.clone()).abs().item() < 1e-6


def test_gradcheck():
    a = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for reduction in ("batchmean", "mean"):
        assert torch.autograd.gradcheck(lambda x, y, r=reduction: ops.sym_kl(x, y, r), (a, b))


def test_non_contiguous_inputs():
    a = torch.randn(9, 4).t()
    b = torch.randn(9, 4).t()
    torch.testing.assert_close(
        ops.sym_kl(a, b).double(), reference.sym_kl(a.double(), b.double()), atol=1e-6, rtol=1e-5
    )


@pytest.mark.parametrize(
    "a, b, kw, exc, match",
    [
        (torch.randn(3), torch.randn(3), {}, ValueError, "logits_a must be 2-D"),
        (torch.randn(3, 4), torch.randn(3, 5), {}, ValueError, "logits_b must have the shape"),
        (torch.randn(3, 1), torch.randn(3, 1), {}, ValueError, "2 <= C"),
        (torch.randn(0, 4), torch.randn(0, 4), {}, ValueError, "at least one row"),
        (torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4), {}, TypeError, "logits_a must have dtype"),
        (torch.randn(3, 4), torch.randn(3, 4), {"reduction": "none"}, ValueError, "reduction must be"),
        (torch.randn(3, 4), "x", {}, TypeError, "logits_b must be a torch.Tensor"),
    ],
)
def test_bad_arguments(a, b, kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.sym_kl(a, b, **kw)


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_row_mask_equals_the_kept_rows(backend, reduction):
    dev = backend_device(backend)
    n, c = 9, 37
    a = (torch.randn(n, c, dtype=torch.float64) * 2).float()
    b = (torch.randn(n, c, dtype=torch.float64) * 2).float()
    keep = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1], dtype=torch.bool)
    a[~keep] = float("nan")  # whatever the left-out rows hold reaches neither the loss nor the gradients
    b[~keep, 3] = float("inf")
    xa, xb = a.to(dev).requires_grad_(), b.to(dev).requires_grad_()
    got = ops.sym_kl(xa, xb, reduction, row_mask=keep.to(dev))
    got.backward()
    want, wga, wgb = reference.sym_kl_fwd(a[keep].double(), b[keep].double(), reduction)
    atol, rtol = tol(torch.float32, backend)
    torch.testing.assert_close(got.double().cpu(), want, atol=atol, rtol=rtol)
    gscale = 1.0 / {"batchmean": keep.sum().item(), "mean": keep.sum().item() * c, "sum": 1}[reduction]
    for g, w in ((xa.grad, wga), (xb.grad, wgb)):
        g = g.double().cpu()
        assert torch.equal(g[~keep], torch.zeros_like(g[~keep]))
        torch.testing.assert_close(g[keep], w, atol=atol * gscale * 10, rtol=rtol * 10)


def test_row_mask_with_no_row_kept_gives_zero():
    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6, requires_grad=True)
    got = ops.sym_kl(a, b, row_mask=torch.zeros(4, dtype=torch.bool))
    got.backward()
    assert got.item() == 0.0
    assert torch.equal(a.grad, torch.zeros_like(a)) and torch.equal(b.grad, torch.zeros_like(b))


def test_row_mask_all_true_changes_nothing():
    a = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(
        ops.sym_kl(a, b, "mean", row_mask=torch.ones(5, dtype=torch.bool)), ops.sym_kl(a, b, "mean"), rtol=1e-15, atol=0
    )
    assert torch.autograd.gradcheck(
        lambda x: ops.sym_kl(x, b, row_mask=torch.tensor([True, False, True, True, False])), (a,)
    )


@pytest.mark.parametrize(
    "mask, exc, match",
    [
        (torch.ones(3, dtype=torch.int64), TypeError, "row_mask must have dtype bool"),
        (torch.ones(4, dtype=torch.bool), ValueError, r"row_mask must have shape \[N\] = \(3,\)"),
        (torch.ones(3, 1, dtype=torch.bool), ValueError, "row_mask must have shape"),
        ([True, True, False], TypeError, "row_mask must be a torch.Tensor"),
    ],
)
def test_bad_row_mask(mask, exc, match):
    with pytest.raises(exc, match=match):
        ops.sym_kl(torch.randn(3, 4), torch.randn(3, 4), row_mask=mask)


@pytest.mark.parametrize("scale", [65536.0, 1024.0])
def test_float16_gradients_survive_a_loss_scale(backend, scale):
    """float16 logits under a GradScaler-sized upstream gradient: the gradients are those of autograd through
    the float32 math (not inf from the scale cast to float16, not flushed to zero before it is applied)."""
    if backend == "cuda":
        pytest.skip("the float16 op runs on float32 copies: one backend on the CPU shows it")
    dev = backend_device(backend)
    a = (torch.randn(8, 3129) * 3).half().to(dev).requires_grad_()
    b = (torch.randn(8, 3129) * 3).half().to(dev).requires_grad_()
    (ops.sym_kl(a, b, "mean") * scale).backward()
    _, wga, wgb = reference.sym_kl_fwd(a.detach().double().cpu(), b.detach().double().cpu(), "mean")
    for got, want in ((a.grad, wga), (b.grad, wgb)):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        want = (want * scale).half().double()  # what a float16 gradient of the exact math holds
        torch.testing.assert_close(got.double().cpu(), want, atol=1e-3, rtol=2e-2)


@pytest.mark.parametrize("c", [5, 9000])
def test_a_class_minus_inf_on_one_side_only_gives_inf(backend, c):
    """KL to a distribution with a zero where the other has mass is +inf (as the reference says), not NaN; the
    long rows take the Triton kernel's chunked path."""
    dev = backend_device(backend)
    a, b = torch.randn(2, c), torch.randn(2, c)
    a[0, 1] = float("-inf")
    got = ops.sym_kl(a.to(dev), b.to(dev))
    assert got.item() == float("inf") and reference.sym_kl(a.double(), b.double()).item() == float("inf")


@pytest.mark.parametrize("offset", [1.0, 20.0])
def test_long_rows_offset_by_a_constant_keep_their_digits(backend, offset):
    """Logits that differ by a per-row constant plus a little noise: the softmaxes barely differ, so the loss is
    tiny next to the logits' scale. Every path forms d = log p - log q per element; one that subtracted
    sum p (a - b) and the log-sum-exps would lose most digits (vocabulary-sized rows take the streaming path)."""
    dev = backend_device(backend)
    n, c = 2, 30522
    g = torch.Generator().manual_seed(5)
    a = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    b = a + offset + 1e-3 * torch.randn(n, c, generator=g, dtype=torch.float64)
    want, wga, _ = reference.sym_kl_fwd(a, b, "batchmean")
    xa = a.float().to(dev).requires_grad_()
    got = ops.sym_kl(xa, b.float().to(dev))
    got.backward()
    # float32 inputs: the noise itself is rounded at about 1e-7 * offset, so compare with the float64 loss of
    # the rounded inputs
    want32, wga32, _ = reference.sym_kl_fwd(a.float().double(), b.float().double(), "batchmean")
    torch.testing.assert_close(got.double().cpu(), want32, rtol=2e-3, atol=0)
    assert want32.item() > 0 and abs(want32.item() - want.item()) < 0.5 * want.item()
    scale = wga32.abs().max().item()
    torch.testing.assert_close(xa.grad.double().cpu(), wga32, rtol=0, atol=2e-3 * scale)
