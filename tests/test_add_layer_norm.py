"""add_layer_norm: LayerNorm(x + residual) * weight + bias, against a float64 reference, and in the model."""

import pytest
import torch
import torch.nn.functional as F

from tests._tol import tol
from tests.conftest import backend_device
from tests.test_models import make_batch, run_encoder, tiny_config
from villa_fast import ops, reference
from villa_fast.models import UniterConfig, UniterModel
from villa_fast.models import layers as layers_mod
from villa_fast.ops import _add_layer_norm as aln_mod

# the backends this op has: no C++/CUDA extension kernel
OP_BACKENDS = ("triton", "reference")
_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


# the conftest `backend` fixture, over this op's backends only
op_backends = pytest.mark.parametrize("backend", OP_BACKENDS, indirect=True)


def _inputs(shape, x_dtype, r_dtype=None, p_dtype=None, dev="cpu", bias=True):
    h = shape[-1]
    x = torch.randn(shape).to(x_dtype).to(dev).requires_grad_()
    r = (torch.randn(shape) * 2 + 0.5).to(r_dtype or x_dtype).to(dev).requires_grad_()
    w = (torch.rand(h) + 0.5).to(p_dtype or x_dtype).to(dev).requires_grad_()
    b = torch.randn(h).to(p_dtype or x_dtype).to(dev).requires_grad_() if bias else None
    return x, r, w, b


