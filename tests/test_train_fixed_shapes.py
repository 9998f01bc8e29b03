"""Training batches for a CUDA-graphed VILLA step (``adv_graphed``) come in a few fixed padded shapes."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from tests.test_train_fixtures import task_config
from villa_fast.data import PadBuckets
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer


def _batches(tmp_path, n, **changes):
    cfg = resolve_config(None, task_config(tmp_path, "vqa", adv_training=True, **changes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "GraphedVillaStep runs eagerly: CUDA is not available"
        trainer = Trainer(cfg, quiet=True)
    return trainer, list(itertools.islice(trainer.source().batches(), n))


def test_graphed_training_pads_to_bucket_shapes(tmp_path):
    _, plain = _batches(tmp_path / "plain", 12)
    trainer, fixed = _batches(tmp_path / "graphed", 12, adv_graphed=True)
    loader = trainer.source().loader
    pb = loader.pad_buckets
    # fitted to the training set: the sizes that pad its examples least, the largest its largest
    dims = loader.dataset.pad_dims
    assert (pb.txt, pb.img) == (PadBuckets.fit(dims).txt, PadBuckets.fit(dims).img)
    assert (pb.txt[-1], pb.img[-1]) == (max(t for t, _ in dims), max(n for _, n in dims))
    assert len(pb.txt) * len(pb.img) <= trainer.cfg["adv_max_graphs"]
    for b in fixed:
        lt, n = b["input_ids"].size(1), b["img_feat"].size(1)
        assert lt in pb.txt and n in pb.img
        assert b["attn_masks"].size(1) == lt + n == b["gather_index"].size(1)
        # one batch size per padded shape, the padding masked out
        assert int(b["attn_masks"].sum()) == sum(b["txt_lens"]) + sum(b["num_bbs"])
    shapes = {(b["input_ids"].shape, b["img_feat"].shape) for b in fixed}
    assert len(shapes) <= len(pb.txt) * len(pb.img)
    # without adv_graphed the authors' batches: padded to their longest row only
    for b in plain:
        assert b["input_ids"].size(1) == max(b["txt_lens"])


def test_graphed_training_runs_on_the_padded_batches(tmp_path):
    cfg = resolve_config(None, task_config(tmp_path, "vqa", adv_training=True, adv_graphed=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = Trainer(cfg, quiet=True).train()
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)


def test_one_graph_signature_per_padded_shape(tmp_path):
    """What the graphed step keys its graphs on: the step batch (tensors only for VQA), so batches of one padded
    shape share a graph; the full batch's per-row length lists would make each batch a signature of its own."""
    from torch.utils import _pytree as pytree

    trainer, fixed = _batches(tmp_path, 24, adv_graphed=True)
    step = trainer.adv_step

    def key(batch):
        b = trainer.task.step_batch(trainer.task.prepare(trainer.model, batch))
        t, i = trainer.task.adv_masks(batch)
        return step._key(*pytree.tree_flatten(b), t, i, False)

    shapes = {(b["input_ids"].shape, b["img_feat"].shape) for b in fixed}
    assert len({key(b) for b in fixed}) == len(shapes) < len(fixed)
    full = {step._key(*pytree.tree_flatten(b), None, None, False) for b in fixed}
    assert len(full) > len(shapes)


def _variant(task, model) -> dict:
    if task == "retrieval":  # sampled negatives: batches of 2 texts, 1 + 2 * 2 rows each
        return {"hard_neg_size": 0, "negative_size": 2, "train_batch_size": 2} if model == "sampled" else {}
    return {"model": model} if model else {}


