"""The ops are torch.library custom ops: opcheck passes and they trace under torch.compile without graph breaks."""

import pytest
import torch

from tests.conftest import backend_device
from villa_fast import ops
from villa_fast.ops import _perturb as perturb_mod
from villa_fast.ops import _sym_kl as sym_kl_mod

# test_aot_dispatch_dynamic retraces with symbolic shapes; it is the slow part and adds nothing for these ops
_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def test_opcheck_sym_kl(backend):
    dev = backend_device(backend)
    a = torch.randn(4, 9, device=dev, requires_grad=True)
    b = torch.randn(4, 9, device=dev, requires_grad=True)
    for reduction in ("batchmean", "mean"):
        torch.library.opcheck(sym_kl_mod._sym_kl_op, (a, b, reduction, True, backend), test_utils=_UTILS)
    torch.library.opcheck(sym_kl_mod._sym_kl_op, (a.detach(), b.detach(), "mean", False, backend), test_utils=_UTILS)


def test_opcheck_perturb_update(backend):
    dev = backend_device(backend)
    deltas = [torch.randn(3, 4, 5, device=dev) * 0.01, torch.randn(3, 2, 7, device=dev) * 0.01]
    grads = [torch.randn(3, 4, 5, device=dev), torch.randn(3, 2, 7, device=dev)]
    scale = torch.tensor([2.0], device=dev)
    args = (deltas, grads, [0.1, 0.2], "l2", 0.05, scale, backend)
    torch.library.opcheck(perturb_mod._perturb_update_op, args, test_utils=_UTILS)


def test_opcheck_perturb_init(backend):
    dev = backend_device(backend)
    noise = torch.rand(3, 4, 5, device=dev) * 2 - 1
    mask = (torch.rand(3, 4, device=dev) > 0.5).float()
    torch.library.opcheck(perturb_mod._perturb_init_op, (noise, mask, 0.5, "l2", backend), test_utils=_UTILS)


@pytest.mark.slow
def test_compile_fullgraph_no_graph_breaks():
    def step(a, b, delta, grad, like, mask):
        loss = ops.sym_kl(a, b) * 2.0
        count = ops.perturb_update_(delta, grad, lr=1e-3, norm_type="l2", max_norm=0.5)
        init = ops.perturb_init(like, mask, init_mag=0.0, norm_type="l2")
        return loss, count, init

    a = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, 6)
    args = (a, b, torch.zeros(4, 3, 5), torch.randn(4, 3, 5), torch.zeros(4, 3, 5), torch.ones(4, 3))
    explanation = torch._dynamo.explain(step)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    d_eager, d_comp = torch.zeros(4, 3, 5), torch.zeros(4, 3, 5)
    grad = torch.randn(4, 3, 5)
    le, ce, _ = step(a, b, d_eager, grad, *args[4:])
    lc, cc, _ = compiled(a, b, d_comp, grad, *args[4:])
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(d_comp, d_eager)
    (g1,) = torch.autograd.grad(le, a)
    (g2,) = torch.autograd.grad(lc, a)
    torch.testing.assert_close(g1, g2)
