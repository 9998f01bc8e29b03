"""NLVR2: a sentence and two images -> true / false (cross-entropy over 2 classes).

``model`` picks the layout and head, as in the authors' scripts: ``paired-attn`` and ``paired`` run two
rows per example (the sentence with each image), ``triplet`` one row holding the sentence and both
images' regions. Every layout tells the images apart by image type ids 1 and 2 (``use_img_type``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from villa_fast.tasks.base import DataContext, Task

__all__ = ["Nlvr2Task"]

_MODELS = {"paired-attn": "nlvr2", "paired": "nlvr2_paired", "triplet": "nlvr2_triplet"}


class Nlvr2Task(Task):
    name = "nlvr2"
    data_kinds = ("nlvr2",)
    also_validate = ("test",)  # train_nlvr2_adv.py validates test-P beside dev
    kl_reduction = "batchmean"
    fixed_shape_training = True

    def step_batch(self, batch):
        # the NLVR2 forwards and loss read tensors only: txt_lens / num_bbs (lists) stay out of graph keys
        return {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    @property
    def triplet(self) -> bool:
        return self.cfg["model"] == "triplet"

    def build_model(self):
        from villa_fast.models import build_model

        return build_model(_MODELS[self.cfg["model"]], self.model_config())

    def _dataset(self, txt: str, img: str, max_len: int, eval_: bool):
        from villa_fast.data import (
            Nlvr2PairedDataset,
            Nlvr2PairedEvalDataset,
            Nlvr2TripletDataset,
            Nlvr2TripletEvalDataset,
            TxtTokLmdb,
        )

        if self.triplet:
            cls = Nlvr2TripletEvalDataset if eval_ else Nlvr2TripletDataset
        else:
            cls = Nlvr2PairedEvalDataset if eval_ else Nlvr2PairedDataset
        return cls(TxtTokLmdb(txt, max_len), self.img_db(img), use_img_type=self.cfg["use_img_type"])

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, nlvr2_paired_collate, nlvr2_triplet_collate

        sets = [self._dataset(t, i, self.cfg["max_txt_len"], False) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        collate = nlvr2_triplet_collate if self.triplet else nlvr2_paired_collate
        return self.batch_loader(ds, collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import nlvr2_paired_eval_collate, nlvr2_triplet_eval_collate

        (txt, img), *_ = self.pairs(split)
        collate = nlvr2_triplet_eval_collate if self.triplet else nlvr2_paired_eval_collate
        return self.batch_loader(self._dataset(txt, img, -1, True), collate, ctx, train=False)

    def n_examples(self, batch) -> int:
        return int(batch["targets"].numel())

    def eval_batch(self, state, model, logits, batch) -> None:
        logits = logits.float()
        targets = batch["targets"].to(logits.device).reshape(-1)
        state["loss"] += float(F.cross_entropy(logits, targets, reduction="sum"))
        pred = logits.argmax(dim=1)
        state["correct"] += float((pred == targets).sum())
        state["n"] += targets.numel()
        state["pred"].extend([q, bool(p)] for q, p in zip(batch["qids"], pred.tolist(), strict=True))

    def write_predictions(self, preds, path_prefix: str) -> str:
        # one "identifier,True|False" line per example, as the authors' NLVR2 inference writes
        path = f"{path_prefix}.csv"
        with open(path, "w", encoding="utf-8") as fh:
            for qid, answer in preds:
                fh.write(f"{qid},{answer}\n")
        return path
