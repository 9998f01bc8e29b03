"""Bad input to the adversarial step gets a clear error naming what is wrong, raised before it can do harm
(no crash deep in an op, no silent NaN, no gradient silently lost or doubled)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_adversarial import make_batch, make_toy, toy_forward, vqa_loss
from villa_fast import AdversarialConfig, GraphedVillaStep, VillaStep
from villa_fast.adversarial import clip_grad_norm_capturable_

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:GraphedVillaStep runs eagerly"),
]

CFG = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image", init_mag=0.1)


def _step(model, cfg=CFG, *, forward_fn=None, loss_fn=vqa_loss, cls=VillaStep, **kw):
    return cls(
        forward_fn or toy_forward(model),
        loss_fn,
        cfg,
        text_embedding=model.word if cfg.perturb_text else None,
        image_input=model.img if cfg.perturb_image else None,
        **kw,
    )


def _no_grads(model) -> bool:
    return all(p.grad is None for p in model.parameters())


class _Counting:
    """forward_fn wrapper counting its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, b):
        self.calls += 1
        return self.fn(b)


# ------------------------------------------------------------------------------------------------ masks


def test_txt_mask_of_the_wrong_shape_names_the_shape_it_needs():
    model, batch = make_toy(), make_batch()
    step = _step(model)
    with pytest.raises(
        ValueError,
        match=r"txt_mask must be a tensor of shape \[B, L\] = \(4, 5\) \(the text injection point's output "
        r"\(4, 5, 8\) without its last dim\), got \(4, 4\)",
    ):
        step.step(batch, txt_mask=batch["tmask"][:, :4], img_mask=batch["imask"])
    assert _no_grads(model)


def test_img_mask_of_the_wrong_shape_names_the_shape_it_needs():
    model, batch = make_toy(), make_batch()
    step = _step(model)
    with pytest.raises(
        ValueError, match=r"img_mask must be a tensor of shape \[B, N\] = \(4, 3\) \(the image injection point's first"
    ):
        step.step(batch, txt_mask=batch["tmask"], img_mask=batch["imask"][:2])


@pytest.mark.parametrize("cls", [VillaStep, GraphedVillaStep])
def test_a_mask_that_is_not_a_tensor_is_refused_before_any_forward(cls):
    model, batch = make_toy(), make_batch()
    fwd = _Counting(toy_forward(model))
    step = _step(model, forward_fn=fwd, cls=cls)
    with pytest.raises(TypeError, match=r"txt_mask must be a tensor \[B, L\] .* got list"):
        step.step(batch, txt_mask=batch["tmask"].tolist())
    with pytest.raises(TypeError, match=r"img_mask must be a tensor \[B, N\] .* got list"):
        step.step(batch, img_mask=batch["imask"].tolist())
    assert fwd.calls == 0 and _no_grads(model)


# ---------------------------------------------------------------------------------------------- loss_fn


def _per_row_loss(logits, batch):
    t = batch["target"].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, t, reduction="none").sum(1)


@pytest.mark.parametrize("modality", ["text", "alter"])
def test_loss_fn_returning_a_vector_is_named(modality):
    model, batch = make_toy(), make_batch()
    step = _step(model, AdversarialConfig(modality=modality), loss_fn=_per_row_loss)
    want = r"loss_fn must return a scalar tensor \(0-dim\); got a tensor of shape \(4,\)"
    with pytest.raises(ValueError, match=want):
        step.step(batch)
    assert _no_grads(model)


def test_loss_fn_returning_a_tuple_is_named_in_the_step_and_in_discover_params():
    model, batch = make_toy(), make_batch()

    def loss(z, b):
        return vqa_loss(z, b), {"acc": 0.0}

    with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor \(0-dim\); got tuple"):
        _step(model, loss_fn=loss).discover_params(batch)
    with pytest.raises(TypeError, match=r"loss_fn must return a scalar tensor \(0-dim\); got tuple"):
        _step(model, loss_fn=loss).step(batch)
    assert _no_grads(model)


# ----------------------------------------------------------------------------------------------- logits


def test_a_single_logit_head_is_told_how_to_make_two():
    model, batch = make_toy(), make_batch()
    fwd = toy_forward(model)
    step = _step(model, forward_fn=lambda b: fwd(b)[:, :1], loss_fn=lambda z, b: z.sum())
    with pytest.raises(ValueError, match=r"needs C >= 2.*torch\.cat\(\[torch\.zeros_like\(z\), z\], 1\)"):
        step.step(batch)
    assert _no_grads(model)


