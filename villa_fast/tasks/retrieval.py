"""Image-text retrieval: rank scores with a hinge loss over sampled (or mined hard) negatives;
recall@1/5/10 in both directions over the full text x image score matrix.

Batches come in groups: row 0 of each group is the positive (text, image) pair, the other rows its
negatives (``sample_size`` rows per group; with hard negatives one group per micro-batch, the
positive and the ``hard_neg_size`` highest-scoring of ``negative_size`` sampled negatives, mined
without gradient in eval mode as UNITER's ``train_itm_hard_negatives.py`` does). The task's logits
are the rank scores of a group laid out as one row, ``[groups, sample_size]``, not the model's
``[rows, 1]``.

Training with hard negatives accumulates as ``train_itm_hard_negatives.py`` does. There the loaders
hold one item per batch (a text with ``negative_size`` images, or an image with as many texts), and
``train_batch_size`` is the number of positive pairs per optimizer step, reached by gradient
accumulation: each pass of its loop takes an image-side item, then a text-side item (two loaders,
each shuffled on its own), backpropagates each item's hinge loss divided by ``train_batch_size``,
and steps the optimizer (and the learning-rate schedule) after every ``train_batch_size`` passes;
``gradient_accumulation_steps`` is not read. Here (:meth:`RetrievalTask.accumulation`) an optimizer
step is ``2 * train_batch_size`` micro-batches per process, image side and text side alternating
(:class:`AlternatingSidesSampler`), their summed gradients multiplied by ``1 / train_batch_size``
(the VILLA step's objective, hinge and KL term, alike); ``gradient_accumulation_steps`` must stay 1.
Across processes the gradients are averaged, as theirs are; each process takes its own share of each
side's permutation (their per-process loaders are not sharded). An image-side item's rows (one image, many
texts) are packed with each row's own text length; the authors' ``ItmRankDatasetHardNegFromImage`` passes
the last sampled text's length as the padded text width to ``get_gather_index``, which whenever that text
is not the longest reads text padding into the region slots of the other rows; that slip is not reproduced.

Adversarial fine-tuning. The authors' repository (zhegan27/VILLA) ships adversarial training scripts
for VQA, VCR, NLVR2 and SNLI-VE only (``train_{vqa,vcr,nlvr2,ve}_adv.py``); for retrieval it has the
inference script ``inf_itm.py`` alone, so the retrieval recipe behind the paper's Flickr30k numbers is
not public. This task runs the VILLA step of VILLA_SPEC section 2 unchanged on the group layout:

* task loss: UNITER's rank loss, mean over groups and negatives of
  ``max(0, margin + sigmoid(s_neg) - sigmoid(s_pos))`` (margin 0.2 in the released configs);
* consistency term: ``symKL(z_adv, z_clean)`` between the softmax distributions of the raw rank
  scores over each group (which candidate matches), summed over the group and averaged over
  groups (``batchmean``), alpha = ``adv_kl_weight``.

A single score per row has no distribution of its own; over the group the scores form one, and it is
the quantity the ranking is about: the KL penalises perturbations that reorder or reweight the
candidates, which is what the hinge loss trains. Each row (a text paired with one candidate image)
gets its own delta, normalised per row, as the candidate rows of VCR do.

Evaluation scores every validation text against every image (one loader item per text, its image
first) and reports recall@1/5/10 over the full score matrix, as the authors' ``evaluate``
(``utils/itm_eval.py`` with ``ItmEvalDataset``) does, with one difference: their text -> image recall
compares the whole ``nonzero()`` of the top-10 hit matrix with k, whose first column is the text's row
index, not a rank, so their ``img_r{k}`` also counts each of the first k texts whose gt image is
anywhere in its top 10 (at most k / N_txt more); here only the gt image's rank counts. Scores are
float32 (theirs float16, ties broken by ``topk``). ``inf_minibatch_size`` is their number of
(text, image) pairs scored per forward: a text's candidates go through the model in forwards of at
most that many rows, grouped by region count (the authors sort the images by it) and each padded to
its own widest row; the scores come back in the item's order, the same as one forward over all of
them up to float rounding. It must be a positive integer (checked when the task is built).

Robust evaluation (``evaluate --robust``) attacks each validation query (a text against every
image, its image first) with the embedding attack of :mod:`villa_fast.train.robust`, per row, and
reports the recalls under the attack (``robust_img_r1`` is text-to-image recall@1). The attack
ascends the listwise ranking loss ``-log softmax(scores)[gt]`` over the query's candidates rather than
the training hinge: the hinge is flat (zero gradient) for every query whose positive already leads
each negative by the margin after the sigmoid, so an attack on it would leave exactly the confident
queries untouched and report them as robust.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from villa_fast.data.sampler import ResumableBatchSampler, _epoch_rng
from villa_fast.tasks.base import EXAMPLES, Accumulation, DataContext, Task, _unwrap
from villa_fast.train.config import ConfigError

__all__ = [
    "AlternatingSidesSampler",
    "RetrievalTask",
    "group_scores",
    "inf_minibatch_size",
    "rank_attack_loss",
    "rank_hinge_loss",
    "read_retrieval_scores",
    "recall_at_k",
    "score_in_minibatches",
]

#: key of an evaluation item: score its rows in forwards of at most this many (consumed by the first forward)
_MINIBATCH_KEY = "inf_minibatch_size"


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
    # image -> text recall is over the images that have a gt text among the evaluated ones (all of them in a
    # full evaluation; fewer when max_val_examples stops it early)
    has_text = torch.zeros(scores.size(1), dtype=torch.bool)
    has_text[gt_img] = True
    out = {}
    for k in ks:
        out[f"txt_r{k}"] = float((best[has_text] < k).float().mean())
        out[f"img_r{k}"] = float((img_rank < k).float().mean())
    out["r_mean"] = sum(out.values()) / len(out)
    return out


def group_scores(scores: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """Rank scores [rows, 1] -> [groups, sample_size] (the whole batch is one group without ``sample_size``)."""
    flat = scores.reshape(-1)
    size = int(batch.get("sample_size") or flat.numel())
    if flat.numel() % size:
        raise ValueError(f"{flat.numel()} rows are not whole groups of sample_size={size}")
    return flat.reshape(-1, size)


def rank_hinge_loss(scores: Tensor, margin: float) -> Tensor:
    """UNITER's rank loss on group scores [G, S] (positive in column 0): the mean over groups and
    negatives of ``max(0, margin + sigmoid(neg) - sigmoid(pos))``; float32 at least (float64 stays)."""
    p = torch.sigmoid(scores if scores.dtype == torch.float64 else scores.float())
    return torch.clamp(margin + p[:, 1:] - p[:, :1], min=0.0).mean()


def rank_attack_loss(scores: Tensor) -> Tensor:
    """The loss the robust-evaluation attack ascends: ``-log softmax(scores)[:, 0]`` averaged over
    groups, the listwise ranking loss of the positive in column 0 (smooth, never flat)."""
    s = scores if scores.dtype == torch.float64 else scores.float()
    return F.cross_entropy(s, torch.zeros(s.size(0), dtype=torch.long, device=s.device))


def inf_minibatch_size(cfg: Mapping[str, Any]) -> int:
    """The config's ``inf_minibatch_size``, checked: a positive integer, else a :class:`ConfigError`."""
    v = cfg.get("inf_minibatch_size")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(
            f"config key 'inf_minibatch_size' must be a positive integer (retrieval evaluation: image-text "
            f"pairs scored per forward), got {v!r}"
        )
    return v


