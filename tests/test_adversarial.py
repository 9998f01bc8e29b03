"""The adversarial step against a literal float64 transcription of the released VILLA loop (VILLA_SPEC section 2).

The transcription below uses plain torch ops only (F.kl_div, softmax, the per-example normalised update
written out), never villa_fast.ops, and passes the perturbations to the model explicitly, while the step
under test injects them by hooks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from villa_fast import AdversarialConfig, StepResult, VillaStep

REL = 1e-10  # float64, dropout 0


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- models


class Toy(nn.Module):
    """Text ids + region features -> class logits, with token mixing so deltas interact non-linearly."""

    def __init__(self, vocab: int = 37, hidden: int = 8, img_dim: int = 6, n_cls: int = 5, dropout: float = 0.0):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.pos = nn.Parameter(0.1 * torch.randn(16, hidden))
        self.ln = nn.LayerNorm(hidden)
        self.img = nn.Linear(img_dim, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, n_cls)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids, feat, tmask, imask, d_txt=None, d_img=None):
        w = self.word(ids)
        if d_txt is not None:
            w = w + d_txt
        t = self.ln(w + self.pos[: ids.shape[1]])
        if d_img is not None:
            feat = feat + d_img
        x = torch.cat([t, self.img(feat)], 1)
        m = torch.cat([tmask, imask], 1).to(x.dtype)[..., None]
        h = torch.tanh(self.mix(self.drop(x)))
        pooled = (h * m).sum(1) / m.sum(1)
        att = torch.softmax((h * pooled[:, None]).sum(-1) + (m[..., 0] - 1) * 1e4, dim=1)
        ctx = (att[..., None] * h).sum(1)
        return self.head(torch.tanh(self.out(torch.cat([pooled, ctx], -1))))


def toy_forward(model):
    return lambda b: model(b["ids"], b["feat"], b["tmask"], b["imask"])


def vqa_loss(logits, batch):
    """BCE on soft scores, mean * C (the VQA / VE task loss of the released code)."""
    t = batch["target"].to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, t) * t.shape[1]


def make_batch(b=4, lt=5, ni=3, vocab=37, img_dim=6, n_cls=5, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    tmask = torch.ones(b, lt, dtype=dtype)
    imask = torch.ones(b, ni, dtype=dtype)
    for r in range(1, b):  # ragged rows: padded text and regions
        tmask[r, lt - (r % lt) :] = 0 if r % lt else 1
        imask[r, ni - 1 - (r % 2) :] = 0 if r % 2 else 1
    return {
        "ids": torch.randint(0, vocab, (b, lt), generator=g),
        "feat": torch.randn(b, ni, img_dim, generator=g, dtype=dtype).relu(),
        "tmask": tmask,
        "imask": imask,
        "target": (torch.rand(b, n_cls, generator=g, dtype=dtype) < 0.4).to(dtype),
    }


def make_toy(seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return Toy(**kw).to(dtype).train()


# ------------------------------------------------------------------------------------- transcription


def released_loop(
    fwd, task_loss, batch, cfg, *, txt_shape, img_shape, txt_mask=None, img_mask=None, gen=None, skip=(), losses=None
):
    """VILLA_SPEC section 2, literally: clean logits kept in the graph, K forwards, backward with retain_graph,
    per-example normalised updates written out. ``fwd(d_txt, d_img)`` returns logits. Returns the final
    deltas; parameter gradients accumulate in ``.grad``. Steps in ``skip`` are left out (no backward, no
    update), which is what the step under test does with a non-finite step."""
    K, alpha = cfg.steps, cfg.kl_weight
    text = cfg.modality in ("text", "text+image", "alter")
    image = cfg.modality in ("image", "text+image", "alter")

    def init(shape, mask):
        if cfg.init_mag == 0:
            return torch.zeros(shape, dtype=torch.float64)
        u = torch.empty(shape, dtype=torch.float64).uniform_(-1, 1, generator=gen)
        m = torch.ones(shape[:2], dtype=torch.float64) if mask is None else mask.to(torch.float64)
        if cfg.norm_type == "l2":
            length = m.sum(1)
            return u * m[..., None] * (cfg.init_mag / torch.sqrt(length * shape[-1]))[:, None, None]
        return u * m[..., None] * cfg.init_mag

    def kl(a, b):
        la, lb = F.log_softmax(a, dim=1), F.log_softmax(b, dim=1)
        e = F.kl_div(la, F.softmax(b, dim=1), reduction="none") + F.kl_div(lb, F.softmax(a, dim=1), reduction="none")
        return e.sum() / a.shape[0] if cfg.kl_reduction == "batchmean" else e.mean()

    def update(delta, lr):
        g = delta.grad.detach()
        b = g.shape[0]
        if cfg.norm_type == "l2":
            den = torch.norm(g.view(b, -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
        else:
            den = torch.norm(g.view(b, -1), dim=1, p=float("inf")).view(-1, 1, 1).clamp(min=1e-8)
        delta = (delta + lr * g / den).detach()
        if cfg.max_norm > 0:
            if cfg.norm_type == "l2":
                n = torch.norm(delta.view(b, -1), p=2, dim=1)
                over = (n > cfg.max_norm).to(delta)
                w = (cfg.max_norm / n * over + (1 - over)).view(-1, 1, 1)
                delta = (delta * w).detach()
            else:
                delta = torch.clamp(delta, -cfg.max_norm, cfg.max_norm).detach()
        return delta

    dt = init(txt_shape, txt_mask) if text else None
    di = init(img_shape, img_mask) if image else None
    clean = fwd(None, None)
    for k in range(K):
        if dt is not None:
            dt.requires_grad_()
        if di is not None:
            di.requires_grad_()
        if cfg.modality == "alter":
            z1, z2 = fwd(dt, None), fwd(None, di)
            loss = (task_loss(z1) + task_loss(z2) + alpha * (kl(z1, clean) + kl(z2, clean))) / (2 * K)
        else:
            z = fwd(dt, di)
            loss = (task_loss(z) + alpha * kl(z, clean)) / K
        if k not in skip:
            loss.backward(retain_graph=True)
            if losses is not None:
                losses.append(loss.detach())
        if k == K - 1:
            break
        if k in skip:
            continue
        if dt is not None:
            dt = update(dt, cfg.lr_txt)
        if di is not None:
            di = update(di, cfg.lr_img)
    return {n: d.detach() for n, d in (("text", dt), ("image", di)) if d is not None}


def toy_reference(model, batch, cfg, *, use_masks=True, gen=None, skip=(), losses=None):
    b, lt = batch["ids"].shape
    hidden = model.word.embedding_dim

    def fwd(d_txt, d_img):
        return model(batch["ids"], batch["feat"], batch["tmask"], batch["imask"], d_txt, d_img)

    return released_loop(
        fwd,
        lambda z: vqa_loss(z, batch),
        batch,
        cfg,
        txt_shape=(b, lt, hidden),
        img_shape=tuple(batch["feat"].shape),
        txt_mask=batch["tmask"] if use_masks else None,
        img_mask=batch["imask"] if use_masks else None,
        gen=gen,
        skip=skip,
        losses=losses,
    )


def grads_of(model):
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def assert_same(got: dict, want: dict, what: str, rel: float = REL):
    assert got.keys() == want.keys(), f"{what}: keys {sorted(got)} vs {sorted(want)}"
    for k in want:
        g, w = got[k], want[k]
        assert (g is None) == (w is None), f"{what}[{k}]: one is None"
        if w is None:
            continue
        assert torch.isfinite(g).all(), f"{what}[{k}] not finite"
        e = rel_err(g, w)
        assert e <= rel, f"{what}[{k}] relative error {e:.3e} > {rel:.0e}"


def run_step(model, batch, cfg, *, gen=None, use_masks=True, in_place=False, **kw) -> StepResult:
    step = VillaStep(
        toy_forward(model), vqa_loss, cfg, text_embedding=model.word, image_input=model.img, generator=gen, **kw
    )
    step._grads_in_place = in_place
    res = step.step(batch, batch["tmask"] if use_masks else None, batch["imask"] if use_masks else None)
    step.remove_hooks()
    return res


def check_against_reference(cfg, *, seed=0, micro_batches=1, use_masks=True, in_place=False):
    model = make_toy(seed)
    batches = [make_batch(seed=seed + 1 + i) for i in range(micro_batches)]
    # reference
    model.zero_grad(set_to_none=True)
    ref_deltas = [
        toy_reference(model, b, cfg, gen=torch.Generator().manual_seed(7), use_masks=use_masks) for b in batches
    ]
    ref = grads_of(model)
    # step under test
    model.zero_grad(set_to_none=True)
    results = [
        run_step(model, b, cfg, gen=torch.Generator().manual_seed(7), use_masks=use_masks, in_place=in_place)
        for b in batches
    ]
    got = grads_of(model)
    assert_same(got, ref, "param grad")
    for res, want in zip(results, ref_deltas, strict=True):
        assert_same(res.deltas, want, "delta")
        assert int(res.skipped_steps) == 0
        assert int(res.skipped_rows.sum()) == 0
    return results


# ------------------------------------------------------------------------------------------- the matrix

MATRIX = list(
    itertools.product(
        ("text", "image", "text+image", "alter"),
        ("l2", "linf"),
        (0.0, 1.0),
        (0.0, 1.0),
        ("batchmean", "mean"),
        ("once", "per_step", "recompute"),
    )
)


@pytest.mark.parametrize("modality,norm,max_norm_on,init_on,reduction,clean", MATRIX)
def test_matches_released_loop(modality, norm, max_norm_on, init_on, reduction, clean):
    # large ascent steps so that the projection really clips (l2 radius 0.3 < lr 0.5; linf 0.02 < step)
    lr = 0.5 if norm == "l2" else 0.05
    max_norm = (0.3 if norm == "l2" else 0.02) * max_norm_on
    init_mag = (0.2 if norm == "l2" else 0.01) * init_on
    cfg = AdversarialConfig(
        steps=3,
        lr_txt=lr,
        lr_img=1.5 * lr,
        norm_type=norm,
        max_norm=max_norm,
        init_mag=init_mag,
        kl_weight=1.5,
        modality=modality,
        kl_reduction=reduction,
        clean_backward=clean,
    )
    results = check_against_reference(cfg)
    res = results[0]
    assert res.loss.dtype == torch.float64 and not res.loss.requires_grad
    if max_norm_on:
        for d in res.deltas.values():
            if norm == "l2":
                assert d.flatten(1).norm(dim=1).max() <= max_norm * (1 + 1e-12)
            else:
                assert d.abs().max() <= max_norm


@pytest.mark.parametrize("in_place", [False, True], ids=["aside", "in_place"])
@pytest.mark.parametrize("clean", ["once", "per_step", "recompute"])
@pytest.mark.parametrize("modality", ["text+image", "alter"])
def test_gradient_accumulation_two_micro_batches(modality, clean, in_place):
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality=modality, clean_backward=clean, init_mag=0.1)
    check_against_reference(cfg, micro_batches=2, in_place=in_place)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_other_step_counts_and_no_masks(steps):
    cfg = AdversarialConfig(steps=steps, lr_txt=0.3, lr_img=0.4, modality="text+image", init_mag=0.1)
    check_against_reference(cfg, use_masks=False)


def test_once_per_step_and_recompute_agree():
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image")
    out = {}
    for clean in ("once", "per_step", "recompute"):
        model = make_toy(3)
        run_step(model, make_batch(seed=5), cfg.replace(clean_backward=clean))
        out[clean] = grads_of(model)
    assert_same(out["once"], out["per_step"], "once vs per_step")
    assert_same(out["recompute"], out["once"], "recompute vs once")


@pytest.mark.parametrize(("clean", "calls"), [("once", 4), ("per_step", 4), ("recompute", 5)])
def test_recompute_runs_the_clean_forward_again_and_saves_only_its_inputs(clean, calls):
    """K = 3: clean + 3 perturbed forwards; "recompute" adds the clean forward's second run (in the final
    backward), and keeps none of the clean pass's activations through the steps."""
    model = make_toy(3)
    fwd = toy_forward(model)
    seen = []

    def counting(batch):
        seen.append(torch.is_grad_enabled())
        return fwd(batch)

    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
    step = VillaStep(counting, vqa_loss, cfg, text_embedding=model.word, image_input=model.img)
    batch = make_batch(seed=5)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step._clean(batch, step._autocast(batch))
    clean_saved = sum(saved)
    step.step(batch)
    step.remove_hooks()
    assert len(seen) == 1 + calls
    if clean == "recompute":
        # checkpoint keeps the clean forward's inputs only: far less than a plain forward saves
        plain = VillaStep(
            fwd, vqa_loss, cfg.replace(clean_backward="once"), text_embedding=model.word, image_input=model.img
        )
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            plain._clean(batch, plain._autocast(batch))
        plain.remove_hooks()
        assert clean_saved < sum(saved) / 2


