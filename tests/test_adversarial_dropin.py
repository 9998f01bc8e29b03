"""The adversarial step with models that are not UNITER: layer subclasses, parameters that change between steps,
models kept in bfloat16, injection points of different dtypes, sparse gradients, and GraphedVillaStep's
handling of module buffers and host tensors (checked on the CPU where the graph itself cannot run)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.test_adversarial import (
    Toy,
    assert_same,
    grads_of,
    make_batch,
    make_toy,
    toy_forward,
    toy_reference,
    vqa_loss,
)
from villa_fast import AdversarialConfig, GraphedVillaStep, VillaStep
from villa_fast.adversarial.hooks import Injector

pytestmark = pytest.mark.usefixtures("one_thread")


class LoraLinear(nn.Linear):
    """An ``nn.Linear`` subclass whose forward adds a low-rank term (as LoRA adapters do)."""

    def __init__(self, i: int, o: int, r: int = 2) -> None:
        super().__init__(i, o)
        self.a = nn.Parameter(0.5 * torch.randn(r, i))
        self.b = nn.Parameter(0.5 * torch.randn(o, r))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + x @ self.a.t() @ self.b.t()


def _against_reference(model, cfg, batches, between=None):
    """Grads and deltas of the step under test against the float64 transcription over ``batches`` (each call of
    ``between(i)`` runs before batch i in both runs, e.g. to unfreeze a layer)."""
    model.zero_grad(set_to_none=True)
    want_d = []
    for i, b in enumerate(batches):
        if between is not None:
            between(i)
        want_d.append(toy_reference(model, b, cfg))
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    if between is not None:
        between(-1)
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    got_d = []
    for i, b in enumerate(batches):
        if between is not None:
            between(i)
        got_d.append(step.step(b, b["tmask"], b["imask"]).deltas)
    step.remove_hooks()
    assert_same(grads_of(model), want, "param grad")
    for g, w in zip(got_d, want_d, strict=True):
        assert_same(g, w, "delta")
    return step


def test_an_nn_linear_subclass_takes_the_image_delta_at_its_input():
    # the split product W delta would skip the subclass's own term: the delta goes into its input instead
    model = make_toy(0)
    model.img = LoraLinear(6, 8).double()
    cfg = AdversarialConfig(steps=3, lr_img=0.5, modality="text+image")
    step = _against_reference(model, cfg, [make_batch(seed=1)])
    assert step._injector.image_split is False
    assert Injector(None, nn.Linear(3, 2)).image_split is True


def test_a_linear_with_a_hook_of_its_own_takes_the_image_delta_at_its_input():
    model = make_toy(0)
    model.img.register_forward_hook(lambda m, a, out: torch.tanh(out))  # changes the output: W delta would be wrong
    cfg = AdversarialConfig(steps=3, lr_img=0.5, modality="image")
    step = _against_reference(model, cfg, [make_batch(seed=1)])
    assert step._injector.image_split is False


def test_parameters_unfrozen_between_steps_get_their_gradients():
    model = make_toy(0)
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.3, modality="text+image")

    def between(i):  # the mixing layer frozen for the first micro-batch, trained from the second
        model.mix.requires_grad_(i != 0)

    _against_reference(model, cfg, [make_batch(seed=1), make_batch(seed=2)], between)
    assert model.mix.weight.grad is not None


class _TwoHeads(Toy):
    def __init__(self):
        super().__init__()
        self.head2 = nn.Linear(8, 5)

    def forward(self, ids, feat, tmask, imask, d_txt=None, d_img=None, head=0):
        h = self.head
        if head:
            self.head = self.head2
        try:
            return super().forward(ids, feat, tmask, imask, d_txt, d_img)
        finally:
            self.head = h


def test_a_head_chosen_per_batch_gets_its_gradient():
    torch.manual_seed(0)
    model = _TwoHeads().double()
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, modality="text")
    b0, b1 = make_batch(seed=1), make_batch(seed=2)
    b1["head"] = 1

    def fwd(b):
        return model(b["ids"], b["feat"], b["tmask"], b["imask"], head=b.get("head", 0))

    step = VillaStep(fwd, vqa_loss, cfg, text_embedding=model.word)
    step.step(b0)
    assert model.head2.weight.grad is None
    step.step(b1)
    assert model.head2.weight.grad is not None and model.head2.weight.grad.abs().sum() > 0


def test_given_parameters_that_stop_requiring_grad_are_named():
    model = make_toy(0)
    cfg = AdversarialConfig(steps=2, modality="text")
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, params=list(model.parameters()))
    step.step(make_batch(seed=1))
    model.mix.requires_grad_(False)
    with pytest.raises(RuntimeError, match=r"params\[\d+\] \(shape \(8, 8\)\) no longer requires grad"):
        step.step(make_batch(seed=2))


def test_a_bfloat16_model_under_autocast_takes_its_own_dtype_back():
    # the sum stays float32 under autocast only for float32 weights: a bf16 LayerNorm on the CPU refuses float32
    torch.manual_seed(0)
    model = Toy(vocab=50, hidden=16, img_dim=32, n_cls=7).to(torch.bfloat16).train()
    model.img = nn.Sequential(model.img)  # the input add: the next op is the bf16 projection
    batch = make_batch(b=3, lt=6, ni=4, vocab=50, img_dim=32, n_cls=7, dtype=torch.bfloat16)
    cfg = AdversarialConfig(steps=2, lr_txt=0.1, lr_img=0.1, modality="text+image", amp_dtype=torch.bfloat16)
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    res = step.step(batch)
    assert torch.isfinite(res.loss) and int(res.skipped_steps) == 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert res.deltas["text"].abs().sum() > 0 and res.deltas["image"].abs().sum() > 0


class _F64Features(nn.Module):
    """A float32 projection that takes float64 features and casts them itself."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x.float())