# per-row tensors whose dim 1 is padded: text width, region count, joint width
_TXT_KEYS = ("input_ids", "txt_type_ids", "txt_mask")
_IMG_KEYS = ("img_feat", "img_pos_feat", "img_type_ids", "img_mask")
_JOINT_KEYS = ("attn_masks",)


def _take_rows(batch: Mapping[str, Any], rows: list[int]) -> dict[str, Any]:
    """The batch restricted to ``rows`` (in that order), padded to their own widest text, region set and
    joint row. Tensors and lists with one entry per row follow the rows; the rest (a text or image shared
    by every row: first dim 1) is kept."""
    from villa_fast.data import get_gather_index

    n = batch["attn_masks"].size(0)
    index = torch.tensor(rows, dtype=torch.long, device=batch["attn_masks"].device)
    out: dict[str, Any] = {}
    for key, v in batch.items():
        if isinstance(v, Tensor) and v.dim() > 0 and v.size(0) == n and key != "position_ids":
            out[key] = v.index_select(0, index)
        elif isinstance(v, list | tuple) and len(v) == n:
            out[key] = [v[i] for i in rows]
        else:
            out[key] = v
    txt_lens, num_bbs = out["txt_lens"], out["num_bbs"]
    lt, nbb = max(txt_lens), max(num_bbs)
    joint = max(t + b for t, b in zip(txt_lens, num_bbs, strict=True))
    for keys, width in ((_TXT_KEYS, lt), (_IMG_KEYS, nbb), (_JOINT_KEYS, joint)):
        for key in keys:
            v = out.get(key)
            if isinstance(v, Tensor) and v.dim() > 1:
                out[key] = v[:, :width]
    if isinstance(out.get("position_ids"), Tensor):
        out["position_ids"] = out["position_ids"][:, :lt]
    device = out["attn_masks"].device
    out["gather_index"] = get_gather_index(txt_lens, num_bbs, len(rows), lt, joint).to(device)
    return out