def test_result_contents():
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image")
    model = make_toy()
    batch = make_batch()
    res = run_step(model, batch, cfg)
    assert res.loss.dim() == 0 and not res.loss.requires_grad
    assert res.logits.shape == (4, 5) and not res.logits.requires_grad
    with torch.no_grad():
        clean = model(batch["ids"], batch["feat"], batch["tmask"], batch["imask"])
    torch.testing.assert_close(res.logits, clean, rtol=1e-12, atol=1e-12)
    assert res.deltas["text"].shape == (4, 5, 8) and res.deltas["image"].shape == (4, 3, 6)
    assert res.skipped_rows.dtype == torch.int64 and res.skipped_rows.shape == (2,)
    assert res.skipped_steps.dtype == torch.int64 and res.skipped_steps.dim() == 0
    assert set(res.perturbation_survival) == {"text", "image"}
    for v in res.perturbation_survival.values():  # float64 everywhere: every perturbed element survives
        assert v.item() == 1.0
    # the total loss is the sum of the K loss_k (each divided by K), as the transcription computes them
    model.zero_grad(set_to_none=True)
    losses = []
    toy_reference(model, batch, cfg, losses=losses)
    torch.testing.assert_close(res.loss, torch.stack(losses).sum(), rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------------------ HF-style BERT


class BertEmbeddings(nn.Module):
    def __init__(self, vocab, hidden, max_pos=32):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden)
        self.position_embeddings = nn.Embedding(max_pos, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(0.0)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None):
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        n = inputs_embeds.shape[1]
        pos = torch.arange(n, device=inputs_embeds.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device)
        e = inputs_embeds + self.position_embeddings(pos) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(e))


