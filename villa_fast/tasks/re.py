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

Keys that no example supports are left out; ``acc_iou`` is the task's main metric (the authors'
``valid/acc``).

Training sums the cross-entropy over the batch, as the authors' ``train_re.py`` does (``loss.sum()``
of the per-example losses; with their gradient clipping at 2.0 the sum's scale matters). The authors
released no adversarial RE script; here the VILLA step's consistency term is summed over the batch
too (``kl_reduction = "sum"``), which keeps the two terms in the ratio they have on the averaged tasks.

Predictions are ``{"sent_id", "pred_region"}`` plus ``pred_box`` / ``tgt_box`` (``[x, y, w, h]`` in
pixels) where known.

Image databases follow the authors' rule (``create_dataloader`` of UNITER's ``train_re.py``, and
``inf_re.py``): an ``img_db`` path that contains ``coco_gt`` (the official ``re_coco_gt``) holds
ground-truth boxes and is read with ``conf_th = -1`` and ``num_bb = 100`` (its ``feat_numbb100``
database: up to 100 regions an image, every box of the official databases, whose training texts need
one region per ``ann_id``), whatever the config says, for training and evaluation alike;
any other path is read with the config's ``conf_th`` / ``num_bb`` (the official ``re_coco_det``
detections). See :meth:`ReTask.re_img_db`.

Batches count examples (sentences), not tokens: ``train_batch_size`` / ``val_batch_size`` are the
``batch_size`` of the authors' ``DataLoader`` (``create_dataloader`` of ``train_re.py``, and
``inf_re.py``; "batch by examples", 128 in the released config), per process, over their
``DistributedSampler``: the last, shorter batch is kept (no ``drop_last``), every training rank
gets as many examples (the epoch padded with its first ones).

The examples and their order are the authors' (UNITER's ``data/re.py``, see
:class:`~villa_fast.data.ReTxtTokLmdb`): the sentences of the refs of ``refs.json``, ref by ref
in file order, each ref's sentences together; training keeps those strictly shorter than
``max_txt_len`` tokens (a sentence of exactly ``max_txt_len`` is left out), evaluation keeps every
sentence (the authors open evaluation databases with ``max_txt_len = -1``, in ``train_re.py`` and
``inf_re.py``) and reads them in that order. Training shuffles each epoch by referring expression:
the refs are permuted and each keeps its sentences together, in order, which is what the authors'
epoch-end ``dataset.shuffle()`` (a shuffle of ``ref_ids``) is written to do; in their code it
rebuilds a list the dataset does not read, so their training reads the ``refs.json`` order every
epoch, the first included. See :meth:`ReTask.ref_groups`.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from villa_fast.tasks.base import EXAMPLES, DataContext, Task

__all__ = ["GT_IMG_DB_MARK", "GT_NUM_BB", "IOU_THRESHOLD", "ReTask", "box_iou", "is_gt_img_db"]

logger = logging.getLogger(__name__)

#: a prediction counts under ``acc_iou`` when its IoU with the referred box is strictly above this
IOU_THRESHOLD = 0.5
#: an img_db whose path contains this holds ground-truth boxes (the authors' test, on the path as given)
GT_IMG_DB_MARK = "coco_gt"
#: regions read from a ground-truth-boxes img_db (with ``conf_th = -1``): the authors' fixed value, which
#: keeps every box of the official databases (``feat_numbb100``)
GT_NUM_BB = 100


