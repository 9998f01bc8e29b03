"""adamw_step_: the authors' AdamW rule fused over many tensors; every backend against the plain-PyTorch reference,
the reference against a float64 transcription of the rule; a non-zero found_inf changes nothing."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import backend_device
from villa_fast import ops, reference
from villa_fast.ops import _adamw_step as adamw_mod

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
HYPER = {"beta1": 0.9, "beta2": 0.98, "eps": 1e-6}
# sizes around the CUDA tile (2048 elements) and the Triton block (2048): partial tiles, one element, exact
# tiles, an empty tensor
SHAPES = [(3, 5), (2048,), (4099,), (1,), (0,), (37, 11), (2, 3, 4)]


def _state(dev, shapes=SHAPES, seed=0, pdt=F32, gdt=None):
    """(params, grads, exp_avgs, exp_avg_sqs, steps): moments as after some steps, step counts that differ."""
    g = torch.Generator().manual_seed(seed)
    gdt = pdt if gdt is None else gdt
    params = [torch.randn(s, generator=g, dtype=F64).to(pdt).to(dev) for s in shapes]
    grads = [(torch.randn(s, generator=g, dtype=F64) * 1e-2).to(gdt).to(dev) for s in shapes]
    ms = [(torch.randn(s, generator=g, dtype=F64) * 1e-3).to(pdt).to(dev) for s in shapes]
    vs = [(torch.rand(s, generator=g, dtype=F64) * 1e-5).to(pdt).to(dev) for s in shapes]
    steps = [torch.tensor(float(3 * i % 7), device=dev) for i in range(len(shapes))]
    return params, grads, ms, vs, steps


def _bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bytes (NaN payloads included)."""
    same = a.dtype == b.dtype and a.shape == b.shape
    return same and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _clone(state):
    return tuple([t.clone() for t in lst] for lst in state)


def _new_grads(grads, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(t.shape, generator=g, dtype=F64) * 1e-2 * scale).to(t.dtype).to(t.device) for t in grads]