class BertLike(nn.Module):
    """The HF layout: model.embeddings.word_embeddings, an encoder layer, a pooler, a classifier."""

    def __init__(self, vocab=41, hidden=12, heads=2, n_cls=3):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, hidden)
        self.encoder = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout=0.0, batch_first=True)
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, n_cls)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        x = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds)
        pad = None if attention_mask is None else attention_mask == 0
        h = self.encoder(x, src_key_padding_mask=pad)
        return self.classifier(torch.tanh(self.pooler(h[:, 0])))


@pytest.mark.parametrize("clean", ["once", "per_step", "recompute"])
def test_hf_style_bert_word_embeddings(clean):
    torch.manual_seed(0)
    model = BertLike().double().train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 41, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.tensor([0, 2, 1])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    cfg = AdversarialConfig(
        steps=3, lr_txt=0.2, modality="text", kl_reduction="batchmean", clean_backward=clean, init_mag=0.1
    )

    def ce(z, b):
        return F.cross_entropy(z, b["labels"])

    model.zero_grad(set_to_none=True)
    emb = model.embeddings.word_embeddings

    def fwd(d_txt, d_img):
        e = emb(ids)
        if d_txt is not None:
            e = e + d_txt
        return model(inputs_embeds=e, attention_mask=mask)

    want_d = released_loop(
        fwd,
        lambda z: ce(z, batch),
        batch,
        cfg,
        txt_shape=(3, 7, 12),
        img_shape=None,
        txt_mask=mask,
        gen=torch.Generator().manual_seed(1),
    )
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    step = VillaStep(
        lambda b: model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
        ce,
        cfg,
        text_embedding=emb,
        generator=torch.Generator().manual_seed(1),
    )
    res = step.step(batch, txt_mask=mask)
    assert_same(grads_of(model), want, "param grad")
    assert_same(res.deltas, want_d, "delta")
    # the hooks do nothing outside a step
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask)
        step.remove_hooks()
        b = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(a, b)


