"""GraphedVillaStep: eager on the CPU (same results as VillaStep), captured in a CUDA graph on a GPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from tests.test_adversarial import (
    assert_same,
    grads_of,
    make_batch,
    make_toy,
    toy_forward,
    toy_reference,
    vqa_loss,
)
from villa_fast import AdversarialConfig, GraphedVillaStep, VillaStep
from villa_fast.adversarial import clip_grad_norm_capturable_

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_thread")


def _graphed(model, cfg, **kw):
    return GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_cpu_runs_eagerly_says_so_once_and_matches_the_released_loop():
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", init_mag=0.1)
    model = make_toy()
    batches = [make_batch(seed=2), make_batch(seed=3)]
    model.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(4)
    want_d = [toy_reference(model, b, cfg, gen=gen) for b in batches]
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    step = _graphed(model, cfg, generator=torch.Generator().manual_seed(4))
    with pytest.warns(RuntimeWarning, match="runs eagerly: CUDA is not available"):
        r0 = step.step(batches[0], batches[0]["tmask"], batches[0]["imask"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r1 = step.step(batches[1], batches[1]["tmask"], batches[1]["imask"])
    assert not step.graphed
    assert_same(grads_of(model), want, "param grad")
    assert_same(r0.deltas, want_d[0], "delta")
    assert_same(r1.deltas, want_d[1], "delta")


@pytest.mark.filterwarnings("ignore:GraphedVillaStep runs eagerly")
def test_optimizer_and_clipping_inside_match_the_manual_loop():
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="alter")
    a = make_toy(1)
    b = copy.deepcopy(a)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.01)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    manual = VillaStep(toy_forward(a), vqa_loss, cfg, text_embedding=a.word, image_input=a.img)
    graphed = _graphed(b, cfg, optimizer=opt_b, max_grad_norm=0.5)
    for seed in (5, 6, 7):
        batch = make_batch(seed=seed)
        manual.step(batch)
        torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        graphed.step(batch)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-12, atol=1e-14), n
        assert pb.grad is None or not pb.grad.any()


@pytest.mark.filterwarnings("ignore:GraphedVillaStep runs eagerly")
def test_accumulation_without_optimizer_step():
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, modality="text")
    model = make_toy(2)
    batches = [make_batch(seed=8), make_batch(seed=9)]
    model.zero_grad(set_to_none=True)
    for b in batches:
        toy_reference(model, b, cfg)
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, optimizer=opt)
    for b in batches:
        step.step(b, optimizer_step=False)
    assert_same(grads_of(model), want, "accumulated grad")


def test_capturable_clip_matches_torch():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)) for _ in range(3)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for p, q in zip(ps, qs, strict=True):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    n1 = clip_grad_norm_capturable_(ps, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(qs, 1.0)
    torch.testing.assert_close(n1, n2)
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------------ GPU


def _cuda_toy(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    from tests.test_adversarial import Toy

    return Toy(vocab=97, hidden=64, img_dim=96, n_cls=31, dropout=dropout).cuda().train()


def _cuda_batch(seed=1, b=8):
    batch = make_batch(b=b, lt=12, ni=9, vocab=97, img_dim=96, n_cls=31, dtype=torch.float32, seed=seed)
    return {k: v.cuda() for k, v in batch.items()}


def _fused_adamw(model, lr=1e-3):
    return torch.optim.AdamW(
        model.parameters(), lr=torch.tensor(lr, device="cuda"), fused=True, capturable=True, weight_decay=0.01
    )


@pytest.mark.gpu
@needs_cuda
def test_graphed_matches_eager_in_bf16():
    cfg = AdversarialConfig(steps=3, lr_txt=1e-2, lr_img=1e-2, modality="text+image", amp_dtype=torch.bfloat16)
    a = _cuda_toy()
    b = copy.deepcopy(a)
    opt_a, opt_b = _fused_adamw(a), _fused_adamw(b)
    eager = VillaStep(toy_forward(a), vqa_loss, cfg, text_embedding=a.word, image_input=a.img)
    graphed = _graphed(b, cfg, optimizer=opt_b, max_grad_norm=2.0)
    for seed in range(4):
        batch = _cuda_batch(seed)
        ra = eager.step(batch, batch["tmask"], batch["imask"])
        clip_grad_norm_capturable_(list(a.parameters()), 2.0)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        rb = graphed.step(batch, batch["tmask"], batch["imask"])
        torch.testing.assert_close(rb.loss, ra.loss, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(rb.deltas["text"], ra.deltas["text"], rtol=5e-2, atol=1e-4)
    assert graphed.graphed
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=2e-2, atol=2e-3)


@pytest.mark.gpu
@needs_cuda
def test_graphed_with_the_authors_adamw_rule_matches_eager():
    """villa_fast.train.optim.AdamW(capturable=True) inside the graph: the same weights as the plain rule eagerly."""
    from villa_fast.train.optim import AdamW

    cfg = AdversarialConfig(steps=2, lr_txt=1e-2, lr_img=1e-2, modality="text+image")
    a = _cuda_toy()
    b = copy.deepcopy(a)
    opt_a = AdamW(a.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.01)
    opt_b = AdamW(
        b.parameters(), lr=torch.tensor(1e-3, device="cuda"), betas=(0.9, 0.98), weight_decay=0.01, capturable=True
    )
    eager = VillaStep(toy_forward(a), vqa_loss, cfg, text_embedding=a.word, image_input=a.img)
    graphed = _graphed(b, cfg, optimizer=opt_b, max_grad_norm=2.0)
    for seed in range(3):
        batch = _cuda_batch(seed)
        eager.step(batch, batch["tmask"], batch["imask"])
        clip_grad_norm_capturable_(list(a.parameters()), 2.0)
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
        graphed.step(batch, batch["tmask"], batch["imask"])
    assert graphed.graphed
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_recompute_replays_the_clean_dropout_masks_on_cuda():
    """clean_backward="recompute" on CUDA with dropout: the same gradients as "once" from the same CUDA seed."""
    cfg = AdversarialConfig(steps=3, lr_txt=1e-2, lr_img=1e-2, modality="text+image")
    model = _cuda_toy(dropout=0.3)
    batch = _cuda_batch()
    grads = {}
    for clean in ("once", "recompute"):
        model.zero_grad(set_to_none=True)
        step = VillaStep(
            toy_forward(model),
            vqa_loss,
            cfg.replace(clean_backward=clean),
            text_embedding=model.word,
            image_input=model.img,
        )
        torch.cuda.manual_seed(11)
        step.step(batch, batch["tmask"], batch["imask"])
        step.remove_hooks()
        grads[clean] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["recompute"], grads["once"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_recompute_is_captured_and_replays_the_clean_masks():
    """clean_backward="recompute" is captured: the clean pass draws from its own registered generator states.
    Each replay's gradients (fp32, dropout 0.3) equal those of the eager "once" step started from the default
    generator's state at that replay, with its clean pass on a snapshot of the graph's own clean stream taken
    before that replay: the recomputation replays the clean masks, and the registered copies advance with every
    replay."""
    cfg = AdversarialConfig(steps=3, lr_txt=1e-2, lr_img=1e-2, modality="text+image", clean_backward="recompute")
    a = _cuda_toy(dropout=0.3)
    b = copy.deepcopy(a)
    graphed = _graphed(b, cfg)  # no optimizer: the gradients stay in the fixed .grad tensors
    eager = VillaStep(
        toy_forward(a), vqa_loss, cfg.replace(clean_backward="once"), text_embedding=a.word, image_input=a.img
    )
    batch = _cuda_batch()
    graphed.step(batch, batch["tmask"], batch["imask"])  # captures (and replays once)
    entry = next(iter(graphed._graphs.values()))
    starts, clean_streams = [], []
    for _replay in range(2):
        for p in b.parameters():
            if p.grad is not None:
                p.grad.zero_()
        starts.append(torch.cuda.get_rng_state())
        clean_streams.append(entry.clean_rng.snapshot())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed.step(batch, batch["tmask"], batch["imask"])
        assert not [str(w.message) for w in caught if "runs eagerly" in str(w.message)]
        got = [p.grad.clone() for p in b.parameters()]
        after = torch.cuda.get_rng_state()
        a.zero_grad(set_to_none=True)
        torch.cuda.set_rng_state(starts[-1])
        eager._clean_rng = clean_streams[-1]
        eager.step(batch, batch["tmask"], batch["imask"])
        torch.cuda.set_rng_state(after)
        for ga, gb in zip([p.grad for p in a.parameters()], got, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)
    assert not torch.equal(starts[0], starts[1])
    # the clean stream is its own: not the default generator's, and it moved between the replays
    with clean_streams[0].use("first"):
        c0 = torch.rand(256, device="cuda")
    with clean_streams[1].use("first"):
        c1 = torch.rand(256, device="cuda")
    torch.cuda.set_rng_state(starts[0])
    assert not torch.equal(c0, c1) and not torch.equal(c0, torch.rand(256, device="cuda"))


@pytest.mark.gpu
@needs_cuda
def test_graphed_dropout_differs_across_replays_and_lr_tensor_applies():
    cfg = AdversarialConfig(steps=2, modality="text", amp_dtype=torch.bfloat16)
    model = _cuda_toy(dropout=0.3)
    opt = _fused_adamw(model)
    step = GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, optimizer=opt)
    batch = _cuda_batch()
    r1 = step.step(batch)
    r2 = step.step(batch)
    assert step.graphed
    assert not torch.equal(r1.logits, r2.logits)  # fresh dropout masks at every replay
    opt.param_groups[0]["lr"].fill_(0.0)
    before = [p.detach().clone() for p in model.parameters()]
    step.step(batch)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)  # a learning rate of 0 (weight decay scales with lr too): nothing moves


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("graphed", [False, True])
def test_fp16_with_grad_scaler(graphed):
    cfg = AdversarialConfig(steps=3, lr_txt=1e-3, lr_img=1e-3, modality="text+image", amp_dtype=torch.float16)
    model = _cuda_toy()
    opt = _fused_adamw(model)
    scaler = torch.amp.GradScaler("cuda")
    start = [p.detach().clone() for p in model.parameters()]
    if graphed:
        step = _graphed(model, cfg, optimizer=opt, scaler=scaler, max_grad_norm=2.0)
    else:
        step = VillaStep(
            toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img, scaler=scaler
        )
    for seed in range(3):
        batch = _cuda_batch(seed)
        res = step.step(batch, batch["tmask"], batch["imask"])
        if not graphed:
            scaler.unscale_(opt)
            clip_grad_norm_capturable_(list(model.parameters()), 2.0)
            scaler.step(opt)
            step.update_scaler(res.skipped_steps)
            opt.zero_grad(set_to_none=True)
        assert torch.isfinite(res.loss)
        assert res.deltas["text"].dtype == torch.float32 and res.deltas["text"].abs().sum() > 0
        assert int(res.skipped_steps) == 0
    moved = sum(int(not torch.equal(p, q)) for p, q in zip(model.parameters(), start, strict=True))
    assert moved > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@needs_cuda
def test_no_host_sync_inside_a_step():
    cfg = AdversarialConfig(steps=3, lr_txt=1e-3, lr_img=1e-3, modality="text+image", amp_dtype=torch.bfloat16)
    model = _cuda_toy()
    step = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    batch = _cuda_batch()
    step.step(batch, batch["tmask"], batch["imask"])  # first step: parameter discovery, kernel compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = step.step(batch, batch["tmask"], batch["imask"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(res.loss)


@pytest.mark.gpu
@needs_cuda
def test_graphed_nonfinite_step_is_skipped():
    from tests.test_adversarial import PoisonToy

    cfg = AdversarialConfig(steps=3, modality="text", amp_dtype=torch.bfloat16)
    torch.manual_seed(0)
    model = PoisonToy(poison_at=-1, vocab=97, hidden=64, img_dim=96, n_cls=31).cuda().train()
    opt = _fused_adamw(model)
    step = GraphedVillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, optimizer=opt, warmup=1)
    batch = _cuda_batch()
    # poison adversarial step 1 of the capture, so that every replay back-propagates NaN there: forwards are
    # the discovery pass (1), one warm-up step (clean + 3), then the captured clean pass and step 0
    model.calls, model.poison_at = 0, 1 + 4 + 1 + 1
    res = step.step(batch)
    res = step.step(batch)
    assert int(res.skipped_steps) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:GraphedVillaStep runs eagerly")
def test_warmup_is_undone_before_capture():
    """The capture's warm-up runs real steps; the snapshot/restore around it (run here on the CPU) must put
    parameters, gradients, optimizer state and the init generator back, with the same tensor objects."""
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image", init_mag=0.1)
    model = make_toy(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(11)
    step = _graphed(model, cfg, optimizer=opt, generator=gen)
    batch = make_batch(seed=12)
    step.eager.discover_params(batch)
    before = [p.detach().clone() for p in model.parameters()]
    gen_state = gen.get_state()
    snap = step._snapshot()
    for _ in range(2):
        step._full(batch, None, None, True)
    state_tensors = {id(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)}
    assert state_tensors
    step._restore(snap)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    for p in step.eager.params:
        assert p.grad is not None and not p.grad.any()
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                assert id(v) in state_tensors and not v.any()
    assert torch.equal(gen.get_state(), gen_state)


@pytest.mark.gpu
@needs_cuda
def test_warmup_leaves_the_default_cuda_generator_alone():
    """The warm-up's draws (here the initial perturbation, from the default CUDA generator) are undone: the run's
    random stream does not depend on the step at which a shape is first captured."""
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image", init_mag=0.1)
    model = _cuda_toy()
    step = _graphed(model, cfg, optimizer=_fused_adamw(model))
    batch = _cuda_batch(12)
    step.eager.discover_params(batch)
    state = torch.cuda.get_rng_state()
    snap = step._snapshot()
    for _ in range(2):
        step._full(batch, None, None, True)
    assert not torch.equal(torch.cuda.get_rng_state(), state)
    step._restore(snap)
    assert torch.equal(torch.cuda.get_rng_state(), state)


def test_new_shapes_beyond_max_graphs_run_eagerly(monkeypatch):
    """The capture policy, without a GPU: signatures past ``max_graphs`` are not captured (each graph holds
    its own memory pool) but run eagerly, with one warning naming the remedy."""
    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image")
    model = make_toy(3)
    step = _graphed(model, cfg, max_graphs=2)
    captured, eager = [], []

    class FakeGraph:
        def replay(self, leaves, masks):
            return "replayed"

    monkeypatch.setattr(step, "_why_eager", lambda batch: "")
    monkeypatch.setattr(step, "_attach_static_grads", lambda: None)
    monkeypatch.setattr(step, "_capture", lambda leaves, spec, t, i, o: captured.append(leaves[0].shape) or FakeGraph())
    monkeypatch.setattr(step, "_full", lambda batch, t, i, o: eager.append(batch["ids"].shape) or "eager")
    with pytest.warns(RuntimeWarning, match="max_graphs=2"):
        outs = [step.step(make_batch(b=b)) for b in (2, 3, 2, 4, 5, 3, 4)]
    assert captured == [(2, 5), (3, 5)]
    assert outs == ["replayed", "replayed", "replayed", "eager", "eager", "replayed", "eager"]
    assert eager == [(4, 5), (5, 5), (4, 5)]
    with pytest.raises(ValueError, match="max_graphs"):
        _graphed(model, cfg, max_graphs=0)


def test_a_batch_pytree_cannot_open_runs_eagerly(monkeypatch):
    """A graph is fed through its tensor leaves only: a batch object pytree cannot open (here a dataclass, whose
    repr also hides most of a large tensor) would be frozen into the graph with the data of its capture. Such
    a batch runs eagerly, with a warning naming the type and the remedy; dicts of tensors are captured."""
    import dataclasses

    @dataclasses.dataclass
    class Batch:
        ids: torch.Tensor

    cfg = AdversarialConfig(steps=2, lr_txt=0.3, lr_img=0.4, modality="text+image")
    step = _graphed(make_toy(3), cfg)
    captured, eager = [], []
    monkeypatch.setattr(step, "_why_eager", lambda batch: "")
    monkeypatch.setattr(step, "_attach_static_grads", lambda: None)
    monkeypatch.setattr(step, "_capture", lambda *a: captured.append(1) or type("G", (), {"replay": lambda *a: 0})())
    monkeypatch.setattr(step, "_full", lambda batch, t, i, o: eager.append(type(batch).__name__) or "eager")
    with pytest.warns(RuntimeWarning, match="holds a Batch, which torch.utils._pytree cannot open"):
        assert step.step({"b": Batch(torch.zeros(3))}) == "eager"
    step.step({"ids": torch.zeros(3), "n": 3, "name": "vqa"})
    assert eager == ["dict"] and captured == [1]


@pytest.mark.gpu
@needs_cuda
def test_graphs_of_several_shapes_share_one_pool_and_replay_in_any_order():
    """Three batch shapes captured into one memory pool, replayed interleaved: each replay equals the eager step
    on the same weights (fp32, no dropout, no optimizer: gradients compared)."""
    cfg = AdversarialConfig(steps=2, lr_txt=1e-2, lr_img=1e-2, modality="text+image")
    a = _cuda_toy()
    b = copy.deepcopy(a)
    eager = VillaStep(toy_forward(a), vqa_loss, cfg, text_embedding=a.word, image_input=a.img)
    graphed = _graphed(b, cfg)
    batches = {n: _cuda_batch(seed=n, b=n) for n in (4, 8, 12)}
    for n in (4, 8, 12, 8, 4, 12, 4):
        batch = batches[n]
        a.zero_grad(set_to_none=True)
        for p in b.parameters():
            if p.grad is not None:
                p.grad.zero_()
        ra = eager.step(batch, batch["tmask"], batch["imask"])
        rb = graphed.step(batch, batch["tmask"], batch["imask"])
        torch.testing.assert_close(rb.loss, ra.loss, rtol=1e-5, atol=1e-6)
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-6)
    assert len(graphed._graphs) == 3
    assert len({tuple(g.graph.pool()) for g in graphed._graphs.values()}) == 1
