"""NLVR2: a sentence and two images -> true / false (cross-entropy over 2 classes)."""

from __future__ import annotations

import torch.nn.functional as F

from villa_fast.tasks.base import DataContext, Task
from villa_fast.train.config import ConfigError

__all__ = ["Nlvr2Task"]


class Nlvr2Task(Task):
    name = "nlvr2"
    kl_reduction = "batchmean"

    def build_model(self):
        from villa_fast.models import build_model

        kind = self.cfg["model"]
        if kind == "triplet":
            raise ConfigError("task nlvr2: key 'model' = 'triplet' has no head here; use 'paired-attn' or 'paired'")
        return build_model("nlvr2" if kind == "paired-attn" else "nlvr2_paired", self.model_config())

    def _dataset(self, txt: str, img: str, max_len: int, eval_: bool):
        from villa_fast.data import Nlvr2PairedDataset, Nlvr2PairedEvalDataset, TxtTokLmdb

        cls = Nlvr2PairedEvalDataset if eval_ else Nlvr2PairedDataset
        return cls(TxtTokLmdb(txt, max_len), self.img_db(img), use_img_type=self.cfg["use_img_type"])

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, nlvr2_paired_collate

        sets = [self._dataset(t, i, self.cfg["max_txt_len"], False) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.token_loader(ds, nlvr2_paired_collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import nlvr2_paired_eval_collate

        (txt, img), *_ = self.pairs(split)
        return self.token_loader(self._dataset(txt, img, -1, True), nlvr2_paired_eval_collate, ctx, train=False)

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
