"""The authors' AdamW rule (villa_fast.train.optim.AdamW) against a float64 transcription, and build_optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from villa_fast.train.optim import AdamW, build_optimizer


def _transcribed_step(params, grads, state, lr, betas, eps, wd, correct_bias=True):
    """One step of the authors' AdamW, element by element in float64 (the loop written out per parameter)."""
    b1, b2 = betas
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if g is None:
            continue
        st = state.setdefault(i, {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
        st["step"] += 1
        st["m"] = b1 * st["m"] + (1.0 - b1) * g
        st["v"] = b2 * st["v"] + (1.0 - b2) * g * g
        denom = st["v"].sqrt() + eps
        size = lr
        if correct_bias:
            size = lr * math.sqrt(1.0 - b2 ** st["step"]) / (1.0 - b1 ** st["step"])
        p -= size * st["m"] / denom
        if wd > 0.0:
            p -= lr * wd * p


@pytest.mark.parametrize("correct_bias", [True, False])
def test_matches_the_transcribed_rule(correct_bias):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 3), (5,), (2, 2, 3)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone() for t in init]
    opt = AdamW(
        [{"params": ours[:2], "weight_decay": 0.01}, {"params": ours[2:], "weight_decay": 0.0}],
        lr=3e-2,
        betas=(0.9, 0.98),
        eps=1e-6,
        correct_bias=correct_bias,
    )
    state: dict = {}
    for step in range(6):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 1e-3 for s in shapes]
        if step in (1, 4):
            grads[1] = None  # a parameter without a gradient this step keeps its own step count
        for p, gr in zip(ours, grads, strict=True):
            p.grad = gr
        opt.step()
        _transcribed_step(ref[:2], grads[:2], state, 3e-2, (0.9, 0.98), 1e-6, 0.01, correct_bias)
        sub = {k - 2: v for k, v in state.items() if k >= 2}
        _transcribed_step(ref[2:], grads[2:], sub, 3e-2, (0.9, 0.98), 1e-6, 0.0, correct_bias)
        state.update({k + 2: v for k, v in sub.items()})
    for p, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-15)
    assert opt.state[ours[1]]["step"] == 4 and opt.state[ours[0]]["step"] == 6


def test_differs_from_torch_adamw_only_by_eps_and_decay_placement():
    g = torch.Generator().manual_seed(1)
    init = torch.randn(50, generator=g, dtype=torch.float64)
    grads = [torch.randn(50, generator=g, dtype=torch.float64) * 1e-4 for _ in range(4)]

    def run(opt_cls, **kw):
        p = torch.nn.Parameter(init.clone())
        opt = opt_cls([p], lr=1e-2, betas=(0.9, 0.98), **kw)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        return p.detach()

    # no eps, no decay: the two rules are the same algebra
    torch.testing.assert_close(
        run(AdamW, eps=0.0), run(torch.optim.AdamW, eps=0.0, weight_decay=0.0), rtol=1e-12, atol=1e-15
    )
    # eps 1e-6 with gradients of 1e-4: torch's eps sits after the bias correction, the authors' before it
    diff = (run(AdamW, eps=1e-6) - run(torch.optim.AdamW, eps=1e-6, weight_decay=0.0)).abs().max()
    assert diff > 1e-6


def test_state_dict_resumes_exactly():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(4, 3, generator=g) for _ in range(5)]
    a = torch.nn.Parameter(torch.ones(4, 3))
    opt_a = AdamW([a], lr=1e-2, weight_decay=0.01)
    for gr in grads:
        a.grad = gr.clone()
        opt_a.step()
    b = torch.nn.Parameter(torch.ones(4, 3))
    opt_b = AdamW([b], lr=1e-2, weight_decay=0.01)
    for gr in grads[:2]:
        b.grad = gr.clone()
        opt_b.step()
    c = torch.nn.Parameter(b.detach().clone())
    opt_c = AdamW([c], lr=1e-2, weight_decay=0.01)
    opt_c.load_state_dict(opt_b.state_dict())
    for gr in grads[2:]:
        c.grad = gr.clone()
        opt_c.step()
    assert torch.equal(c, a)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -1}, "weight_decay"),
    ],
)
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        AdamW([torch.nn.Parameter(torch.ones(2))], **kw)


def test_build_optimizer_choices():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    cfg = {"weight_decay": 0.01, "lr_mul": 1.0, "betas": [0.9, 0.98], "learning_rate": 1e-3}
    assert type(build_optimizer(model, {**cfg, "optim": "adamw"})) is AdamW
    assert type(build_optimizer(model, {**cfg, "optim": "adamw_torch"})) is torch.optim.AdamW
    assert type(build_optimizer(model, {**cfg, "optim": "adam"})) is torch.optim.Adam
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer(model, {**cfg, "optim": "sgd"})


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_capturable_matches_the_plain_rule(tensor_lr, correct_bias):
    """capturable=True (step counts and lr on the device) gives the same weights as the plain rule."""
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 4), (3,), (2, 5)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    plain = [torch.nn.Parameter(t.clone()) for t in init]
    capt = [torch.nn.Parameter(t.clone()) for t in init]
    lr = torch.tensor(2e-2, dtype=torch.float64) if tensor_lr else 2e-2
    kw = {"betas": (0.9, 0.98), "eps": 1e-6, "correct_bias": correct_bias}
    opt_p = AdamW([{"params": plain[:2], "weight_decay": 0.01}, {"params": plain[2:]}], lr=2e-2, **kw)
    opt_c = AdamW([{"params": capt[:2], "weight_decay": 0.01}, {"params": capt[2:]}], lr=lr, capturable=True, **kw)
    for step in range(5):
        grads = [torch.randn(s, generator=g, dtype=torch.float64) * 1e-3 for s in shapes]
        if step == 2:
            grads[0] = None
        for ps in (plain, capt):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = None if gr is None else gr.clone()
        opt_p.step()
        opt_c.step()
    for a, b in zip(capt, plain, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-15)
    st = opt_c.state[capt[0]]["step"]
    assert isinstance(st, torch.Tensor) and float(st) == 4.0
    assert opt_c.param_groups[0]["capturable"] is True
    # a checkpoint of the plain rule (int step counts) resumes under capturable=True
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    opt_r = AdamW(
        [{"params": resumed[:2], "weight_decay": 0.01}, {"params": resumed[2:]}], lr=lr, capturable=True, **kw
    )
    opt_r.load_state_dict(copy.deepcopy(opt_p.state_dict()))
    assert opt_r.param_groups[0]["capturable"] is True
    grads = [torch.randn(s, generator=g, dtype=torch.float64) * 1e-3 for s in shapes]
    for ps in (plain, resumed):
        for p, gr in zip(ps, grads, strict=True):
            p.grad = gr.clone()
    opt_p.step()
    opt_r.step()
    for a, b in zip(resumed, plain, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-15)


def test_tensor_lr_needs_capturable():
    with pytest.raises(ValueError, match="capturable"):
        AdamW([torch.nn.Parameter(torch.ones(2))], lr=torch.tensor(1e-3))
