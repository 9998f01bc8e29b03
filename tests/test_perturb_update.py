import math

import pytest
import torch

from tests._tol import tol
from tests.conftest import backend_device
from villa_fast import ops, reference


def _oracle(delta, grad, **kw):
    d = delta.double().clone()
    n = reference.perturb_update_(
        d, grad.double(), **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}
    )
    return d, int(n)


SHAPES = [(7, 13, 17), (5, 31), (3, 2, 3, 5), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_matches_reference_fp32(backend, shape, norm_type, max_norm):
    dev = backend_device(backend)
    delta = (torch.randn(shape) * 0.03).to(dev)
    grad = torch.randn(shape).to(dev)
    want, nwant = _oracle(delta, grad, lr=0.02, norm_type=norm_type, max_norm=max_norm)
    got = delta.clone()
    n = ops.perturb_update_(got, grad, lr=0.02, norm_type=norm_type, max_norm=max_norm)
    atol, rtol = tol(torch.float32, backend)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=atol, rtol=rtol)
    assert n.dtype == torch.int64 and n.dim() == 0 and int(n) == nwant == 0
    if max_norm > 0 and norm_type == "l2":
        assert got.reshape(shape[0], -1).norm(dim=1).max() <= max_norm * (1 + 1e-5)
    if max_norm > 0 and norm_type == "linf":
        assert got.abs().max() <= max_norm


@pytest.mark.parametrize("gdtype", [torch.float16, torch.bfloat16])
def test_low_precision_grad(backend, gdtype):
    dev = backend_device(backend)
    delta = (torch.randn(6, 11, 19) * 0.01).to(dev)
    grad = torch.randn(6, 11, 19).to(gdtype).to(dev)
    want, _ = _oracle(delta, grad, lr=1e-3, norm_type="l2")
    got = delta.clone()
    ops.perturb_update_(got, grad, lr=1e-3, norm_type="l2")
    # the gradient is already rounded to gdtype; the update math itself is float32
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("max_norm", [0.0, 0.3])
def test_float64_exact(backend, norm_type, max_norm):
    if backend in ("triton", "cuda"):
        pytest.skip(f"the {backend} backend updates float32 deltas only")
    delta = torch.randn(5, 7, 3, dtype=torch.float64) * 0.1
    grad = torch.randn(5, 7, 3, dtype=torch.float64)
    want, _ = _oracle(delta, grad, lr=0.1, norm_type=norm_type, max_norm=max_norm)
    got = delta.clone()
    ops.perturb_update_(got, grad, lr=0.1, norm_type=norm_type, max_norm=max_norm)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)


def test_long_rows_stream_in_chunks(backend):
    # rows longer than the on-chip limit of the fused kernels take the chunked path
    dev = backend_device(backend)
    delta = (torch.randn(3, 20000) * 0.01).to(dev)
    grad = torch.randn(3, 20000).to(dev)
    for norm_type in ("l2", "linf"):
        want, _ = _oracle(delta, grad, lr=0.5, norm_type=norm_type, max_norm=0.2)
        got = delta.clone()
        ops.perturb_update_(got, grad, lr=0.5, norm_type=norm_type, max_norm=0.2)
        torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [300, 20000], ids=["on_chip", "streamed"])
def test_l2_projection_holds_when_the_step_nearly_undoes_delta(backend, n):
    """A delta outside the ball and a step that nearly cancels it: the projected norm is that of the written row
    (a norm of d + s g formed from partial sums of d and g lost its digits: 1% outside the ball)."""
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(5)
    d = torch.randn(2, n, generator=gen)
    d = d / d.norm(dim=1, keepdim=True) * 100.0
    g = -d + 1e-3 * torch.randn(2, n, generator=gen)
    lr = float(g[0].norm())  # row 0: step 1, d + g is the small noise left
    want, _ = _oracle(d, g, lr=lr, norm_type="l2", max_norm=0.05)
    got = d.clone().to(dev)
    assert int(ops.perturb_update_(got, g.to(dev), lr=lr, norm_type="l2", max_norm=0.05)) == 0
    got = got.double().cpu()
    assert float(got[0].norm()) <= 0.05 * (1 + 1e-5)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-3)


