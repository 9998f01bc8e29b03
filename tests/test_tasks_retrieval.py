"""Image-text retrieval with VILLA: the adversarial step on group rank scores against a float64
transcription of the released loop, standard vs adversarial training, robust evaluation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tests.test_train_fixtures import task_config
from villa_fast.tasks.retrieval import (
    RetrievalTask,
    group_scores,
    rank_attack_loss,
    rank_hinge_loss,
    read_retrieval_scores,
    score_in_minibatches,
)
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

REL = 1e-10  # float64, dropout 0


def _trainer(tmp_path, **changes) -> Trainer:
    return Trainer(resolve_config(None, task_config(tmp_path, "retrieval", **changes)), quiet=True)


def _double(batch: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


# -- the loss and the group layout ------------------------------------------------------------------


def test_group_layout_and_losses_match_the_head():
    from villa_fast.models.heads import UniterForImageTextRetrieval

    torch.manual_seed(0)
    scores = torch.randn(12, 1)
    batch = {"sample_size": 4}
    g = group_scores(scores, batch)
    assert g.shape == (3, 4) and torch.equal(g[1], scores[4:8, 0])
    assert group_scores(scores, {}).shape == (1, 12)  # a validation query: the whole batch is one group
    with pytest.raises(ValueError, match="whole groups"):
        group_scores(scores, {"sample_size": 5})
    head = UniterForImageTextRetrieval.__new__(UniterForImageTextRetrieval)
    head.margin = 0.2
    assert torch.allclose(rank_hinge_loss(g, 0.2), UniterForImageTextRetrieval.loss(head, scores, batch))
    assert rank_hinge_loss(g.double(), 0.2).dtype == torch.float64


def test_attack_loss_is_not_flat_where_the_hinge_is():
    # the positive leads every negative by more than the margin after the sigmoid: the hinge has no gradient
    s = torch.tensor([[6.0, -6.0, -5.0, -7.0]], requires_grad=True)
    (g_hinge,) = torch.autograd.grad(rank_hinge_loss(s, 0.2), s)
    assert torch.count_nonzero(g_hinge) == 0
    (g_att,) = torch.autograd.grad(rank_attack_loss(s), s)
    assert g_att[0, 0] < 0 and (g_att[0, 1:] > 0).all()  # ascent lowers the positive, raises every negative


# -- the adversarial step against the released loop's semantics --------------------------------------


def _released_loop(model, batch, *, steps, lr_txt, lr_img, alpha, margin):
    """VILLA_SPEC section 2 written out on the group scores: zero init, clean scores kept in the graph,
    K forwards with backward(retain_graph=True), per-row l2-normalised delta updates (text, then image);
    task loss UNITER's hinge on sigmoid scores viewed as [-1, sample_size]; KL between the group softmaxes."""
    m = model
    deltas: dict[str, torch.Tensor | None] = {"text": None, "image": None}

    shapes = {}

    def txt_hook(mod, inp, out):
        shapes.setdefault("text", out.shape)
        return out if deltas["text"] is None else out + deltas["text"]

    def img_hook(mod, inp):
        shapes.setdefault("image", inp[0].shape)
        return None if deltas["image"] is None else (inp[0] + deltas["image"], *inp[1:])

    handles = [
        m.uniter.embeddings.word_embeddings.register_forward_hook(txt_hook),
        m.uniter.img_embeddings.img_linear.register_forward_pre_hook(img_hook),
    ]
    size = batch["sample_size"]

    def scores():
        return m(batch).view(-1, size)

    def hinge(z):
        p = torch.sigmoid(z)
        return torch.clamp(margin + p[:, 1:] - p[:, :1], min=0).mean()

    def sym_kl(a, b):
        la, lb = F.log_softmax(a, dim=1), F.log_softmax(b, dim=1)
        kl = F.kl_div(la, lb.exp(), reduction="sum") + F.kl_div(lb, la.exp(), reduction="sum")
        return kl / a.size(0)

    def update(d, lr):
        g = d.grad
        den = g.reshape(g.size(0), -1).norm(dim=1).clamp(min=1e-8).view(-1, 1, 1)
        return (d + lr * g / den).detach()

    try:
        z0 = scores()
        dt = torch.zeros(shapes["text"], dtype=torch.float64)
        di = torch.zeros(shapes["image"], dtype=torch.float64)
        for k in range(steps):
            deltas["text"], deltas["image"] = dt.requires_grad_(), di.requires_grad_()
            z = scores()
            loss = (hinge(z) + alpha * sym_kl(z, z0)) / steps
            loss.backward(retain_graph=True)
            if k < steps - 1:
                dt, di = update(dt, lr_txt), update(di, lr_img)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("negatives", ["hard", "sampled"])
