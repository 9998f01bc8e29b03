"""The authors' AdamW rule (villa_fast.train.optim.AdamW) against a float64 transcription, and build_optimizer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from villa_fast.ops._backend import _why_not
from villa_fast.train.optim import AdamW, build_optimizer


@pytest.fixture(params=["reference", "cpp"])
def step_backend(request, monkeypatch):
    """AdamW's step through the foreach rule (the reference backend) and through the fused C++ op."""
    why = _why_not(request.param, torch.device("cpu"))
    if why:
        pytest.skip(f"backend {request.param} unavailable: {why}")
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADAMW_STEP", request.param)
    return request.param


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
def test_matches_the_transcribed_rule(step_backend, correct_bias):
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

    # (next to) no eps, no decay: the two rules are the same algebra (eps = 0 itself is refused: 0 / 0 for a
    # zero gradient)
    torch.testing.assert_close(
        run(AdamW, eps=1e-300), run(torch.optim.AdamW, eps=1e-300, weight_decay=0.0), rtol=1e-12, atol=1e-15
    )
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        AdamW([torch.nn.Parameter(torch.ones(2))], eps=0.0)
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
def test_capturable_matches_the_plain_rule(step_backend, tensor_lr, correct_bias):
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


# ------------------------------------------------------------------------------- loss scaling (GradScaler)


def _toy(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(device)


def _loss(model: torch.nn.Module, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, 5, generator=g).to(device)
    return model(x).pow(2).mean()


def _opt(model: torch.nn.Module, **kw) -> AdamW:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    return AdamW(groups, lr=kw.pop("lr", 1e-2), betas=(0.9, 0.98), **kw)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, exact: bool) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        if exact:
            assert torch.equal(pa, pb)
        else:
            torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_declares_that_it_handles_loss_scaling():
    assert AdamW._step_supports_amp_scaling is True


@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_step_equals_unscaling_by_hand(step_backend, unscale_first):
    """scaler.step(opt) (the optimizer unscales on the fly), or unscale_ then step (grad_scale None), gives the
    weights of unscaled gradients and a plain step; a power-of-two scale makes the scaling exact, so through
    one kernel the weights are bitwise equal (the reference pairs the reference op with the foreach rule)."""
    a = _toy()
    b = copy.deepcopy(a)
    opt_a, opt_b = _opt(a), _opt(b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    for k in range(5):
        scaler.scale(_loss(a, k)).backward()
        if unscale_first:
            scaler.unscale_(opt_a)
        scaler.step(opt_a)
        scaler.update()
        opt_a.zero_grad(set_to_none=True)
        _loss(b, k).backward()
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
    assert scaler.get_scale() > 2.0**12  # the scale grew: several scales were used
    assert not hasattr(opt_a, "grad_scale") and not hasattr(opt_a, "found_inf")
    _assert_same_weights(a, b, exact=step_backend == "cpp")
    for p in a.parameters():
        st = opt_a.state[p]["step"]
        # counts went to the device (no host read-back under the scaler) and advanced every step
        assert isinstance(st, torch.Tensor) and st.dtype == torch.float32 and float(st) == 5.0
    assert all(opt_b.state[p]["step"] == 5 for p in b.parameters())


def test_grad_scaler_skips_a_step_with_an_inf_gradient(step_backend):
    model = _toy()
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(_loss(model, 0)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    weights = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict()["state"])
    scaler.scale(_loss(model, 1)).backward()
    first = next(model.parameters())
    first.grad[0, 0] = float("inf")
    first.grad[1, 0] = float("nan")
    scaler.step(opt)
    scaler.update()
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            assert torch.equal(v, state[i][k]), (i, k)
    assert scaler.get_scale() == 2.0**9  # backed off: the scaler saw the overflow
    opt.zero_grad(set_to_none=True)
    scaler.scale(_loss(model, 2)).backward()
    scaler.step(opt)
    assert all(float(opt.state[p]["step"]) == 2.0 for p in model.parameters())


def test_the_protocol_by_hand(step_backend):
    """grad_scale and found_inf set on the optimizer as GradScaler sets them: a scaled gradient with a zero flag
    steps as the unscaled one; a non-zero flag changes nothing, with a NaN gradient and a tensor lr included."""
    a, b = _toy(), _toy()
    opt_a, opt_b = _opt(a), _opt(b)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        g = torch.randn_like(p) * 1e-2
        p.grad, q.grad = g * 64.0, g.clone()
    opt_a.grad_scale, opt_a.found_inf = torch.tensor(64.0), torch.zeros(1)
    opt_a.step()
    opt_b.step()
    _assert_same_weights(a, b, exact=step_backend == "cpp")
    weights = [p.detach().clone() for p in a.parameters()]
    state = copy.deepcopy(opt_a.state_dict()["state"])
    for p in a.parameters():
        p.grad.fill_(float("nan"))
    opt_a.found_inf = torch.ones(1)
    opt_a.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(a.parameters(), weights, strict=True))
    for i, st in opt_a.state_dict()["state"].items():
        assert all(torch.equal(v, state[i][k]) for k, v in st.items())
    # capturable with a tensor lr: the same skip
    c = _toy()
    opt_c = _opt(c, lr=torch.tensor(1e-2), capturable=True)
    for p in c.parameters():
        p.grad = torch.full_like(p, float("inf"))
    before = [p.detach().clone() for p in c.parameters()]
    opt_c.grad_scale, opt_c.found_inf = None, torch.tensor([2.0])
    opt_c.step()
    assert all(torch.equal(p.detach(), w) for p, w in zip(c.parameters(), before, strict=True))
    assert all(float(opt_c.state[p]["step"]) == 0.0 for p in c.parameters())