def test_an_empty_batch_is_named():
    model, batch = make_toy(), make_batch()
    fwd = toy_forward(model)
    step = _step(model, forward_fn=lambda b: fwd(b)[:0])
    with pytest.raises(ValueError, match=r"forward_fn returned 0 logit rows \(empty batch\)"):
        step.step(batch)
    assert _no_grads(model)


def test_logits_changing_shape_between_clean_and_perturbed_passes_are_named():
    model, batch = make_toy(), make_batch()
    fwd = _Counting(toy_forward(model))
    # the clean pass (the first call) drops a row, as a forward with a random row selection might
    step = _step(model, forward_fn=lambda b: fwd(b)[:3] if fwd.calls == 0 else fwd(b))
    with pytest.raises(
        RuntimeError,
        match=r"forward_fn returned logits \(4, 5\) on a perturbed pass but \(3, 5\) on the clean pass; its output "
        "shape must not depend on randomness",
    ):
        step.step(batch)
    assert _no_grads(model)


# ---------------------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("cls", [VillaStep, GraphedVillaStep])
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_step_without_autograd_says_so(cls, mode):
    model, batch = make_toy(), make_batch()
    fwd = _Counting(toy_forward(model))
    step = _step(model, forward_fn=fwd, cls=cls)
    with (
        pytest.raises(
            RuntimeError,
            match=rf"^{cls.__name__}\.step needs autograd: it was called under torch\.no_grad\(\) or "
            r"torch\.inference_mode\(\)",
        ),
        mode(),
    ):
        step.step(batch)
    assert fwd.calls == 0 and _no_grads(model)


# ------------------------------------------------------------------------------------------------ params


def test_empty_params_or_a_consumed_iterator_are_refused():
    model = make_toy()
    it = model.parameters()
    list(it)  # e.g. consumed by the optimizer
    for params in (it, []):
        with pytest.raises(ValueError, match=r"params is empty \(an iterator already consumed.*: pass a list"):
            _step(model, params=params)
    assert not model.word._forward_hooks  # refused before any hook was registered


def test_the_same_parameter_twice_is_refused_not_counted_twice():
    model = make_toy()
    w, b = model.head.weight, model.head.bias
    with pytest.raises(ValueError, match=r"params\[1\] is params\[0\]"):
        _step(model, params=[w, w, b])
    with pytest.raises(ValueError, match=r"params\[3\] is params\[1\]"):
        _step(model, params=[b, w, model.mix.weight, w])


def test_a_non_leaf_parameter_is_refused():
    model = make_toy()
    with pytest.raises(ValueError, match=r"params\[1\] is not a leaf tensor"):
        _step(model, params=[model.head.bias, model.head.weight * 1.0])


def test_params_the_loss_never_reaches_are_refused():
    model, other, batch = make_toy(), make_toy(seed=1), make_batch()
    step = _step(model, params=list(other.parameters()))
    with pytest.raises(RuntimeError, match=r"none of params is reached by forward_fn/loss_fn"):
        step.step(batch)
    assert _no_grads(model) and _no_grads(other)


def test_params_may_still_be_partly_unreached_or_a_single_tensor():
    """A parameter set some batches do not reach (a pre-training head) stays fine; one tensor is a list of one."""
    model, other, batch = make_toy(), make_toy(seed=1), make_batch()
    _step(model, params=[*model.parameters(), *other.parameters()]).step(batch)
    assert model.head.weight.grad is not None and _no_grads(other)
    model.zero_grad(set_to_none=True)
    _step(model, params=model.head.weight).step(batch)
    assert model.head.weight.grad is not None and model.head.bias.grad is None


# ------------------------------------------------------------------------------ GraphedVillaStep clipping


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, math.nan, math.inf])
def test_graphed_max_grad_norm_must_be_positive_and_finite(bad):
    model = make_toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"max_grad_norm must be a finite number > 0"):
        _step(model, cls=GraphedVillaStep, optimizer=opt, max_grad_norm=bad)
    assert not model.word._forward_hooks and not model.img._forward_pre_hooks


def test_graphed_max_grad_norm_without_optimizer_is_refused():
    model = make_toy()
    with pytest.raises(ValueError, match=r"max_grad_norm needs optimizer="):
        _step(model, cls=GraphedVillaStep, max_grad_norm=1.0)
    _step(model, cls=GraphedVillaStep, max_grad_norm=None)  # no clipping, no optimizer: fine