def test_adversarial_step_matches_the_released_loop_on_group_scores(tmp_path, negatives):
    changes = dict(adv_training=True, dropout=0.0, adv_steps=3, adv_modality=["text", "image"], adv_kl_weight=1.5)
    if negatives == "sampled":  # several groups of [pos, neg image, neg text] per micro-batch
        changes.update(hard_neg_size=0, negative_size=1, train_batch_size=4)  # texts (examples) per batch
    trainer = _trainer(tmp_path, **changes)
    model = trainer.model.double()
    batch = _double(trainer.task.prepare(model, next(trainer.source().batches())))
    groups = batch["attn_masks"].size(0) // batch["sample_size"]
    assert groups == 1 if negatives == "hard" else groups > 1
    ref = copy.deepcopy(model)

    calls = []
    step = trainer.adv_step.step
    trainer.adv_step.step = lambda b, **kw: calls.append(r := step(b, **kw)) or r
    model.zero_grad(set_to_none=True)
    trainer.micro_step(batch)
    assert len(calls) == 1 and calls[0].logits.shape == (groups, batch["sample_size"])
    got = {n: p.grad for n, p in model.named_parameters()}

    ref.zero_grad(set_to_none=True)
    c = trainer.cfg
    _released_loop(ref, batch, steps=3, lr_txt=c["adv_lr_txt"], lr_img=c["adv_lr_img"], alpha=1.5, margin=c["margin"])
    want = {n: p.grad for n, p in ref.named_parameters()}
    assert got.keys() == want.keys()
    for n, w in want.items():
        g = got[n]
        assert (g is None) == (w is None), n
        if w is None:
            continue
        assert g.dtype == torch.float64
        err = ((g - w).norm() / w.norm().clamp(min=1e-300)).item()
        assert err <= REL, f"{n}: relative error {err:.2e}"
    # the KL term between the group distributions contributes: without it the gradients differ
    ref.zero_grad(set_to_none=True)
    _released_loop(ref, batch, steps=3, lr_txt=c["adv_lr_txt"], lr_img=c["adv_lr_img"], alpha=0.0, margin=c["margin"])
    w = ref.uniter.embeddings.word_embeddings.weight.grad
    g = model.uniter.embeddings.word_embeddings.weight.grad
    assert ((g - w).norm() / w.norm()).item() > 1e-6


# -- training end to end and robust evaluation ------------------------------------------------------


def test_standard_and_adversarial_training_diverge(tmp_path):
    weights = {}
    for adv in (False, True):
        trainer = _trainer(tmp_path / str(adv), adv_training=adv, num_train_steps=2, valid_steps=2)
        history = trainer.train()
        losses = [e["loss"] for e in history if "loss" in e]
        assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
        val = [e for e in history if "val/r_mean" in e][-1]
        assert 0.0 <= val["val/img_r1"] <= 1.0 and 0.0 <= val["val/txt_r1"] <= 1.0
        weights[adv] = trainer.model.rank_output.weight.detach().clone()
    assert not torch.equal(weights[False], weights[True])


def test_robust_evaluation(tmp_path):
    trainer = _trainer(tmp_path, attack_modality=["text", "image"], attack_eps=2.0, max_val_examples=8)
    # eps 0: the attack cannot move anything, robust recalls equal clean ones
    trainer.cfg["attack_eps"] = 0.0
    m0 = trainer.evaluate("val", robust=True)
    for k in ("img_r1", "img_r5", "txt_r1", "r_mean"):
        assert m0[f"robust_{k}"] == pytest.approx(m0[k])
    trainer.cfg["attack_eps"] = 2.0
    m = trainer.evaluate("val", robust=True)
    assert m["n"] == 8 and {"robust_img_r1", "robust_txt_r1", "robust_r_mean"} <= set(m)
    assert m["img_r1"] == m0["img_r1"]
    # on a query, the attack lowers its image's score and raises the best other image's score
    model, task = trainer.model, trainer.task
    model.eval()
    batch = next(iter(trainer.eval_loader("val")))
    with torch.no_grad():
        clean = task.forward(model, batch)
    attacked = trainer.attack()(lambda b: task.forward(model, b), lambda z, b: task.attack_loss(model, z, b), batch)
    assert clean.shape == attacked.shape == (1, batch["attn_masks"].size(0))
    assert attacked[0, 0] < clean[0, 0] and attacked[0, 1:].max() > clean[0, 1:].max()
    assert rank_attack_loss(attacked) > rank_attack_loss(clean)