@pytest.mark.parametrize("modality", ["text+image", "alter"])
def test_injection_points_of_two_dtypes_are_updated_each_in_its_own(modality):
    torch.manual_seed(0)
    model = Toy().float().train()
    model.img = _F64Features(model.img)
    batch = make_batch(dtype=torch.float32)
    batch["feat"] = batch["feat"].double()
    cfg = AdversarialConfig(steps=3, lr_txt=0.1, lr_img=0.1, modality=modality)
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    res = step.step(batch)
    assert res.deltas["text"].dtype == torch.float32 and res.deltas["image"].dtype == torch.float64
    # the image delta's rows have the step's l2 norm: lr per step, two ascent steps in the same direction at most
    n = res.deltas["image"].reshape(len(batch["ids"]), -1).norm(dim=1)
    assert (n > 0).all() and (n <= 0.2 + 1e-9).all()
    assert res.skipped_rows.tolist() == [0, 0]


def test_a_sparse_embedding_gradient_is_refused_by_name():
    model = make_toy(0)
    model.word = nn.Embedding(37, 8, sparse=True).double()
    cfg = AdversarialConfig(steps=2, modality="text")
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word)
    with pytest.raises(TypeError, match="sparse=False"):
        step.step(make_batch(seed=1))


# ------------------------------------------------------------------------------------- GraphedVillaStep


class _BnToy(Toy):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(6)

    def forward(self, ids, feat, tmask, imask, d_txt=None, d_img=None):
        return super().forward(ids, feat, tmask, imask, d_txt, d_img) + self.bn(feat.mean(1))[:, :5]


def test_graphed_step_restores_the_models_buffers_after_its_warmup():
    torch.manual_seed(0)
    model = _BnToy().double().train()
    cfg = AdversarialConfig(steps=2, modality="text")
    step = GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, model=model)
    before = [b.clone() for b in model.buffers()]
    snap = step._snapshot_model()
    step._full(make_batch(seed=1), None, None, False)  # what a warm-up runs: K + 1 forwards through the BatchNorm
    assert not torch.equal(model.bn.running_mean, before[0])
    step._restore({**step._snapshot(), **snap})
    for b, v in zip(model.buffers(), before, strict=True):
        assert torch.equal(b, v)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, model=[model])


def test_graphed_step_runs_a_batch_with_host_tensors_eagerly(monkeypatch):
    # on a GPU a host tensor's new values could not reach the captured kernels: the step says so and runs eagerly
    model = make_toy(0)
    cfg = AdversarialConfig(steps=2, modality="text")
    step = GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word)
    monkeypatch.setattr(GraphedVillaStep, "_why_eager", lambda self, batch: "")
    monkeypatch.setattr(step.eager._injector, "device", lambda: torch.device("cuda"))  # the model "on the GPU"

    def no_capture(*a, **k):
        raise AssertionError("a batch with host tensors was captured")

    monkeypatch.setattr(GraphedVillaStep, "_capture", no_capture)
    batch = make_batch(seed=1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = step.step(batch)
    assert any("cpu tensor of shape" in str(w.message) for w in seen)
    assert torch.isfinite(res.loss) and model.word.weight.grad is not None
