"""Referring expressions (RefCOCO, RefCOCO+, RefCOCOg): pick the referred region among the image's regions.

Evaluation reports two accuracies:

* ``acc``: the predicted region's index equals the target index. Defined only where the regions
  are the image's ground-truth boxes (``n_target`` such examples); ``loss`` is the cross-entropy
  over the same examples.
* ``acc_iou``: the official UNITER measure: the predicted region's box and the referred object's
  box have an IoU above 0.5 (:func:`box_iou`, strictly greater, as the authors' evaluation). It
  works on detected boxes too ("det" features, where no target index exists), and needs the
  image size (``images.json`` ``width`` / ``height``) and the referred box (the record's ``bbox``);
  ``n_iou`` examples had both.

Keys that no example supports are left out. Predictions are ``{"sent_id", "pred_region"}`` plus
``pred_box`` / ``tgt_box`` (``[x, y, w, h]`` in pixels) where known.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from villa_fast.tasks.base import DataContext, Task

__all__ = ["IOU_THRESHOLD", "ReTask", "box_iou"]

#: a prediction counts under ``acc_iou`` when its IoU with the referred box is strictly above this
IOU_THRESHOLD = 0.5


def box_iou(box1: Tensor, box2: Tensor) -> Tensor:
    """IoU of boxes ``[..., 4]`` given as ``[x, y, w, h]`` in pixels, broadcast over the leading dims.

    The convention of the authors' RE evaluation (from the RefCOCO tooling): a box covers the
    pixels ``x .. x + w - 1`` (inclusive); the intersection counts only when its corners are
    strictly ordered (``x1 < x2`` and ``y1 < y2``), so boxes that share an edge or a single pixel
    column have IoU 0; the union is ``w1 * h1 + w2 * h2 - intersection``. NaN in, NaN out.
    """
    ix1 = torch.maximum(box1[..., 0], box2[..., 0])
    iy1 = torch.maximum(box1[..., 1], box2[..., 1])
    ix2 = torch.minimum(box1[..., 0] + box1[..., 2] - 1, box2[..., 0] + box2[..., 2] - 1)
    iy2 = torch.minimum(box1[..., 1] + box1[..., 3] - 1, box2[..., 1] + box2[..., 3] - 1)
    overlap = (ix1 < ix2) & (iy1 < iy2)
    inter = torch.where(overlap, (ix2 - ix1 + 1) * (iy2 - iy1 + 1), torch.zeros_like(ix1))
    nan = box1[..., 0].isnan() | box2[..., 0].isnan()
    inter = torch.where(nan, torch.full_like(inter, math.nan), inter)
    union = box1[..., 2] * box1[..., 3] + box2[..., 2] * box2[..., 3] - inter
    return inter / union


class ReTask(Task):
    name = "re"
    supports_adversarial = True
    sum_keys = ("n", "correct", "loss", "n_target", "n_iou", "correct_iou")

    def build_model(self):
        from villa_fast.models import UniterForReferringExpression

        return UniterForReferringExpression(self.model_config(), mlp=self.cfg["mlp"])

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, ReDataset, ReTxtTokLmdb, re_collate

        sets = [ReDataset(ReTxtTokLmdb(t, self.cfg["max_txt_len"]), self.img_db(i)) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.token_loader(ds, re_collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import ReEvalDataset, ReTxtTokLmdb, re_eval_collate

        (txt, img), *_ = self.pairs(split)
        ds = ReEvalDataset(ReTxtTokLmdb(txt, -1), self.img_db(img), use_gt_feat=_gt_or_det(img))
        return self.token_loader(ds, re_eval_collate, ctx, train=False)

    def attack_loss(self, model, logits: Tensor, batch) -> Tensor:
        # on detected boxes no region is the target: the attack lowers the currently predicted region
        targets = batch["targets"].reshape(-1)
        if bool((targets >= 0).all()):
            return self.loss(model, logits, batch)
        labels = torch.where(targets.to(logits.device) >= 0, targets.to(logits.device), logits.detach().argmax(1))
        return F.cross_entropy(logits.float(), labels)

    def eval_init(self):
        state = super().eval_init()
        state.update(n_target=0.0, n_iou=0.0, correct_iou=0.0)
        return state

    def eval_batch(self, state, model, logits, batch) -> None:
        logits = logits.float()
        targets = batch["targets"].to(logits.device).reshape(-1)
        pred = logits.argmax(dim=1)
        has = targets >= 0
        state["n"] += targets.numel()
        state["n_target"] += float(has.sum())
        state["loss"] += float(F.cross_entropy(logits[has], targets[has], reduction="sum")) if bool(has.any()) else 0.0
        state["correct"] += float(((pred == targets) & has).sum())
        pred_cpu = pred.cpu()
        obj_boxes, tgt_box = batch.get("obj_boxes"), batch.get("tgt_box")
        pred_box = iou = None
        if obj_boxes is not None and tgt_box is not None:
            obj_boxes, tgt_box = obj_boxes.cpu(), tgt_box.cpu()
            pred_box = obj_boxes[torch.arange(pred_cpu.numel()), pred_cpu]
            iou = box_iou(pred_box, tgt_box)
            known = ~iou.isnan()
            state["n_iou"] += float(known.sum())
            state["correct_iou"] += float((iou[known] > IOU_THRESHOLD).sum())
        for k, (q, p) in enumerate(zip(batch["qids"], pred_cpu.tolist(), strict=True)):
            entry = {"sent_id": q, "pred_region": int(p)}
            if iou is not None and not bool(iou[k].isnan()):
                entry["pred_box"] = pred_box[k].tolist()
                entry["tgt_box"] = tgt_box[k].tolist()
            state["pred"].append(entry)

    def eval_finish(self, state) -> dict[str, float]:
        out: dict[str, float] = {}
        if state["n_target"]:
            out["acc"] = state["correct"] / state["n_target"]
            out["loss"] = state["loss"] / state["n_target"]
        if state["n_iou"]:
            out["acc_iou"] = state["correct_iou"] / state["n_iou"]
        out.update(n=state["n"], n_target=state["n_target"], n_iou=state["n_iou"])
        return out


def _gt_or_det(img_db: str) -> bool | None:
    """The authors' rule for the official image databases: ``re_coco_gt`` holds ground-truth boxes,
    ``re_coco_det`` detections; other paths are decided per image (see ``ReEvalDataset``)."""
    if "coco_gt" in img_db:
        return True
    if "coco_det" in img_db:
        return False
    return None
