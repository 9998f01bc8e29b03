"""Batch assembly shared by every task: padding, the gather index, masks, fixed-shape padding.

Every collate returns a dict with the authors' keys plus

* ``txt_lens`` / ``num_bbs``: python lists of per-row text length (CLS..SEP) and region count;
* ``txt_mask`` [B, L_txt] and ``img_mask`` [B, N] long, 1 on real tokens / regions;

and the packed layout the model expects: row ``i`` of the joint sequence is
``[txt_i (txt_lens[i]), regions_i (num_bbs[i]), padding]``; ``gather_index[i, j]`` is the
position of that element in ``cat([txt_emb [L_txt], img_emb [N]])``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

__all__ = [
    "PadBuckets",
    "base_batch",
    "get_gather_index",
    "ot_inputs",
    "pad_batch",
    "pad_tensors",
]


def pad_tensors(tensors: Sequence[Tensor], lens: Sequence[int] | None = None, pad: float = 0, max_len=None) -> Tensor:
    """B x [T_i, D] -> [B, max T, D] (or ``max_len``), filled with ``pad``.

    The dtype is the tensors' own (float16 region features stay float16: the model widens them), their promoted
    dtype when they differ (features of a float16 and a float32 db), so no value is rounded here."""
    if lens is None:
        lens = [t.size(0) for t in tensors]
    max_len = max(lens) if max_len is None else max_len
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t.dtype != dtype:
            dtype = torch.promote_types(dtype, t.dtype)
    out = tensors[0].new_full((len(tensors), max_len, *tensors[0].shape[1:]), pad, dtype=dtype)
    for i, (t, n) in enumerate(zip(tensors, lens, strict=True)):
        out[i, :n] = t[:n]
    return out


def get_gather_index(txt_lens: Sequence[int], num_bbs: Sequence[int], batch_size: int, max_len: int, out_size: int):
    """[B, out_size] long: row i = arange except ``[tl, tl + nbb) -> max_len + arange(nbb)``."""
    if not len(txt_lens) == len(num_bbs) == batch_size:
        raise ValueError("txt_lens, num_bbs and batch_size disagree")
    gather_index = torch.arange(out_size, dtype=torch.long).unsqueeze(0).repeat(batch_size, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs, strict=True)):
        gather_index[i, tl : tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long)
    return gather_index


def _lens_mask(lens: Sequence[int], width: int) -> Tensor:
    return (torch.arange(width).unsqueeze(0) < torch.tensor(list(lens)).unsqueeze(1)).long()


def ot_inputs(txt_lens: Sequence[int], num_bbs: Sequence[int], max_tl: int, max_nbb: int, joint_len: int) -> dict:
    """Inputs of the ITM optimal-transport term, with the authors' keys.

    ``ot_scatter`` [B, joint_len] maps each packed position back to the ``[txt (max_tl), img]``
    layout; ``txt_pad`` [B, max_tl] and ``img_pad`` [B, max_nbb] are 1 on padding (uint8).
    """
    bs = len(txt_lens)
    ot_scatter = torch.arange(joint_len, dtype=torch.long).unsqueeze(0).repeat(bs, 1)
    for i, tl in enumerate(txt_lens):
        ot_scatter[i, tl:] = torch.arange(max_tl, max_tl + joint_len - tl, dtype=torch.long)
    txt_pad = (1 - _lens_mask(txt_lens, max_tl)).to(torch.uint8)
    img_pad = (1 - _lens_mask(num_bbs, max_nbb)).to(torch.uint8)
    return {
        "ot_scatter": ot_scatter,
        "scatter_max": int(ot_scatter.max().item()),
        "txt_pad": txt_pad,
        "img_pad": img_pad,
    }


def base_batch(
    input_ids: Sequence[Tensor],
    img_feats: Sequence[Tensor],
    img_pos_feats: Sequence[Tensor],
) -> dict:
    """The keys every task shares, from per-row text ids, region features and 7-d boxes.

    ``img_feat`` keeps the features' dtype (float16 from an official img_db; the model widens it before its image
    projection); ``img_pos_feat`` the boxes' (float32 from the db: 7 values a region, not worth narrowing)."""
    txt_lens = [int(t.size(0)) for t in input_ids]
    num_bbs = [int(f.size(0)) for f in img_feats]
    ids = pad_sequence(list(input_ids), batch_first=True, padding_value=0)
    bs, max_tl = ids.shape
    max_nbb = max(num_bbs)
    out_size = max(tl + nbb for tl, nbb in zip(txt_lens, num_bbs, strict=True))
    return {
        "input_ids": ids,
        "position_ids": torch.arange(max_tl, dtype=torch.long).unsqueeze(0),
        "img_feat": pad_tensors(img_feats, num_bbs, max_len=max_nbb),
        "img_pos_feat": pad_tensors(img_pos_feats, num_bbs, max_len=max_nbb),
        "attn_masks": _lens_mask([tl + nbb for tl, nbb in zip(txt_lens, num_bbs, strict=True)], out_size),
        "gather_index": get_gather_index(txt_lens, num_bbs, bs, max_tl, out_size),
        "txt_lens": txt_lens,
        "num_bbs": num_bbs,
        "txt_mask": _lens_mask(txt_lens, max_tl),
        "img_mask": _lens_mask(num_bbs, max_nbb),
    }