@pytest.mark.parametrize("bad", [0, 0.0, -2.0, math.nan, True])
def test_capturable_clip_refuses_a_max_norm_that_is_not_positive(bad):
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"max_norm must be a number > 0"):
        clip_grad_norm_capturable_([p], bad)
    assert torch.equal(p.grad, torch.ones(3))


def test_capturable_clip_takes_a_single_tensor_as_torch_does():
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    q = nn.Parameter(p.detach().clone())
    p.grad = torch.randn_like(p)
    q.grad = p.grad.clone()
    n1 = clip_grad_norm_capturable_(p, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(q, 0.5)
    torch.testing.assert_close(n1, n2)
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)
    assert p.grad.norm() < n1  # clipped, not left as it was


# -------------------------------------------------------------------------------------------------- scaler


@pytest.mark.parametrize("cls", [VillaStep, GraphedVillaStep])
def test_a_scaler_that_is_not_a_grad_scaler_is_refused_at_construction(cls):
    model = make_toy()
    with pytest.raises(TypeError, match=r"scaler must be a torch\.amp\.GradScaler .* got bool"):
        _step(model, cls=cls, scaler=True)
    assert not model.word._forward_hooks


def _scaled(growth_interval=1000):
    model = make_toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=growth_interval)
    step = _step(model, scaler=scaler)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return step, scaler, opt


def test_update_scaler_takes_a_python_count():
    step, scaler, opt = _scaled()
    for skipped, want in ((1, 512.0), (0, 512.0), (2, 256.0)):
        scaler.scale(torch.ones(()))
        scaler.step(opt)
        step.update_scaler(skipped)
        assert scaler.get_scale() == want


def test_update_scaler_refuses_what_is_not_a_count():
    step, scaler, opt = _scaled()
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    with pytest.raises(TypeError, match=r"skipped_steps must be the summed result\.skipped_steps"):
        step.update_scaler("1")
    with pytest.raises(ValueError, match=r"skipped_steps must be one count"):
        step.update_scaler(torch.tensor([0, 1]))


# --------------------------------------------------------------------------------------------------- hooks


def test_an_image_input_whose_input_is_not_floating_point_is_named():
    """An nn.Embedding as image_input: its first input (the ids) would get the perturbation, cast back to ints."""
    model, batch = make_toy(), make_batch()
    step = VillaStep(toy_forward(model), vqa_loss, AdversarialConfig(modality="image"), image_input=model.word)
    with pytest.raises(TypeError, match=r"the image injection point \(image_input's first input\) is torch\.int64"):
        step.step(batch)
    assert _no_grads(model)


def test_a_text_embedding_whose_output_is_not_floating_point_is_named():
    model, batch = make_toy(), make_batch()
    ids = nn.Identity()
    fwd = toy_forward(model)
    step = VillaStep(lambda b: fwd({**b, "ids": ids(b["ids"])}), vqa_loss, AdversarialConfig(), text_embedding=ids)
    with pytest.raises(TypeError, match=r"the text injection point \(text_embedding's output\) is torch\.int64"):
        step.step(batch)


@pytest.mark.parametrize("same_shape", [True, False])
def test_an_injection_module_called_twice_in_one_forward_is_refused(same_shape):
    model, batch = make_toy(), make_batch()
    fwd = toy_forward(model)

    def twice(b):
        extra = model.word(b["ids"] if same_shape else b["ids"][:, :3]).sum()
        return fwd(b) + 0.0 * extra

    step = VillaStep(twice, vqa_loss, AdversarialConfig(), text_embedding=model.word)
    want = r"\(shape \(4, 5, 8\)\)" if same_shape else r"\(shapes \(4, 3, 8\) and \(4, 5, 8\)\)"
    with pytest.raises(RuntimeError, match=r"text injection point was called more than once in one forward " + want):
        step.step(batch)
    assert _no_grads(model)


@pytest.mark.parametrize("cls", [VillaStep, GraphedVillaStep])
def test_a_step_after_remove_hooks_says_the_hooks_were_removed(cls):
    model, batch = make_toy(), make_batch()
    step = _step(model, cls=cls)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        step.step(batch)
    step.remove_hooks()
    with pytest.raises(RuntimeError, match=r"the hooks were removed \(remove_hooks\(\)\)"):
        step.step(batch)
