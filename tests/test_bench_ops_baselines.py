"""The op benchmark's eager baselines compute what the fused ops compute: a baseline that skipped work would
inflate every reported speed-up (bench/bench_ops.py)."""

from __future__ import annotations

import torch

from bench.bench_ops import eager_add_layer_norm, eager_init, eager_sym_kl, eager_update
from villa_fast import ops


def test_eager_update_is_the_normalised_step_with_projection():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, 7, generator=g) * 0.05
    grad = torch.randn(6, 5, 7, generator=g)
    for max_norm in (0.0, 0.2):
        want = delta.clone()
        ops.perturb_update_(want, grad, lr=0.3, norm_type="l2", max_norm=max_norm)
        got = eager_update(delta, grad, 0.3, max_norm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the projection does act here: some rows leave the 0.2 ball before it
    assert (eager_update(delta, grad, 0.3, 0.0).flatten(1).norm(dim=1) > 0.2).any()


def test_eager_sym_kl_is_the_mean_reduction_with_its_gradients():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(8, 50, generator=g) * 2).requires_grad_()
    b = (torch.randn(8, 50, generator=g) * 2).requires_grad_()
    want = ops.sym_kl(a, b, "mean")
    wa, wb = torch.autograd.grad(want, (a, b))
    got = eager_sym_kl(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, wa, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gb, wb, rtol=1e-4, atol=1e-8)


def test_eager_add_layer_norm_is_the_fused_op():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(4, 9, 16, generator=g), torch.randn(4, 9, 16, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(eager_add_layer_norm(x, r, w, b), ops.add_layer_norm(x, r, w, b, eps=1e-12))


def test_eager_init_has_the_fused_ops_mask_and_scale():
    like = torch.empty(3, 40, 64)
    mask = torch.ones(3, 40)
    mask[1, 10:] = 0
    torch.manual_seed(3)
    got = eager_init(like, mask, 0.5)
    want = ops.perturb_init(like, mask, init_mag=0.5, norm_type="l2")
    assert (got[1, 10:] == 0).all() and (want[1, 10:] == 0).all()
    # same distribution: uniform(-1, 1) * init_mag / sqrt(valid positions x width), so equal expected norms
    for d in (got, want):
        norms = d.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((3,), 0.5 / 3**0.5), rtol=0.05, atol=0)