class PadBuckets:
    """A small set of padded sizes for the text and region dimensions.

    With it, every batch is padded up to the smallest bucket that holds it, so a CUDA-graphed
    step meets only ``len(txt) * len(img)`` shapes (times the batch sizes the sampler picks;
    :class:`~villa_fast.data.sampler.TokenBucketSampler` fixes one batch size per shape).
    A batch longer than the largest bucket keeps its own size (counted in ``overflow``).
    """

    def __init__(self, txt: Sequence[int] = (16, 24, 32, 48, 64), img: Sequence[int] = (16, 36, 50, 100)):
        self.txt = tuple(sorted(int(x) for x in txt))
        self.img = tuple(sorted(int(x) for x in img))
        if not self.txt or not self.img:
            raise ValueError("PadBuckets needs at least one text and one image size")
        self.overflow = 0

    @staticmethod
    def _up(x: int, sizes: tuple[int, ...]) -> int:
        for s in sizes:
            if x <= s:
                return s
        return x

    def shape_of(self, max_txt: int, max_img: int) -> tuple[int, int]:
        """Padded (L_txt, N) for a batch whose longest text row / region set has these sizes."""
        return self._up(max_txt, self.txt), self._up(max_img, self.img)

    def __call__(self, batch: dict) -> dict:
        lt, n = self.shape_of(batch["input_ids"].size(1), batch["img_feat"].size(1))
        if lt > self.txt[-1] or n > self.img[-1]:
            self.overflow += 1
        return pad_batch(batch, lt, n)

    def __repr__(self) -> str:
        return f"PadBuckets(txt={self.txt}, img={self.img})"

    def shapes(self) -> list[tuple[int, int]]:
        """Every ``(L_txt, N)`` pair of sizes, smallest first."""
        return sorted(((t, n) for t in self.txt for n in self.img), key=lambda s: (s[0] + s[1], s))

    @classmethod
    def fit(cls, dims: Sequence[tuple[int, int]], n_txt: int = 4, n_img: int = 4) -> PadBuckets:
        """The sizes that pad these per-example ``(txt_len, num_bb)`` bounds least: at most ``n_txt`` text and
        ``n_img`` region sizes, the largest of each the data's largest (no training example overflows).

        A padded example costs its bucket's ``L_txt + N`` tokens, a text term plus a region term, so the two
        dimensions are fitted apart, each exactly (the sizes minimising the summed padding over the examples).
        """
        if not dims:
            raise ValueError("PadBuckets.fit needs at least one example's sizes")
        if n_txt < 1 or n_img < 1:
            raise ValueError(f"n_txt and n_img must be >= 1, got {n_txt} and {n_img}")
        return cls(_least_padding([int(t) for t, _ in dims], n_txt), _least_padding([int(n) for _, n in dims], n_img))


def _least_padding(values: list[int], k: int) -> tuple[int, ...]:
    """At most ``k`` sizes, the largest ``max(values)``, minimising ``sum_v (smallest size >= v) - v``.

    Exact dynamic programme over the distinct values (a size is best placed on a value): ``best[i][j]`` is the
    least padding of the ``j`` smallest distinct values covered by ``i`` sizes, the ``j``-th value the largest.
    """
    counts = Counter(values)
    v = sorted(counts)
    m = len(v)
    if m <= k:
        return tuple(v)
    c_pre, s_pre = [0] * (m + 1), [0] * (m + 1)  # prefix counts and prefix sums of count * value
    for j, x in enumerate(v):
        c_pre[j + 1] = c_pre[j] + counts[x]
        s_pre[j + 1] = s_pre[j] + counts[x] * x

    def cost(a: int, b: int) -> int:  # values a..b-1 padded to v[b-1]
        return v[b - 1] * (c_pre[b] - c_pre[a]) - (s_pre[b] - s_pre[a])

    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(k + 1)]
    back = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0
    for i in range(1, k + 1):
        for j in range(i, m + 1):
            for t in range(i - 1, j):
                c = best[i - 1][t] + cost(t, j)
                if c < best[i][j]:
                    best[i][j], back[i][j] = c, t
    sizes, j = [], m
    for i in range(k, 0, -1):
        sizes.append(v[j - 1])
        j = back[i][j]
    return tuple(sorted(sizes))


def _pad_dim(t: Tensor, dim: int, size: int, value) -> Tensor:
    cur = t.size(dim)
    if cur == size:
        return t
    if cur > size:
        raise ValueError(f"cannot pad dimension {dim} of size {cur} down to {size}")
    shape = list(t.shape)
    shape[dim] = size - cur
    return torch.cat([t, t.new_full(shape, value)], dim=dim)


