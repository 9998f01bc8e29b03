"""The compiled kernels of villa_fast._C against the plain-PyTorch reference (villa_fast.reference)."""

from __future__ import annotations

import pytest
import torch

C = pytest.importorskip(
    "villa_fast._C", reason="villa_fast._C is not built (pure-Python install, or built for another torch)"
)

from villa_fast import reference as ref  # noqa: E402

pytestmark = pytest.mark.ext

NORMS = {"l2": 0, "linf": 1}
REDUCTIONS = {"batchmean": 0, "mean": 1}

_CUDA_OK = torch.cuda.is_available() and getattr(C, "with_cuda", False)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not _CUDA_OK, reason="needs a CUDA device and a CUDA build of _C")],
    ),
]

# (delta dtype, grad dtype, atol, rtol): the grad is converted exactly to the accumulate type, so only the
# summation order differs from the reference.
UPDATE_DTYPES = [
    pytest.param(torch.float64, torch.float64, 1e-15, 1e-12, id="f64"),
    pytest.param(torch.float32, torch.float32, 1e-7, 1e-5, id="f32"),
    pytest.param(torch.float32, torch.float16, 1e-7, 1e-5, id="f32-f16grad"),
    pytest.param(torch.float32, torch.bfloat16, 1e-7, 1e-5, id="f32-bf16grad"),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _delta_grad(shape, ddtype, gdtype, device, scale=1.0):
    delta = (torch.randn(shape, dtype=torch.float64) * 0.02).to(ddtype).to(device)
    grad = (torch.randn(shape, dtype=torch.float64) * scale).to(gdtype).to(device)
    return delta, grad


def _ref_update(delta, grad, lr, norm, max_norm=0.0, grad_scale=None):
    out = delta.clone()
    count = ref.perturb_update_(out, grad, lr=lr, norm_type=norm, max_norm=max_norm, grad_scale=grad_scale)
    return out, int(count)


# ---- perturb_update_ ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ddtype, gdtype, atol, rtol", UPDATE_DTYPES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("max_norm", [0.0, 0.05])
@pytest.mark.parametrize("shape", [(7, 13, 17), (5, 3), (4,), (3, 20011)], ids=["7x13x17", "5x3", "4", "3x20011"])
def test_perturb_update_matches_reference(device, ddtype, gdtype, atol, rtol, norm, max_norm, shape):
    if device == "cuda" and ddtype == torch.float64:
        pytest.skip("float64 deltas are CPU-only")
    delta, grad = _delta_grad(shape, ddtype, gdtype, device)
    want, want_skipped = _ref_update(delta, grad, 0.03, norm, max_norm)
    skipped = C.perturb_update_([delta], [grad], [0.03], NORMS[norm], max_norm, None)
    assert skipped.dtype == torch.int64 and skipped.shape == (1,) and skipped.device == delta.device
    assert skipped.tolist() == [want_skipped] == [0]
    torch.testing.assert_close(delta, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_perturb_update_projection_is_active(device, norm):
    # large steps: every row must end on the boundary of the ball
    delta, grad = _delta_grad((6, 11, 9), torch.float64 if device == "cpu" else torch.float32, torch.float32, device)
    C.perturb_update_([delta], [grad], [1.0], NORMS[norm], 0.1, None)
    flat = delta.reshape(6, -1).double()
    if norm == "l2":
        torch.testing.assert_close(flat.norm(dim=1), torch.full((6,), 0.1, dtype=torch.float64, device=device))
    else:
        assert flat.abs().max() <= 0.1
        torch.testing.assert_close(flat.abs().amax(dim=1), torch.full((6,), 0.1, dtype=torch.float64, device=device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("max_norm", [0.0, 0.05])
def test_perturb_update_two_tensors_one_call(device, norm, max_norm):
    dd = torch.float64 if device == "cpu" else torch.float32
    tol = {"atol": 1e-15, "rtol": 1e-12} if dd == torch.float64 else {"atol": 1e-7, "rtol": 1e-5}
    d_txt, g_txt = _delta_grad((7, 13, 17), dd, dd, device)
    d_img, g_img = _delta_grad((7, 11, 23), dd, torch.float16 if dd == torch.float32 else dd, device)
    want_txt, _ = _ref_update(d_txt, g_txt, 0.1, norm, max_norm)
    want_img, _ = _ref_update(d_img, g_img, 0.02, norm, max_norm)
    skipped = C.perturb_update_([d_txt, d_img], [g_txt, g_img], [0.1, 0.02], NORMS[norm], max_norm, None)
    assert skipped.tolist() == [0, 0]
    torch.testing.assert_close(d_txt, want_txt, **tol)
    torch.testing.assert_close(d_img, want_img, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("shape", [(7, 13, 17), (4, 20011)], ids=["on-chip", "long-row"])
def test_perturb_update_skips_non_finite_rows(device, norm, shape):
    delta, grad = _delta_grad(shape, torch.float32, torch.float32, device)
    grad.view(shape[0], -1)[1, 5] = float("nan")
    grad.view(shape[0], -1)[3, -1] = float("inf")
    grad.view(shape[0], -1)[2, 0] = float("-inf")
    before = delta.clone()
    want, want_skipped = _ref_update(delta, grad, 0.05, norm, 0.03)
    skipped = C.perturb_update_([delta], [grad], [0.05], NORMS[norm], 0.03, None)
    assert skipped.tolist() == [want_skipped] == [3]
    for r in (1, 2, 3):
        assert torch.equal(delta[r], before[r])
    assert not torch.equal(delta[0], before[0])
    torch.testing.assert_close(delta, want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("value", [1024.0, 3.0, 2.0**-20])
def test_perturb_update_grad_scale(device, scale_dtype, gdtype, value):
    # a loss scaler: grads arrive multiplied by the scale, the update must see grad / scale
    # (powers of two take the reciprocal-multiply path, 3.0 the division path)
    delta, grad = _delta_grad((5, 7, 19), torch.float32, gdtype, device, scale=min(value, 64.0))
    scale = torch.tensor([value], dtype=scale_dtype, device=device)
    want, _ = _ref_update(delta, grad, 0.01, "l2", 0.05, grad_scale=scale)
    skipped = C.perturb_update_([delta], [grad], [0.01], NORMS["l2"], 0.05, scale)
    assert skipped.tolist() == [0]
    torch.testing.assert_close(delta, want, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad_scale", [0.0, float("inf"), float("nan")])
def test_perturb_update_bad_grad_scale_skips_every_row(device, bad_scale):
    d1, g1 = _delta_grad((5, 7, 3), torch.float32, torch.float32, device)
    d2, g2 = _delta_grad((3, 4), torch.float32, torch.bfloat16, device)
    before1, before2 = d1.clone(), d2.clone()
    scale = torch.tensor(bad_scale, device=device)  # a 0-dim tensor is accepted too (numel 1)
    skipped = C.perturb_update_([d1, d2], [g1, g2], [0.1, 0.1], NORMS["linf"], 0.0, scale)
    assert skipped.tolist() == [5, 3]
    assert torch.equal(d1, before1) and torch.equal(d2, before2)


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_update_zero_grad_row_and_zero_lr(device):
    delta, grad = _delta_grad((4, 6), torch.float32, torch.float32, device)
    grad[2] = 0  # norm clamped to 1e-8: a zero step, not NaN
    before = delta.clone()
    C.perturb_update_([delta], [grad], [0.1], NORMS["l2"], 0.0, None)
    assert torch.equal(delta[2], before[2]) and torch.isfinite(delta).all()
    delta2 = before.clone()
    C.perturb_update_([delta2], [grad], [0.0], NORMS["linf"], 0.0, None)
    assert torch.equal(delta2, before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("n", [8188, 8192, 8193, 8200], ids=lambda n: f"n{n}")
def test_perturb_update_row_length_and_alignment(device, gdtype, offset, n):
    # rows around the on-chip limit (8192), lengths that do or do not allow 16-byte packs, base pointers one
    # element off 16 bytes (views into a flat buffer), and a non-finite row on every path
    rows = 5
    d_buf = torch.randn(rows * n + offset, dtype=torch.float64, device=device).mul_(0.02).float()
    g_buf = torch.randn(rows * n + offset, dtype=torch.float64, device=device).to(gdtype)
    delta, grad = d_buf[offset:].view(rows, n), g_buf[offset:].view(rows, n)
    grad[2, n // 2] = float("nan")
    grad[4, n - 1] = float("inf")
    for norm in ("l2", "linf"):
        want, want_skipped = _ref_update(delta, grad, 0.05, norm, 0.5)
        skipped = C.perturb_update_([delta], [grad], [0.05], NORMS[norm], 0.5, None)
        assert skipped.tolist() == [want_skipped] == [2]
        torch.testing.assert_close(delta, want, atol=1e-7, rtol=1e-5)


# ---- perturb_init_ -----------------------------------------------------------------------


def _mask(b, p, dtype, kind):
    if kind == "none":
        return None
    m = (torch.rand(b, p) > 0.3).to(dtype)
    m[1] = 0  # an example with no valid position
    if kind == "soft":
        m = m * torch.rand(b, p, dtype=dtype) * 2
    return m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float64, 1e-15, 1e-12), (torch.float32, 1e-7, 1e-6)])
@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("mask_kind", ["none", "binary", "soft"])
@pytest.mark.parametrize("shape", [(5, 7, 11), (3, 13, 768)], ids=["5x7x11", "3x13x768"])
def test_perturb_init_matches_reference(device, dtype, atol, rtol, norm, mask_kind, shape):
    b, p, d = shape
    noise = (torch.rand(shape, dtype=dtype) * 2 - 1).to(device)
    mask = _mask(b, p, dtype, mask_kind)
    mask = None if mask is None else mask.to(device)
    want = ref.perturb_init_scale_(noise.clone(), mask, init_mag=0.3, norm_type=norm)
    got = C.perturb_init_(noise, mask, 0.3, NORMS[norm])
    assert got.data_ptr() == noise.data_ptr()  # in place
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    if mask is not None:
        assert (got[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_perturb_init_more_examples_than_grid_rows(device):
    # B above 65535: the examples must all be scaled even where one grid dimension cannot cover them
    b, p, d = 70001, 2, 3
    noise = (torch.rand(b, p, d) * 2 - 1).to(device)
    mask = (torch.rand(b, p) > 0.3).float().to(device)
    want = ref.perturb_init_scale_(noise.clone(), mask, init_mag=0.3, norm_type="l2")
    C.perturb_init_(noise, mask, 0.3, NORMS["l2"])
    torch.testing.assert_close(noise, want, atol=1e-7, rtol=1e-6)


# ---- sym_kl_fwd --------------------------------------------------------------------------

# (dtype, loss atol/rtol, grad atol/rtol); grads are compared after scaling by the row count so the
# tolerances do not depend on N.
KL_DTYPES = [
    pytest.param(torch.float64, 1e-14, 1e-12, 1e-14, 1e-12, id="f64"),
    pytest.param(torch.float32, 1e-6, 1e-5, 1e-6, 1e-4, id="f32"),
    pytest.param(torch.float16, 1e-5, 1e-3, 1e-5, 1e-2, id="f16"),
    pytest.param(torch.bfloat16, 1e-5, 1e-3, 1e-4, 2e-2, id="bf16"),
]


def _logits(n, c, dtype, device, scale=3.0):
    a = torch.randn(n, c, dtype=torch.float64) * scale
    b = a + torch.randn(n, c, dtype=torch.float64)
    return a.to(dtype).to(device), b.to(dtype).to(device)


def _check_kl(got, want, n, dtype, latol, lrtol, gatol, grtol):
    loss, ga, gb = got
    wloss, wga, wgb = want
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ga.dtype == gb.dtype == dtype and ga.shape == gb.shape == wga.shape
    torch.testing.assert_close(loss, wloss.to(loss.dtype), atol=latol, rtol=lrtol)
    torch.testing.assert_close((ga.double() * n), (wga.double() * n), atol=gatol, rtol=grtol)
    torch.testing.assert_close((gb.double() * n), (wgb.double() * n), atol=gatol, rtol=grtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, latol, lrtol, gatol, grtol", KL_DTYPES)
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
@pytest.mark.parametrize("n, c", [(6, 2), (7, 3), (5, 257), (6, 3129), (2, 9001), (2, 28996)])
def test_sym_kl_matches_reference(device, dtype, latol, lrtol, gatol, grtol, reduction, n, c):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 sym_kl is CPU-only")
    a, b = _logits(n, c, dtype, device)
    want = ref.sym_kl_fwd(a, b, reduction)
    got = C.sym_kl_fwd(a, b, REDUCTIONS[reduction])
    scale = n if reduction == "batchmean" else n * c
    _check_kl(got, want, scale, dtype, latol, lrtol, gatol, grtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [5, 3129, 9001])
def test_sym_kl_neg_inf_logits(device, c):
    # classes masked on both sides contribute nothing and produce zero gradients, never NaN
    a, b = _logits(4, c, torch.float32, device)
    a[:, 0] = b[:, 0] = float("-inf")
    a[2, 3] = b[2, 3] = float("-inf")
    want = ref.sym_kl_fwd(a, b, "batchmean")
    loss, ga, gb = C.sym_kl_fwd(a, b, 0)
    assert torch.isfinite(loss) and torch.isfinite(ga).all() and torch.isfinite(gb).all()
    assert (ga[:, 0] == 0).all() and (gb[:, 0] == 0).all() and ga[2, 3] == 0
    _check_kl((loss, ga, gb), want, 4, torch.float32, 1e-6, 1e-5, 1e-6, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_sym_kl_matches_autograd_and_is_deterministic(device):
    a, b = _logits(9, 31, torch.float64 if device == "cpu" else torch.float32, device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    ref.sym_kl(a, b, "batchmean").backward()
    loss, ga, gb = C.sym_kl_fwd(a.detach(), b.detach(), 0)
    torch.testing.assert_close(ga, a.grad)
    torch.testing.assert_close(gb, b.grad)
    again = C.sym_kl_fwd(a.detach(), b.detach(), 0)
    assert torch.equal(loss, again[0]) and torch.equal(ga, again[1]) and torch.equal(gb, again[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n, c", [(37, 3), (9, 256), (9, 257), (3, 8192), (3, 8193)])
def test_sym_kl_path_limits(device, n, c):
    # the warp path up to 256 classes, the block path up to 8192, the online path above
    a, b = _logits(n, c, torch.float32, device)
    _check_kl(C.sym_kl_fwd(a, b, 0), ref.sym_kl_fwd(a, b, "batchmean"), n, torch.float32, 1e-6, 1e-5, 1e-6, 1e-4)


def _leading_masked(c, device):
    # leading classes masked on both sides, over more than one chunk of the long-row paths
    a, b = _logits(3, c, torch.float32, "cpu")
    a[:, :2048] = b[:, :2048] = float("-inf")
    a[1, :4100] = b[1, :4100] = float("-inf")
    return a.to(device), b.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [9001, 28996])
def test_sym_kl_leading_masked_classes(device, c):
    a, b = _leading_masked(c, device)
    got = C.sym_kl_fwd(a, b, 0)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    _check_kl(got, ref.sym_kl_fwd(a, b, "batchmean"), 3, torch.float32, 1e-6, 1e-5, 1e-6, 1e-4)


def test_triton_sym_kl_leading_masked_classes():
    # the Triton long-row path (C > 8192) rescales its running sums chunk by chunk
    pytest.importorskip("triton")
    kernel = pytest.importorskip("villa_fast.kernels.sym_kl")
    a, b = _leading_masked(9001, "cuda" if torch.cuda.is_available() else "cpu")
    got = kernel.sym_kl(a=a, b=b, reduction="batchmean", need_grad=True)
    assert torch.isfinite(got[0]) and torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    _check_kl(got, ref.sym_kl_fwd(a, b, "batchmean"), 3, torch.float32, 1e-5, 1e-5, 1e-4, 1e-4)


def test_sym_kl_identical_inputs_give_zero():
    a = torch.randn(5, 17)
    loss, ga, gb = C.sym_kl_fwd(a, a.clone(), 0)
    assert loss.item() == 0 and (ga == 0).all() and (gb == 0).all()


# ---- argument checks ---------------------------------------------------------------------


def _f(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


BAD_UPDATE_CALLS = [
    (lambda: C.perturb_update_([], [], [], 0, 0.0, None), "deltas"),
    (lambda: C.perturb_update_([_f(2, 3)], [], [0.1], 0, 0.0, None), "grads"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [0.1, 0.2], 0, 0.0, None), "lrs"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [0.1], 2, 0.0, None), "norm_type"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [0.1], 0, -1.0, None), "max_norm"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [-0.1], 0, 0.0, None), r"lrs\[0\]"),
    (lambda: C.perturb_update_([_f(2, 3), _f(2, 3)], [_f(2, 3), _f(2, 4)], [0.1, 0.1], 0, 0.0, None), r"grads\[1\]"),
    (lambda: C.perturb_update_([_f()], [_f()], [0.1], 0, 0.0, None), r"deltas\[0\]"),
    (lambda: C.perturb_update_([_f(2, 3, dtype=torch.int32)], [_f(2, 3)], [0.1], 0, 0.0, None), r"deltas\[0\]"),
    (lambda: C.perturb_update_([_f(2, 3, dtype=torch.float16)], [_f(2, 3)], [0.1], 0, 0.0, None), r"deltas\[0\]"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3, dtype=torch.float64)], [0.1], 0, 0.0, None), r"grads\[0\]"),
    (lambda: C.perturb_update_([_f(3, 2).t()], [_f(2, 3)], [0.1], 0, 0.0, None), r"deltas\[0\].*contiguous"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(3, 2).t()], [0.1], 0, 0.0, None), r"grads\[0\].*contiguous"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [0.1], 0, 0.0, _f(2)), "grad_scale"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3)], [0.1], 0, 0.0, _f(1, dtype=torch.float16)), "grad_scale"),
    (lambda: C.perturb_update_([_f(2, 3)], [_f(2, 3, device="meta")], [0.1], 0, 0.0, None), r"grads\[0\]"),
]