def test_a_row_whose_l2_norm_overflows_is_counted_not_silently_still(backend):
    """Finite gradients whose squared sum passes float32's range: the step would round to zero and the row
    stay where it is unnoticed; it is left unchanged and counted as a non-finite row."""
    dev = backend_device(backend)
    for n in (4, 20000):
        delta = (torch.randn(3, n) * 0.01).to(dev)
        grad = torch.randn(3, n)
        grad[1, :2] = torch.tensor([3e19, -4e19])
        grad = grad.to(dev)
        got = delta.clone()
        assert int(ops.perturb_update_(got, grad, lr=0.1, norm_type="l2")) == 1
        assert torch.equal(got[1], delta[1])
        want, _ = _oracle(delta, grad, lr=0.1, norm_type="l2")
        keep = [0, 2]
        torch.testing.assert_close(got[keep].double().cpu(), want[keep].cpu(), atol=1e-6, rtol=1e-5)
        # linf has no sum to overflow: the row takes its step
        got = delta.clone()
        assert int(ops.perturb_update_(got, grad, lr=0.1, norm_type="linf")) == 0
        assert not torch.equal(got[1], delta[1])


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_a_gradient_below_the_floor_is_divided_by_the_floor(backend, norm_type):
    """The normaliser is max(||g||, 1e-8) (the authors' clamp): a row whose gradient norm is 1e-10 moves by
    lr * g / 1e-8, a hundredth of lr, not by lr; a row above the floor by lr."""
    dev = backend_device(backend)
    g = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    norm = (lambda t: t.flatten(1).norm(dim=1)) if norm_type == "l2" else (lambda t: t.flatten(1).abs().amax(1))
    g = g / norm(g)[:, None, None] * torch.tensor([1e-10, 1.0], dtype=torch.float64)[:, None, None]
    delta = torch.zeros(2, 3, 50)
    got = delta.clone().to(dev)
    ops.perturb_update_(got, g.float().to(dev), lr=0.5, norm_type=norm_type)
    moved = norm(got.double().cpu())
    torch.testing.assert_close(moved, torch.tensor([0.5 * 1e-2, 0.5], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(got.double().cpu()[0], 0.5 * g[0] / 1e-8, rtol=1e-5, atol=1e-12)


def test_non_finite_rows_are_skipped_and_counted(backend):
    dev = backend_device(backend)
    delta = (torch.randn(6, 4, 9) * 0.01).to(dev)
    grad = torch.randn(6, 4, 9)
    grad[1, 2, 3] = float("nan")
    grad[4, 0, 0] = float("inf")
    grad[5, 3, 8] = float("-inf")
    grad = grad.to(dev)
    got = delta.clone()
    n = ops.perturb_update_(got, grad, lr=0.1, norm_type="l2", max_norm=0.5)
    assert int(n) == 3
    assert torch.isfinite(got).all()
    for r in (1, 4, 5):
        assert torch.equal(got[r], delta[r])
    want, _ = _oracle(delta, grad, lr=0.1, norm_type="l2", max_norm=0.5)
    torch.testing.assert_close(got.double().cpu(), want.cpu(), atol=1e-6, rtol=1e-5)


def test_grad_scale_divides_on_device(backend):
    dev = backend_device(backend)
    delta = (torch.randn(4, 10) * 0.01).to(dev)
    grad = torch.randn(4, 10).to(dev)
    scale = torch.tensor([1024.0], device=dev)
    a, b = delta.clone(), delta.clone()
    ops.perturb_update_(a, grad * 1024.0, lr=0.1, norm_type="linf", max_norm=0.02, grad_scale=scale)
    ops.perturb_update_(b, grad, lr=0.1, norm_type="linf", max_norm=0.02)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # a zero scale makes every gradient non-finite: nothing moves, everything is counted
    c = delta.clone()
    n = ops.perturb_update_(c, grad, lr=0.1, norm_type="l2", grad_scale=torch.zeros(1, device=dev))
    assert int(n) == 4 and torch.equal(c, delta)
    for bad in (float("inf"), float("nan")):
        n = ops.perturb_update_(
            c, grad, lr=0.1, norm_type="l2", max_norm=1e-3, grad_scale=torch.tensor([bad], device=dev)
        )
        assert int(n) == 4 and torch.equal(c, delta)
    # a float64 scale beyond float32's range is infinite for float32 rows: as non-finite as inf itself
    n = ops.perturb_update_(
        c, grad, lr=0.1, norm_type="l2", grad_scale=torch.tensor([1e300], dtype=torch.float64, device=dev)
    )
    assert int(n) == 4 and torch.equal(c, delta)


def test_an_empty_batch_changes_nothing(backend):
    dev = backend_device(backend)
    delta = torch.zeros(0, 5, device=dev)
    n = ops.perturb_update_(delta, torch.ones(0, 5, device=dev), lr=0.1, norm_type="l2", max_norm=0.5)
    assert int(n) == 0 and delta.shape == (0, 5)


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
def test_empty_rows_change_nothing(backend, norm_type):
    # examples without any element (a [B, 0] delta): a zero norm, nothing to move, nothing skipped
    dev = backend_device(backend)
    delta = torch.zeros(4, 0, device=dev)
    n = ops.perturb_update_(delta, torch.ones(4, 0, device=dev), lr=0.1, norm_type=norm_type, max_norm=0.5)
    assert int(n) == 0 and delta.shape == (4, 0)


def test_two_tensors_in_one_call(backend):
    dev = backend_device(backend)
    dt = (torch.randn(4, 6, 8) * 0.01).to(dev)
    di = (torch.randn(4, 5, 12) * 0.01).to(dev)
    gt, gi = torch.randn(4, 6, 8).to(dev), torch.randn(4, 5, 12).to(dev)
    gi[2, 0, 0] = float("nan")
    wt, _ = _oracle(dt, gt, lr=1e-2, norm_type="l2", max_norm=0.0)
    wi, _ = _oracle(di, gi, lr=3e-2, norm_type="l2", max_norm=0.0)
    a, b = dt.clone(), di.clone()
    n = ops.perturb_update_multi_([a, b], [gt, gi], lrs=[1e-2, 3e-2], norm_type="l2")
    assert n.tolist() == [0, 1]
    torch.testing.assert_close(a.double().cpu(), wt.cpu(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.double().cpu(), wi.cpu(), atol=1e-6, rtol=1e-5)


def test_non_contiguous_delta_is_updated(backend):
    dev = backend_device(backend)
    base = (torch.randn(8, 5, 3) * 0.01).to(dev)
    delta = base.transpose(1, 2)
    grad = torch.randn(8, 3, 5).to(dev)
    want, _ = _oracle(delta, grad, lr=0.1, norm_type="l2")
    ops.perturb_update_(delta, grad, lr=0.1, norm_type="l2")
    torch.testing.assert_close(base.transpose(1, 2).double().cpu(), want.cpu(), atol=1e-6, rtol=1e-5)


def test_step_length_is_lr():
    delta = torch.zeros(3, 24, 768)
    ops.perturb_update_(delta, torch.randn(3, 24, 768), lr=1e-3, norm_type="l2")
    torch.testing.assert_close(delta.reshape(3, -1).norm(dim=1), torch.full((3,), 1e-3))
    # the per-element move VILLA_SPEC section 9 quotes: about lr / sqrt(L * H)
    assert math.isclose(delta.abs().mean().item() * math.sqrt(math.pi / 2), 1e-3 / math.sqrt(24 * 768), rel_tol=0.05)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"delta": torch.zeros(2, 3, dtype=torch.int32)}, TypeError, "delta must have dtype"),
        ({"grad": torch.zeros(2, 3, dtype=torch.int64)}, TypeError, "grad must have dtype"),
        ({"grad": torch.zeros(2, 4)}, ValueError, "grad must have the shape"),
        ({"lr": -1.0}, ValueError, "lr must be"),
        ({"lr": float("nan")}, ValueError, "lr must be"),
        ({"max_norm": -0.1}, ValueError, "max_norm must be"),
        ({"norm_type": "l1"}, ValueError, "norm_type must be"),
        ({"grad_scale": torch.ones(2)}, ValueError, "grad_scale must hold one element"),
        ({"grad_scale": 2.0}, TypeError, "grad_scale must be a torch.Tensor"),
        ({"delta": [1.0]}, TypeError, "delta must be a torch.Tensor"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"delta": torch.zeros(2, 3), "grad": torch.ones(2, 3), "lr": 0.1, "norm_type": "l2"}
    args.update(kwargs)
    delta, grad = args.pop("delta"), args.pop("grad")
    with pytest.raises(exc, match=match):
        ops.perturb_update_(delta, grad, **args)


def test_mismatched_devices_are_rejected():
    with pytest.raises(ValueError, match="must share a device"):
        ops.perturb_update_(torch.zeros(2, 3), torch.ones(2, 3, device="meta"), lr=0.1, norm_type="l2")


def test_multi_length_mismatch():
    with pytest.raises(ValueError, match="equal length"):
        ops.perturb_update_multi_([torch.zeros(2, 3)], [torch.ones(2, 3)] * 2, lrs=[0.1], norm_type="l2")


def test_the_same_delta_twice_is_refused():
    d = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"deltas\[1\] is the same tensor as deltas\[0\]"):
        ops.perturb_update_multi_([d, d], [torch.ones(2, 3), torch.ones(2, 3)], lrs=[0.1, 0.1], norm_type="l2")