def test_hooks_inactive_outside_step_and_removed():
    model = make_toy()
    batch = make_batch()
    fwd = toy_forward(model)
    with torch.no_grad():
        before = fwd(batch)
    step = VillaStep(
        fwd,
        vqa_loss,
        AdversarialConfig(modality="text+image", lr_txt=0.5, lr_img=0.5),
        text_embedding=model.word,
        image_input=model.img,
    )
    step.step(batch)
    with torch.no_grad():
        during = fwd(batch)
    assert torch.equal(before, during)
    assert len(model.word._forward_hooks) == 1 and len(model.img._forward_pre_hooks) == 1
    step.remove_hooks()
    assert len(model.word._forward_hooks) == 0 and len(model.img._forward_pre_hooks) == 0


def test_injection_module_not_called_is_reported():
    model = make_toy()
    other = nn.Embedding(3, 8).double()
    step = VillaStep(toy_forward(model), vqa_loss, AdversarialConfig(), text_embedding=other)
    with pytest.raises(RuntimeError, match="not called"):
        step.step(make_batch())


# --------------------------------------------------------------------------------------- loss scaler


@pytest.mark.parametrize("clean", ["once", "per_step", "recompute"])
def test_grad_scaler_scales_params_and_unscales_deltas(clean):
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
    model = make_toy()
    batch = make_batch()
    model.zero_grad(set_to_none=True)
    want_d = toy_reference(model, batch, cfg)
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    res = run_step(model, batch, cfg, scaler=scaler)
    got = {k: (None if v is None else v / 1024.0) for k, v in grads_of(model).items()}
    assert_same(got, want, "unscaled param grad")
    assert_same(res.deltas, want_d, "delta")


def _scaled_step(growth_interval):
    """A VillaStep with a GradScaler (scale 1024) and an optimizer over gradients already present."""
    model = make_toy()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=growth_interval)
    step = VillaStep(toy_forward(model), vqa_loss, AdversarialConfig(), text_embedding=model.word, scaler=scaler)
    for p in params:
        p.grad = torch.zeros_like(p)
    return step, scaler, opt


def test_update_scaler_backs_off_after_a_skipped_step():
    step, scaler, opt = _scaled_step(1000)
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    step.update_scaler(torch.tensor(1))
    assert scaler.get_scale() == 512.0
    scaler.scale(torch.ones(()))
    scaler.step(opt)
    step.update_scaler(torch.tensor(0))
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("unscaled_first", [False, True])
@pytest.mark.parametrize("skipped", [torch.tensor(2), 1])
def test_skip_if_left_out_skips_the_optimizer_step(unscaled_first, skipped):
    """Before scaler.step: a left-out step makes the scaler skip the optimizer step and back off, as an overflow
    in .grad does (whether or not the caller unscaled first; a tensor or a Python count)."""
    step, scaler, sgd = _scaled_step(1000)
    model_params = [p for g in sgd.param_groups for p in g["params"]]
    opt = torch.optim.SGD(model_params, lr=1.0)
    for p in model_params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model_params]
    scaler.scale(torch.ones(()))  # the scale exists once a loss was scaled
    if unscaled_first:
        scaler.unscale_(opt)
    step.skip_if_left_out(opt, skipped)
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(model_params, before, strict=True))
    assert scaler.get_scale() == 512.0
    # nothing left out: the step is applied and the scale kept
    for p in model_params:
        p.grad = torch.ones_like(p)
    step.skip_if_left_out(opt, torch.tensor(0))
    scaler.step(opt)
    scaler.update()
    assert all(not torch.equal(p, q) for p, q in zip(model_params, before, strict=True))
    assert scaler.get_scale() == 512.0


def test_a_skipped_step_is_an_overflow_for_the_scalers_growth():
    """As for an overflow in .grad: the scale halves and the growth count restarts, even on the iteration that
    would otherwise have doubled the scale."""
    step, scaler, opt = _scaled_step(3)
    for skipped in (0, 0, 1, 0, 0):  # the third iteration would have doubled the scale
        scaler.scale(torch.ones(()))
        scaler.step(opt)
        step.update_scaler(torch.tensor(skipped))
    assert scaler.get_scale() == 512.0 and int(scaler._get_growth_tracker()) == 2