BAD_INIT_CALLS = [
    (lambda: C.perturb_init_(_f(2, 3), None, 0.1, 0), "noise"),
    (lambda: C.perturb_init_(_f(2, 3, 4, dtype=torch.float16), None, 0.1, 0), "noise"),
    (lambda: C.perturb_init_(_f(3, 2, 4).transpose(0, 1), None, 0.1, 0), "noise.*contiguous"),
    (lambda: C.perturb_init_(_f(2, 3, 4), _f(2, 4), 0.1, 0), "mask"),
    (lambda: C.perturb_init_(_f(2, 3, 4), _f(2, 3, dtype=torch.float64), 0.1, 0), "mask"),
    (lambda: C.perturb_init_(_f(2, 3, 4), _f(3, 2).t(), 0.1, 0), "mask.*contiguous"),
    (lambda: C.perturb_init_(_f(2, 3, 4), None, -0.1, 0), "init_mag"),
    (lambda: C.perturb_init_(_f(2, 3, 4), None, 0.1, 5), "norm_type"),
]

BAD_KL_CALLS = [
    (lambda: C.sym_kl_fwd(_f(4), _f(4), 0), r"\ba\b"),
    (lambda: C.sym_kl_fwd(_f(2, 4), _f(2, 5), 0), r"\bb\b"),
    (lambda: C.sym_kl_fwd(_f(2, 1), _f(2, 1), 0), "C"),
    (lambda: C.sym_kl_fwd(_f(1, 32769), _f(1, 32769), 0), "C"),
    (lambda: C.sym_kl_fwd(_f(0, 4), _f(0, 4), 0), "N"),
    (lambda: C.sym_kl_fwd(_f(2, 4), _f(2, 4, dtype=torch.float64), 0), "dtype"),
    (lambda: C.sym_kl_fwd(_f(2, 4, dtype=torch.int64), _f(2, 4, dtype=torch.int64), 0), r"\ba\b"),
    (lambda: C.sym_kl_fwd(_f(4, 2).t(), _f(2, 4), 0), "a must be contiguous"),
    (lambda: C.sym_kl_fwd(_f(2, 4), _f(4, 2).t(), 0), "b must be contiguous"),
    (lambda: C.sym_kl_fwd(_f(2, 4), _f(2, 4), 2), "reduction"),
]