def score_in_minibatches(model: nn.Module, batch: Mapping[str, Any], size: int) -> Tensor:
    """The model's scores [rows, 1] for ``batch``, computed in forwards of at most ``size`` rows.

    As the authors' evaluation, rows are grouped by region count (stable sort) so that each forward
    pads little; each forward is padded to its own rows (see :func:`_take_rows`). The scores come
    back in the batch's row order.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    n = batch["attn_masks"].size(0)
    if n <= size:
        return model(batch)
    num_bbs = batch["num_bbs"]
    order = sorted(range(n), key=lambda i: int(num_bbs[i]))
    parts = [model(_take_rows(batch, order[lo : lo + size])) for lo in range(0, n, size)]
    scores = torch.cat(parts, dim=0)
    back = torch.empty(n, dtype=torch.long, device=scores.device)
    back[torch.tensor(order, dtype=torch.long, device=scores.device)] = torch.arange(n, device=scores.device)
    return scores.index_select(0, back)


class AlternatingSidesSampler(ResumableBatchSampler):
    """Batch sampler of hard-negative training: one item per micro-batch, an image-side item then a text-side item,
    as each pass of the loop of UNITER's ``train_itm_hard_negatives.py`` takes them.

    The dataset holds ``n`` text-side items (indices ``[0, n)``: a text with sampled images) followed by ``n``
    image-side items (``[n, 2n)``: an image with sampled texts). Each epoch draws one permutation per side from
    ``(seed, epoch)`` (the two sides shuffled independently, as their two loaders are); rank ``r`` of
    ``world_size`` keeps positions ``r::world_size`` of each, both cut first to a multiple of ``world_size`` so
    that every rank runs as many micro-batches, and yields ``[image-side k]``, ``[text-side k]`` for each of its
    positions ``k``: ``2 * (n // world_size)`` micro-batches, image side on even positions. An optimizer step of an
    even number of micro-batches thus always holds as many of each side, across epoch ends too.

    The interface :class:`villa_fast.data.TokenBucketLoader` drives (``epoch``, ``seed``, ``start_batch``,
    ``set_epoch``, ``set_lens``, ``state_dict``), so the loader resumes it exactly.
    """

    def __init__(self, n: int, *, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a count of items per side, got {n!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if n < world_size:
            raise ValueError(
                f"hard-negative training: {n} texts cannot give each of {world_size} processes one item per side"
            )
        self._n = n
        self.seed, self.epoch = int(seed), int(epoch)
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0

    def set_lens(self, lens, pad_dims=None) -> None:
        """Called by the loader after the dataset's ``set_epoch``: the dataset must still hold both sides."""
        if len(lens) != 2 * self._n:
            raise ValueError(f"the dataset now has {len(lens)} items, the sampler was built for 2 x {self._n}")

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's micro-batches (one index each) for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = _epoch_rng(self.seed, epoch)
        n, world = self._n, self.world_size
        txt, img = list(range(n)), list(range(n, 2 * n))
        rng.shuffle(txt)
        rng.shuffle(img)
        keep = n // world * world
        mine_t, mine_i = txt[:keep][self.rank :: world], img[:keep][self.rank :: world]
        return [[i] for pair in zip(mine_i, mine_t, strict=True) for i in pair]

    def __len__(self) -> int:
        return 2 * (self._n // self.world_size)


#: the split name of validation on candidate minibatches (see :meth:`RetrievalTask.validation_split`)
MINIVAL = "minival"


class RetrievalTask(Task):
    name = "retrieval"
    data_kinds = ("caption",)
    main_metric = "r_mean"
    supports_robust = True
    supports_adversarial = True
    #: symKL summed over a group's candidates, averaged over groups
    kl_reduction = "batchmean"
    #: sampled negatives: batches of train_batch_size texts (each 1 + 2 * negative_size rows), shuffled, the last
    #: shorter one dropped, as UNITER's train_itm.py (DataLoader(shuffle=True, drop_last=True))
    train_drop_last = True
    #: evaluation: one item per text (the authors' batch_size=1), its forwards sized by inf_minibatch_size
    val_batch_unit = None
    #: training batches (sampled or hard negatives) pad to fixed shapes under adv_graphed
    fixed_shape_training = True

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__(cfg)
        inf_minibatch_size(cfg)
        accum = cfg.get("gradient_accumulation_steps", 1)
        if cfg.get("hard_neg_size", 0) > 0 and accum != 1:
            raise ConfigError(
                f"retrieval with hard negatives (hard_neg_size={cfg['hard_neg_size']}): train_batch_size sets the "
                f"positive pairs per optimizer step (train_itm_hard_negatives.py), so gradient_accumulation_steps "
                f"must be 1, got {accum!r}; raise train_batch_size instead"
            )

    @property
    def train_batch_unit(self) -> str | None:
        """:data:`EXAMPLES` with sampled negatives; None with hard negatives, where a micro-batch is one item
        (a text with its ``negative_size`` images, or an image with as many texts) whatever the batch size, and
        ``train_batch_size`` counts positive pairs per optimizer step instead (:meth:`accumulation`)."""
        return None if self.cfg["hard_neg_size"] > 0 else EXAMPLES

    def accumulation(self) -> Accumulation:
        """With hard negatives, as ``train_itm_hard_negatives.py``: ``train_batch_size`` image-side and as many
        text-side micro-batches per optimizer step, each loss divided by ``train_batch_size``. With sampled
        negatives, the default (``gradient_accumulation_steps``, unscaled), as ``train_itm.py``."""
        if self.cfg["hard_neg_size"] > 0:
            n = int(self.cfg["train_batch_size"])
            return Accumulation(2 * n, 1.0 / n)
        return super().accumulation()

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
            TokenBucketLoader,
            TxtTokLmdb,
            itm_rank_collate,
            itm_rank_hn_collate,
        )

        c = self.cfg
        pairs = self.pairs("train")
        if c["hard_neg_size"] > 0:
            # every text-side item, then every image-side item (each side concatenated over the pairs, as the
            # authors' two ConcatDatasets); the sampler alternates the sides
            txt_side, img_side = [], []
            for txt, img in pairs:
                tdb, idb = TxtTokLmdb(txt, c["max_txt_len"]), self.img_db(img)
                txt_side.append(ItmRankDatasetHardNegFromText(tdb, idb, c["negative_size"]))
                img_side.append(ItmRankDatasetHardNegFromImage(tdb, idb, c["negative_size"]))
            n_txt, n_img = sum(map(len, txt_side)), sum(map(len, img_side))
            if n_txt != n_img:
                raise ValueError(f"hard-negative training: {n_txt} text-side items but {n_img} image-side items")
            ds = ConcatDatasetWithLens(txt_side + img_side)
            self.check_data_fits_model(ds)
            sampler = AlternatingSidesSampler(n_txt, seed=ctx.seed, rank=ctx.rank, world_size=ctx.world_size)
            return TokenBucketLoader(
                ds,
                itm_rank_hn_collate,
                sampler,
                num_workers=ctx.num_workers,
                device=ctx.device,
                pad_buckets=self.pad_buckets(),
            )
        sets = [ItmRankDataset(TxtTokLmdb(t, c["max_txt_len"]), self.img_db(i), c["negative_size"]) for t, i in pairs]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.batch_loader(ds, itm_rank_collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import ItmValDataset, TxtTokLmdb
        from villa_fast.train.loader import ItemLoader

        mini = split == MINIVAL
        (txt, img), *_ = self.pairs("val" if mini else split)
        tdb = TxtTokLmdb(txt, -1)
        idb = self.img_db(img)
        n_img = len(set(tdb.txt2img[t] for t in tdb.id2len if tdb.txt2img[t] in idb))
        size = inf_minibatch_size(self.cfg)
        val = ItmValDataset(tdb, idb, mini_batch_size=min(size, n_img) if mini else n_img)
        if not mini:
            self._img_ids = list(val.all_img_ids)
        self.check_data_fits_model(val)
        ds = _Named(val, size, mini)
        limit = self.cfg["max_val_examples"]
        # in this process: the full evaluation's items are gathered from the image bank the dataset keeps (one
        # copy, read once); workers would each read and hold their own
        return ItemLoader(
            ds, _first, shuffle=False, rank=ctx.rank, world_size=ctx.world_size, num_workers=0, limit=limit
        )

    def prepare(self, model, batch):
        m = getattr(model, "module", model)
        if model.training and self.cfg["hard_neg_size"] > 0:
            return m.hard_negative_batch(batch, self.cfg["hard_neg_size"])
        return batch

    def step_batch(self, batch):
        # forward and loss read tensors and the group size (one value per run): the per-row length lists stay
        # out of graph keys
        return {k: v for k, v in batch.items() if isinstance(v, Tensor) or k == "sample_size"}

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """Rank scores as ``[groups, sample_size]``: what the loss, the VILLA step's KL and the attack see.

        An evaluation item's first forward (its clean scores, without gradient) runs in forwards of at
        most ``inf_minibatch_size`` rows (:func:`score_in_minibatches`). The item gives that size once:
        any later forward of the same batch (the robust attack's steps and its final scoring) is one
        pass over all rows, since the attack's perturbations are sized for the whole batch.
        """
        size = batch.pop(_MINIBATCH_KEY, None) if isinstance(batch, dict) else None
        if size and not torch.is_grad_enabled():
            return group_scores(score_in_minibatches(model, batch, int(size)), batch)
        return group_scores(model(batch), batch)

    def loss(self, model: nn.Module, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return rank_hinge_loss(group_scores(logits, batch), _unwrap(model).margin)

    def attack_loss(self, model: nn.Module, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return rank_attack_loss(group_scores(logits, batch))

    def n_examples(self, batch) -> int:
        size = int(batch.get("sample_size") or 1)
        return int(batch["attn_masks"].size(0)) // max(size, 1)

    def validation_split(self, final: bool) -> str:
        """Without ``full_val``, validation during training scores each text against its image and the next
        ``inf_minibatch_size - 1`` images only (text -> image recall, the authors' ``validate`` on
        ``ItmValDataset``); the last validation, and every one with ``full_val``, is the full evaluation."""
        return "val" if final or self.cfg["full_val"] else MINIVAL

    def has_split(self, split: str) -> bool:
        return super().has_split("val" if split == MINIVAL else split)

    def eval_init(self):
        return {"n": 0.0, "mini": 0.0, "pred": []}

    sum_keys = ("n", "mini")

    def eval_batch(self, state, model, logits, batch) -> None:
        scores = logits.float().reshape(-1).cpu()
        if batch.get("minival"):
            # the gt image is the first candidate: its rank is the number of candidates scored above it
            state["pred"].append([batch["txt_id"], int((scores[1:] > scores[0]).sum())])
            state["mini"] += 1
            state["n"] += 1
            return
        # the dataset scores a text against every image, starting from its gt image: undo the rotation (a float32
        # tensor per text: the matrix is stacked once at the end, never held as Python numbers)
        row = torch.roll(scores, shifts=int(batch["gt_pos"]))
        state["pred"].append([batch["txt_id"], row, batch["gt_img"]])
        state["n"] += 1

    def eval_finish(self, state) -> dict[str, Any]:
        rows = state["pred"]
        if state["mini"]:
            ranks = torch.tensor([r[1] for r in rows])
            return {**{f"img_r{k}": float((ranks < k).float().mean()) for k in (1, 5, 10)}, "n": len(rows)}
        if not rows:
            return {"r_mean": 0.0, "n": 0}
        txt_ids = [r[0] for r in rows]
        scores = torch.stack([r[1] for r in rows])
        out = recall_at_k(scores, txt_ids, self._img_ids, {r[0]: r[2] for r in rows})
        out["n"] = len(rows)
        return out

    def write_predictions(self, preds, path_prefix: str) -> str:
        """Minibatch validation: ``PREFIX.json``, ``{"minival_gt_rank": {txt_id: rank of the gt image}}``. The
        full evaluation: ``PREFIX.safetensors``, the score matrix (``scores`` [texts, images], float32) with the
        text and image ids in its metadata (:func:`read_retrieval_scores`): 20 MB for Flickr30k's 5000 x 1000
        where JSON took 100 MB and seconds to write at every validation."""
        import json

        if preds and isinstance(preds[0][1], int):  # minibatch validation: the gt image's rank per text
            path = f"{path_prefix}.json"
            with open(path, "w", encoding="utf-8") as fh:
                json.dump({"minival_gt_rank": {r[0]: r[1] for r in preds}}, fh)
            return path
        from safetensors.torch import save_file

        path = f"{path_prefix}.safetensors"
        scores = torch.stack([r[1] for r in preds]) if preds else torch.zeros(0, len(self._img_ids))
        meta = {"txt_ids": json.dumps([r[0] for r in preds]), "img_ids": json.dumps(list(self._img_ids))}
        save_file({"scores": scores.float().contiguous()}, path, metadata=meta)
        return path


def read_retrieval_scores(path: str | os.PathLike) -> tuple[list[str], list[str], Tensor]:
    """``(txt_ids, img_ids, scores)`` of a full retrieval evaluation's predictions file (``PREFIX.safetensors``):
    ``scores[i, j]`` is text ``txt_ids[i]`` against image ``img_ids[j]``."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        if "txt_ids" not in meta or "img_ids" not in meta or "scores" not in fh.keys():
            raise ValueError(f"{path}: not a retrieval scores file (no scores tensor or no txt_ids / img_ids)")
        scores = fh.get_tensor("scores")
    return json.loads(meta["txt_ids"]), json.loads(meta["img_ids"]), scores


class _Named:
    """ItmValDataset items plus the text id, the gt image's name and position, and the forward size (and the
    ``minival`` flag: the item holds a minibatch of candidates, the gt image first)."""

    def __init__(self, ds, minibatch: int, mini: bool = False):
        self.ds = ds
        self.minibatch = minibatch
        self.mini = mini

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        batch = self.ds[i]
        txt_id = self.ds.ids[i]
        gt = self.ds._txt2img[txt_id]
        batch["txt_id"] = txt_id
        batch["gt_pos"] = self.ds.all_img_ids.index(gt)
        batch["gt_img"] = gt
        batch[_MINIBATCH_KEY] = self.minibatch
        if self.mini:
            batch["minival"] = True
        return batch


def _first(items):
    return items[0]