# -- evaluation in forwards of inf_minibatch_size pairs ------------------------------------------------------


def _count_rows(model) -> list[int]:
    """Rows of every forward of ``model`` from now on."""
    rows: list[int] = []
    forward = model.forward
    model.forward = lambda batch, *a, **kw: rows.append(int(batch["attn_masks"].size(0))) or forward(batch, *a, **kw)
    return rows


def test_score_in_minibatches_equals_one_forward_float64(tmp_path):
    trainer = _trainer(tmp_path)
    model = trainer.model.double().eval()
    batch = _double(next(iter(trainer.eval_loader("val"))))
    n = batch["attn_masks"].size(0)
    assert n == 12 and len(set(batch["num_bbs"])) > 1  # candidates with different region counts
    with torch.no_grad():
        whole = model(batch)
        rows = _count_rows(model)
        for size in (1, 2, 5, 11, 12, 400):
            rows.clear()
            got = score_in_minibatches(model, batch, size)
            assert rows == ([n] if size >= n else [min(size, n - lo) for lo in range(0, n, size)])
            torch.testing.assert_close(got, whole, rtol=1e-12, atol=1e-12)


def _eval_scores(trainer, prefix) -> tuple[dict, dict]:
    metrics = trainer.evaluate("val", predictions_prefix=str(prefix))
    txt_ids, _, scores = read_retrieval_scores(f"{prefix}.safetensors")
    return metrics, {t: row.tolist() for t, row in zip(txt_ids, scores, strict=True)}


def test_evaluation_honours_inf_minibatch_size_with_the_same_scores(tmp_path):
    # the implementation before inf_minibatch_size: one forward over a text's every candidate
    trainer = _trainer(tmp_path, max_val_examples=6)
    model = trainer.model.eval()
    ref = {}
    with torch.no_grad():
        for batch in trainer.eval_loader("val"):
            scores = group_scores(model(batch), batch).reshape(-1)
            ref[batch["txt_id"]] = torch.roll(scores, shifts=batch["gt_pos"]).tolist()
            if len(ref) == 6:
                break
    results = {}
    for size in (5, 3, 400):
        t = _trainer(tmp_path / str(size), max_val_examples=6, inf_minibatch_size=size)
        t.model.load_state_dict(model.state_dict())
        rows = _count_rows(t.model)
        results[size] = _eval_scores(t, tmp_path / f"pred_{size}")
        # 12 candidates per text: in forwards of at most `size` pairs (400: one forward)
        want = [12] if size >= 12 else [min(size, 12 - lo) for lo in range(0, 12, size)]
        assert rows == want * 6
    for size, (metrics, scores) in results.items():
        assert scores.keys() == ref.keys()
        for txt_id, row in scores.items():
            torch.testing.assert_close(torch.tensor(row), torch.tensor(ref[txt_id]), rtol=1e-5, atol=1e-6)
        assert metrics == results[400][0], size


def test_robust_evaluation_with_minibatches(tmp_path):
    # the clean scores go in forwards of 5 pairs; the attack still sees a query's candidates in one forward
    trainer = _trainer(tmp_path, attack_modality=["text", "image"], attack_eps=0.0, max_val_examples=4)
    plain = trainer.evaluate("val", robust=True)
    trainer = _trainer(tmp_path / "mb", attack_modality=["text", "image"], attack_eps=0.0, max_val_examples=4,
                       inf_minibatch_size=5)  # fmt: skip
    rows = _count_rows(trainer.model)
    m = trainer.evaluate("val", robust=True)
    assert rows[:3] == [5, 5, 2] and set(rows[3:6]) == {12}  # clean in minibatches, then the attack's passes
    for k in ("img_r1", "img_r5", "txt_r1", "r_mean"):
        assert m[k] == pytest.approx(plain[k]) and m[f"robust_{k}"] == pytest.approx(m[k])


@pytest.mark.parametrize("bad", [0, -4, None, 2.5, True, "400"])
def test_inf_minibatch_size_must_be_a_positive_integer(tmp_path, bad):
    cfg = resolve_config(None, {"task": "retrieval"})
    cfg["inf_minibatch_size"] = bad
    with pytest.raises(ConfigError, match=r"'inf_minibatch_size' must be a positive integer.*got"):
        RetrievalTask(cfg)
    if isinstance(bad, int) and not isinstance(bad, bool):  # values the config's own type check lets through
        with pytest.raises(ConfigError, match="inf_minibatch_size"):
            _trainer(tmp_path, inf_minibatch_size=bad)


