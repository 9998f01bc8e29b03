"""Region features stay in the img_db's stored dtype (float16) from the db through collate, fixed-shape padding and
the copy to the device; the model widens them, once, before its image projection. On the CPU in float32 every
number is the same as widening them first: losses, gradients, MRFR / MRC targets, the adversarial image delta and
the robust-evaluation attack (torch.equal throughout)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from tests.test_train_fixtures import IMG_DIM, build_task_data, task_config
from villa_fast.data import (
    DetectFeatLmdb,
    ImgDbWriter,
    MrcDataset,
    MrcDatasetForVcr,
    MrfrDataset,
    PadBuckets,
    TxtTokLmdb,
    VcrTxtTokLmdb,
    VqaDataset,
    move_to_device,
    mrc_collate,
    mrfr_collate,
    pad_batch,
    pad_tensors,
    vcr_pretrain_collate,
    vqa_collate,
)
from villa_fast.data.codec import encode_img_record
from villa_fast.train.config import resolve_config
from villa_fast.train.robust import EmbeddingAttack
from villa_fast.train.trainer import Trainer

TASKS = ("itm", "mlm", "mrfr", "mrckl")


def _img_db(path: str) -> DetectFeatLmdb:
    return DetectFeatLmdb(path, 0.2, 6, 2, 36, False)


def _widened(batch: dict) -> dict:
    """The batch as the loader built it before: region features (and MRFR targets) widened to float32."""
    out = dict(batch)
    for key in ("img_feat", "feat_targets"):
        if key in out:
            out[key] = out[key].float()
    return out


# ------------------------------------------------------------------------------------------- the data


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory):
    return build_task_data(tmp_path_factory.mktemp("vqa"), "vqa")


def test_a_float16_db_gives_float16_batches_through_padding_and_the_device_copy(vqa_data):
    img = _img_db(vqa_data["img_db"])
    ds = VqaDataset(5, TxtTokLmdb(vqa_data["train_txt_db"], -1), img)
    items = [ds[i] for i in range(8)]
    for x in items:
        assert x[1].dtype == torch.float16 and x[2].dtype == torch.float32
    batch = vqa_collate(items)
    feat = batch["img_feat"]
    assert feat.dtype == torch.float16 and batch["img_pos_feat"].dtype == torch.float32
    for k, x in enumerate(items):  # the stored values, zero padding
        n = x[1].size(0)
        assert torch.equal(feat[k, :n], x[1]) and not feat[k, n:].any()
    lt, n = batch["input_ids"].size(1), feat.size(1)
    for padded in (pad_batch(batch, lt + 3, n + 5), PadBuckets(txt=(lt + 3,), img=(n + 5,))(batch)):
        assert padded["img_feat"].dtype == torch.float16 and padded["img_feat"].shape == (feat.size(0), n + 5, IMG_DIM)
        assert torch.equal(padded["img_feat"][:, :n], feat) and not padded["img_feat"][:, n:].any()
    moved = move_to_device(batch, torch.device("cpu"))
    assert moved["img_feat"].dtype == torch.float16
    name = next(iter(img.name2nbb))
    dump = img.get_dump(name)
    assert dump["features"].dtype == np.float16 and np.array_equal(dump["features"], img[name][0].numpy())
    assert dump["norm_bb"].dtype == np.float32


def test_a_float32_db_keeps_float32_and_mixed_dtypes_promote(tmp_path):
    rng = np.random.default_rng(0)
    feats = {f"im{k}.npz": rng.normal(size=(4, IMG_DIM)).astype(np.float32) for k in range(2)}
    with ImgDbWriter(tmp_path / "img", conf_th=0.2, max_bb=6, min_bb=2, compress=False) as w:
        for name, f in feats.items():
            bb = np.tile(np.array([0.1, 0.1, 0.5, 0.5, 0.4, 0.4], np.float32), (4, 1))
            conf = np.ones(4, np.float32)
            w.add(name, f, bb, conf)
            # the writer stores float32 as float16, as the authors' conversion does: store this record's float32
            w._txn.put(name.encode("utf-8"), encode_img_record({"features": f, "norm_bb": bb, "conf": conf}, False))
    db = _img_db(tmp_path / "img")
    f32, _ = db["im0.npz"]
    assert f32.dtype == torch.float32 and np.array_equal(f32.numpy(), feats["im0.npz"])
    half = torch.from_numpy(feats["im1.npz"].astype(np.float16))
    mixed = pad_tensors([half, f32], max_len=6)  # a float16 and a float32 db in one batch: nothing rounded
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed[0, :4], half.float()) and torch.equal(mixed[1, :4], f32)


def test_mrfr_targets_and_mrc_rows_are_those_of_widened_features(tmp_path):
    root = build_task_data(tmp_path / "d", "pretrain")
    img = _img_db(root["img_db"])
    txt = TxtTokLmdb(root["train_txt_db"], -1)
    mrfr = MrfrDataset(0.3, txt, img)
    items = [mrfr[i] for i in range(12)]
    new = mrfr_collate(items)
    old = mrfr_collate([(x[0], x[1].float(), *x[2:]) for x in items])  # today's items were float32
    assert new["img_feat"].dtype == new["feat_targets"].dtype == torch.float16
    assert torch.equal(new["img_masks"], old["img_masks"]) and new["img_masks"].any()
    assert torch.equal(new["feat_targets"].float(), old["feat_targets"])
    assert torch.equal(new["img_feat"].float(), old["img_feat"])
    assert not new["img_feat"][new["img_masks"]].any()  # masked regions zeroed

    mrc = MrcDataset(0.3, txt, img)
    items = [mrc[i] for i in range(12)]
    assert items[0][1].dtype == items[0][3].dtype == torch.float16
    new = mrc_collate(items)
    masks = new["img_masks"]
    # the previous selection: float32 soft labels padded to [B, N, C], then the masked rows
    want = pad_tensors([x[3].float() for x in items], max_len=masks.size(1))[masks]
    assert new["label_targets"].dtype == torch.float32 and torch.equal(new["label_targets"], want)
    assert new["label_targets"].shape == (int(masks.sum()), 1601)


def test_vcr_mrc_rows_are_those_of_widened_soft_labels(tmp_path):
    data = build_task_data(tmp_path / "d", "vcr", soft=True)
    gt_dir, det_dir = data["img_db"].split(";")
    gt, det = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False), _img_db(det_dir)
    ds = MrcDatasetForVcr(0.3, VcrTxtTokLmdb(data["train_txt_db"], -1, task="qar"), gt, det)
    items = [ds[i] for i in range(8)]
    batch = vcr_pretrain_collate(items, mrc_collate)
    masks = batch["img_masks"]
    want = pad_tensors([x[3].float() for x in items], max_len=masks.size(1))[masks]
    assert batch["img_feat"].dtype == torch.float16
    assert batch["label_targets"].dtype == torch.float32 and torch.equal(batch["label_targets"], want)


# ------------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    cfg = task_config(
        root,
        "pretrain",
        adv_training=True,
        dropout=0.0,
        adv_modality=["text", "image"],
        adv_pretrain_tasks=list(TASKS),
        adv_init_mag=0.5,
        adv_max_norm=1.0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        t = Trainer(resolve_config(None, cfg), quiet=True)
    t.model.train()
    return t


@pytest.fixture(scope="module")
def batches(trainer):
    out = {}
    for b in itertools.islice(trainer.source().batches(), 400):
        out.setdefault(b["task"], b)
        if len(out) == len(TASKS):
            return out
    raise AssertionError(f"tasks {set(TASKS) - set(out)} not in the first 400 batches")


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("task", TASKS)
def test_training_step_is_that_of_widened_features(trainer, batches, task):
    batch = batches[task]
    assert batch["img_feat"].dtype == torch.float16
    model, t = trainer.model, trainer.task
    seen = []
    hook = model.uniter.img_embeddings.img_linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))
    try:
        out = []
        for b in (batch, _widened(batch)):
            model.zero_grad(set_to_none=True)
            b = t.prepare(model, b)
            loss = t.loss(model, t.forward(model, b), b)
            loss.backward()
            out.append((loss.detach(), _grads(model)))
    finally:
        hook.remove()
    assert seen == [torch.float32, torch.float32]  # widened before img_linear, for both
    (la, ga), (lb, gb) = out
    assert torch.equal(la, lb)
    _assert_same_grads(ga, gb)


@pytest.mark.parametrize("task", TASKS)
def test_adversarial_step_and_image_delta_are_those_of_widened_features(trainer, batches, task):
    batch = batches[task]
    model, t, step = trainer.model, trainer.task, trainer.adv_step
    assert t.adversarial_for(batch)
    recorded = []
    out = []
    for b in (batch, _widened(batch)):
        model.zero_grad(set_to_none=True)
        b = t.prepare(model, b)
        txt_mask, img_mask = t.adv_masks(b)
        torch.manual_seed(123)  # the random delta init
        r = step.step(t.step_batch(b), txt_mask=txt_mask, img_mask=img_mask)
        recorded.append(step._injector.recorded["image"][1])
        out.append((r, _grads(model)))
    (ra, ga), (rb, gb) = out
    # the image injection point (img_linear's input) sees float32 features, the delta is float32 and moved
    assert recorded == [torch.float32, torch.float32]
    assert ra.deltas["image"].dtype == torch.float32 and ra.deltas["image"].abs().sum() > 0
    assert torch.equal(ra.deltas["image"], rb.deltas["image"])
    assert torch.equal(ra.deltas["text"], rb.deltas["text"])
    assert torch.equal(ra.loss, rb.loss) and torch.equal(ra.logits, rb.logits)
    _assert_same_grads(ga, gb)
    # and the trainer's own micro-step
    losses = []
    for b in (batch, _widened(batch)):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        losses.append(trainer.micro_step(b))
    assert torch.equal(losses[0], losses[1])


@pytest.mark.parametrize("task", ("itm", "mrfr"))
def test_robust_attack_is_that_of_widened_features(trainer, batches, task):
    model, t = trainer.model, trainer.task
    u = model.uniter
    attack = EmbeddingAttack(
        u.embeddings.word_embeddings, u.img_embeddings.img_linear, steps=2, eps=0.5, modalities=("text", "image")
    )
    model.eval()
    try:
        out = []
        for b in (batches[task], _widened(batches[task])):
            b = t.prepare(model, b)
            out.append(attack(lambda x: t.forward(model, x), lambda z, x: t.attack_loss(model, z, x), b))
    finally:
        model.train()
    assert torch.equal(out[0], out[1])