def _transcribed(params, grads, ms, vs, steps, *, lr, beta1, beta2, eps, weight_decay, correct_bias, grad_scale=None):
    """The rule written out in float64 with the scalars in Python (as the authors' loop computes them)."""
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        g = g.double() / (1.0 if grad_scale is None else grad_scale)
        steps[i] += 1
        t = steps[i]
        ms[i] = beta1 * ms[i] + (1.0 - beta1) * g
        vs[i] = beta2 * vs[i] + (1.0 - beta2) * g * g
        size = lr * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t) if correct_bias else lr
        p -= size * ms[i] / (vs[i].sqrt() + eps)
        if weight_decay > 0.0:
            p *= 1.0 - lr * weight_decay


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_reference_matches_the_float64_transcription(correct_bias, weight_decay, tensor_lr):
    params, grads, ms, vs, steps = _state("cpu", pdt=F64)
    want_p, want_m, want_v = [p.clone() for p in params], [m.clone() for m in ms], [v.clone() for v in vs]
    want_t = [float(s) for s in steps]
    lr = 3e-2
    for k in range(5):
        grads = _new_grads(grads, 10 + k, scale=4.0 if k % 2 else 1.0)
        scale = 4.0 if k % 2 else None
        reference.adamw_step_(
            params,
            grads,
            ms,
            vs,
            steps,
            lr=torch.tensor(lr, dtype=F64) if tensor_lr else lr,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            grad_scale=None if scale is None else torch.tensor([scale], dtype=F64),
            **HYPER,
        )
        _transcribed(
            want_p,
            grads,
            want_m,
            want_v,
            want_t,
            lr=lr,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            grad_scale=scale,
            **HYPER,
        )
    for got, want in zip(params + ms + vs, want_p + want_m + want_v, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert [float(s) for s in steps] == want_t


def _run(backend_state, ref_state, nsteps, **kw):
    """The op (through the forced backend) and the reference on copies of one state, step after step."""
    grads = backend_state[1]
    for k in range(nsteps):
        grads = _new_grads(grads, 100 + k)
        ops.adamw_step_(backend_state[0], grads, *backend_state[2:], **kw)
        reference.adamw_step_(ref_state[0], grads, *ref_state[2:], **kw)


def _assert_close_state(got, want, pdt=F32):
    tol = {"rtol": 1e-12, "atol": 1e-15} if pdt == F64 else {"rtol": 2e-6, "atol": 1e-7}
    for name, gl, wl in zip(("params", "grads", "exp_avgs", "exp_avg_sqs"), got[:4], want[:4], strict=True):
        if name == "grads":
            continue
        for i, (a, b) in enumerate(zip(gl, wl, strict=True)):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name, i=i: f"{name}[{i}]: {m}")
    for a, b in zip(got[4], want[4], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("correct_bias", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("lr_kind", ["float", "tensor32", "tensor64"])
def test_backend_matches_reference(backend, correct_bias, weight_decay, lr_kind):
    dev = backend_device(backend)
    state = _state(dev)
    ref = _clone(state)
    lr = {"float": 2e-2, "tensor32": torch.tensor(2e-2, device=dev), "tensor64": torch.tensor(2e-2, dtype=F64)}[lr_kind]
    lr = lr.to(dev) if isinstance(lr, torch.Tensor) else lr
    _run(state, ref, 4, lr=lr, weight_decay=weight_decay, correct_bias=correct_bias, **HYPER)
    _assert_close_state(state, ref)
    assert [float(s) for s in state[4]] == [float(3 * i % 7) + 4 for i in range(len(SHAPES))]


@pytest.mark.parametrize("gdt", [F32, BF16, F16])
def test_grad_scale_and_half_gradients(backend, gdt):
    """Gradients of float32 parameters in float32, bfloat16 or float16, divided by a device scale; not modified."""
    dev = backend_device(backend)
    state = _state(dev, gdt=gdt)
    ref = _clone(state)
    scale = torch.tensor(1024.0, device=dev)
    for k in range(3):
        grads = [(g * 1024.0).to(gdt) for g in _new_grads(state[1], 200 + k)]
        before = [g.clone() for g in grads]
        kw = {"lr": 1e-2, "weight_decay": 0.01, "correct_bias": True, "grad_scale": scale, **HYPER}
        ops.adamw_step_(state[0], grads, *state[2:], **kw)
        reference.adamw_step_(ref[0], grads, *ref[2:], **kw)
        assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True))
    _assert_close_state(state, ref)


def test_float64_parameters(backend):
    """float64 parameters: math in float64 on the backends that take them, the reference elsewhere."""
    if backend in ("cuda", "triton"):
        pytest.skip("float64 parameters run through the reference on the GPU")
    state = _state("cpu", pdt=F64)
    ref = _clone(state)
    _run(state, ref, 3, lr=1e-2, weight_decay=0.01, correct_bias=True, **HYPER)
    _assert_close_state(state, ref, F64)


@pytest.mark.parametrize("flag_dtype", [F32, F64])
def test_nonzero_found_inf_changes_nothing_nan_and_inf_included(backend, flag_dtype):
    dev = backend_device(backend)
    params, grads, ms, vs, steps = _state(dev)
    bad = []
    for g in grads:
        b = torch.full_like(g, float("nan"))
        if b.numel() > 1:
            b.view(-1)[1] = float("inf")
        bad.append(b)
    before = _clone((params, bad, ms, vs, steps))
    for flag in (torch.tensor([1.0], dtype=flag_dtype), torch.tensor(float("inf"), dtype=flag_dtype)):
        ops.adamw_step_(
            params,
            bad,
            ms,
            vs,
            steps,
            lr=torch.tensor(1e-2, device=dev),
            weight_decay=0.01,
            correct_bias=True,
            grad_scale=torch.tensor(2.0, device=dev),
            found_inf=flag.to(dev),
            **HYPER,
        )
        for got, want in zip((params, bad, ms, vs, steps), before, strict=True):
            assert all(_bitwise_equal(a, b) for a, b in zip(got, want, strict=True))