def _want(x, r, w, b, eps, dy):
    """Output and the four gradients of the float64 reference at the (rounded) inputs."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, r, w)]
    bias = b.detach().cpu().double().requires_grad_() if b is not None else None
    y = reference.add_layer_norm(*leaves, bias, eps)
    grads = torch.autograd.grad(y, [*leaves, *([bias] if bias is not None else [])], dy.cpu().double())
    return y.detach(), grads


def _check(x, r, w, b, eps, atol, rtol, grad_scale=4.0):
    y = ops.add_layer_norm(x, r, w, b, eps)
    assert y.dtype == torch.promote_types(x.dtype, r.dtype) and y.shape == x.shape
    dy = torch.randn(y.shape).to(y.dtype).to(y.device)
    want, wgrads = _want(x, r, w, b, eps, dy)
    torch.testing.assert_close(y.double().cpu(), want, atol=atol, rtol=rtol)
    leaves = [x, r, w, *([b] if b is not None else [])]
    got = torch.autograd.grad(y, leaves, dy)
    for name, leaf, g, wg in zip(("x", "residual", "weight", "bias"), leaves, got, wgrads, strict=False):
        assert g.dtype == leaf.dtype, name
        # dweight and dbias sum over rows: their scale grows with the row count
        scale = grad_scale * (1 if name in ("x", "residual") else max(1.0, x.numel() / x.shape[-1]) ** 0.5)
        torch.testing.assert_close(g.double().cpu(), wg, atol=atol * scale, rtol=rtol * grad_scale, msg=name)


# -- the reference itself --------------------------------------------------------------------------------


def test_reference_matches_torch_layer_norm():
    x, r, w, b = _inputs((6, 13), torch.float64)
    want = F.layer_norm(x + r, (13,), w, b, 1e-5)
    got = reference.add_layer_norm(x, r, w, b, 1e-5)
    torch.testing.assert_close(got, want, atol=1e-14, rtol=1e-12)
    dy = torch.randn_like(want)
    gw = torch.autograd.grad(want, (x, r, w, b), dy)
    _, mean, rstd = reference.add_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b.detach(), 1e-5)
    dh, dw, db = reference.add_layer_norm_bwd(dy, x.detach(), r.detach(), w.detach(), mean, rstd)
    for got_g, want_g in zip((dh, dh, dw, db), gw, strict=True):
        torch.testing.assert_close(got_g, want_g, atol=1e-12, rtol=1e-10)


# -- every backend against the float64 reference ---------------------------------------------------------

# (shape, eps): H = 1 (output is the bias), prime widths, a 3-D input, BERT's 768 with few rows
SHAPES = [((3, 1), 1e-5), ((4, 7), 1e-5), ((2, 3, 97), 1e-12), ((5, 768), 1e-12)]


@op_backends
@pytest.mark.parametrize("shape, eps", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_matches_reference(backend, shape, eps, dtype):
    atol, rtol = tol(dtype, backend)
    _check(*_inputs(shape, dtype, dev=backend_device(backend)), eps, atol, rtol)


@op_backends
@pytest.mark.parametrize(
    "x_dtype, r_dtype, out_dtype",
    [
        (torch.bfloat16, torch.float32, torch.float32),  # a bf16 dense output plus an fp32 residual (autocast)
        (torch.float16, torch.float32, torch.float32),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.float16, torch.bfloat16, torch.float32),
    ],
)
def test_mixed_dtypes_promote(backend, x_dtype, r_dtype, out_dtype):
    dev = backend_device(backend)
    x, r, w, b = _inputs((5, 33), x_dtype, r_dtype, torch.float32, dev=dev)
    assert ops.add_layer_norm(x, r, w, b).dtype == out_dtype
    # the inputs are exact in their dtypes and the math is float32: float32 accuracy before the gradient casts
    atol, rtol = tol(torch.bfloat16 if torch.bfloat16 in (x_dtype, r_dtype) else torch.float16, backend)
    _check(x, r, w, b, 1e-5, atol, rtol, grad_scale=1.0)


@op_backends
def test_no_bias(backend):
    _check(*_inputs((6, 19), torch.float32, dev=backend_device(backend), bias=False), 1e-5, 1e-5, 1e-5)


@op_backends
def test_non_contiguous_inputs(backend):
    dev = backend_device(backend)
    x = torch.randn(24, 9, device=dev).t().requires_grad_()  # [9, 24], column-major
    r = torch.randn(9, 48, device=dev)[:, ::2].requires_grad_()  # [9, 24], column stride 2
    wide = torch.randn(9, 40, device=dev)
    xs = wide[:, 3:27].requires_grad_()  # [9, 24], row stride 40 (rows strided, columns contiguous)
    w = torch.randn(48, device=dev)[::2].requires_grad_()
    b = torch.randn(24, device=dev, requires_grad=True)
    assert not (x.is_contiguous() or r.is_contiguous() or xs.is_contiguous() or w.is_contiguous())
    _check(x, r, w, b, 1e-5, 1e-5, 1e-5)
    _check(xs, r, w, b, 1e-5, 1e-5, 1e-5)


@op_backends
def test_output_used_twice(backend):
    dev = backend_device(backend)
    leaves = _inputs((4, 10), torch.float32, dev=dev)
    y = ops.add_layer_norm(*leaves)
    got = torch.autograd.grad((y * y).sum() + 3.0 * y.sum(), leaves)
    ref = [t.detach().double().cpu().requires_grad_() for t in leaves]
    want = reference.add_layer_norm(*ref)
    for g, wg in zip(got, torch.autograd.grad((want * want).sum() + 3.0 * want.sum(), ref), strict=True):
        torch.testing.assert_close(g.double().cpu(), wg, atol=1e-4, rtol=1e-4)


@op_backends
def test_empty_rows(backend):
    dev = backend_device(backend)
    x, r, w, b = _inputs((0, 5), torch.float32, dev=dev)
    y = ops.add_layer_norm(x, r, w, b)
    assert y.shape == (0, 5)
    gx, gw = torch.autograd.grad(y.sum(), (x, w))
    assert gx.shape == (0, 5) and torch.equal(gw, torch.zeros_like(gw))


def test_gradcheck_reference(monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND", "reference")
    x, r, w, b = _inputs((3, 5), torch.float64)
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a, eps=1e-5), (x, r, w, b))
    assert torch.autograd.gradcheck(lambda *a: ops.add_layer_norm(*a, None, 1e-5), (x, r, w))


def test_backends_of_the_op(monkeypatch):
    x = torch.randn(2, 4)
    w = torch.ones(4)
    monkeypatch.setenv("VILLA_FAST_BACKEND", "auto")
    # no C++ kernel: the automatic choice on the CPU is the reference even with the extension built
    assert aln_mod.choose("add_layer_norm", "cpu", "torch.float32") == "reference"
    torch.testing.assert_close(ops.add_layer_norm(x, x, w), F.layer_norm(2 * x, (4,), w, eps=1e-12))
    if "cpp" in ops.available_backends("cpu"):
        monkeypatch.setenv("VILLA_FAST_BACKEND", "cpp")
        with pytest.raises(ops.BackendUnavailableError, match="add_layer_norm has no cpp backend"):
            ops.add_layer_norm(x, x, w)


def test_triton_width_limit(monkeypatch):
    dev = backend_device("triton")
    if "triton" not in ops.available_backends(dev):
        pytest.skip("triton cannot run here")
    monkeypatch.setattr(aln_mod, "_MAX_TRITON_HIDDEN", 8)
    monkeypatch.setenv("VILLA_FAST_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="H <= 8"):
        ops.add_layer_norm(torch.randn(2, 9, device=dev), torch.randn(2, 9, device=dev), torch.ones(9, device=dev))


@pytest.mark.parametrize(
    "args, kw, exc, match",
    [
        ((torch.randn(3, 4), torch.randn(3, 5), torch.ones(4)), {}, ValueError, "residual must have the shape of x"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(5)), {}, ValueError, r"weight must have shape \[H\]"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(1, 4)), {}, ValueError, "weight must have shape"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(3)), {}, ValueError, "bias must have"),
        ((torch.randn(3, 0), torch.randn(3, 0), torch.ones(0)), {}, ValueError, "x must have shape"),
        ((torch.tensor(1.0), torch.tensor(1.0), torch.ones(1)), {}, ValueError, "x must have shape"),
        ((torch.ones(3, 4, dtype=torch.int64), torch.randn(3, 4), torch.ones(4)), {}, TypeError, "x must have dtype"),
        ((torch.randn(3, 4), torch.ones(3, 4, dtype=torch.int32), torch.ones(4)), {}, TypeError, "residual must"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(4, dtype=torch.int64)), {}, TypeError, "weight must"),
        (
            (torch.randn(3, 4), torch.randn(3, 4), torch.ones(4), torch.zeros(4, dtype=torch.bool)),
            {},
            TypeError,
            "bias",
        ),
        ((torch.randn(3, 4), "r", torch.ones(4)), {}, TypeError, "residual must be a torch.Tensor"),
        ((torch.randn(3, 4), torch.randn(3, 4), None), {}, TypeError, "weight must be a torch.Tensor"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(4)), {"eps": -1.0}, ValueError, "eps must be"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(4)), {"eps": "1e-5"}, TypeError, "eps must be"),
        ((torch.randn(3, 4), torch.randn(3, 4, device="meta"), torch.ones(4)), {}, ValueError, "residual is on"),
        ((torch.randn(3, 4), torch.randn(3, 4), torch.ones(4, device="meta")), {}, ValueError, "weight is on"),
    ],
)
def test_bad_arguments(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        ops.add_layer_norm(*args, **kw)


# -- custom op registration --------------------------------------------------------------------------------


@op_backends
def test_opcheck(backend):
    dev = backend_device(backend)
    for x_dtype, r_dtype, bias in ((torch.float32, torch.float32, True), (torch.bfloat16, torch.float32, False)):
        x, r, w, b = _inputs((4, 9), x_dtype, r_dtype, torch.float32, dev=dev, bias=bias)
        torch.library.opcheck(aln_mod._add_layer_norm_op, (x, r, w, b, 1e-5, backend), test_utils=_UTILS)
        x, r, w = x.detach(), r.detach(), w.detach()
        y, mean, rstd = aln_mod._add_layer_norm_op(x, r, w, b.detach() if bias else None, 1e-5, backend)
        args = (torch.randn_like(y), x, r, w, mean, rstd, bias, backend)
        torch.library.opcheck(aln_mod._add_layer_norm_bwd_op, args, test_utils=_UTILS)


@pytest.mark.slow
def test_compile_fullgraph():
    def f(x, r, w, b):
        return ops.add_layer_norm(x, r, w, b, 1e-5) * 2.0

    x, r, w, b = _inputs((4, 6), torch.float32)
    explanation = torch._dynamo.explain(f)(x, r, w, b)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ye, yc = f(x, r, w, b), compiled(x, r, w, b)
    torch.testing.assert_close(yc, ye)
    for ge, gc in zip(
        torch.autograd.grad(ye.sum(), (x, r, w, b)), torch.autograd.grad(yc.sum(), (x, r, w, b)), strict=True
    ):
        torch.testing.assert_close(gc, ge)


# -- the model ------------------------------------------------------------------------------------------


def test_config_accepts_fused_and_names_bad_values():
    assert UniterConfig(layer_norm_impl="fused").layer_norm_impl == "fused"
    with pytest.raises(ValueError, match="layer_norm_impl"):
        UniterConfig(layer_norm_impl="fast")


def test_make_layer_norm_fused(monkeypatch):
    monkeypatch.delenv("VILLA_FAST_LAYERNORM", raising=False)
    ln = layers_mod.make_layer_norm(8, 1e-6, "fused")
    assert type(ln) is layers_mod.FusedAddLayerNorm and isinstance(ln, torch.nn.LayerNorm) and ln.eps == 1e-6
    x, r = torch.randn(3, 8), torch.randn(3, 8)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (8,), ln.weight, ln.bias, 1e-6))
    torch.testing.assert_close(ln.forward_add(x, r), F.layer_norm(x + r, (8,), ln.weight, ln.bias, 1e-6))
    monkeypatch.setenv("VILLA_FAST_LAYERNORM", "fused")
    assert type(layers_mod.make_layer_norm(8, 1e-6, "torch")) is layers_mod.FusedAddLayerNorm
    monkeypatch.setenv("VILLA_FAST_LAYERNORM", "fastest")
    with pytest.raises(ValueError, match="VILLA_FAST_LAYERNORM"):
        layers_mod.make_layer_norm(8, 1e-6)


def test_init_weights_initialises_fused_layer_norm():
    ln = layers_mod.FusedAddLayerNorm(6)
    with torch.no_grad():
        ln.weight.fill_(3.0)
        ln.bias.fill_(2.0)
    layers_mod.init_weights(ln, 0.02)
    assert torch.equal(ln.weight, torch.ones(6)) and torch.equal(ln.bias, torch.zeros(6))


@op_backends
@pytest.mark.usefixtures("one_thread")
def test_model_fused_matches_torch(backend, monkeypatch):
    monkeypatch.delenv("VILLA_FAST_LAYERNORM", raising=False)
    # float32 matmuls in float32: TF32 would amplify the LayerNorms' last-place differences past 1e-5 (the
    # conftest's autouse fixture puts the switch back after the test)
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = backend_device(backend)
    ref = UniterModel(tiny_config(layer_norm_impl="torch")).to(dev).eval()
    fused = UniterModel(tiny_config(layer_norm_impl="fused")).to(dev).eval()
    assert list(fused.state_dict()) == list(ref.state_dict())
    with torch.no_grad():  # non-trivial LayerNorm parameters, so a dropped weight or bias would show
        for name, p in ref.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    fused.load_state_dict(ref.state_dict())
    batch = make_batch(ref.config, [5, 3], [4, 6])
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    out_ref, out_fused = run_encoder(ref, batch), run_encoder(fused, batch)
    torch.testing.assert_close(out_fused, out_ref, atol=1e-5, rtol=1e-5)
    proj = torch.randn_like(out_ref)
    (out_ref * proj).sum().backward()
    (out_fused * proj).sum().backward()
    grads = dict(fused.named_parameters())
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
            continue
        torch.testing.assert_close(grads[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@op_backends
@pytest.mark.usefixtures("one_thread")
def test_model_fused_under_autocast_keeps_float32_output(backend, monkeypatch):
    monkeypatch.delenv("VILLA_FAST_LAYERNORM", raising=False)
    dev = backend_device(backend)
    ref = UniterModel(tiny_config(layer_norm_impl="torch")).to(dev).eval()
    fused = UniterModel(tiny_config(layer_norm_impl="fused")).to(dev).eval()
    fused.load_state_dict(ref.state_dict())
    batch = make_batch(ref.config, [4, 2], [3, 5])
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        out_ref, out_fused = run_encoder(ref, batch), run_encoder(fused, batch)
    assert out_fused.dtype == out_ref.dtype == torch.float32
    torch.testing.assert_close(out_fused, out_ref, atol=2e-2, rtol=2e-2)