def test_device_step_counts_cross_modes_through_state_dict(step_backend):
    """Counts kept on the device by a scaled step (capturable=False) save and load into a plain, a scaled and a
    capturable optimizer, and a plain (int) checkpoint loads into a scaled step: all continue the same run."""
    ref = _toy()
    opt_ref = _opt(ref)
    grads = []
    for k in range(4):
        _loss(ref, k).backward()
        grads.append([p.grad.clone() for p in ref.parameters()])
        opt_ref.step()
        opt_ref.zero_grad(set_to_none=True)

    def run(model, opt, ks, scaled):
        for k in ks:
            for p, g in zip(model.parameters(), grads[k], strict=True):
                p.grad = g * 8.0 if scaled else g.clone()
            if scaled:
                opt.grad_scale, opt.found_inf = torch.tensor(8.0), torch.zeros(())
            opt.step()
            if scaled:
                del opt.grad_scale, opt.found_inf

    exact = step_backend == "cpp"
    scaled = _toy()
    opt_s = _opt(scaled)
    run(scaled, opt_s, [0, 1], scaled=True)
    assert all(isinstance(opt_s.state[p]["step"], torch.Tensor) for p in scaled.parameters())
    saved = copy.deepcopy(opt_s.state_dict())
    for mode in ("plain", "scaled", "capturable"):
        model = copy.deepcopy(scaled)
        opt = _opt(model, **({"lr": torch.tensor(1e-2), "capturable": True} if mode == "capturable" else {}))
        opt.load_state_dict(copy.deepcopy(saved))
        run(model, opt, [2, 3], scaled=mode == "scaled")
        _assert_same_weights(model, ref, exact=exact and mode != "capturable")
        _assert_same_weights(model, ref, exact=False)
        assert all(float(opt.state[p]["step"]) == 4.0 for p in model.parameters())
    # the other way: a checkpoint with int counts continues under the scaler
    plain = _toy()
    opt_p = _opt(plain)
    run(plain, opt_p, [0, 1], scaled=False)
    assert all(opt_p.state[p]["step"] == 2 for p in plain.parameters())
    model = copy.deepcopy(plain)
    opt = _opt(model)
    opt.load_state_dict(copy.deepcopy(opt_p.state_dict()))
    run(model, opt, [2, 3], scaled=True)
    _assert_same_weights(model, ref, exact=exact)
    assert all(float(opt.state[p]["step"]) == 4.0 for p in model.parameters())


# --------------------------------------------------------------------------------------------------- GPU only

_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _gpu_backend(monkeypatch, name):
    why = _why_not(name, torch.device("cuda"))
    if why:
        pytest.skip(f"backend {name} unavailable: {why}")
    monkeypatch.setenv("VILLA_FAST_BACKEND_ADAMW_STEP", name)


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("unscale_first", [False, True])
@pytest.mark.parametrize("name", ["cuda", "triton", "reference"])
def test_scaler_step_never_syncs_on_cuda(monkeypatch, name, unscale_first):
    """scaler.step(AdamW) under torch.cuda.set_sync_debug_mode("error"), first step (state creation) included,
    an overflowing step included; the weights are those of unscaling by hand."""
    _gpu_backend(monkeypatch, name)
    a = _toy(device="cuda")
    b = copy.deepcopy(a)
    opt_a, opt_b = _opt(a), _opt(b)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    for k in range(4):
        scaler.scale(_loss(a, k, "cuda")).backward()
        if k == 2:
            next(a.parameters()).grad[0, 0] = float("inf")
        if unscale_first:
            scaler.unscale_(opt_a)
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.step(opt_a)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.update()
        opt_a.zero_grad(set_to_none=True)
        if k != 2:
            _loss(b, k, "cuda").backward()
            opt_b.step()
            opt_b.zero_grad(set_to_none=True)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        assert float(opt_a.state[pa]["step"]) == 3.0


