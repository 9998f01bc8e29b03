"""Task heads: output shapes, loss formulas, gradients; OT alignment; retrieval and RE helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.test_models import make_batch, tiny_config
from villa_fast.models import (
    UniterForImageTextRetrieval,
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForPretraining,
    UniterForReferringExpression,
    UniterForVcr,
    UniterForVqa,
    build_model,
    optimal_transport_dist,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TXT, NBB = [5, 3, 6, 4], [4, 6, 2, 5]


def _cfg():
    return tiny_config()


def _batch_for(task: str, cfg, model) -> dict:
    g = torch.Generator().manual_seed(7)
    batch = make_batch(cfg, TXT, NBB, seed=11)
    b = len(TXT)
    if task in ("vqa", "ve"):
        a = model.num_answer
        batch["targets"] = torch.rand(b, a, generator=g) * (torch.rand(b, a, generator=g) < 0.3)
    elif task in ("nlvr2", "nlvr2_paired"):
        batch["img_type_ids"] = torch.ones(b, max(NBB), dtype=torch.long)
        batch["img_type_ids"][1::2] = 2
        batch["targets"] = torch.tensor([1, 0])
    elif task == "vcr":
        tt = torch.zeros_like(batch["input_ids"])
        tt[:, 2:] = 2
        tt[:, 4:] = 3
        batch["txt_type_ids"] = tt
        batch["input_ids"][:, 1] = cfg.vocab_size + 80  # a person tag
        batch["targets"] = torch.tensor([0, 1, 0, 0])
    elif task in ("itm", "retrieval"):
        batch["sample_size"] = 2
    elif task == "re":
        obj = torch.ones(b, max(NBB), dtype=torch.bool)
        for i, n in enumerate(NBB):
            obj[i, :n] = False
        batch["obj_masks"] = obj
        batch["targets"] = torch.tensor([3, 0, 1, 2])
    return batch


def _expected_loss(task: str, logits, batch, model):
    z = logits.float()
    if task in ("vqa", "ve"):
        t = batch["targets"]
        return F.binary_cross_entropy_with_logits(z, t, reduction="none").mean() * t.size(1)
    if task in ("nlvr2", "nlvr2_paired", "vcr"):
        return F.cross_entropy(z, batch["targets"], reduction="none").mean()
    if task == "re":  # summed over the batch, as the authors' train_re.py
        return F.cross_entropy(z, batch["targets"], reduction="none").sum()
    if task in ("itm", "retrieval"):
        s = torch.sigmoid(z).view(-1, batch["sample_size"])
        return torch.clamp(model.margin + s[:, 1:] - s[:, :1], min=0).mean()
    raise AssertionError(task)


SHAPES = {
    "vqa": (4, 3129),
    "ve": (4, 3),
    "nlvr2": (2, 2),
    "nlvr2_paired": (2, 2),
    "vcr": (4, 2),
    "itm": (4, 1),
    "retrieval": (4, 1),
    "re": (4, max(NBB)),
}
CLASSES = {
    "vqa": UniterForVqa,
    "ve": UniterForVqa,
    "nlvr2": UniterForNlvr2PairedAttn,
    "nlvr2_paired": UniterForNlvr2Paired,
    "vcr": UniterForVcr,
    "itm": UniterForImageTextRetrieval,
    "retrieval": UniterForImageTextRetrieval,
    "re": UniterForReferringExpression,
}


@pytest.mark.parametrize("task", sorted(SHAPES))
def test_head_logits_loss_and_gradient(task):
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_model(task, cfg)
    assert type(model) is CLASSES[task]
    model.train()
    batch = _batch_for(task, cfg, model)
    logits = model(batch)
    assert logits.shape == SHAPES[task]
    loss = model.loss(logits, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(loss, _expected_loss(task, logits, batch, model))
    loss.backward()
    word_grad = model.uniter.embeddings.word_embeddings.weight.grad
    assert word_grad is not None and word_grad.abs().sum() > 0
    assert model.uniter.img_embeddings.img_linear.weight.grad.abs().sum() > 0
    head = [p for n, p in model.named_parameters() if not n.startswith("uniter.") and n != "rank_output.bias"]
    head_used = [p for p in head if p.grad is not None and p.grad.abs().sum() > 0]
    assert head_used, "no head parameter received a gradient"
    # compute_loss=True gives the same number
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch, compute_loss=True), model.loss(model(batch), batch))


def test_task_embeddings_are_expanded():
    cfg = _cfg()
    nlvr2 = build_model("nlvr2", cfg)
    t = nlvr2.uniter.embeddings.token_type_embeddings.weight
    assert t.shape[0] == 3
    torch.testing.assert_close(t[2], t[1])
    vcr = build_model("vcr", cfg)
    t = vcr.uniter.embeddings.token_type_embeddings.weight
    assert t.shape[0] == 4 and vcr.uniter.embeddings.word_embeddings.num_embeddings == cfg.vocab_size + 81
    torch.testing.assert_close(t[2], t[0])
    torch.testing.assert_close(t[3], t[0])
    assert vcr.config.type_vocab_size == 4 and cfg.type_vocab_size == 2  # the caller's config is untouched
    with pytest.raises(ValueError, match="unknown task"):
        build_model("vqa2", cfg)


def test_nlvr2_paired_concatenates_the_pair():
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForNlvr2Paired(cfg).eval()
    batch = _batch_for("nlvr2_paired", cfg, model)
    with torch.no_grad():
        pooled = model.uniter.pooler(
            model.uniter(
                batch["input_ids"],
                batch["position_ids"],
                batch["img_feat"],
                batch["img_pos_feat"],
                batch["attn_masks"],
                batch["gather_index"],
                img_type_ids=batch["img_type_ids"],
            )
        )
        expect = model.nlvr2_output(torch.cat([pooled[0::2], pooled[1::2]], dim=-1))
        torch.testing.assert_close(model(batch), expect)


# -- retrieval -----------------------------------------------------------------------------------


def test_retrieval_hard_negatives_keep_the_top_scores():
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForImageTextRetrieval(cfg, hard_size=2).train()
    txt = [5] * 6
    batch = make_batch(cfg, txt, [4, 6, 2, 5, 3, 6], seed=2)
    batch["input_ids"] = batch["input_ids"][:1]  # one text against six images, as in the recipe
    hard = model.hard_negative_batch(batch)
    assert model.training
    full = dict(batch, input_ids=batch["input_ids"].expand(6, -1))
    model.eval()
    with torch.no_grad():
        scores = model(full).squeeze(-1)
    top = set((scores[1:].topk(2).indices + 1).tolist())
    assert hard["sample_size"] == 3 and hard["attn_masks"].size(0) == 3
    picked = {i for i in range(1, 6) if any(torch.equal(batch["img_feat"][i], f) for f in hard["img_feat"][1:])}
    assert picked == top
    assert torch.equal(hard["img_feat"][0], batch["img_feat"][0])
    kept = [0] + sorted(
        picked, key=lambda i: [torch.equal(batch["img_feat"][i], f) for f in hard["img_feat"]].index(True)
    )
    assert hard["num_bbs"] == [batch["num_bbs"][i] for i in kept] and len(hard["txt_lens"]) == 3
    # two groups of three: the top negative of each group is kept
    two = dict(full, sample_size=3)
    hard2 = model.hard_negative_batch(two, 1)
    assert hard2["sample_size"] == 2 and hard2["attn_masks"].size(0) == 4
    for grp in range(2):
        best = 3 * grp + 1 + int(scores[3 * grp + 1 : 3 * grp + 3].argmax())
        assert torch.equal(hard2["img_feat"][2 * grp], batch["img_feat"][3 * grp])
        assert torch.equal(hard2["img_feat"][2 * grp + 1], batch["img_feat"][best])
    assert hard["input_ids"].size(0) == 1  # the shared text is broadcast by forward
    assert model(hard).shape == (3, 1)
    torch.testing.assert_close(model(hard), model(dict(hard, input_ids=hard["input_ids"].expand(3, -1))))


# -- referring expressions -------------------------------------------------------------------------


def test_re_image_hidden_matches_per_row_slices():
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForReferringExpression(cfg).eval()
    batch = _batch_for("re", cfg, model)
    seq = torch.randn(len(TXT), batch["attn_masks"].size(1), cfg.hidden_size)
    got = model.image_hidden(seq, batch)
    for i, (tl, n) in enumerate(zip(TXT, NBB, strict=True)):
        torch.testing.assert_close(got[i, :n], seq[i, tl : tl + n])
        assert got[i, n:].abs().sum() == 0
    derived = dict(batch)
    del derived["txt_lens"]
    torch.testing.assert_close(model.image_hidden(seq, derived), got)
    with torch.no_grad():
        scores = model(batch)
    assert (scores[1, NBB[1] :] == -1e4).all() or NBB[1] == max(NBB)
    assert (scores[2, NBB[2] :] == -1e4).all()


def test_re_accepts_uint8_and_bool_obj_masks():
    """re_collate emits obj_masks as uint8; the model takes it as it is, the same as a bool mask."""
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForReferringExpression(cfg).eval()
    batch = _batch_for("re", cfg, model)
    as_u8 = dict(batch, obj_masks=batch["obj_masks"].to(torch.uint8))
    with torch.no_grad():
        ref = model(batch)
    got = model(as_u8)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    model.train()
    loss = model(as_u8, compute_loss=True)
    loss.backward()
    assert torch.isfinite(loss) and model.re_output.weight.grad.abs().sum() > 0


# -- pre-training ------------------------------------------------------------------------------------


def _pretrain_batch(cfg, task):
    g = torch.Generator().manual_seed(5)
    batch = make_batch(cfg, TXT, NBB, seed=9)
    b, lt = batch["input_ids"].shape
    total = batch["attn_masks"].size(1)
    batch["task"] = task
    if task == "mlm":
        labels = torch.full((b, lt), -1, dtype=torch.long)
        labels[0, 2], labels[1, 1], labels[3, 3] = 7, 9, 11
        batch["txt_labels"] = labels
    elif task in ("mrfr", "mrc", "mrckl"):
        img_masks = torch.zeros(b, max(NBB), dtype=torch.bool)
        img_masks[0, 1] = img_masks[2, 0] = img_masks[3, 4] = True
        tgt = torch.zeros(b, total, dtype=torch.bool)
        for i, (tl, nbb) in enumerate(zip(TXT, NBB, strict=True)):
            tgt[i, tl : tl + nbb] = img_masks[i, :nbb]
        batch["img_masks"] = img_masks
        batch["img_mask_tgt"] = tgt
        batch["feat_targets"] = batch["img_feat"][img_masks]
        soft = torch.rand(3, 1601, generator=g).softmax(-1)
        batch["label_targets"] = soft
    elif task == "itm":
        batch["targets"] = torch.tensor([1, 0, 1, 0])
        max_tl = lt
        scatter = torch.arange(total).unsqueeze(0).repeat(b, 1)
        for i, tl in enumerate(TXT):
            scatter[i, tl:] = torch.arange(max_tl, max_tl + total - tl)
        txt_pad = torch.ones(b, max_tl, dtype=torch.bool)
        img_pad = torch.ones(b, max(NBB), dtype=torch.bool)
        for i, (tl, nbb) in enumerate(zip(TXT, NBB, strict=True)):
            txt_pad[i, :tl] = False
            img_pad[i, :nbb] = False
        batch["ot_inputs"] = {"ot_scatter": scatter, "txt_pad": txt_pad, "img_pad": img_pad}
    return batch


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm"])
def test_pretraining_tasks(task):
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForPretraining(cfg).train()
    batch = _pretrain_batch(cfg, task)
    out = model(batch)
    z = out["logits"]
    if task == "mlm":
        assert z.shape == (3, cfg.vocab_size)
        expect = F.cross_entropy(z, torch.tensor([7, 9, 11]))
    elif task == "mrfr":
        assert z.shape == (3, cfg.img_dim)
        expect = F.mse_loss(z, batch["feat_targets"])
    elif task == "mrc":
        assert z.shape == (3, 1601)
        expect = F.cross_entropy(z, batch["label_targets"][:, 1:].argmax(-1) + 1)
    elif task == "mrckl":
        expect = (batch["label_targets"] * (batch["label_targets"].log() - z.log_softmax(-1))).mean()
    else:
        assert z.shape == (4, 2) and out["ot_dist"].shape == (4,)
        d = out["ot_dist"]
        expect = F.cross_entropy(z, batch["targets"]) + 0.1 * (d[0] + d[2] - d[1] - d[3]) / 4
    loss = model.loss(out, batch)
    torch.testing.assert_close(loss, expect)
    loss.backward()
    assert model.uniter.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_pretraining_heads_are_tied():
    torch.manual_seed(0)
    cfg = _cfg()
    model = UniterForPretraining(cfg).eval()
    names = {n for n, _ in model.named_parameters()}
    assert "cls.predictions.decoder.weight" not in names and "feat_regress.weight" not in names
    h = torch.randn(3, cfg.hidden_size)
    with torch.no_grad():
        before = model.cls(h)
        model.uniter.embeddings.word_embeddings.weight[5] += torch.randn(cfg.hidden_size)
        after = model.cls(h)
        assert not torch.allclose(before[:, 5], after[:, 5]) and torch.equal(before[:, 6], after[:, 6])
        reg = model.feat_regress(h)
        w = model.uniter.img_embeddings.img_linear.weight
        torch.testing.assert_close(reg, model.feat_regress.net(h) @ w + model.feat_regress.bias)


# -- optimal transport -------------------------------------------------------------------------------


def _ipot_dense(cost: torch.Tensor, beta=0.5, iters=50) -> torch.Tensor:
    """IPOT on one unpadded [M, N] cost, written directly from the algorithm (plan [M, N])."""
    m, n = cost.shape
    a = torch.full((m, 1), 1.0 / m, dtype=cost.dtype)
    b = torch.full((n, 1), 1.0 / n, dtype=cost.dtype)
    g = torch.exp(-cost / beta)
    t = torch.ones(m, n, dtype=cost.dtype)
    sig = torch.full((m, 1), 1.0 / m, dtype=cost.dtype)
    for _ in range(iters):
        q = g * t
        dlt = b / (q.t() @ sig)  # [N, 1]
        sig = a / (q @ dlt)  # [M, 1]
        t = sig * q * dlt.t()
    return t


def test_ot_distance_matches_unpadded_ipot():
    torch.manual_seed(0)
    lens_t, lens_i = [5, 3, 4], [6, 2, 4]
    b, m, n, d = 3, 5, 6, 8
    txt = torch.randn(b, m, d, dtype=torch.float64, requires_grad=True)
    img = torch.randn(b, n, d, dtype=torch.float64)
    txt_pad = torch.arange(m).unsqueeze(0) >= torch.tensor(lens_t).unsqueeze(1)
    img_pad = torch.arange(n).unsqueeze(0) >= torch.tensor(lens_i).unsqueeze(1)
    dist = optimal_transport_dist(txt, img, txt_pad, img_pad)
    for i in range(b):
        x, y = txt[i, : lens_t[i]].detach(), img[i, : lens_i[i]]
        cost = 1 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).t()
        plan = _ipot_dense(cost)
        torch.testing.assert_close(dist[i].detach(), (cost * plan).sum(), rtol=1e-6, atol=1e-8)
        # the plan's marginals are close to uniform
        torch.testing.assert_close(
            plan.sum(1), torch.full((lens_t[i],), 1.0 / lens_t[i], dtype=plan.dtype), atol=1e-3, rtol=0
        )
    dist.sum().backward()
    assert txt.grad[0].abs().sum() > 0 and txt.grad[1, 3:].abs().sum() == 0


def test_vcr_rebuilt_from_its_source_config_has_the_same_shapes(tmp_path):
    """UniterForVcr adds 81 token rows and two type rows to the config it is given; the config it records for
    rebuilding (and the trainer's log/model.json) is that given one, so a rebuild does not add them twice."""
    import json
    import warnings

    from tests.test_train_fixtures import task_config
    from villa_fast.models import UniterConfig, UniterForVcr
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    cfg = UniterConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    m = UniterForVcr(cfg)
    assert m.uniter.config.vocab_size == 181 and m.source_config.vocab_size == 100
    again = UniterForVcr(m.source_config.to_dict())
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer = Trainer(resolve_config(None, task_config(tmp_path, "vcr")), quiet=True)
    trainer._prepare_output()
    written = json.loads((trainer.output_dir / "log" / "model.json").read_text())
    rebuilt = UniterForVcr(written)
    assert rebuilt.uniter.config.vocab_size == trainer.model.uniter.config.vocab_size
