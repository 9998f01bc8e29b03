"""The clean pass on its own random streams (villa_fast.adversarial.rng.ForkedRng).

GraphedVillaStep captures clean_backward="recompute" with the clean pass drawing from two registered copies
of the CUDA generator state. On the CPU the same scheme runs on saved states; these tests check it there:
the copies draw the same numbers, the recomputation replays the first run's dropout masks, and the step
then has the gradients of the released loop whose clean pass draws from that copy.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from tests.test_adversarial import (
    assert_same,
    grads_of,
    make_batch,
    make_toy,
    released_loop,
    run_step,
    toy_forward,
    vqa_loss,
)
from villa_fast import AdversarialConfig, VillaStep
from villa_fast.adversarial.rng import ForkedRng

pytestmark = pytest.mark.usefixtures("one_thread")


def test_copies_draw_the_same_numbers_and_leave_the_default_generator_alone():
    torch.manual_seed(3)
    rng = ForkedRng("cpu")
    before = torch.get_rng_state()
    with rng.use("first"):
        a1 = torch.rand(5)
    with rng.use("first"):
        a2 = torch.rand(5)  # the copy goes on where it stopped
    with rng.use("again"):
        b1 = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    want = torch.rand(10, generator=torch.Generator().manual_seed(rng.seed))
    assert torch.equal(torch.cat([a1, a2]), want)
    assert torch.equal(b1, want[:5])
    rng.resync()  # "again" jumps to where "first" is
    with rng.use("again"):
        assert torch.equal(torch.rand(3), torch.rand(13, generator=torch.Generator().manual_seed(rng.seed))[10:])
    twin = rng.snapshot()  # both copies where "first" stands
    for part in ("first", "again"):
        with twin.use(part):
            assert torch.equal(torch.rand(2), torch.rand(12, generator=torch.Generator().manual_seed(rng.seed))[10:])


def test_the_stream_is_its_own_and_reproducible():
    """Seeded apart from the default generator (whose next numbers the perturbed passes draw), yet the same for
    the same default-generator state."""
    torch.manual_seed(3)
    rng = ForkedRng("cpu")
    with rng.use("first"):
        mine = torch.rand(64)
    assert not torch.equal(mine, torch.rand(64))  # the default generator goes on with other numbers
    torch.manual_seed(3)
    assert ForkedRng("cpu").seed == rng.seed
    torch.manual_seed(4)
    assert ForkedRng("cpu").seed != rng.seed
    assert ForkedRng("cpu", seed=11).seed == 11


def test_clean_masks_differ_from_the_perturbed_passes():
    """VILLA_SPEC section 2: step 0 (delta = 0) draws a different dropout mask from the clean pass's. With the
    clean pass on its own stream no perturbed pass reproduces the clean logits."""
    model = make_toy(5, dropout=0.3)
    batch = make_batch(seed=6)
    outs = []

    def fwd(b):
        z = model(b["ids"], b["feat"], b["tmask"], b["imask"])
        outs.append(z.detach().clone())
        return z

    torch.manual_seed(123)
    step = VillaStep(fwd, vqa_loss, AdversarialConfig(steps=3, lr_txt=0.3), text_embedding=model.word)
    step.discover_params(batch)
    step._clean_rng = ForkedRng("cpu")
    for _ in range(4):
        outs.clear()
        step.step(batch)
        assert len(outs) == 4 and not any(torch.equal(z, outs[0]) for z in outs[1:])
    step.remove_hooks()


def test_exception_inside_restores_the_default_generator():
    torch.manual_seed(0)
    rng = ForkedRng("cpu")
    before = torch.get_rng_state()
    with pytest.raises(KeyError), rng.use("first"):
        torch.rand(4)
        raise KeyError("boom")
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_arguments_are_named():
    rng = ForkedRng("cpu")
    with pytest.raises(ValueError, match="part must be one of"), rng.use("second"):
        pass
    with pytest.raises(ValueError, match="cpu and cuda"):
        ForkedRng("meta")
    with pytest.raises(RuntimeError, match="CUDA generator states"):
        rng.register(object())


def _fork_step(model, batch, cfg, seed):
    """One VillaStep whose clean pass draws from copies forked from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    step._clean_rng = ForkedRng("cpu")
    res = step.step(batch, batch["tmask"], batch["imask"])
    step.remove_hooks()
    return res


@pytest.mark.parametrize("clean", ["once", "recompute"])
def test_step_on_forked_streams_matches_the_released_loop(clean):
    """Dropout 0.3, float64: the clean pass draws from the fork, the K perturbed passes from the default
    generator, in the released loop's order; "recompute" replays the clean masks from the second copy."""
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
    model = make_toy(5, dropout=0.3)
    batch = make_batch(seed=6)

    # the transcription, its clean pass (the first forward) under the fork
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    fork = ForkedRng("cpu")
    calls = []

    def fwd(d_txt, d_img):
        calls.append(1)
        with fork.use("first") if len(calls) == 1 else contextlib.nullcontext():
            return model(batch["ids"], batch["feat"], batch["tmask"], batch["imask"], d_txt, d_img)

    b, lt = batch["ids"].shape
    want_d = released_loop(
        fwd,
        lambda z: vqa_loss(z, batch),
        batch,
        cfg,
        txt_shape=(b, lt, model.word.embedding_dim),
        img_shape=tuple(batch["feat"].shape),
        txt_mask=batch["tmask"],
        img_mask=batch["imask"],
    )
    want = grads_of(model)

    model.zero_grad(set_to_none=True)
    res = _fork_step(model, batch, cfg, 123)
    assert_same(grads_of(model), want, "param grad")
    assert_same(res.deltas, want_d, "delta")

    # and the fork matters: on the default generator alone the clean masks, hence the gradients, differ
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    run_step(model, batch, cfg)
    plain = grads_of(model)
    assert any(not torch.allclose(plain[k], want[k]) for k in want if want[k] is not None)


def test_recompute_equals_once_over_several_steps_on_one_fork():
    """The copies stay in step across steps (and across a forward that was never recomputed)."""
    model_a = make_toy(5, dropout=0.3)
    model_b = make_toy(5, dropout=0.3)
    out = {}
    for clean, model in (("once", model_a), ("recompute", model_b)):
        cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
        torch.manual_seed(9)
        step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
        step._clean_rng = ForkedRng("cpu")
        step.discover_params(make_batch(seed=1))  # a clean forward with no backward: "first" moves alone
        for i in range(3):
            b = make_batch(seed=2 + i)
            step.step(b, b["tmask"], b["imask"])
        step.remove_hooks()
        out[clean] = grads_of(model)
    assert_same(out["recompute"], out["once"], "recompute vs once")
