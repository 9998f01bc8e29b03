"""Adversarial pre-training in fixed shapes (``adv_graphed``): MLM and ITM batches padded, MLM's masked-token
predictions a fixed number of rows whose padding the loss and the consistency term leave out."""

from __future__ import annotations

import itertools
import math
import random
import warnings

import pytest
import torch

from tests.test_train_fixtures import task_config
from villa_fast.adversarial import AdversarialConfig, VillaStep
from villa_fast.data import mlm_capacity, mlm_rows, pad_batch
from villa_fast.data.pretrain import random_word
from villa_fast.ops import sym_kl
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer


def _trainer(tmp_path, **changes):
    cfg = resolve_config(None, task_config(tmp_path, "pretrain", adv_training=True, dropout=0.0, **changes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "GraphedVillaStep runs eagerly: CUDA is not available"
        return Trainer(cfg, quiet=True)


def _first(trainer, task, n=1):
    """The first ``n`` batches of ``task`` from the training mix."""
    out = []
    for b in itertools.islice(trainer.source().batches(), 400):
        if b["task"] == task:
            out.append(b)
            if len(out) == n:
                return out
    raise AssertionError(f"no {task} batch in the first 400")


# ------------------------------------------------------------------------------------------- the rows


def test_mlm_rows_lists_the_targets_row_major_then_padding():
    labels = torch.full((3, 6), -1)
    labels[0, 2], labels[2, 1], labels[2, 4] = 11, 12, 13
    index, lab = mlm_rows(labels, 0.15)
    cap = mlm_capacity(3, 6, 0.15)
    assert index.shape == lab.shape == (cap,) and index.dtype == lab.dtype == torch.long
    assert index[:3].tolist() == [2, 13, 16] and lab[:3].tolist() == [11, 12, 13]
    assert (lab[3:] == -1).all() and (index[3:] == 0).all()
    # without the probability, or with more targets than the capacity: every text position
    assert mlm_rows(labels)[0].numel() == 18
    full = torch.arange(18).reshape(3, 6)
    index, lab = mlm_rows(full, 0.01)
    assert mlm_capacity(3, 6, 0.01) < 18 and index.tolist() == list(range(18)) and lab.tolist() == list(range(18))
    with pytest.raises(ValueError, match="mask_prob is a probability"):
        mlm_capacity(3, 6, 1.2)


def test_mlm_capacity_holds_the_batches_masking_draws():
    """The BERT masking of random batches (lengths anywhere up to the padded width, the at-least-one rule
    included) never exceeds the capacity of the shape, which is a multiple of 8 below the full text block."""
    rng = random.Random(0)
    for rows, width, p in [(4, 8, 0.15), (32, 24, 0.15), (100, 22, 0.15), (16, 40, 0.3), (8, 5, 0.0)]:
        cap = mlm_capacity(rows, width, p)
        assert cap % 8 == 0 or cap == rows * width
        assert cap <= rows * width
        worst = 0
        for _ in range(300):
            n = 0
            for _ in range(rows):
                tokens = [5] * rng.randint(1, width - 2)
                n += sum(lab != -1 for lab in random_word(tokens, (10, 20), 3, rng, p)[1])
            worst = max(worst, n)
        assert worst <= cap, (rows, width, p, worst, cap)
        if rows >= 32:  # and it is not the whole block: the point of a capacity
            assert cap < 0.5 * rows * width


# --------------------------------------------------------------------------------------- the loaders


def test_graphed_pretraining_pads_the_adversarial_tasks_within_the_graph_budget(tmp_path):
    trainer = _trainer(tmp_path, adv_graphed=True, adv_max_graphs=8)
    loaders = trainer.source().loaders
    padded = {k: v[1].pad_buckets for k, v in loaders.items()}
    assert padded["tiny_mrfr"] is None and padded["tiny_mrckl"] is None  # standard steps: authors' batches
    budget = 0
    for key in ("tiny_mlm", "tiny_itm"):
        pb = padded[key]
        assert pb is not None
        dims = loaders[key][1].dataset.pad_dims
        assert (pb.txt[-1], pb.img[-1]) == (max(t for t, _ in dims), max(n for _, n in dims))
        budget += len(pb.txt) * len(pb.img)
    assert budget <= 8  # the two adversarial loaders share adv_max_graphs
    p = trainer.cfg["mlm_prob"]
    for b in _first(trainer, "mlm", 6):
        lt, n = b["input_ids"].size(1), b["img_feat"].size(1)
        assert lt in padded["tiny_mlm"].txt and n in padded["tiny_mlm"].img
        assert b["mlm_index"].numel() == mlm_capacity(b["input_ids"].size(0), lt, p)
        real = b["mlm_labels"] != -1
        assert int(real.sum()) == int((b["txt_labels"] != -1).sum())
        assert torch.equal(b["mlm_labels"][real], b["txt_labels"][b["txt_labels"] != -1])
    for b in _first(trainer, "itm", 4):
        assert b["input_ids"].size(1) in padded["tiny_itm"].txt and b["img_feat"].size(1) in padded["tiny_itm"].img


def test_one_graph_signature_per_task_and_padded_shape(tmp_path):
    from torch.utils import _pytree as pytree

    trainer = _trainer(tmp_path, adv_graphed=True)
    keys, shapes = set(), set()
    batches = [b for b in itertools.islice(trainer.source().batches(), 60) if b["task"] in ("mlm", "itm")]
    for b in batches:
        sb = trainer.task.step_batch(b)
        assert sb["task"] == b["task"]
        assert all(
            isinstance(v, torch.Tensor) for v in pytree.tree_leaves({k: v for k, v in sb.items() if k != "task"})
        )
        shapes.add((b["task"], b["input_ids"].shape, b["img_feat"].shape))
        keys.add(trainer.adv_step._key(*pytree.tree_flatten(sb), *trainer.task.adv_masks(b), False))
    assert len(keys) == len(shapes) < len(batches)


# ------------------------------------------------------------------------------------- the numbers


@pytest.mark.parametrize("task", ["mlm", "itm"])
def test_padding_changes_no_loss_and_no_kl(tmp_path, task):
    """A batch and the same batch padded to its fixed shape: same task loss, same consistency term (the MLM
    padding rows left out by the task's kl_mask), eval mode, float32."""
    trainer = _trainer(tmp_path)
    trainer.model.eval()
    batch = _first(trainer, task)[0]
    padded = pad_batch(dict(batch), batch["input_ids"].size(1) + 3, batch["img_feat"].size(1) + 2)
    t = trainer.task
    with torch.no_grad():
        z, zp = t.forward(trainer.model, batch), t.forward(trainer.model, padded)
        loss, loss_p = t.loss(trainer.model, z, batch), t.loss(trainer.model, zp, padded)
        torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
        rows = t.kl_mask(padded)
        if task == "mlm":
            assert zp.size(0) > z.size(0) and int(rows.sum()) == z.size(0)
            torch.testing.assert_close(zp[rows], z, rtol=1e-5, atol=1e-5)
        else:
            assert rows is None and zp.shape == z.shape
        # the consistency term against a class-reversed copy (rows stay paired, as clean and perturbed are)
        kl, kl_p = sym_kl(z, z.flip(1)), sym_kl(zp, zp.flip(1), row_mask=rows)
        torch.testing.assert_close(kl_p, kl, rtol=1e-5, atol=1e-6)


def _double(batch):
    return {
        k: (
            v.double()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            else _double(v)
            if isinstance(v, dict)
            else v
        )
        for k, v in batch.items()
    }


@pytest.mark.parametrize("task, ot", [("mlm", 0.1), ("itm", 0.0), ("itm", 0.1)])
def test_villa_step_on_the_padded_batch_equals_the_unpadded_one(tmp_path, task, ot):
    """The whole VILLA step (K = 3, text + image, float64): parameter gradients, loss and deltas of a padded
    pre-training batch are those of the authors' unpadded one. With ITM's optimal-transport term to 1e-5: its
    transport plan handles padding by a large constant, as the authors' does (their batches pad too)."""
    trainer = _trainer(tmp_path, itm_ot_lambda=ot)
    model = trainer.model.double().train()  # dropout 0
    t = trainer.task
    raw = _first(trainer, task)[0]
    batch = _double(raw)
    padded = _double(pad_batch(dict(raw), raw["input_ids"].size(1) + 4, raw["img_feat"].size(1) + 3))
    cfg = AdversarialConfig(steps=3, lr_txt=0.05, lr_img=0.05, modality="text+image", kl_weight=1.5)
    step = VillaStep(
        lambda b: t.forward(model, b),
        lambda z, b: t.loss(model, z, b),
        cfg,
        text_embedding=model.uniter.embeddings.word_embeddings,
        image_input=model.uniter.img_embeddings.img_linear,
        params=[p for p in model.parameters() if p.requires_grad],
        kl_mask_fn=t.kl_mask,
    )
    results, grads = [], []
    for b in (batch, t.step_batch(padded)):
        model.zero_grad(set_to_none=True)
        results.append(step.step(b))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (r, rp), (g, gp) = results, grads
    rel = 1e-5 if task == "itm" and ot else 1e-9
    assert g.keys() == gp.keys() and len(g) > 10
    for name in g:
        torch.testing.assert_close(gp[name], g[name], rtol=rel, atol=rel * g[name].abs().max().item(), msg=name)
    torch.testing.assert_close(rp.loss, r.loss, rtol=rel, atol=0)
    lt, n = batch["input_ids"].size(1), batch["img_feat"].size(1)
    torch.testing.assert_close(
        rp.deltas["text"][:, :lt], r.deltas["text"], rtol=rel, atol=rel * r.deltas["text"].abs().max().item()
    )
    torch.testing.assert_close(
        rp.deltas["image"][:, :n], r.deltas["image"], rtol=rel, atol=rel * r.deltas["image"].abs().max().item()
    )
    assert rp.deltas["text"][:, lt:].abs().max() == 0 and rp.deltas["image"][:, n:].abs().max() == 0


def test_graphed_pretraining_trains(tmp_path):
    trainer = _trainer(tmp_path, adv_graphed=True, num_train_steps=8, valid_steps=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = trainer.train()
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert "val/mlm_acc" in history[-1] or any("val/mlm_acc" in e for e in history)


def test_itm_fixed_sizes_hold_every_epochs_negatives(tmp_path):
    """ITM re-draws its negatives each epoch, so its examples' region counts change: the largest fitted size is
    the most regions of any image, and a concatenation follows each epoch's sizes."""
    trainer = _trainer(tmp_path, adv_graphed=True)
    cfg = trainer.cfg
    entry = dict(cfg["train_datasets"][0])
    ds, _ = trainer.task._dataset("itm", trainer.task._entry_pairs(entry, "train_datasets") * 2, cfg["max_txt_len"])
    first = ds.datasets[0]
    most = max(first.img_db.name2nbb[i] for i in first.all_imgs)
    assert ds.pad_bounds == [(max(first.txt_lens) + 2, most)] * 2
    pb = trainer.task.pad_buckets(ds)
    assert pb.img[-1] == most and pb.txt[-1] == max(first.txt_lens) + 2
    before = list(ds.pad_dims)
    for epoch in range(1, 6):
        ds.set_epoch(epoch, 7)
        assert ds.pad_dims == [p for d in ds.datasets for p in d.pad_dims]
        assert ds.lens == [t + n - 2 for t, n in ds.pad_dims]
        assert all(pb.shape_of(t, n) in pb.shapes() for t, n in ds.pad_dims)
    assert ds.pad_dims != before  # the negatives did change


def test_itm_losses_read_the_ot_of_their_own_forward_under_half_precision():
    """``alter`` runs both perturbed forwards before either loss; under autocast the step hands each loss its
    logits cast to float32. Each loss must read the OT distance of its own forward, not the newest one, however
    many forwards ran before (micro-batches and adversarial steps: no bookkeeping limit may drop an entry)."""
    import gc

    import torch

    from villa_fast.adversarial.step import _loss_dtype
    from villa_fast.tasks.pretrain import PretrainTask

    task = PretrainTask({"itm_ot_lambda": 0.1})

    class Model:
        calls = 0
        seen = None

        def __call__(self, batch):
            Model.calls += 1
            return {"logits": torch.randn(2, 2, dtype=torch.bfloat16), "ot_dist": torch.full((2,), float(Model.calls))}

        def loss(self, out, batch):
            Model.seen = out["ot_dist"]
            return torch.zeros(())

    m = Model()
    for _ in range(4):  # earlier micro-batches: their logits die, and so do their entries
        task.loss(m, _loss_dtype(task.forward(m, {})), {"task": "itm"})
    gc.collect()
    assert len(task._ot) == 0
    zs = [_loss_dtype(task.forward(m, {})) for _ in range(11)]  # forwards 5..15, then their losses
    for n, z in zip(range(5, 16), zs, strict=True):
        task.loss(m, z, {"task": "itm"})
        assert Model.seen[0].item() == float(n)
    # a copy of the logits (a caller that does not hand the loss the forward's tensor) reads the newest forward's
    task.loss(m, zs[0].clone(), {"task": "itm"})
    assert Model.seen[0].item() == 15.0
