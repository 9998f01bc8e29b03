"""add_if_: accs += vals under a device flag, every backend against plain PyTorch; a false flag changes nothing."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import backend_device
from villa_fast import ops
from villa_fast.ops import _add_if as add_if_mod

F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def _dtypes(backend):
    return (F32, F16, BF16) if backend == "cuda" else (F32, F16, BF16, F64)


def _pairs(dev, dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    # sizes around the CUDA tile (4096 fp32 / 8192 half elements): partial tiles, one element, exact tiles
    sizes = [(3, 5), (4096,), (8192,), (1,), (37, 301), (0,), (2, 3, 4)]
    accs, vals = [], []
    for i, shape in enumerate(sizes):
        dt = dtypes[i % len(dtypes)]
        accs.append(torch.randn(shape, generator=g).to(dt).to(dev))
        vals.append(torch.randn(shape, generator=g).to(dt).to(dev))
    return accs, vals


def test_true_flag_adds_like_torch(backend):
    dev = backend_device(backend)
    accs, vals = _pairs(dev, _dtypes(backend))
    want = [a + v for a, v in zip(accs, vals, strict=True)]
    ops.add_if_(accs, vals, torch.tensor(True, device=dev))
    for got, w in zip(accs, want, strict=True):
        assert got.dtype == w.dtype
        if backend == "triton" and dev == "cpu" and w.dtype in (F16, BF16):
            # Triton's interpreter rounds float32 -> half types approximately: one ulp of slack there only
            ulp = 2.0**-7 if w.dtype == BF16 else 2.0**-10
            torch.testing.assert_close(got, w, rtol=ulp, atol=0)
        else:
            assert torch.equal(got, w)


def test_false_flag_reads_nothing_nan_and_inf_included(backend):
    dev = backend_device(backend)
    accs, _ = _pairs(dev, _dtypes(backend))
    before = [a.clone() for a in accs]
    bad = []
    for a in accs:
        v = torch.full_like(a, float("nan"))
        if v.numel() > 1:
            v.view(-1)[1] = float("inf")
        bad.append(v)
    ops.add_if_(accs, bad, torch.tensor([False], device=dev))
    for got, w in zip(accs, before, strict=True):
        assert torch.equal(got, w)


def test_many_tensors_misaligned_and_non_contiguous(backend):
    """More tensors than one CUDA launch takes (40), views starting at odd offsets (no 16-byte alignment),
    and a non-contiguous pair (handled by the reference)."""
    dev = backend_device(backend)
    flat_a = torch.randn(50 * 1000 + 7, device=dev)
    flat_v = torch.randn(50 * 1000 + 7, device=dev)
    accs = [flat_a[1 + 1000 * i : 1 + 1000 * i + 997] for i in range(50)]
    vals = [flat_v[3 + 1000 * i : 3 + 1000 * i + 997] for i in range(50)]
    base = torch.randn(64, 48, device=dev)
    accs.append(base.t())
    vals.append(torch.randn(48, 64, device=dev))
    want = [a + v for a, v in zip(accs, vals, strict=True)]
    ops.add_if_(accs, vals, torch.tensor(True, device=dev))
    for got, w in zip(accs, want, strict=True):
        assert torch.equal(got, w)


def test_empty_lists_are_fine_and_still_checked(backend):
    dev = backend_device(backend)
    assert ops.add_if_([], [], torch.tensor(True, device=dev)) is None
    with pytest.raises(ValueError, match="one-element bool"):
        ops.add_if_([], [], torch.tensor(1.0, device=dev))


@pytest.mark.parametrize(
    ("make", "err", "match"),
    [
        (lambda: ([torch.zeros(3)], [], torch.tensor(True)), ValueError, "accs has 1 tensors but vals has 0"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(1.0)), ValueError, "one-element bool"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor([True, True])), ValueError, "one-element bool"),
        (lambda: ([torch.zeros(3)], [torch.zeros(4)], torch.tensor(True)), ValueError, r"vals\[0\] has shape"),
        (
            lambda: ([torch.zeros(3)], [torch.zeros(3, dtype=F64)], torch.tensor(True)),
            TypeError,
            r"vals\[0\] has dtype",
        ),
        (lambda: ([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)], torch.tensor(True)), TypeError, r"accs\[0\]"),
        (lambda: ([torch.zeros(3)], ["x"], torch.tensor(True)), TypeError, r"vals\[0\] must be a torch.Tensor"),
        (lambda: ([torch.zeros(3)], [torch.zeros(3)], torch.tensor(True, device="meta")), ValueError, "device"),
    ],
)
def test_bad_arguments_are_named(make, err, match):
    accs, vals, ok = make()
    with pytest.raises(err, match=match):
        ops.add_if_(accs, vals, ok)


def test_the_same_tensor_twice_is_refused():
    a = torch.zeros(5)
    with pytest.raises(ValueError, match=r"accs\[1\] is the same tensor as accs\[0\]"):
        ops.add_if_([a, a], [torch.ones(5), torch.ones(5)], torch.tensor(True))


def test_overlapping_views_are_refused_and_disjoint_slices_run():
    """Concurrent blocks on a GPU would race on the shared elements: views of one buffer must not overlap."""
    buf = torch.zeros(10)
    ok = torch.tensor(True)
    with pytest.raises(ValueError, match=r"shares memory with"):
        ops.add_if_([buf[:6], buf[4:]], [torch.ones(6), torch.ones(6)], ok)
    with pytest.raises(ValueError, match=r"vals\[0\] shares memory with accs\[1\]"):
        ops.add_if_([buf[:5], buf[5:]], [buf[5:], torch.ones(5)], ok)
    # a val shifted against its own acc reads elements another block writes
    with pytest.raises(ValueError, match=r"vals\[0\] shares memory with accs\[0\]"):
        ops.add_if_([buf[:5]], [buf[1:6]], ok)
    # interleaved strided views run apart (the reference, one tensor at a time): allowed; the same one twice is not
    m = torch.zeros(4, 4)
    ops.add_if_([m[:, 0], m[:, 1]], [torch.ones(4), torch.full((4,), 2.0)], ok)
    assert m[:, 0].tolist() == [1.0] * 4 and m[:, 1].tolist() == [2.0] * 4 and m[:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="is the same tensor as"):
        ops.add_if_([m[:, 0], m[:, 0]], [torch.ones(4), torch.ones(4)], ok)
    ops.add_if_([buf[:5], buf[5:]], [torch.ones(5), torch.full((5,), 2.0)], ok)
    assert buf.tolist() == [1.0] * 5 + [2.0] * 5
    ops.add_if_([buf], [buf], ok)  # an element that reads itself: doubled
    assert buf.tolist() == [2.0] * 5 + [4.0] * 5


def test_opcheck(backend):
    dev = backend_device(backend)
    accs = [torch.randn(3, 4, device=dev), torch.randn(7, device=dev)]
    vals = [torch.randn(3, 4, device=dev), torch.randn(7, device=dev)]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static")
    for flag in (True, False):
        torch.library.opcheck(
            add_if_mod._add_if_op,
            ([a.clone() for a in accs], vals, torch.tensor(flag, device=dev), backend),
            test_utils=utils,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_captured_in_a_cuda_graph_follows_the_flag_at_each_replay(monkeypatch, name):
    from villa_fast.ops._backend import _why_not

    why = _why_not(name, torch.device("cuda"))
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADD_IF", name)
    accs = [torch.zeros(4099, device="cuda"), torch.zeros(37, 5, device="cuda", dtype=BF16)]
    vals = [torch.ones(4099, device="cuda"), torch.ones(37, 5, device="cuda", dtype=BF16)]
    ok = torch.tensor(True, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.add_if_(accs, vals, ok)  # warm-up (Triton JIT)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.add_if_(accs, vals, ok)
    for a in accs:
        a.zero_()
    for flag, want in ((True, 1.0), (False, 1.0), (True, 2.0)):
        ok.fill_(flag)
        vals[0][7] = float("nan") if not flag else 1.0
        graph.replay()
        torch.cuda.synchronize()
        for a in accs:
            assert torch.equal(a, torch.full_like(a, want))


def test_a_leaf_requiring_grad_is_refused_in_grad_mode_by_every_backend(backend):
    # torch's own in-place ops refuse it; a kernel called directly would change it silently
    dev = backend_device(backend)
    leaf = torch.zeros(4, device=dev, requires_grad=True)
    ok = torch.tensor(True, device=dev)
    with pytest.raises(RuntimeError, match=r"add_if_: accs\[0\] is a leaf tensor that requires grad"):
        ops.add_if_([leaf], [torch.ones(4, device=dev)], ok)
    assert torch.equal(leaf.detach(), torch.zeros(4, device=dev))
    with torch.no_grad():
        ops.add_if_([leaf], [torch.ones(4, device=dev)], ok)
    assert torch.equal(leaf.detach(), torch.ones(4, device=dev))
