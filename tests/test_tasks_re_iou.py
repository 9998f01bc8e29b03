"""Referring expressions: the IoU of the official evaluation, the boxes the data gives it, the two accuracies."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from tests.test_train_fixtures import META, task_config, tiny_model_config
from villa_fast.data import (
    DetectFeatLmdb,
    ImgDbWriter,
    ReDataset,
    ReEvalDataset,
    ReTxtTokLmdb,
    TxtDbWriter,
    re_det_img_name,
    re_eval_collate,
)
from villa_fast.tasks.re import IOU_THRESHOLD, ReTask, box_iou
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _iou(a, b) -> float:
    return float(box_iou(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)))


# -- IoU ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # identical
        ([0, 0, 10, 10], [5, 0, 10, 10], 50 / 150),  # overlap: 5 x 10 pixels shared
        ([0, 0, 10, 10], [2, 2, 10, 10], 64 / 136),  # overlap in both directions: 8 x 8
        ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),  # disjoint
        ([0, 0, 20, 20], [5, 5, 10, 10], 100 / 400),  # contained
        ([0, 0, 10, 10], [0, 0, 10, 5], 50 / 100),  # contained, sharing three edges
        ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # touching edge
        ([0, 0, 10, 10], [10, 10, 4, 4], 0.0),  # touching corner
        ([0, 0, 10, 10], [9, 0, 10, 10], 0.0),  # one shared pixel column: empty under the strict corner test
        ([0.5, 1.5, 10, 20], [0.5, 1.5, 10, 20], 1.0),  # fractional pixels (detected boxes scaled to the image)
    ],
)
def test_box_iou_hand_computed(a, b, expected):
    assert _iou(a, b) == pytest.approx(expected, abs=1e-12)
    assert _iou(b, a) == pytest.approx(expected, abs=1e-12)


def test_box_iou_broadcasts_and_passes_nan():
    boxes = torch.tensor([[0, 0, 10, 10], [5, 0, 10, 10], [10, 0, 10, 10]], dtype=torch.float64)
    out = box_iou(boxes, torch.tensor([0, 0, 10, 10], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([1.0, 1 / 3, 0.0], dtype=torch.float64))
    nan = torch.full((4,), math.nan, dtype=torch.float64)
    assert box_iou(nan, boxes[0]).isnan() and box_iou(boxes[0], nan).isnan()


def test_threshold_is_strict():
    # exactly 0.5 does not count, as in the authors' evaluation (IoU > .5)
    assert IOU_THRESHOLD == 0.5 and not _iou([0, 0, 10, 10], [0, 0, 10, 5]) > IOU_THRESHOLD


# -- tiny synthetic RefCOCO-like data ---------------------------------------------------------------------
# image of 256 x 128 pixels; every coordinate below is exact in the float16 the img_db stores
W, H = 256, 128
GT_BOXES = [  # [x, y, w, h] pixels, the image's ground-truth boxes in region order
    [0, 0, 128, 64],
    [16, 8, 128, 64],  # IoU with box 0: 112 * 56 / (2 * 8192 - 112 * 56) = 0.62
    [128, 64, 128, 64],  # touches box 0 at a corner: IoU 0
    [192, 0, 64, 64],
]
DET_BOXES = [[4, 2, 120, 60], [128, 64, 128, 64], [190, 0, 64, 64], [0, 64, 64, 64]]
IMG_DIM = 16
N_IMG = 3

# (ann index, referred box, predicted region): index hit, IoU hit
CASES = [
    (0, GT_BOXES[0], 1),  # wrong index, IoU 0.62: counts under IoU only
    (2, GT_BOXES[0], 2),  # right index, but the annotation's box is box 0's: IoU 0, counts under index only
    (3, GT_BOXES[3], 3),  # both
    (0, GT_BOXES[0], 2),  # neither
]


def _gt_name(image_id: int) -> str:
    return f"visual_grounding_coco_gt_{image_id:012}.npz"


def _norm_bb(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64)
    x1, y1, w, h = b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H
    return np.stack([x1, y1, x1 + w, y1 + h, w, h], axis=1).astype(np.float32)


def _img_db(path, names, boxes, seed, num_bb: int) -> str:
    rng = np.random.default_rng(seed)
    with ImgDbWriter(path, conf_th=-1, num_bb=num_bb, compress=False) as w:
        for name in names:
            n = len(boxes)
            conf = np.linspace(0.9, 0.5, n).astype(np.float32)  # already sorted: region order kept
            w.add(name, features=rng.normal(size=(n, IMG_DIM)).astype(np.float32), norm_bb=_norm_bb(boxes), conf=conf)
    return str(path)


def _txt_db(path, n: int, seed: int, official: bool = False) -> str:
    """Sentences cycling through CASES over N_IMG images; ``official``: no txt2img.json, refs.json instead."""
    rng = np.random.default_rng(seed)
    images = [{"id": k, "ann_ids": [100 * k + j for j in range(4)], "width": W, "height": H} for k in range(N_IMG)]
    refs = []
    with TxtDbWriter(path, META) as w:
        for i in range(n):
            k = i % N_IMG
            ann, box, _ = CASES[i % len(CASES)]
            rec = {
                "sent_id": i,
                "input_ids": [int(x) for x in rng.integers(META["v_range"][0], META["vocab_size"], 4 + i % 3)],
                "img_fname": _gt_name(k),
                "image_id": k,
                "ann_id": 100 * k + ann,
                "bbox": list(box),
            }
            w.add(str(i), rec)
            refs.append({"ref_id": i, "sent_ids": [i], "ann_id": rec["ann_id"], "image_id": k})
        w.extra_json["images.json"] = images
        w.extra_json["refs.json"] = refs
    if official:
        os.remove(path / "txt2img.json")
        os.remove(path / "img2txts.json")
    return str(path)


@pytest.fixture(scope="module")
def re_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("re_iou")
    # as the official databases: every ground-truth box under feat_numbb100, detections under the config's count
    gt = _img_db(root / "re_coco_gt", [_gt_name(k) for k in range(N_IMG)], GT_BOXES, 0, num_bb=100)
    det = _img_db(root / "re_coco_det", [re_det_img_name(_gt_name(k)) for k in range(N_IMG)], DET_BOXES, 1, num_bb=4)
    return {
        "root": root,
        "gt": gt,
        "det": det,
        "train": _txt_db(root / "txt_train", 16, 0),
        "val": _txt_db(root / "txt_val", 8, 1, official=True),
    }


def _logits_for(batch, preds) -> torch.Tensor:
    z = torch.zeros(batch["obj_masks"].shape)
    z[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return z.masked_fill(batch["obj_masks"].bool(), -1e4)


def test_eval_data_boxes_in_pixels(re_dbs):
    txt = ReTxtTokLmdb(re_dbs["val"], -1)
    assert txt.txt2img["0"] == _gt_name(0)  # built from refs.json: the official dbs have no txt2img.json
    img = DetectFeatLmdb(re_dbs["gt"], conf_th=-1, num_bb=100, compress=False)
    ds = ReEvalDataset(txt, img)
    batch = re_eval_collate([ds[i] for i in range(4)])
    assert batch["qids"] == ["0", "1", "2", "3"]
    assert batch["targets"].flatten().tolist() == [c[0] for c in CASES]
    # img_pos_feat is [x1, y1, x2, y2, w, h, w * h] normalised; boxes come back as [x, y, w, h] pixels
    pos = batch["img_pos_feat"][0]
    torch.testing.assert_close(pos[:, 2], pos[:, 0] + pos[:, 4])
    torch.testing.assert_close(pos[:, 6], pos[:, 4] * pos[:, 5])
    torch.testing.assert_close(batch["obj_boxes"][0], torch.tensor(GT_BOXES, dtype=torch.float64))
    torch.testing.assert_close(batch["tgt_box"][1], torch.tensor(GT_BOXES[0], dtype=torch.float64))
    # the training dataset reads the same texts and targets
    train = ReDataset(txt, img)
    assert [int(train[i][5]) for i in range(4)] == batch["targets"].flatten().tolist()


def test_task_evaluation_counts_index_and_iou_separately(re_dbs):
    txt = ReTxtTokLmdb(re_dbs["val"], -1)
    ds = ReEvalDataset(txt, DetectFeatLmdb(re_dbs["gt"], conf_th=-1, num_bb=100, compress=False))
    batch = re_eval_collate([ds[i] for i in range(4)])
    preds = [c[2] for c in CASES]
    task = ReTask(resolve_config(None, {"task": "re"}))
    state = task.eval_init()
    task.eval_batch(state, None, _logits_for(batch, preds), batch)
    out = task.eval_finish(state)
    assert out["acc"] == 0.5 and out["acc_iou"] == 0.5  # different halves: cases 1, 2 and 0, 2
    assert out["n"] == out["n_target"] == out["n_iou"] == 4
    assert state["pred"][0] == {"sent_id": "0", "pred_region": 1, "pred_box": GT_BOXES[1], "tgt_box": GT_BOXES[0]}
    # one example at a time: which measure counts it
    for i, (ann, _, pred) in enumerate(CASES):
        s = task.eval_init()
        one = re_eval_collate([ds[i]])
        task.eval_batch(s, None, _logits_for(one, [pred]), one)
        assert s["correct"] == float(pred == ann)
        assert s["correct_iou"] == float(i in (0, 2))


def test_detected_boxes_report_iou_only(re_dbs):
    txt = ReTxtTokLmdb(re_dbs["val"], -1)
    det = DetectFeatLmdb(re_dbs["det"], conf_th=-1, num_bb=4, compress=False)
    for use_gt_feat in (None, False):  # found by name, or named by the caller
        ds = ReEvalDataset(txt, det, use_gt_feat=use_gt_feat)
        batch = re_eval_collate([ds[i] for i in range(4)])
        assert batch["targets"].flatten().tolist() == [-1] * 4
        torch.testing.assert_close(batch["obj_boxes"][0], torch.tensor(DET_BOXES, dtype=torch.float64))
    task = ReTask(resolve_config(None, {"task": "re"}))
    state = task.eval_init()
    # detection 0 overlaps gt box 0 (IoU 0.88), detection 2 gt box 3 (0.94); detection 1 misses gt box 0
    task.eval_batch(state, None, _logits_for(batch, [0, 0, 2, 1]), batch)
    out = task.eval_finish(state)
    assert "acc" not in out and "loss" not in out
    assert out["acc_iou"] == 0.75 and out["n"] == out["n_iou"] == 4 and out["n_target"] == 0


@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
def test_train_on_gt_validate_on_det(tmp_path, re_dbs, adv):
    cfg = task_config(tmp_path, "re", adv_training=adv)
    cfg.update(
        model_config=tiny_model_config(tmp_path / "model.json"),
        train_txt_db=re_dbs["train"],
        train_img_db=re_dbs["gt"],
        val_txt_db=re_dbs["val"],
        val_img_db=re_dbs["det"],
        conf_th=-1,
        num_bb=4,  # the detections' count; the ground-truth db is read with num_bb 100 whatever the config says
        compressed_db=False,
        train_batch_size=1000,  # sentences (RE batches count examples): the whole split in one batch
    )
    trainer = Trainer(resolve_config(None, cfg), quiet=True)
    history = trainer.train()
    vals = [e for e in history if "val/acc_iou" in e]
    assert [e["step"] for e in vals] == [2, 4]
    assert all(0.0 <= e["val/acc_iou"] <= 1.0 and "val/acc" not in e for e in vals)
    assert vals[-1]["val/n_iou"] == 8
    preds = json.loads((trainer.output_dir / "results" / "results_4.json").read_text())
    assert len(preds) == 8 and set(preds[0]) == {"sent_id", "pred_region", "pred_box", "tgt_box"}
    robust = trainer.evaluate("val", robust=True)  # no target on detections: attacks the prediction
    assert 0.0 <= robust["robust_acc_iou"] <= 1.0