def test_minibatch_validation_ranks_the_gt_among_the_next_images(tmp_path):
    """Without full_val, validation during training ranks each text's gt image among itself and the next
    inf_minibatch_size - 1 images (the authors' validate on ItmValDataset): the ranks equal those read off the
    full evaluation's score matrix, in float64."""
    trainer = _trainer(tmp_path, inf_minibatch_size=5, max_val_examples=0)
    trainer.model.double()
    assert trainer.task.validation_split(final=False) == "minival"
    assert trainer.task.validation_split(final=True) == "val"
    assert trainer.task.has_split("minival")
    orig = trainer._to_device
    trainer._to_device = lambda b: _double(orig(b))
    full = trainer.evaluate("val", predictions_prefix=str(tmp_path / "full"))
    mini = trainer.evaluate("minival", predictions_prefix=str(tmp_path / "mini"))
    txt_ids, img_ids, matrix = read_retrieval_scores(tmp_path / "full.safetensors")
    scores = {"scores": {t: row.tolist() for t, row in zip(txt_ids, matrix, strict=True)}}
    ranks = json.loads((tmp_path / "mini.json").read_text())["minival_gt_rank"]
    from villa_fast.data import TxtTokLmdb

    tdb = TxtTokLmdb(trainer.cfg["val_txt_db"], -1)
    assert ranks.keys() == scores["scores"].keys() and len(ranks) == mini["n"] == full["n"]
    want = {}
    for txt_id, row in scores["scores"].items():
        k = img_ids.index(tdb.txt2img[txt_id])
        cand = [row[(k + j) % len(img_ids)] for j in range(5)]
        want[txt_id] = sum(s > cand[0] for s in cand[1:])
    assert ranks == want and len(set(want.values())) > 1
    assert set(mini) == {"img_r1", "img_r5", "img_r10", "n"}
    for k in (1, 5, 10):
        assert mini[f"img_r{k}"] == pytest.approx(sum(r < k for r in want.values()) / len(want))
    assert mini["img_r5"] == 1.0  # 5 candidates: the gt is always in the top 5


@pytest.mark.parametrize("full_val", [False, True])
def test_training_validates_on_minibatches_unless_full_val(tmp_path, full_val):
    trainer = _trainer(tmp_path, num_train_steps=4, valid_steps=2, inf_minibatch_size=3, full_val=full_val)
    history = trainer.train()
    splits = [(e["step"], k.split("/")[0]) for e in history for k in e if k.endswith("/n")]
    assert splits == [(2, "val" if full_val else "minival"), (4, "val")]


def test_full_evaluation_items_from_the_image_bank_equal_reading_every_image(tmp_path):
    """The full evaluation reads and pads the split's images once; each text's item, gathered from that bank,
    is element for element the batch built by reading and padding every image for it."""
    from villa_fast.data import ItmValDataset, TxtTokLmdb
    from villa_fast.data.batch import base_batch

    trainer = _trainer(tmp_path)
    cfg = trainer.cfg
    tdb = TxtTokLmdb(cfg["val_txt_db"], -1)
    ds = ItmValDataset(tdb, trainer.task.img_db(cfg["val_img_db"]), mini_batch_size=len(set(tdb.txt2img.values())))
    m = len(ds.all_img_ids)
    reads = []
    real = ds._get_img_feat
    ds._get_img_feat = lambda name: (reads.append(name), real(name))[1]
    for i in range(len(ds)):
        got = ds[i]
        k = ds.all_img_ids.index(tdb.txt2img[ds.ids[i]])
        imgs = [ds.all_img_ids[(k + j) % m] for j in range(m)]
        feats, poss, _ = zip(*map(real, imgs), strict=True)
        ids = tdb.combine_inputs(tdb[ds.ids[i]]["input_ids"])
        want = base_batch([ids] * m, list(feats), list(poss))
        assert got.keys() == want.keys()
        for key, v in want.items():
            if isinstance(v, torch.Tensor):
                assert got[key].dtype == v.dtype and torch.equal(got[key], v), key
            else:
                assert got[key] == v, key
        assert len(set(got["num_bbs"])) > 1  # images of different region counts, rotated per text
    assert sorted(reads) == sorted(ds.all_img_ids)  # each image read once, for the bank
