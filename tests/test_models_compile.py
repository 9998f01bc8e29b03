"""UniterModel.compile_layers: torch.compile of the encoder layers, eager embeddings, same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from tests.test_models import make_batch, run_encoder, tiny_config
from villa_fast import AdversarialConfig, VillaStep
from villa_fast.models import UniterModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _models():
    torch.manual_seed(0)
    eager = UniterModel(tiny_config(num_hidden_layers=3)).eval()
    compiled = copy.deepcopy(eager).compile_layers()
    return eager, compiled


@pytest.fixture(scope="module")
def pair():
    torch._dynamo.reset()
    counters.clear()
    return _models()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_compiled_layers_match_eager_and_share_one_graph(pair):
    eager, compiled = pair
    batch = make_batch(eager.config, [5, 3], [4, 6])
    outs = []
    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
        out = run_encoder(m, batch)
        (out.square().mean() + out[:, 0].sum()).backward()
        outs.append(out.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    ge, gc = _grads(eager), _grads(compiled)
    assert ge.keys() == gc.keys() and len(ge) > 0
    for name in ge:
        torch.testing.assert_close(gc[name], ge[name], atol=1e-5, rtol=1e-4, msg=name)
    # three layers, one compiled graph: the parameters are inputs of the graph, not constants in it
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("clean", ["once", "recompute"])
def test_villa_step_with_compiled_layers_matches_eager(pair, clean):
    """Also with the clean pass recomputed under torch.utils.checkpoint through the compiled layers."""
    eager, compiled = pair
    batch = make_batch(eager.config, [5, 3], [4, 6], seed=1)
    target = torch.tensor([0, 2])
    cfg = AdversarialConfig(
        steps=2, lr_txt=1e-2, lr_img=1e-2, modality="text+image", kl_weight=1.5, clean_backward=clean
    )
    results = []
    for m in (eager, compiled):
        m.zero_grad(set_to_none=True)
        head = torch.nn.Linear(m.config.hidden_size, 3)
        torch.nn.init.constant_(head.weight, 0.05)
        torch.nn.init.zeros_(head.bias)
        step = VillaStep(
            lambda b, m=m, head=head: head(run_encoder(m, b)[:, 0]),
            lambda logits, b: F.cross_entropy(logits, target),
            cfg,
            text_embedding=m.embeddings.word_embeddings,
            image_input=m.img_embeddings.img_linear,
        )
        results.append((step.step(batch), _grads(m)))
        step.remove_hooks()
    (r0, g0), (r1, g1) = results
    torch.testing.assert_close(r1.loss, r0.loss, atol=1e-5, rtol=1e-5)
    for key in r0.deltas:
        torch.testing.assert_close(r1.deltas[key], r0.deltas[key], atol=1e-5, rtol=1e-4)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-4, msg=name)


def test_compile_choice_survives_deepcopy_and_uses_the_copy_weights(pair):
    eager, compiled = pair
    clone = copy.deepcopy(compiled)
    assert clone.encoder.compile_options == {}
    with torch.no_grad():
        for p in clone.encoder.parameters():
            p.mul_(0.5)
    batch = make_batch(eager.config, [5, 3], [4, 6], seed=2)
    with torch.no_grad():
        ref = copy.deepcopy(eager)
        for p in ref.encoder.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(run_encoder(clone, batch), run_encoder(ref, batch), atol=1e-5, rtol=1e-5)
        # the original is untouched by the copy's change
        torch.testing.assert_close(run_encoder(compiled, batch), run_encoder(eager, batch), atol=1e-5, rtol=1e-5)


def test_compile_is_not_part_of_the_weights_and_can_be_undone(pair):
    eager, compiled = pair
    assert list(compiled.state_dict()) == list(eager.state_dict())
    m = copy.deepcopy(compiled).compile_layers(enabled=False)
    assert m.encoder.compile_options is None


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_modes_with_their_own_cuda_graphs_are_refused(mode):
    model = UniterModel(tiny_config(num_hidden_layers=1))
    with pytest.raises(ValueError, match="GraphedVillaStep"):
        model.compile_layers(mode=mode)
    assert model.encoder.compile_options is None