# key -> (padding value) for tensors whose dim 1 is the text / region / joint dimension
_TXT_KEYS = {"input_ids": 0, "txt_type_ids": 0, "txt_labels": -1, "txt_mask": 0}
_IMG_KEYS = {"img_feat": 0, "img_pos_feat": 0, "img_type_ids": 0, "img_mask": 0, "img_masks": 0, "obj_masks": 1}
_JOINT_KEYS = {"attn_masks": 0, "img_mask_tgt": 0}


def pad_batch(batch: dict, txt_len: int, num_bb: int) -> dict:
    """Pad a collated batch to text width ``txt_len`` and ``num_bb`` regions.

    The joint width becomes ``txt_len + num_bb``; ``gather_index``, ``position_ids`` and
    ``ot_inputs`` are rebuilt; padded positions are masked everywhere (labels -1, obj_masks 1).
    A batch with ``txt_labels`` (MLM) also gets ``mlm_index`` and ``mlm_labels`` (:func:`mlm_rows`), so that
    its masked-token predictions have a row count fixed by the shape too.
    """
    out = dict(batch)
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
    bs = len(txt_lens)
    joint = txt_len + num_bb
    for key, val in _TXT_KEYS.items():
        if isinstance(out.get(key), Tensor):
            out[key] = _pad_dim(out[key], 1, txt_len, val)
    for key, val in _IMG_KEYS.items():
        if isinstance(out.get(key), Tensor):
            out[key] = _pad_dim(out[key], 1, num_bb, val)
    for key, val in _JOINT_KEYS.items():
        if isinstance(out.get(key), Tensor):
            out[key] = _pad_dim(out[key], 1, joint, val)
    out["position_ids"] = torch.arange(txt_len, dtype=torch.long).unsqueeze(0)
    out["gather_index"] = get_gather_index(txt_lens, num_bbs, bs, txt_len, joint)
    if isinstance(out.get("ot_inputs"), dict):
        out["ot_inputs"] = ot_inputs(txt_lens, num_bbs, txt_len, num_bb, joint)
    if isinstance(out.get("txt_labels"), Tensor):
        out["mlm_index"], out["mlm_labels"] = mlm_rows(
            out["txt_labels"], out.get("mlm_prob"), out.get("mlm_segments", 1)
        )
    return out


def mlm_capacity(rows: int, txt_len: int, mask_prob: float | None = None, segments: int = 1) -> int:
    """Rows reserved for the masked-token predictions of a ``[rows, txt_len]`` text block.

    With the masking probability ``p`` known: six standard deviations above the most a batch of this shape
    can expect (``p`` of the ``rows * (txt_len - 2)`` maskable tokens, plus the one token a segment with none
    masked gets, at most ``1 - p`` per segment; ``segments`` per row: VCR pre-training masks its question,
    answer and rationale apart), a multiple of 8, so a batch exceeds it about never; otherwise, and never
    more than, every text position.
    """
    full = rows * txt_len
    if mask_prob is None:
        return full
    p = float(mask_prob)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mask_prob is a probability: it must be in [0, 1], got {mask_prob!r}")
    if int(segments) < 1:
        raise ValueError(f"segments must be >= 1, got {segments!r}")
    n = rows * max(txt_len - 2, 1)
    forced = rows * int(segments)
    cap = p * n + forced * (1.0 - p) + 6.0 * math.sqrt(n * p * (1.0 - p) + forced)
    return min(full, 8 * math.ceil(cap / 8))


def mlm_rows(txt_labels: Tensor, mask_prob: float | None = None, segments: int = 1) -> tuple[Tensor, Tensor]:
    """The masked tokens of ``txt_labels`` [B, L] (-1 = not a target) as a fixed number of rows.

    Returns ``mlm_index`` (int64, flat positions ``b * L + t`` of the targets, row-major, then 0 on the padding
    rows) and ``mlm_labels`` (their target ids, then -1), both of length :func:`mlm_capacity` ``(B, L,
    mask_prob)``, or ``B * L`` for the rare batch with more targets. The model predicts the rows ``mlm_index``
    names; the loss and the consistency term leave the ``-1`` rows out. ``segments``: the text segments a row
    masks apart (at least one target each), see :func:`mlm_capacity`.
    """
    flat = txt_labels.reshape(-1)
    where = (flat != -1).nonzero().squeeze(1)
    cap = mlm_capacity(txt_labels.size(0), txt_labels.size(1), mask_prob, segments)
    if where.numel() > cap:
        cap = flat.numel()
    index = torch.zeros(cap, dtype=torch.long)
    labels = torch.full((cap,), -1, dtype=torch.long)
    index[: where.numel()] = where
    labels[: where.numel()] = flat[where]
    return index, labels
