"""The in-place multi-tensor ops (add_if_, adamw_step_) call their kernels directly in plain eager mode and go
through their torch.library registration everywhere else (compile, fake tensors, modes, profiler)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from villa_fast import ops
from villa_fast.ops import _adamw_step, _add_if, _backend

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.98, eps=1e-6, weight_decay=0.01, correct_bias=True)


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Sub(torch.Tensor):
    pass


def _lists(n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (2, 2, 2), (1,), (5, 3)][:n]
    return [torch.randn(s, generator=g) for s in shapes]


def test_plain_eager_only_outside_tracing_modes_and_subclasses():
    ts = _lists()
    assert _backend.plain_eager(ts, [torch.tensor(True)])
    assert _backend.plain_eager([torch.nn.Parameter(ts[0])])
    assert not _backend.plain_eager([*ts, ts[0].as_subclass(_Sub)])
    with _Passthrough():
        assert not _backend.plain_eager(ts)
    with torch.device("cpu"):  # a torch-function mode
        assert not _backend.plain_eager(ts)
    with torch.profiler.profile():
        assert not _backend.plain_eager(ts)
    seen = []
    torch.vmap(lambda x: seen.append(_backend.plain_eager([x])) or x)(torch.zeros(2, 3))
    assert seen == [False]
    assert _backend.plain_eager(ts)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_add_if_direct_equals_registered_and_bumps_versions(backend, monkeypatch):
    if backend == "cpp" and _backend.extension() is None:
        pytest.skip("the C++ extension is not installed")
    monkeypatch.setenv("VILLA_FAST_BACKEND", backend)
    out = {}
    for direct in (True, False):
        monkeypatch.setattr(_add_if, "plain_eager", lambda *a, direct=direct: direct)
        accs, vals = _lists(seed=1), _lists(seed=2)
        before = [a._version for a in accs]
        ops.add_if_(accs, vals, torch.tensor(True))
        assert all(a._version > b for a, b in zip(accs, before, strict=True)), direct
        assert all(v._version == 0 for v in vals)
        out[direct] = accs
    for a, b in zip(out[True], out[False], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_adamw_direct_equals_registered_and_bumps_versions(backend, monkeypatch):
    if backend == "cpp" and _backend.extension() is None:
        pytest.skip("the C++ extension is not installed")
    monkeypatch.setenv("VILLA_FAST_BACKEND", backend)
    out = {}
    for direct in (True, False):
        monkeypatch.setattr(_adamw_step, "plain_eager", lambda *a, direct=direct: direct)
        p, g = _lists(seed=3), _lists(seed=4)
        m, v = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p]
        s = [torch.zeros(1) for _ in p]
        changed = [*p, *m, *v, *s]
        before = [t._version for t in changed]
        for _ in range(2):
            ops.adamw_step_(p, g, m, v, s, **HYPER)
        assert all(t._version >= b + 2 for t, b in zip(changed, before, strict=True)), direct
        out[direct] = changed
    for a, b in zip(out[True], out[False], strict=True):
        assert torch.equal(a, b)


def test_a_saved_tensor_changed_by_the_direct_call_is_caught_by_autograd():
    """The version bump is what lets autograd notice: a tensor saved for backward, then changed in place."""
    w = torch.randn(4, requires_grad=True)
    acc = torch.randn(4)
    loss = (w * acc).sum()  # saves acc
    assert _backend.plain_eager([acc])
    ops.add_if_([acc], [torch.ones(4)], torch.tensor(True))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_compiled_and_profiled_calls_go_through_the_registration():
    accs, vals = _lists(seed=5), _lists(seed=6)
    want = [a + v for a, v in zip(accs, vals, strict=True)]

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(accs, vals, ok):
        ops.add_if_(accs, vals, ok)

    f(accs, vals, torch.tensor(True))  # fullgraph: a direct call into the extension would break the graph
    for a, w in zip(accs, want, strict=True):
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    with torch.profiler.profile() as prof:
        ops.add_if_(accs, vals, torch.tensor(False))
    assert "villa_fast::add_if_" in {e.key for e in prof.key_averages()}

    p, g = _lists(seed=7), _lists(seed=8)
    m, v, s = [torch.zeros_like(t) for t in p], [torch.zeros_like(t) for t in p], [torch.zeros(1) for _ in p]
    q, mq, vq, sq = [t.clone() for t in p], [t.clone() for t in m], [t.clone() for t in v], [t.clone() for t in s]
    torch.compile(lambda *a: ops.adamw_step_(*a, **HYPER), backend="aot_eager", fullgraph=True)(p, g, m, v, s)
    ops.adamw_step_(q, g, mq, vq, sq, **HYPER)
    for a, b in zip([*p, *m, *v, *s], [*q, *mq, *vq, *sq], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