def test_zero_found_inf_steps_as_without_it(backend):
    dev = backend_device(backend)
    a = _state(dev)
    b = _clone(a)
    kw = {"lr": 1e-2, "weight_decay": 0.01, "correct_bias": True, **HYPER}
    for k in range(2):
        grads = _new_grads(a[1], 300 + k)
        ops.adamw_step_(a[0], grads, *a[2:], found_inf=torch.zeros(1, device=dev), **kw)
        ops.adamw_step_(b[0], grads, *b[2:], **kw)
    for la, lb in zip(a, b, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(la, lb, strict=True))


def test_many_tensors_misaligned_and_non_contiguous(backend):
    """More tensors than one CUDA launch takes (64), views at odd offsets (no 16-byte alignment), and a
    non-contiguous parameter (handled by the reference)."""
    dev = backend_device(backend)
    n, size = 70, 997
    g = torch.Generator().manual_seed(5)

    def flat(scale=1.0, positive=False):
        x = torch.rand(n * 1000 + 7, generator=g) if positive else torch.randn(n * 1000 + 7, generator=g)
        return (x * scale).to(dev)

    fp, fg, fm, fv = flat(), flat(1e-2), flat(1e-3), flat(1e-5, positive=True)
    params = [fp[1 + 1000 * i : 1 + 1000 * i + size] for i in range(n)]
    grads = [fg[3 + 1000 * i : 3 + 1000 * i + size] for i in range(n)]
    ms = [fm[2 + 1000 * i : 2 + 1000 * i + size] for i in range(n)]
    vs = [fv[1000 * i : 1000 * i + size] for i in range(n)]
    base = torch.randn(64, 48, generator=g).to(dev)
    params.append(base.t())
    grads.append((torch.randn(48, 64, generator=g) * 1e-2).to(dev))
    ms.append(torch.zeros(48, 64, device=dev))
    vs.append(torch.zeros(48, 64, device=dev))
    steps = [torch.tensor(float(i % 5), device=dev) for i in range(n + 1)]
    state = (params, grads, ms, vs, steps)
    ref = _clone(state)
    kw = {"lr": 1e-2, "weight_decay": 0.01, "correct_bias": True, **HYPER}
    ops.adamw_step_(*state, **kw)
    reference.adamw_step_(*ref, **kw)
    _assert_close_state(state, ref)


def test_empty_lists_are_fine(backend):
    assert ops.adamw_step_([], [], [], [], [], lr=1e-3, weight_decay=0.0, correct_bias=True, **HYPER) is None


def _args(**over):
    p = [torch.zeros(3)]
    args = {
        "params": p,
        "grads": [torch.zeros(3)],
        "exp_avgs": [torch.zeros(3)],
        "exp_avg_sqs": [torch.zeros(3)],
        "steps": [torch.zeros(())],
        "lr": 1e-3,
        "weight_decay": 0.0,
        "correct_bias": True,
        **HYPER,
    }
    args.update(over)
    return args