def test_overlapping_deltas_are_refused_and_disjoint_slices_update_alike():
    buf = torch.zeros(16)
    g = torch.ones(2, 5)
    with pytest.raises(ValueError, match=r"deltas\[1\] shares memory with deltas\[0\]"):
        ops.perturb_update_multi_([buf[:10].view(2, 5), buf[6:].view(2, 5)], [g, g], lrs=[0.1, 0.1], norm_type="l2")
    flat = torch.zeros(12)
    with pytest.raises(ValueError, match=r"grad shares memory with delta"):
        ops.perturb_update_(flat[:8].view(2, 4), flat[4:].view(2, 4), lr=0.1, norm_type="l2")
    # column slices of one buffer are updated through contiguous copies: disjoint, they run
    cols, g2 = torch.zeros(2, 8), torch.randn(2, 4)
    ops.perturb_update_multi_([cols[:, :4], cols[:, 4:]], [g2, g2], lrs=[0.1, 0.2], norm_type="l2")
    torch.testing.assert_close(cols[:, 4:], 2 * cols[:, :4])
    # the text and image deltas as two slices of one flat buffer: each updated as if on its own
    flat = torch.zeros(2 * 3 + 2 * 4)
    dt, di = flat[:6].view(2, 3), flat[6:].view(2, 4)
    gt, gi = torch.randn(2, 3), torch.randn(2, 4)
    ops.perturb_update_multi_([dt, di], [gt, gi], lrs=[0.1, 0.2], norm_type="l2", max_norm=0.05)
    et, ei = torch.zeros(2, 3), torch.zeros(2, 4)
    ops.perturb_update_(et, gt, lr=0.1, norm_type="l2", max_norm=0.05)
    ops.perturb_update_(ei, gi, lr=0.2, norm_type="l2", max_norm=0.05)
    torch.testing.assert_close(dt, et)
    torch.testing.assert_close(di, ei)