@pytest.mark.parametrize(
    "call, name",
    BAD_UPDATE_CALLS + BAD_INIT_CALLS + BAD_KL_CALLS,
    ids=[f"update{i}" for i in range(len(BAD_UPDATE_CALLS))]
    + [f"init{i}" for i in range(len(BAD_INIT_CALLS))]
    + [f"kl{i}" for i in range(len(BAD_KL_CALLS))],
)
def test_bad_arguments_raise_naming_the_argument(call, name):
    with pytest.raises((RuntimeError, ValueError), match=name):
        call()


def test_extension_reports_cuda_support():
    assert isinstance(C.with_cuda, bool)
    assert C.perturb_update_.__doc__ and C.perturb_init_.__doc__ and C.sym_kl_fwd.__doc__


def test_sym_kl_vector_and_scalar_exp_agree(tmp_path):
    """The C++ kernel's float path takes SLEEF's AVX2 exp where it finds it and the scalar one under
    VILLA_FAST_SCALAR_EXP=1: both give the same losses and gradients, -inf and NaN included."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, torch, villa_fast._C as C\n"
        "torch.manual_seed(0)\n"
        "out = []\n"
        "for n, c in [(3, 17), (2, 28996), (4, 8)]:\n"
        "    a, b = torch.randn(n, c) * 3, torch.randn(n, c) * 3\n"
        "    a[0, 1] = float('-inf'); b[0, 1] = float('-inf'); a[1, 2] = float('nan')\n"
        "    out.append(C.sym_kl_fwd(a, b, 0))\n"
        "torch.save(out, sys.argv[1])\n"
    )
    results = {}
    for mode in ("0", "1"):
        path = tmp_path / f"mode{mode}.pt"
        env = {**os.environ, "VILLA_FAST_SCALAR_EXP": mode}
        subprocess.run([sys.executable, "-c", code, str(path)], env=env, check=True, timeout=120)
        results[mode] = torch.load(path, weights_only=True)
    for (lv, av, bv), (ls, as_, bs) in zip(results["0"], results["1"], strict=True):
        torch.testing.assert_close(lv, ls, rtol=1e-6, atol=0, equal_nan=True)
        torch.testing.assert_close(av, as_, rtol=1e-5, atol=1e-9, equal_nan=True)
        torch.testing.assert_close(bv, bs, rtol=1e-5, atol=1e-9, equal_nan=True)
