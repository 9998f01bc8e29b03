"""Image-text retrieval: rank scores with a hinge loss over sampled (or mined hard) negatives;
recall@1/5/10 in both directions over the full text x image score matrix."""

from __future__ import annotations

from typing import Any

import torch

from villa_fast.tasks.base import DataContext, Task

__all__ = ["RetrievalTask", "recall_at_k"]


def recall_at_k(
    scores: torch.Tensor, txt_ids: list[str], img_ids: list[str], txt2img: dict[str, str], ks=(1, 5, 10)
) -> dict[str, float]:
    """scores [n_txt, n_img] -> ``txt_r{k}`` (image -> text retrieval, an image's best gt text in
    its top k), ``img_r{k}`` (text -> image, the gt image in the text's top k), and their mean."""
    img_pos = {n: j for j, n in enumerate(img_ids)}
    gt_img = torch.tensor([img_pos[txt2img[t]] for t in txt_ids])
    # text -> image: rank of the gt image in each row
    gt_score = scores.gather(1, gt_img.unsqueeze(1))
    img_rank = (scores > gt_score).sum(dim=1)
    # image -> text: the best rank over each image's gt texts, in each column
    order = scores.argsort(dim=0, descending=True)
    rank_of = torch.empty_like(order)
    rank_of.scatter_(0, order, torch.arange(scores.size(0)).unsqueeze(1).expand_as(order))
    best = torch.full((scores.size(1),), scores.size(0), dtype=torch.long)
    best = best.scatter_reduce(0, gt_img, rank_of[torch.arange(len(txt_ids)), gt_img], reduce="amin")
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = float((best < k).float().mean())
        out[f"img_r{k}"] = float((img_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


class RetrievalTask(Task):
    name = "retrieval"
    main_metric = "r_mean"
    supports_robust = False
    # a single rank score per row: the symmetric KL of the VILLA step needs a distribution over classes
    supports_adversarial = False

    def build_model(self):
        from villa_fast.models import build_model

        hard = self.cfg["hard_neg_size"] or None
        return build_model("retrieval", self.model_config(), margin=self.cfg["margin"], hard_size=hard)

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import (
            ConcatDatasetWithLens,
            ItmRankDataset,
            ItmRankDatasetHardNegFromImage,
            ItmRankDatasetHardNegFromText,
            TxtTokLmdb,
            itm_rank_collate,
            itm_rank_hn_collate,
        )
        from villa_fast.train.loader import ItemLoader

        c = self.cfg
        pairs = self.pairs("train")
        if c["hard_neg_size"] > 0:
            sets = []
            for txt, img in pairs:
                tdb, idb = TxtTokLmdb(txt, c["max_txt_len"]), self.img_db(img)
                sets.append(ItmRankDatasetHardNegFromText(tdb, idb, c["negative_size"]))
                sets.append(ItmRankDatasetHardNegFromImage(tdb, idb, c["negative_size"]))
            ds = ConcatDatasetWithLens(sets)
            return ItemLoader(
                ds,
                itm_rank_hn_collate,
                shuffle=True,
                seed=ctx.seed,
                rank=ctx.rank,
                world_size=ctx.world_size,
                num_workers=ctx.num_workers,
            )
        sets = [ItmRankDataset(TxtTokLmdb(t, c["max_txt_len"]), self.img_db(i), c["negative_size"]) for t, i in pairs]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.token_loader(ds, itm_rank_collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import ItmValDataset, TxtTokLmdb
        from villa_fast.train.loader import ItemLoader

        (txt, img), *_ = self.pairs(split)
        tdb = TxtTokLmdb(txt, -1)
        idb = self.img_db(img)
        n_img = len(set(tdb.txt2img[t] for t in tdb.id2len if tdb.txt2img[t] in idb))
        val = ItmValDataset(tdb, idb, mini_batch_size=n_img)
        self._img_ids = list(val.all_img_ids)
        ds = _Named(val)
        limit = self.cfg["max_val_examples"]
        return ItemLoader(
            ds, _first, shuffle=False, rank=ctx.rank, world_size=ctx.world_size, num_workers=0, limit=limit
        )

    def prepare(self, model, batch):
        m = getattr(model, "module", model)
        if model.training and self.cfg["hard_neg_size"] > 0:
            return m.hard_negative_batch(batch, self.cfg["hard_neg_size"])
        return batch

    def n_examples(self, batch) -> int:
        size = int(batch.get("sample_size") or 1)
        return int(batch["attn_masks"].size(0)) // max(size, 1)

    def eval_init(self):
        return {"n": 0.0, "pred": []}

    sum_keys = ("n",)

    def eval_batch(self, state, model, logits, batch) -> None:
        scores = logits.float().reshape(-1).cpu()
        # the dataset scores a text against every image, starting from its gt image: undo the rotation
        row = torch.roll(scores, shifts=int(batch["gt_pos"]))
        state["pred"].append([batch["txt_id"], row.tolist(), batch["gt_img"]])
        state["n"] += 1

    def eval_finish(self, state) -> dict[str, Any]:
        rows = state["pred"]
        if not rows:
            return {"r_mean": 0.0, "n": 0}
        txt_ids = [r[0] for r in rows]
        scores = torch.tensor([r[1] for r in rows])
        out = recall_at_k(scores, txt_ids, self._img_ids, {r[0]: r[2] for r in rows})
        out["n"] = len(rows)
        return out

    def write_predictions(self, preds, path_prefix: str) -> str:
        import json

        path = f"{path_prefix}.json"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"img_ids": self._img_ids, "scores": {r[0]: r[1] for r in preds}}, fh)
        return path


class _Named:
    """ItmValDataset items plus the text id, the image order and the gt image's position."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        batch = self.ds[i]
        txt_id = self.ds.ids[i]
        gt = self.ds._txt2img[txt_id]
        batch["txt_id"] = txt_id
        batch["gt_pos"] = self.ds.all_img_ids.index(gt)
        batch["gt_img"] = gt
        return batch


def _first(items):
    return items[0]
