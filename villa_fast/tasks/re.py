"""Referring expressions: pick the referred region among the image's regions."""

from __future__ import annotations

import torch.nn.functional as F

from villa_fast.tasks.base import DataContext, Task

__all__ = ["ReTask"]


class ReTask(Task):
    name = "re"
    supports_adversarial = True

    def build_model(self):
        from villa_fast.models import UniterForReferringExpression

        return UniterForReferringExpression(self.model_config(), mlp=self.cfg["mlp"])

    def _dataset(self, txt: str, img: str, max_len: int):
        from villa_fast.data import ReDataset, ReTxtTokLmdb

        return ReDataset(ReTxtTokLmdb(txt, max_len), self.img_db(img))

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, re_collate

        sets = [self._dataset(t, i, self.cfg["max_txt_len"]) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.token_loader(ds, _ReCollate(re_collate, with_ids=False), ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import re_collate

        (txt, img), *_ = self.pairs(split)
        ds = self._dataset(txt, img, -1)
        return self.token_loader(_WithIds(ds), _ReCollate(re_collate, with_ids=True), ctx, train=False)

    def eval_batch(self, state, model, logits, batch) -> None:
        logits = logits.float()
        targets = batch["targets"].to(logits.device).reshape(-1)
        state["loss"] += float(F.cross_entropy(logits, targets, reduction="sum"))
        pred = logits.argmax(dim=1)
        state["correct"] += float((pred == targets).sum())
        state["n"] += targets.numel()
        state["pred"].extend(
            {"sent_id": q, "pred_region": int(p)} for q, p in zip(batch["qids"], pred.tolist(), strict=True)
        )


class _WithIds:
    """Adds the text id to each item, so evaluation can name its predictions."""

    def __init__(self, ds):
        self.ds = ds
        self.lens = ds.lens
        self.pad_dims = getattr(ds, "pad_dims", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds.ids[i], self.ds[i]


class _ReCollate:
    def __init__(self, collate, with_ids: bool):
        self.collate, self.with_ids = collate, with_ids

    def __call__(self, inputs):
        if not self.with_ids:
            return self.collate(inputs)
        batch = self.collate([x for _, x in inputs])
        batch["qids"] = [q for q, _ in inputs]
        return batch