def _call(args):
    lists = [args.pop(k) for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps")]
    ops.adamw_step_(*lists, **args)


@pytest.mark.parametrize(
    ("over", "err", "match"),
    [
        ({"grads": []}, ValueError, "grads has 0 tensors but params has 1"),
        ({"steps": [torch.zeros(()), torch.zeros(())]}, ValueError, "steps has 2 tensors"),
        ({"params": torch.zeros(3)}, TypeError, "params must be a list"),
        ({"grads": [torch.zeros(4)]}, ValueError, r"grads\[0\] has shape"),
        ({"exp_avgs": [torch.zeros(3, dtype=F64)]}, TypeError, r"exp_avgs\[0\] has dtype"),
        ({"exp_avg_sqs": [torch.zeros(2)]}, ValueError, r"exp_avg_sqs\[0\] has shape"),
        ({"grads": [torch.zeros(3, dtype=F64)]}, TypeError, r"grads\[0\] has dtype torch.float64"),
        ({"params": [torch.zeros(3, dtype=torch.int32)]}, TypeError, r"params\[0\] must have dtype"),
        ({"grads": ["x"]}, TypeError, r"grads\[0\] must be a torch.Tensor"),
        ({"steps": [torch.zeros((), dtype=F64)]}, ValueError, r"steps\[0\] must be a one-element float32"),
        ({"steps": [torch.zeros(2)]}, ValueError, r"steps\[0\] must be a one-element float32"),
        ({"steps": [torch.zeros((), device="meta")]}, ValueError, r"steps\[0\] is on meta"),
        ({"grads": [torch.zeros(3, device="meta")]}, ValueError, r"grads\[0\] is on meta"),
        ({"lr": -1.0}, ValueError, "lr must be a finite number"),
        ({"lr": float("nan")}, ValueError, "lr must be a finite number"),
        ({"lr": torch.zeros(2)}, ValueError, "lr must be a one-element"),
        ({"lr": torch.zeros((), dtype=F16)}, ValueError, "lr must be a one-element float32 or float64"),
        ({"beta1": 1.0}, ValueError, r"beta1 must be in \[0, 1\)"),
        ({"beta2": -0.1}, ValueError, "beta2 must be a finite number"),
        ({"eps": -1e-8}, ValueError, "eps must be"),
        ({"weight_decay": -1}, ValueError, "weight_decay must be"),
        ({"correct_bias": "yes"}, TypeError, "correct_bias must be a bool"),
        ({"grad_scale": torch.ones(1, dtype=torch.int32)}, ValueError, "grad_scale must be a one-element"),
        ({"grad_scale": 2.0}, TypeError, "grad_scale must be a torch.Tensor"),
        ({"found_inf": torch.zeros(2)}, ValueError, "found_inf must be a one-element"),
        ({"found_inf": torch.zeros(1, device="meta")}, ValueError, "found_inf is on meta"),
    ],
)
def test_bad_arguments_are_named(over, err, match):
    with pytest.raises(err, match=match):
        _call(_args(**over))


def test_the_same_tensor_twice_is_refused():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is the same tensor as params\[0\]"):
        _call(_args(params=[p], exp_avgs=[p]))
    s = torch.zeros(())
    two = {k: [torch.zeros(3), torch.zeros(3)] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")}
    with pytest.raises(ValueError, match=r"steps\[1\] is the same tensor as steps\[0\]"):
        _call(_args(**two, steps=[s, s]))


def test_overlapping_views_are_refused_and_disjoint_slices_run():
    buf = torch.zeros(10)
    two = {k: [torch.zeros(3), torch.zeros(3)] for k in ("grads", "exp_avgs", "exp_avg_sqs")}
    with pytest.raises(ValueError, match=r"params\[1\] shares memory with params\[0\]"):
        _call(_args(**two, params=[buf[:3], buf[2:5]], steps=[torch.zeros(()), torch.zeros(())]))
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory with params\[0\]"):
        _call(_args(params=[buf[:3]], grads=[buf[:3]]))
    flat = torch.zeros(9)  # optimizer state kept as slices of one flat buffer
    m, v = flat[:3], flat[3:6]
    _call(_args(params=[torch.ones(3)], grads=[torch.ones(3)], exp_avgs=[m], exp_avg_sqs=[v]))
    assert m.abs().sum() > 0 and v.abs().sum() > 0 and flat[6:].abs().sum() == 0


def test_explicit_gpu_backend_refuses_float64(monkeypatch):
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADAMW_STEP", "triton")
    args = _args(**{k: [torch.zeros(3, dtype=F64)] for k in ("params", "grads", "exp_avgs", "exp_avg_sqs")})
    with pytest.raises(ops.BackendUnavailableError, match="float64|TRITON_INTERPRET|triton is not installed"):
        _call(args)


def test_opcheck(backend):
    dev = backend_device(backend)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for lr, scale, flag in ((1e-2, None, None), (0.0, torch.tensor(2.0), torch.tensor([0.0]))):
        params, grads, ms, vs, steps = _state(dev, shapes=[(3, 4), (7,)])
        lr_t = None if scale is None else torch.tensor(1e-2, device=dev)
        scale = None if scale is None else scale.to(dev)
        flag = None if flag is None else flag.to(dev)
        args = (params, grads, ms, vs, steps, lr, lr_t, 0.9, 0.98, 1e-6, 0.01, True, scale, flag, backend)
        torch.library.opcheck(adamw_mod._adamw_step_op, args, test_utils=utils)


# ------------------------------------------------------------------------------------------------- GPU only

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backend(monkeypatch, name):
    from villa_fast.ops._backend import _why_not

    why = _why_not(name, torch.device("cuda"))
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADAMW_STEP", name)


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_gpu_backend_matches_the_cpu_reference(monkeypatch, name):
    """The GPU kernels against the reference run on the CPU: a UNITER-like mix of shapes, bf16 gradients."""
    _gpu_backend(monkeypatch, name)
    shapes = [(768, 768), (768,), (3072, 768), (30522, 64), (3, 5), (1,)]
    cpu = _state("cpu", shapes=shapes, gdt=BF16)
    gpu = tuple([t.cuda() for t in lst] for lst in cpu)
    kw = {"weight_decay": 0.01, "correct_bias": True, **HYPER}
    for k in range(3):
        grads = _new_grads(cpu[1], 400 + k)
        reference.adamw_step_(cpu[0], grads, *cpu[2:], lr=1e-3, **kw)
        ops.adamw_step_(gpu[0], [g.cuda() for g in grads], *gpu[2:], lr=torch.tensor(1e-3, device="cuda"), **kw)
    _assert_close_state(tuple([t.cpu() for t in lst] for lst in gpu), cpu)


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_captured_in_a_cuda_graph_follows_lr_and_the_flag_at_each_replay(monkeypatch, name):
    _gpu_backend(monkeypatch, name)
    state = _state("cuda", shapes=[(4099,), (37, 5), (2048,)])
    grads = state[1]
    lr = torch.tensor(1e-2, device="cuda")
    scale = torch.tensor(8.0, device="cuda")
    flag = torch.zeros(1, device="cuda")
    kw = {"weight_decay": 0.01, "correct_bias": True, "grad_scale": scale, "found_inf": flag, **HYPER}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm = _clone(state)
    with torch.cuda.stream(side):
        ops.adamw_step_(*warm, lr=lr, **kw)  # warm-up (Triton JIT)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.adamw_step_(*state, lr=lr, **kw)
    ref = _clone(state)  # capture ran nothing: the state is as before
    for k, (lr_v, bad) in enumerate(((1e-2, False), (5e-3, True), (2e-3, False))):
        new = [g * 8.0 for g in _new_grads(grads, 500 + k)]
        if bad:
            new[0][3] = float("inf")
        for g, n in zip(grads, new, strict=True):
            g.copy_(n)
        lr.fill_(lr_v)
        flag.fill_(1.0 if bad else 0.0)
        graph.replay()
        if not bad:
            reference.adamw_step_(ref[0], grads, *ref[2:], lr=lr_v, **{**kw, "found_inf": None})
        torch.cuda.synchronize()
        _assert_close_state(state, ref)
    assert [float(s) for s in state[4]] == [float(3 * i % 7) + 2 for i in range(3)]


def test_a_parameter_requiring_grad_is_refused_in_grad_mode_by_every_backend(backend):
    # as torch's in-place ops refuse it; under no_grad (an optimizer step) it runs
    dev = backend_device(backend)
    params, grads, ms, vs, steps = _state(dev, shapes=[(3, 5)])
    params[0].requires_grad_()
    before = params[0].detach().clone()
    kw = {"lr": 1e-3, "weight_decay": 0.01, "correct_bias": True, **HYPER}
    with pytest.raises(RuntimeError, match=r"adamw_step_: params\[0\] is a leaf tensor that requires grad"):
        ops.adamw_step_(params, grads, ms, vs, steps, **kw)
    assert torch.equal(params[0].detach(), before)
    with torch.no_grad():
        ops.adamw_step_(params, grads, ms, vs, steps, **kw)
    assert not torch.equal(params[0].detach(), before)