def test_graphed_optimizer_step_backs_off_for_any_micro_batch_of_the_cycle():
    """GraphedVillaStep with its optimizer and accumulation: a left-out step in an earlier micro-batch of the
    cycle backs the scale off at the optimizer step (eager on the CPU: the same code)."""
    import warnings

    from villa_fast.adversarial.graphed import GraphedVillaStep

    torch.manual_seed(0)
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 3)
    opt = torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    step = GraphedVillaStep(
        lambda b: head(emb(b["ids"]).mean(1) * b["scale"]),
        lambda z, b: F.cross_entropy(z, b["y"]),
        AdversarialConfig(),
        text_embedding=emb,
        scaler=scaler,
        optimizer=opt,
        max_grad_norm=2.0,
    )
    ids, y = torch.randint(0, 10, (2, 5)), torch.tensor([0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r1 = step.step({"ids": ids, "y": y, "scale": torch.tensor(float("inf"))}, optimizer_step=False)
        r2 = step.step({"ids": ids, "y": y, "scale": torch.tensor(1.0)}, optimizer_step=True)
        assert int(r1.skipped_steps) > 0 and int(r2.skipped_steps) == 0
        assert scaler.get_scale() == 512.0
        step.step({"ids": ids, "y": y, "scale": torch.tensor(1.0)}, optimizer_step=True)
    assert scaler.get_scale() == 512.0  # the count started again after the optimizer step


# ----------------------------------------------------------------------------------- non-finite steps


class _Poison(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, poison):
        ctx.poison = poison
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return (g * float("nan") if ctx.poison else g), None


class PoisonToy(Toy):
    """Toy whose n-th forward (counted from 0) produces a NaN gradient in backward."""

    def __init__(self, poison_at, **kw):
        super().__init__(**kw)
        self.poison_at = poison_at
        self.calls = 0

    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        poison = self.calls == self.poison_at
        self.calls += 1
        return _Poison.apply(out, poison)


def _poisoned_against_reference(toy_cls, bad_step, clean="once", in_place=False):
    """The reference's gradients and deltas with step ``bad_step`` left out, and the step's result when that
    step's backward is poisoned (by ``toy_cls``: its output's gradient, or one parameter's alone)."""
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
    torch.manual_seed(0)
    model = toy_cls(poison_at=-1).double().train()
    batch = make_batch()
    model.zero_grad(set_to_none=True)
    want_d = toy_reference(model, batch, cfg, skip={bad_step})
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    model.calls, model.poison_at = 0, 1 + bad_step  # forward 0 is the clean pass
    return run_step(model, batch, cfg, in_place=in_place), want, want_d, model


@pytest.mark.parametrize("in_place", [False, True], ids=["aside", "in_place"])
@pytest.mark.parametrize("clean", ["once", "per_step", "recompute"])
@pytest.mark.parametrize("bad_step", [0, 1, 2])
def test_nonfinite_gradient_is_skipped_and_reported(bad_step, clean, in_place):
    res, want, want_d, model = _poisoned_against_reference(PoisonToy, bad_step, clean, in_place)
    assert int(res.skipped_steps) == 1
    expected_rows = [4, 4] if bad_step < 2 else [0, 0]  # the last step has no update
    assert res.skipped_rows.tolist() == expected_rows
    assert torch.isfinite(res.loss)
    assert_same(grads_of(model), want, "param grad")
    assert_same(res.deltas, want_d, "delta")


@pytest.mark.parametrize(("modality", "rows"), [("text", [4, 0]), ("image", [0, 4])])
def test_skipped_rows_are_counted_in_their_modalitys_slot(modality, rows):
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality=modality)
    torch.manual_seed(0)
    model = PoisonToy(poison_at=1).double().train()  # the first perturbed step's gradients are NaN
    res = run_step(model, make_batch(), cfg)
    assert int(res.skipped_steps) == 1
    assert res.skipped_rows.tolist() == rows


class ParamPoisonToy(Toy):
    """Toy with an extra parameter added to the logits whose gradient alone is NaN on the n-th forward: the
    deltas' gradients stay finite (an overflow away from the embeddings)."""

    def __init__(self, poison_at, **kw):
        super().__init__(**kw)
        self.extra = nn.Parameter(torch.zeros(5))
        self.poison_at, self.calls = poison_at, 0

    def forward(self, *args, **kw):
        out = super().forward(*args, **kw)
        poison = self.calls == self.poison_at
        self.calls += 1
        return out + _Poison.apply(self.extra, poison)


@pytest.mark.parametrize("bad_step", [0, 1])
def test_a_step_with_only_parameter_gradients_nonfinite_leaves_the_deltas_alone(bad_step):
    """A step left out is left out of the perturbation update too, even when its delta gradients are finite."""
    res, want, want_d, model = _poisoned_against_reference(ParamPoisonToy, bad_step)
    assert int(res.skipped_steps) == 1
    assert_same(res.deltas, want_d, "delta")
    assert_same(grads_of(model), want, "param grad")


class _SharedGradToy(nn.Module):
    """Logits ``head(...) + p1 + p2``: autograd hands p1 and p2 one and the same gradient buffer."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(11, 4)
        self.head = nn.Linear(4, 3)
        self.p1 = nn.Parameter(torch.randn(2, 3) * 0.1)
        self.p2 = nn.Parameter(torch.randn(2, 3) * 0.1)

    def forward(self, ids, d=None):
        e = self.word(ids)
        if d is not None:
            e = e + d
        return self.head(torch.tanh(e).mean(1)) + self.p1 + self.p2


@pytest.mark.parametrize("skip_nonfinite", [True, False])
def test_parameters_sharing_one_gradient_buffer_accumulate_it_once_each(skip_nonfinite):
    torch.manual_seed(0)
    m = _SharedGradToy().double()
    ids, y = torch.randint(0, 11, (2, 5)), torch.tensor([0, 2])
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, kl_weight=1.0, modality="text", skip_nonfinite=skip_nonfinite)

    def kl(a, b):
        return F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="sum") / a.size(0)

    # the released loop, transcribed: zero init, l2, no projection, clean logits kept in the graph
    clean = m(ids)
    d = torch.zeros(2, 5, 4, dtype=torch.float64)
    losses = []
    for k in range(3):
        d.requires_grad_()
        z = m(ids, d)
        loss = (F.cross_entropy(z, y) + kl(z, clean) + kl(clean, z)) / 3
        losses.append(loss.detach())
        loss.backward(retain_graph=True)
        if k < 2:
            g = d.grad
            d = (d + 0.3 * g / g.flatten(1).norm(dim=1).clamp(min=1e-8)[:, None, None]).detach()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    step = VillaStep(lambda b: m(b), lambda z, b: F.cross_entropy(z, y), cfg, text_embedding=m.word)
    res = step.step(ids)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(res.loss, torch.stack(losses).sum(), rtol=1e-12, atol=0)


def test_nonfinite_loss_is_skipped():
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, modality="text")
    model = make_toy()
    batch = make_batch()
    model.zero_grad(set_to_none=True)
    want_d = toy_reference(model, batch, cfg, skip={1})
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    calls = [0]

    def loss_fn(z, b):
        calls[0] += 1
        loss = vqa_loss(z, b)
        return loss * float("inf") if calls[0] == 2 else loss

    step = VillaStep(toy_forward(model), loss_fn, cfg, text_embedding=model.word)
    res = step.step(batch)
    assert int(res.skipped_steps) == 1 and torch.isfinite(res.loss)
    assert_same(grads_of(model), want, "param grad")
    assert_same(res.deltas, want_d, "delta")


# ------------------------------------------------------------------------------------------- precision


def test_bf16_autocast_on_cpu_runs_and_stays_finite():
    torch.manual_seed(0)
    model = Toy(vocab=50, hidden=16, img_dim=32, n_cls=7, dropout=0.1).train()
    batch = make_batch(b=3, lt=6, ni=4, vocab=50, img_dim=32, n_cls=7, dtype=torch.float32)
    cfg = AdversarialConfig(steps=3, lr_txt=1e-3, lr_img=1e-3, modality="text+image", amp_dtype=torch.bfloat16)
    res = run_step(model, batch, cfg)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert torch.isfinite(res.loss)
    assert res.deltas["text"].dtype == torch.float32 and res.deltas["image"].dtype == torch.float32
    assert res.logits.dtype == torch.float32
    s_txt, s_img = res.perturbation_survival["text"].item(), res.perturbation_survival["image"].item()
    # both measured where the perturbed tensor leaves the injection point: text added in fp32 to the fp32
    # embedding, image as W delta added in fp32 to the bf16 projection's output (the sum is fp32): nothing is
    # lost there (a later matrix product's bf16 cast is what bench/perturbation_survival.py measures)
    assert s_txt == 1.0
    assert s_img == 1.0
    assert int(res.skipped_steps) == 0


def test_survival_is_measured_on_the_last_step_in_the_autocast_dtype_for_an_input_add():
    """An image module that is not a Linear takes the delta into its input, which autocast casts to bfloat16 for
    the projection: the step reports the fraction of the last step's delta (the final deltas) that survives that
    cast, computed here with plain ops. Step 0's delta is zero (survival 1 by definition) and float32 would keep
    every element: neither would give this fraction."""
    torch.manual_seed(0)
    model = Toy(vocab=50, hidden=16, img_dim=32, n_cls=7).train()
    model.img = nn.Sequential(model.img)
    batch = make_batch(b=3, lt=6, ni=4, vocab=50, img_dim=32, n_cls=7, dtype=torch.float32)
    cfg = AdversarialConfig(steps=3, lr_txt=1e-3, lr_img=0.05, modality="image", amp_dtype=torch.bfloat16)
    step = VillaStep(toy_forward(model), vqa_loss, cfg, image_input=model.img)
    res = step.step(batch, None, batch["imask"])
    step.remove_hooks()
    d = res.deltas["image"]
    x = batch["feat"]
    nonzero = d != 0
    want = (((x + d).bfloat16() != x.bfloat16()) & nonzero).sum() / nonzero.sum()
    got = res.perturbation_survival["image"]
    assert 0.05 < float(want) < 0.95  # a partial loss: the check can tell the dtype and the step apart
    torch.testing.assert_close(got, want.float(), rtol=0, atol=1e-6)


def test_linear_image_module_takes_the_split_product_with_the_same_function_and_gradients():
    """A Linear image module: W delta is added to its output instead of delta to its input. Same outputs and the
    same gradients for the delta and the weight (float64); another module keeps the input add."""
    from villa_fast.adversarial.hooks import Injector

    torch.manual_seed(0)
    lin = nn.Linear(6, 4).double()
    wrapped = nn.Sequential(lin)  # not a Linear: the delta goes into its input
    f = torch.randn(3, 5, 6, dtype=torch.float64)
    out = {}
    for name, module in (("split", lin), ("input", wrapped)):
        inj = Injector(None, module)
        assert inj.image_split is (name == "split")
        inj.recording = True
        module(f)
        inj.recording = False
        d = (
            1e-3 * torch.randn(3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ).requires_grad_()
        inj.deltas["image"] = d
        y = module(f)
        g = torch.autograd.grad((y.sin() * torch.arange(4.0, dtype=torch.float64)).sum(), [d, lin.weight, lin.bias])
        out[name] = (y.detach(), *g)
        inj.deltas["image"] = None
        torch.testing.assert_close(module(f), lin(f), rtol=0, atol=0)  # no delta: the plain module
        inj.remove()
        assert not lin._forward_hooks and not lin._forward_pre_hooks and not wrapped._forward_pre_hooks
    for a, b in zip(out["split"], out["input"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_injection_keeps_fp32_under_autocast_and_model_dtype_outside():
    from villa_fast.adversarial.hooks import inject, survival

    x = torch.full((2, 3, 4), 0.04, dtype=torch.bfloat16)
    d = torch.full((2, 3, 4), 1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = inject(x, d)
    assert y.dtype == torch.float32 and survival(x, d, y, y.dtype).item() == 1.0
    y2 = inject(x, d)
    assert y2.dtype == torch.bfloat16 and survival(x, d, y2, y2.dtype).item() == 0.0
    assert survival(x, torch.zeros_like(d), y2, torch.bfloat16).item() == 1.0


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field,value",
    [
        ("steps", 0),
        ("steps", 2.5),
        ("steps", True),
        ("lr_txt", -1.0),
        ("lr_img", float("nan")),
        ("norm_type", "l1"),
        ("max_norm", -0.1),
        ("init_mag", float("inf")),
        ("kl_weight", "1"),
        ("modality", "audio"),
        ("kl_reduction", "none"),
        ("clean_backward", "never"),
        ("amp_dtype", torch.float64),
        ("amp_dtype", "bf16"),
        ("skip_nonfinite", 1),
    ],
)
def test_bad_config_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        AdversarialConfig(**{field: value})


def test_from_villa_config():
    official = {
        "adv_training": True,
        "adv_modality": ["text", "image"],
        "adv_lr_txt": 0.01,
        "adv_lr_img": 0.01,
        "adv_steps": 3,
        "norm_type": "l2",
        "adv_max_norm": 0,
        "adv_init_mag": 0,
        "adv_kl_weight": 1.5,
        "learning_rate": 6e-5,
        "fp16": True,
    }
    cfg = AdversarialConfig.from_villa_config(official)
    assert cfg.modality == "text+image" and cfg.lr_txt == 0.01 and cfg.steps == 3 and cfg.kl_weight == 1.5
    assert cfg.amp_dtype == torch.float16
    assert AdversarialConfig.from_villa_config({"adv_modality": ["text"]}).modality == "text"
    assert AdversarialConfig.from_villa_config({"adv_modality": ["image"]}).modality == "image"
    assert AdversarialConfig.from_villa_config({"adv_modality": ["text", "image", "alter"]}).modality == "alter"
    assert AdversarialConfig.from_villa_config({"fp16": True}, amp_dtype=torch.bfloat16).amp_dtype == torch.bfloat16
    # every key lands in its own field (distinct values: a dropped or swapped key shows)
    every = {"adv_steps": 4, "adv_lr_txt": 0.011, "adv_lr_img": 0.022, "norm_type": "linf", "adv_max_norm": 0.33}
    every.update({"adv_init_mag": 0.44, "adv_kl_weight": 0.55, "adv_modality": ["image"]})
    got = AdversarialConfig.from_villa_config(every)
    assert (got.steps, got.lr_txt, got.lr_img, got.norm_type) == (4, 0.011, 0.022, "linf")
    assert (got.max_norm, got.init_mag, got.kl_weight, got.modality) == (0.33, 0.44, 0.55, "image")
    assert got.amp_dtype is None
    with pytest.raises(ValueError, match="adv_modality"):
        AdversarialConfig.from_villa_config({"adv_modality": ["text", "alter"]})
    with pytest.raises(ValueError, match="steps"):
        AdversarialConfig.from_villa_config({"adv_steps": 0})


def test_step_needs_the_modules_of_its_modality():
    model = make_toy()
    with pytest.raises(ValueError, match="text_embedding"):
        VillaStep(toy_forward(model), vqa_loss, AdversarialConfig(modality="text"))
    with pytest.raises(ValueError, match="image_input"):
        VillaStep(toy_forward(model), vqa_loss, AdversarialConfig(modality="alter"), text_embedding=model.word)
    with pytest.raises(TypeError, match="config"):
        VillaStep(toy_forward(model), vqa_loss, {"steps": 3}, text_embedding=model.word)


def test_lazy_exports():
    import villa_fast

    assert villa_fast.VillaStep is VillaStep and villa_fast.AdversarialConfig is AdversarialConfig
    assert villa_fast.GraphedVillaStep.__name__ == "GraphedVillaStep"
    assert math.isfinite(AdversarialConfig().kl_weight)


def test_adversarial_package_knows_no_model_data_or_reference():
    import ast
    import pathlib

    import villa_fast.adversarial as adv

    forbidden = ("villa_fast.models", "villa_fast.data", "villa_fast.train", "villa_fast.reference")
    for path in pathlib.Path(adv.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for n in names:
                assert not n.startswith(forbidden), f"{path.name} imports {n}"


@pytest.mark.parametrize("clean", ["once", "per_step", "recompute"])
def test_matches_released_loop_with_dropout(clean):
    """With dropout on, the step draws its masks in the released loop's order (clean pass, then each step),
    so the same seed gives the same gradients; the clean pass and step 0 see different masks."""
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, lr_img=0.4, modality="text+image", clean_backward=clean)
    model = make_toy(5, dropout=0.3)
    batch = make_batch(seed=6)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    want_d = toy_reference(model, batch, cfg)
    want = grads_of(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    res = run_step(model, batch, cfg)
    assert_same(grads_of(model), want, "param grad")
    assert_same(res.deltas, want_d, "delta")
    torch.manual_seed(123)
    with torch.no_grad():
        z_a = model(batch["ids"], batch["feat"], batch["tmask"], batch["imask"])
        z_b = model(batch["ids"], batch["feat"], batch["tmask"], batch["imask"])
    assert torch.equal(res.logits, z_a) and not torch.equal(z_a, z_b)


@pytest.mark.parametrize("clean", ["once", "per_step"])
@pytest.mark.parametrize("modality", ["text+image", "alter"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean"])
def test_kl_mask_fn_leaves_padded_rows_out(modality, clean, reduction):
    """Logits padded with rows the task does not own (as masked-token predictions padded to a fixed count
    are): with kl_mask_fn naming the real rows, the step equals the released loop on the real rows alone."""
    cfg = AdversarialConfig(
        steps=3, lr_txt=0.3, lr_img=0.4, modality=modality, kl_reduction=reduction, clean_backward=clean
    )
    model = make_toy(3)
    batch = make_batch(seed=5)
    b = batch["ids"].shape[0]
    # real rows at 0, 2, 3, 5 (of 4 + 3 rows): the padding rows depend on the model too, so a leak would show
    order = torch.tensor([0, 4, 1, 2, 5, 3, 6])
    keep = order < b
    batch["keep"] = keep

    def padded_forward(bt):
        z = model(bt["ids"], bt["feat"], bt["tmask"], bt["imask"])
        return torch.cat([z, 5.0 * z[:3].flip(1) - 2.0])[order]

    model.zero_grad(set_to_none=True)
    want = toy_reference(model, batch, cfg)
    ref = grads_of(model)
    model.zero_grad(set_to_none=True)
    step = VillaStep(
        padded_forward,
        lambda z, bt: vqa_loss(z[bt["keep"]], bt),
        cfg,
        text_embedding=model.word,
        image_input=model.img,
        kl_mask_fn=lambda bt: bt["keep"],
    )
    res = step.step(batch, batch["tmask"], batch["imask"])
    assert_same(grads_of(model), ref, "param grad")
    assert_same(res.deltas, want, "delta")
    # and without the mask the padding rows do change the result
    model.zero_grad(set_to_none=True)
    step.kl_mask_fn = None
    step.step(batch, batch["tmask"], batch["imask"])
    assert rel_err(grads_of(model)["mix.weight"], ref["mix.weight"]) > 1e-3


def test_kl_mask_fn_result_is_checked():
    model = make_toy(0)
    batch = make_batch()
    cfg = AdversarialConfig(steps=2, lr_txt=0.1)
    with pytest.raises(TypeError, match="kl_mask_fn must be callable"):
        VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word, kl_mask_fn=3)
    step = VillaStep(
        toy_forward(model), vqa_loss, cfg, text_embedding=model.word, kl_mask_fn=lambda bt: torch.ones(3).bool()
    )
    with pytest.raises(ValueError, match=r"kl_mask_fn must return a bool tensor \[N\] = \[4\]"):
        step.step(batch)


@pytest.mark.parametrize("clean", ["once", "recompute", "per_step"])
def test_nonfinite_clean_backward_leaves_the_micro_batch_out(clean):
    """The clean graph is part of every step's gradient: when its backward is not finite, "once" and "recompute"
    leave the micro-batch out as "per_step" does (there every step is non-finite)."""
    torch.manual_seed(0)
    model = PoisonToy(poison_at=0).double().train()  # forward 0 is the clean pass
    batch = make_batch()
    cfg = AdversarialConfig(steps=3, lr_txt=0.3, modality="text", clean_backward=clean)
    res = VillaStep(toy_forward(model), vqa_loss, cfg, text_embedding=model.word).step(batch)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    assert int(res.skipped_steps) == (3 if clean == "per_step" else 4)
    assert float(res.loss) == 0.0


def test_finiteness_check_accepts_large_finite_half_gradients():
    from villa_fast.adversarial.step import _all_finite

    big = torch.full((100,), 60000.0, dtype=torch.float16)  # finite, but its 2-norm exceeds float16's range
    assert bool(_all_finite([big, torch.ones(3, dtype=torch.bfloat16)]))
    assert bool(_all_finite([big, torch.ones(2, dtype=torch.float64)]))
    for bad in (float("nan"), float("inf")):
        assert not bool(_all_finite([big, torch.tensor([1.0, bad], dtype=torch.float16)]))