def _trainer(tmp_path, task, **changes):
    cfg = resolve_config(None, task_config(tmp_path, task, adv_training=True, dropout=0.0, **changes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return Trainer(cfg, quiet=True)


@pytest.mark.parametrize(
    "task, model",
    [
        ("vqa", None),
        ("re", None),
        ("nlvr2", "paired-attn"),
        ("nlvr2", "paired"),
        ("nlvr2", "triplet"),
        ("vcr", None),
        ("retrieval", "sampled"),
        ("retrieval", "hard"),
    ],
)
def test_padding_to_a_bucket_changes_no_loss_and_no_kl(tmp_path, task, model):
    """The padded positions are masked everywhere: the task loss and the VILLA consistency term of a batch are
    those of the same batch padded to its bucket shape (eval mode, float32)."""
    from villa_fast.ops import sym_kl

    trainer = _trainer(tmp_path, task, **_variant(task, model))
    trainer.model.eval()
    batch = trainer.task.prepare(trainer.model, next(iter(trainer.source().batches())))
    graphed = dict(trainer.cfg, adv_training=True, adv_graphed=True)
    padded = type(trainer.task)(graphed).pad_buckets()(dict(batch))
    assert padded["input_ids"].shape != batch["input_ids"].shape or padded["img_feat"].shape != batch["img_feat"].shape
    with torch.no_grad():
        z, zp = trainer.task.forward(trainer.model, batch), trainer.task.forward(trainer.model, padded)
        loss, loss_p = trainer.task.loss(trainer.model, z, batch), trainer.task.loss(trainer.model, zp, padded)
        torch.testing.assert_close(loss_p, loss, rtol=1e-5, atol=1e-6)
        # the KL against a shifted copy of the logits, as the step computes it between clean and perturbed passes
        # (RE's region logits gain padded regions at -1e4 on both sides: they add nothing)
        kl, kl_p = sym_kl(z, z.roll(1, 0)), sym_kl(zp, zp.roll(1, 0))
        torch.testing.assert_close(kl_p, kl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task", ["re"])
def test_example_counted_training_pads_too(tmp_path, task):
    pb = PadBuckets()
    trainer = _trainer(tmp_path, task, adv_graphed=True)
    batches = list(itertools.islice(trainer.source().batches(), 6))
    for b in batches:
        assert b["input_ids"].size(1) in pb.txt and b["img_feat"].size(1) in pb.img
        assert b["obj_masks"].shape == b["img_feat"].shape[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = trainer.train()
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)


@pytest.mark.parametrize(
    "task, model, rows, counted, budget",
    [
        ("nlvr2", "paired-attn", 2, 2, 1600),
        ("nlvr2", "paired", 2, 2, 1600),
        ("nlvr2", "triplet", 1, 1, 800),
        ("vcr", None, 4, 1, 1600),
    ],
)
def test_multi_row_graphed_training_pads_within_the_token_budget(tmp_path, task, model, rows, counted, budget):
    """NLVR2 and VCR under ``adv_graphed``: the task's bucket shapes, one batch size per shape, and each example's
    padded rows within train_batch_size as the authors count them (both rows of an NLVR2 paired example; a VCR
    question at its priced length, at least one padded row: see the VCR test below)."""
    extra = {"model": model} if model else {}
    # budgets the tiny data fills: a few batches of its largest shape
    trainer = _trainer(
        tmp_path, task, adv_graphed=True, num_train_steps=3, valid_steps=100, train_batch_size=budget, **extra
    )
    pb = trainer.source().loader.pad_buckets
    dims = trainer.source().loader.dataset.pad_dims
    # the largest sizes are the data's: a triplet row's regions are both images'
    assert (pb.txt[-1], pb.img[-1]) == (max(t for t, _ in dims), max(n for _, n in dims))
    budget = trainer.cfg["train_batch_size"]
    batches = list(itertools.islice(trainer.source().batches(), 12))
    sizes: dict[tuple, set] = {}
    for b in batches:
        lt, n = b["input_ids"].size(1), b["img_feat"].size(1)
        assert lt in pb.txt and n in pb.img, (lt, n)
        n_ex = trainer.task.n_examples(b)
        assert b["input_ids"].size(0) == rows * n_ex
        assert counted * n_ex * (lt + n) <= budget
        assert int(b["attn_masks"].sum()) == sum(b["txt_lens"]) + sum(b["num_bbs"])
        sizes.setdefault((lt, n), set()).add(n_ex)
    assert all(len(v) == 1 for v in sizes.values()), sizes
    # the graph signature: one per padded shape (the per-row length lists stay out of the step batch)
    from torch.utils import _pytree as pytree

    step = trainer.adv_step
    keys = set()
    for b in batches:
        sb = trainer.task.step_batch(trainer.task.prepare(trainer.model, b))
        assert all(isinstance(v, torch.Tensor) for v in sb.values())
        keys.add(step._key(*pytree.tree_flatten(sb), *trainer.task.adv_masks(b), False))
    assert len(keys) == len(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = trainer.train()
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)


def test_vcr_graphed_batches_pad_rows_tightly_and_keep_the_authors_price(tmp_path):
    """VCR under ``adv_graphed``: the text pads to the longest row a question makes (its official length prices
    four rows together), while a batch holds as many questions as the authors' pricing (id2len + regions, the
    batch's largest) allows, one batch size per padded shape."""
    trainer = _trainer(tmp_path, "vcr", adv_graphed=True, num_train_steps=2, valid_steps=100, train_batch_size=1600)
    loader = trainer.source().loader
    ds, sampler, budget = loader.dataset, loader.sampler, trainer.cfg["train_batch_size"]
    assert ds.pad_prices == ds.lens
    # regions: the records' own counts bound the padding (the gt db lists 100 for every image: the price)
    for part in ds.datasets:
        assert part.exact_region_counts
        assert all(d[1] < p - t for d, p, t in zip(part.pad_dims, part.lens, part.txt_lens, strict=True))
    # the rows' bound is a fraction of the priced text (the fixture follows the official convention: four
    # Q->A rows priced together, plus the longest rationale)
    for (bound, n), price in zip(ds.pad_dims, ds.pad_prices, strict=True):
        assert bound - 4 <= price - n
    assert 2 * sum(d[0] for d in ds.pad_dims) < sum(p - d[1] for p, d in zip(ds.pad_prices, ds.pad_dims, strict=True))
    pb = loader.pad_buckets
    by_shape: dict[tuple, set] = {}
    for idx in sampler.epoch_batches():
        top = max(ds.pad_prices[i] for i in idx)
        assert len(idx) * top <= budget  # the authors' price of the batch
        shape = pb.shape_of(max(ds.pad_dims[i][0] for i in idx), max(ds.pad_dims[i][1] for i in idx))
        by_shape.setdefault(shape, set()).add(len(idx))
    assert by_shape
    # each shape's batch size: the budget over the largest price the shape holds, in steps of 8
    for shape, sizes in by_shape.items():
        held = [p for p, d in zip(ds.pad_prices, ds.pad_dims, strict=True) if d[0] <= shape[0] and d[1] <= shape[1]]
        assert sizes <= {sampler.batch_size_of(shape)} and sampler.batch_size_of(shape) == budget // max(held) // 8 * 8
    batches = list(itertools.islice(trainer.source().batches(), 6))
    for b in batches:
        lt, n = b["input_ids"].size(1), b["img_feat"].size(1)
        # padded to a bucket shape whose one batch size this is (a QA->R row may sit in a smaller shape than its
        # bound: the bound allows for the longest answer, a row holds the gold one)
        assert (lt, n) in pb.shapes() and trainer.task.n_examples(b) == sampler.batch_size_of((lt, n))
        assert (
            lt
            <= max(d[0] for d in ds.pad_dims)
            < max(p - d[1] for p, d in zip(ds.pad_prices, ds.pad_dims, strict=True))
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = trainer.train()
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)


@pytest.mark.parametrize("mode", ["sampled", "hard"])
def test_retrieval_graphed_training_pads_to_bucket_shapes(tmp_path, mode):
    """Retrieval under ``adv_graphed``, sampled and hard negatives: bucket shapes, one graph signature per padded
    shape (the group size kept: the loss reads it), and training runs."""
    from torch.utils import _pytree as pytree

    variant = _variant("retrieval", mode)
    trainer = _trainer(tmp_path, "retrieval", adv_graphed=True, num_train_steps=2, valid_steps=100, **variant)
    pb = trainer.task.pad_buckets()
    batches = list(itertools.islice(trainer.source().batches(), 8))
    shapes, keys = set(), set()
    for b in batches:
        lt, n = b["input_ids"].size(1), b["img_feat"].size(1)
        assert lt in pb.txt and n in pb.img, (lt, n)
        assert int(b["attn_masks"].sum()) == sum(b["txt_lens"]) + sum(b["num_bbs"])
        trainer.model.train()
        prepared = trainer.task.prepare(trainer.model, b)
        sb = trainer.task.step_batch(prepared)
        assert set(sb) - {"sample_size"} == {k for k, v in sb.items() if isinstance(v, torch.Tensor)}
        shapes.add((sb["input_ids"].shape, sb["img_feat"].shape))
        keys.add(trainer.adv_step._key(*pytree.tree_flatten(sb), *trainer.task.adv_masks(prepared), False))
    assert len(keys) == len(shapes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        history = trainer.train()
    assert all(math.isfinite(e["loss"]) for e in history if "loss" in e)


def test_adv_max_graphs_reaches_the_graphed_step(tmp_path):
    trainer = _trainer(tmp_path, "vqa", adv_graphed=True, adv_max_graphs=3)
    assert trainer.adv_step.max_graphs == 3
    from villa_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="adv_max_graphs"):
        resolve_config(None, task_config(tmp_path / "bad", "vqa", adv_max_graphs=0))


def test_training_reports_the_graphed_steps_captures(tmp_path, caplog):
    trainer = _trainer(tmp_path, "vqa", adv_graphed=True, num_train_steps=2, valid_steps=100)
    with warnings.catch_warnings(), caplog.at_level("INFO", logger="villa_fast.train"):
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    assert trainer.adv_step.stats() == {"graphs": 0, "eager_signatures": 0}  # no CUDA here: eager throughout
    assert "graphed VILLA step: 0 batch shapes captured, 0 run eagerly (adv_max_graphs=16)" in caplog.text