@pytest.mark.gpu
@_needs_cuda
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_capturable_step_with_the_protocol_in_a_cuda_graph(monkeypatch, name):
    """AdamW(capturable=True) with grad_scale/found_inf set as GradScaler sets them, captured once: each replay
    follows the lr, the scale and the flag of that moment."""
    _gpu_backend(monkeypatch, name)
    a = _toy(device="cuda")
    b = copy.deepcopy(a)
    lr = torch.tensor(1e-2, device="cuda")
    opt_a = _opt(a, lr=lr, capturable=True)
    opt_b = _opt(b)
    scale, flag = torch.tensor(16.0, device="cuda"), torch.zeros(1, device="cuda")
    for p in a.parameters():
        p.grad = torch.zeros_like(p)
    opt_a.grad_scale, opt_a.found_inf = scale, flag
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        flag.fill_(1.0)
        opt_a.step()  # warm-up (state, Triton JIT) under a set flag: changes nothing
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_a.step()
    for k, (lr_v, bad) in enumerate(((1e-2, False), (5e-3, True), (2e-3, False))):
        _loss(b, k, "cuda").backward()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            p.grad.copy_(q.grad * 16.0)
            if bad:
                p.grad[0] = float("nan")
        lr.fill_(lr_v)
        flag.fill_(1.0 if bad else 0.0)
        graph.replay()
        if not bad:
            for g in opt_b.param_groups:
                g["lr"] = lr_v
            opt_b.step()
        opt_b.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
        assert float(opt_a.state[pa]["step"]) == 2.0


def test_set_dropout_reaches_what_the_authors_set_dropout_reaches():
    """``nn.Dropout`` modules and the encoder's attention-probability dropout (an ``nn.Dropout`` in the authors'
    layers) take the config's value; NLVR2 paired-attn's attention blocks keep attention_probs_dropout_prob, as
    the authors' MultiheadAttention holds it as a float their set_dropout does not reach."""
    from tests.test_models import tiny_config
    from villa_fast.models import build_model
    from villa_fast.train.optim import set_dropout

    model = build_model("nlvr2", tiny_config())
    set_dropout(model, 0.3)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(m.p == 0.3 for m in drops)
    mha = [m for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert mha and all(m.dropout == model.uniter.config.attention_probs_dropout_prob for m in mha)
    attn = [m for m in model.modules() if isinstance(getattr(m, "dropout_p", None), float)]
    assert attn and all(m.dropout_p == 0.3 for m in attn)


def test_a_stepped_parameter_without_a_gradient_steps_with_zeros_as_the_authors_zero_grad_does(step_backend):
    """The authors zero gradients in place, so a parameter that had a gradient once is stepped with g = 0 on
    the optimizer steps where its task was not drawn (momentum and weight decay move it); one that never had a
    gradient keeps none and is left alone."""
    from villa_fast.train.optim import zero_grads_of_stepped

    g = torch.Generator().manual_seed(1)
    init = [torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [t.clone() for t in init]
    opt = AdamW(ours, lr=3e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    state: dict = {}
    for step in range(4):
        drawn = torch.randn(4, 3, generator=g, dtype=torch.float64)
        # parameter 0: a gradient every step; parameter 1: only at step 0 (its task drawn once); 2: never
        grads = [drawn, drawn * 0.5 if step == 0 else None, None]
        for p, gr in zip(ours, grads, strict=True):
            p.grad = None if gr is None else gr.clone()
        assert zero_grads_of_stepped(opt) == (1 if step > 0 else 0)
        opt.step()
        authors = [grads[0], grads[1] if step == 0 else torch.zeros(4, 3, dtype=torch.float64), None]
        _transcribed_step(ref, authors, state, 3e-2, (0.9, 0.98), 1e-6, 0.01)
    for p, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-15)
    assert opt.state[ours[1]]["step"] == 4 and ours[2].grad is None and not opt.state.get(ours[2])
    assert not torch.equal(ours[1].detach(), init[1])  # moved after its one gradient, by momentum and decay


def test_optimizers_and_schedule_follow_the_authors_settings():
    from villa_fast.models import UniterModel
    from villa_fast.train.optim import LR_FLOOR, WarmupLinear, param_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    cfg = {"weight_decay": 0.01, "lr_mul": 1.0, "betas": [0.9, 0.98], "learning_rate": 1e-3}
    # torch's Adam and Adamax with torch's default eps (the authors pass only lr and betas); their AdamW: 1e-6
    for name, eps in (("adam", 1e-8), ("adamax", 1e-8), ("adamw", 1e-6)):
        assert build_optimizer(model, {**cfg, "optim": name}).defaults["eps"] == eps
    # the last step's learning rate is the authors' floor, not 0; the head's is floor * lr_mul
    opt = build_optimizer(model, {**cfg, "lr_mul": 10.0, "optim": "adamw"})
    sched = WarmupLinear(opt, 1e-3, warmup=2, total=4)
    lrs = [sched.step() for _ in range(5)]
    assert lrs[:3] == [5e-4, 1e-3, 5e-4] and lrs[3:] == [LR_FLOOR, LR_FLOOR]
    # a model without a task head (no .uniter encoder inside) has no head group to multiply
    from tests.test_models import tiny_config

    groups = {gr["name"]: gr for gr in param_groups(UniterModel(tiny_config()), 0.01, 10.0)}
    assert not groups["head"]["params"] and not groups["head_no_decay"]["params"]
    assert groups["encoder"]["params"] and groups["encoder_no_decay"]["params"]