def is_gt_img_db(img_db: str) -> bool:
    """Whether ``img_db`` holds ground-truth boxes by the authors' rule: its path contains ``coco_gt``."""
    return GT_IMG_DB_MARK in str(img_db)


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
    data_kinds = ("re",)
    supports_adversarial = True
    #: the authors' validation accuracy (``valid/acc`` of ``train_re.py``: IoU above 0.5)
    main_metric = "acc_iou"
    #: the loss sums over the batch (the authors' ``loss.sum()``); the consistency term sums likewise, so the
    #: two keep the balance VILLA gives them on the tasks whose both terms average
    kl_reduction = "sum"
    sum_keys = ("n", "correct", "loss", "n_target", "n_iou", "correct_iou")
    #: batches of train_batch_size / val_batch_size sentences, last one kept (see the module docstring)
    train_batch_unit = EXAMPLES
    val_batch_unit = EXAMPLES
    train_drop_last = False
    fixed_shape_training = True

    def step_batch(self, batch):
        # the RE forward and loss read tensors only: txt_lens / num_bbs (lists) stay out of graph keys
        return {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    def build_model(self):
        from villa_fast.models import UniterForReferringExpression

        return UniterForReferringExpression(self.model_config(), mlp=self.cfg["mlp"])

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, ReDataset, ReTxtTokLmdb, re_collate

        sets = [ReDataset(ReTxtTokLmdb(t, self.cfg["max_txt_len"]), self.re_img_db(i)) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.batch_loader(ds, re_collate, ctx, train=True, groups=self.ref_groups(sets))

    @staticmethod
    def ref_groups(datasets) -> list[list[int]] | None:
        """The sentences of each referring expression, as example indices of ``datasets`` concatenated.

        One group per ref of each txt_db's ``refs.json`` (in file order) with those of its sentences that
        the dataset holds, in their order (:attr:`ReTxtTokLmdb.ref_sents`: sentences of ``max_txt_len``
        tokens or more, or without their image, are not there). The examples follow the same order, so a
        group is a run of consecutive indices. Examples of a database without ``refs.json`` are left to
        the sampler, one group each. None when there is no group (no database has a ``refs.json``).
        """
        groups: list[list[int]] = []
        offset = 0
        for ds in datasets:
            index = {id_: offset + k for k, id_ in enumerate(ds.ids)}
            for _, sents in ds.txt_db.ref_sents:
                members = [index[s] for s in sents if s in index]
                if members:
                    groups.append(members)
            offset += len(ds)
        return groups or None

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import ReEvalDataset, ReTxtTokLmdb, re_eval_collate

        (txt, img), *_ = self.pairs(split)
        ds = ReEvalDataset(ReTxtTokLmdb(txt, -1), self.re_img_db(img), use_gt_feat=_gt_or_det(img))
        return self.batch_loader(ds, re_eval_collate, ctx, train=False)

    def re_img_db(self, path: str):
        """The image database at ``path``, read as the authors read RE databases: every box of a
        ground-truth-boxes database (:func:`is_gt_img_db`: ``conf_th = -1``, ``num_bb = 100``, whatever the
        config says; logged), the config's ``conf_th`` / ``num_bb`` for any other (detections)."""
        if not is_gt_img_db(path):
            return self.img_db(path)
        c = self.cfg
        logger.info(
            "%s: ground-truth boxes (path contains %r): keeping every box (conf_th=-1, num_bb=%d); "
            "the config's conf_th=%s, num_bb=%s apply to detected boxes only",
            path,
            GT_IMG_DB_MARK,
            GT_NUM_BB,
            c["conf_th"],
            c["num_bb"],
        )
        try:
            return self.img_db(path, conf_th=-1, num_bb=GT_NUM_BB)
        except FileNotFoundError as exc:
            from villa_fast.data.db import img_db_name

            sub = img_db_name(-1, c["max_bb"], c["min_bb"], GT_NUM_BB, c["compressed_db"])
            raise FileNotFoundError(
                f"{exc}; {path} holds ground-truth boxes by its name (it contains {GT_IMG_DB_MARK!r}), which are "
                f"read from its {sub} database (written with --conf-th -1 --num-bb {GT_NUM_BB})"
            ) from exc

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
    """``use_gt_feat`` of the evaluation dataset: True on a ground-truth-boxes database (:func:`is_gt_img_db`),
    False on the official detections (``re_coco_det``); other paths are decided per image (see
    ``ReEvalDataset``; the authors treat every path without ``coco_gt`` as detections)."""
    if is_gt_img_db(img_db):
        return True
    if "coco_det" in img_db:
        return False
    return None
