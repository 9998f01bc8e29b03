"""Pre-training datasets: MLM, MRM (MRFR / MRC), ITM (with optimal-transport inputs), and the VCR
second-stage pre-training datasets (MLM, MRFR, MRC on VCR's question, answer and rationale).

Masking and negative sampling draw from a generator seeded by ``(seed, epoch, index)``
(see :func:`~villa_fast.data.datasets.example_rng`), so they are reproducible and resumable.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from villa_fast.data.batch import base_batch, ot_inputs, pad_tensors
from villa_fast.data.codec import DataFormatError
from villa_fast.data.datasets import DetectFeatTxtTokDataset, VcrDataset, example_rng, sample_negative

__all__ = [
    "ItmDataset",
    "MlmDataset",
    "MlmDatasetForVcr",
    "MrcDataset",
    "MrcDatasetForVcr",
    "MrfrDataset",
    "MrfrDatasetForVcr",
    "VcrPretrainDataset",
    "itm_collate",
    "itm_ot_collate",
    "mlm_collate",
    "mrc_collate",
    "mrfr_collate",
    "random_word",
    "vcr_pretrain_collate",
]


def random_word(
    tokens: Sequence[int], vocab_range: Sequence[int], mask: int, rng: random.Random, prob: float = 0.15
) -> tuple[list[int], list[int]]:
    """BERT masking: each token with probability ``prob`` becomes a target; of those 80% -> [MASK],
    10% -> a random id in ``vocab_range``, 10% unchanged.  Labels are -1 elsewhere; at least one
    token is always masked."""
    tokens = list(tokens)
    labels = []
    lo, hi = int(vocab_range[0]), int(vocab_range[1])
    for i, tok in enumerate(tokens):
        p = rng.random()
        if p < prob:
            p /= prob
            if p < 0.8:
                tokens[i] = mask
            elif p < 0.9:
                tokens[i] = rng.randrange(lo, hi)
            labels.append(tok)
        else:
            labels.append(-1)
    if tokens and all(lab == -1 for lab in labels):
        labels[0] = tokens[0]
        tokens[0] = mask
    return tokens, labels


class MlmDataset(DetectFeatTxtTokDataset):
    """Items ``(input_ids, img_feat, img_pos_feat, attn_masks, txt_labels)``; labels -1 = ignore."""

    def __init__(self, txt_db, img_db, mask_prob: float = 0.15, **kwargs):
        super().__init__(txt_db, img_db, **kwargs)
        self.mask_prob = mask_prob

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        tokens, labels = random_word(
            example["input_ids"], self.txt_db.v_range, self.txt_db.mask, self.rng(i), self.mask_prob
        )
        input_ids = torch.tensor([self.txt_db.cls_] + tokens + [self.txt_db.sep], dtype=torch.long)
        txt_labels = torch.tensor([-1] + labels + [-1], dtype=torch.long)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, txt_labels


def mlm_collate(inputs, mask_prob: float | None = None) -> dict:
    """Adds ``txt_labels`` [B, L] (-1 = not a target). ``mask_prob`` (the dataset's) is kept as ``mlm_prob``:
    padding to a fixed shape sizes the masked-token rows by it (:func:`villa_fast.data.batch.mlm_rows`)."""
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    batch["txt_labels"] = pad_sequence([x[4] for x in inputs], batch_first=True, padding_value=-1)
    if mask_prob is not None:
        batch["mlm_prob"] = float(mask_prob)
    return batch


def _img_mask(rng: random.Random, prob: float, num_bb: int) -> Tensor:
    mask = [rng.random() < prob for _ in range(num_bb)]
    if num_bb and not any(mask):
        mask[rng.randrange(num_bb)] = True
    return torch.tensor(mask, dtype=torch.bool)


class MrfrDataset(DetectFeatTxtTokDataset):
    """Masked region feature regression: ``img_mask`` marks the ~``mask_prob`` regions zeroed."""

    def __init__(self, mask_prob: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_prob = mask_prob

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        img_mask = _img_mask(self.rng(i), self.mask_prob, num_bb)
        img_mask_tgt = torch.cat([torch.zeros(len(input_ids), dtype=torch.bool), img_mask])
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, img_mask, img_mask_tgt


def _mrm_common(batch: dict, img_masks: list[Tensor], img_mask_tgts: list[Tensor]) -> Tensor:
    n = batch["img_feat"].size(1)
    masks = pad_tensors([m.unsqueeze(-1) for m in img_masks], pad=False, max_len=n).squeeze(-1)
    batch["img_masks"] = masks
    batch["img_mask_tgt"] = pad_sequence(img_mask_tgts, batch_first=True, padding_value=False)
    return masks


def mrfr_collate(inputs) -> dict:
    """Adds ``img_masks`` [B, N] bool, ``img_mask_tgt`` [B, L_total] bool and ``feat_targets`` [S, D]
    (the clean features of the masked regions, in ``img_feat``'s dtype: float16 from an official img_db; the
    regression loss widens them to float32); the masked regions of ``img_feat`` are zeroed."""
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    masks = _mrm_common(batch, [x[4] for x in inputs], [x[5] for x in inputs])
    batch["feat_targets"] = batch["img_feat"][masks].contiguous()
    batch["img_feat"] = batch["img_feat"].masked_fill(masks.unsqueeze(-1), 0)
    return batch


class MrcDataset(MrfrDataset):
    """Masked region classification: the record's ``soft_labels`` of the masked regions are targets."""

    def __getitem__(self, i: int):
        example = DetectFeatTxtTokDataset.__getitem__(self, i)
        fname = self._img_ref(i, example)
        dump = self.img_db.get_dump(fname)
        if "soft_labels" not in dump:
            raise DataFormatError(f"{self.img_db.img_dir}: image {fname!r} has no soft_labels (needed for MRC)")
        img_feat = torch.from_numpy(dump["features"])
        bb = torch.from_numpy(dump["norm_bb"])
        img_pos_feat = torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=-1)
        soft = torch.from_numpy(dump["soft_labels"])  # stored dtype: mrc_collate widens the masked rows
        num_bb = img_feat.size(0)
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        img_mask = _img_mask(self.rng(i), self.mask_prob, num_bb)
        img_mask_tgt = torch.cat([torch.zeros(len(input_ids), dtype=torch.bool), img_mask])
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, soft, attn_masks, img_mask, img_mask_tgt


def mrc_collate(inputs) -> dict:
    """Adds ``img_masks``, ``img_mask_tgt`` and ``label_targets`` [S, C] float32 (the soft detector labels of the
    masked regions, batch row by batch row)."""
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    masks = _mrm_common(batch, [x[5] for x in inputs], [x[6] for x in inputs])
    # each example's masked rows, then widened: the rows of the padded [B, N, C] block masked by img_masks, in
    # the same order, without padding (and widening) the ~85% of rows that are not targets
    batch["label_targets"] = torch.cat(
        [s[m] for s, m in zip((x[3] for x in inputs), (x[5] for x in inputs), strict=True)]
    ).float()
    batch["img_feat"] = batch["img_feat"].masked_fill(masks.unsqueeze(-1), 0)
    return batch


class ItmDataset(DetectFeatTxtTokDataset):
    """Image-text matching: each epoch, with probability ``neg_sample_p`` a text is paired with a
    random other image (target 0), else with its own (target 1).  ``lens`` follow the pairing, so
    call ``set_epoch`` before the sampler builds the epoch's batches (the loader does)."""

    def __init__(self, txt_db, img_db, neg_sample_p: float = 0.5, **kwargs):
        super().__init__(txt_db, img_db, **kwargs)
        self.neg_sample_p = neg_sample_p
        self.all_imgs = sorted(set(self._txt2img.values()))
        self._pair_epoch: tuple[int, int] | None = None
        self._pair()

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        super().set_epoch(epoch, seed)
        self._pair()

    def _pair(self) -> None:
        key = (self.seed, self.epoch)
        if self._pair_epoch == key:
            return
        rng = example_rng(self.seed, self.epoch, -1)
        nbb = self.img_db.name2nbb
        self.labels, self.train_imgs, self.lens, self.pad_dims = [], [], [], []
        for id_, tl in zip(self.ids, self.txt_lens, strict=True):
            img = self._txt2img[id_]
            label = 0 if rng.random() < self.neg_sample_p else 1
            if label == 0:
                img = sample_negative(rng, self.all_imgs, [img], 1)[0]
            self.labels.append(label)
            self.train_imgs.append(img)
            self.lens.append(tl + nbb[img])
            self.pad_dims.append((tl + 2, nbb[img]))
        self._pair_epoch = key

    @property
    def pad_bounds(self) -> list[tuple[int, int]]:
        """Sizes an example may reach in some epoch, beyond this epoch's ``pad_dims``: a negative can be any
        image, so the longest text with the most regions of any image (fixed padded sizes must hold them)."""
        if not self.txt_lens:
            return []
        return [(max(self.txt_lens) + 2, max(self.img_db.name2nbb[i] for i in self.all_imgs))]

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        self._img_ref(i, example)  # the record's own image must be the one txt2img gives (the positive)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self.train_imgs[i])
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, torch.tensor([self.labels[i]], dtype=torch.long)


def itm_collate(inputs) -> dict:
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    batch["targets"] = torch.cat([x[4] for x in inputs], dim=0)
    return batch


def itm_ot_collate(inputs) -> dict:
    """:func:`itm_collate` plus ``ot_inputs`` (``ot_scatter``, ``scatter_max``, ``txt_pad``, ``img_pad``)."""
    batch = itm_collate(inputs)
    batch["ot_inputs"] = ot_inputs(
        batch["txt_lens"],
        batch["num_bbs"],
        batch["input_ids"].size(1),
        batch["img_feat"].size(1),
        batch["attn_masks"].size(1),
    )
    return batch


# ----------------------------------------------------------------------------- VCR second-stage pre-training


class VcrPretrainDataset(VcrDataset):
    """VCR text for pre-training (UNITER's second stage on VCR): one row per question, the gold answer and,
    with ``task="qar"``, the gold rationale: ``[CLS] q [SEP] a [SEP]`` / ``[CLS] q [SEP] a [SEP] r [SEP]``.

    Type ids as the authors' ``data/pretrain_vcr.py`` lays them out (which differs from fine-tuning): question
    0, answer 2, rationale 3, ``[CLS]`` 0, and each ``[SEP]`` the type of the segment before it (QA:
    ``0 0.. 0 2.. 2``; QAR: ``0 0.. 0 2.. 2 3.. 3``). Regions: the ground-truth boxes' image, then the
    detections' (as :class:`~villa_fast.data.VcrDataset`). A record needs ``qa_target`` (and, for QAR,
    ``qar_target``) >= 0: test records, which have none, cannot be pre-trained on.
    """

    def __init__(self, txt_db, img_db_gt=None, img_db=None, **kwargs):
        super().__init__(txt_db, img_db_gt, img_db, **kwargs)
        if self.task not in ("qa", "qar"):
            raise ValueError(f"VCR pre-training reads task 'qa' or 'qar' text, got {self.task!r}")

    def rng(self, i: int) -> random.Random:
        # QA text draws apart from QAR text: a question trained in both forms is masked independently in each
        salt = 0 if self.task == "qar" else 0x9E3779B1
        return example_rng(self.seed + salt, self.epoch, i)

    def _segments(self, example: dict) -> list[tuple[list[int], int]]:
        def target(key: str, n: int) -> int:
            t = int(example.get(key, -1))
            if not 0 <= t < n:
                raise DataFormatError(
                    f"{self.txt_db.db_dir}: VCR pre-training needs {key} in [0, {n}), got {t} (a test record?)"
                )
            return t

        segs = [(list(example["input_ids"]), 0)]
        answers = example["input_ids_as"]
        segs.append((list(answers[target("qa_target", len(answers))]), 2))
        if self.task == "qar":
            rationales = example["input_ids_rs"]
            segs.append((list(rationales[target("qar_target", len(rationales))]), 3))
        return segs

    def _text(self, example: dict, rng: random.Random | None, prob: float = 0.15):
        """(input_ids, txt_type_ids, txt_labels or None): each segment masked on its own (BERT masking with
        at least one target per segment) when ``rng`` is given."""
        ids, types, labels = [self.txt_db.cls_], [0], [-1]
        prev = 0
        for k, (seg, t) in enumerate(self._segments(example)):
            if rng is not None:
                seg, lab = random_word(seg, self.txt_db.v_range, self.txt_db.mask, rng, prob)
            else:
                lab = [-1] * len(seg)
            if k:  # the [SEP] between two segments: the type of the one before
                ids.append(self.txt_db.sep)
                types.append(prev)
                labels.append(-1)
            ids += seg
            types += [t] * len(seg)
            labels += lab
            prev = t
        ids.append(self.txt_db.sep)
        types.append(prev)
        labels.append(-1)
        as_long = [torch.tensor(x, dtype=torch.long) for x in (ids, types, labels)]
        return as_long[0], as_long[1], (as_long[2] if rng is not None else None)

    def _img_dump(self, pair) -> tuple[Tensor, Tensor, Tensor]:
        """Features, 7-d box features and soft labels of the regions (ground truth first), for MRC."""
        feats, poss, softs = [], [], []
        for db, name in self._pick(pair):
            dump = db.get_dump(name)
            if "soft_labels" not in dump:
                raise DataFormatError(f"{db.img_dir}: image {name!r} has no soft_labels (needed for MRC)")
            bb = torch.from_numpy(dump["norm_bb"]).float()
            feats.append(torch.from_numpy(dump["features"]))  # stored dtype (float16): the model widens them
            poss.append(torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=-1))
            softs.append(torch.from_numpy(dump["soft_labels"]))  # stored dtype: mrc_collate widens the masked rows
        return torch.cat(feats), torch.cat(poss), torch.cat(softs)


class MlmDatasetForVcr(VcrPretrainDataset):
    """Items ``(input_ids, img_feat, img_pos_feat, attn_masks, txt_labels, txt_type_ids)``."""

    def __init__(self, txt_db, img_db_gt=None, img_db=None, mask_prob: float = 0.15, **kwargs):
        super().__init__(txt_db, img_db_gt, img_db, **kwargs)
        self.mask_prob = mask_prob

    def __getitem__(self, i: int):
        example = self.txt_db[self.ids[i]]
        input_ids, types, labels = self._text(example, self.rng(i), self.mask_prob)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, labels, types


class MrfrDatasetForVcr(VcrPretrainDataset):
    """Items ``(input_ids, img_feat, img_pos_feat, attn_masks, img_mask, img_mask_tgt, txt_type_ids)``."""

    def __init__(self, mask_prob: float, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask_prob = mask_prob

    def __getitem__(self, i: int):
        example = self.txt_db[self.ids[i]]
        input_ids, types, _ = self._text(example, None)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        img_mask = _img_mask(self.rng(i), self.mask_prob, num_bb)
        img_mask_tgt = torch.cat([torch.zeros(len(input_ids), dtype=torch.bool), img_mask])
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, img_mask, img_mask_tgt, types


class MrcDatasetForVcr(MrfrDatasetForVcr):
    """Items ``(input_ids, img_feat, img_pos_feat, soft_labels, attn_masks, img_mask, img_mask_tgt,
    txt_type_ids)``: the soft labels of both images' regions (ground truth first)."""

    def __getitem__(self, i: int):
        example = self.txt_db[self.ids[i]]
        input_ids, types, _ = self._text(example, None)
        img_feat, img_pos_feat, soft = self._img_dump(self._img_ref(i, example))
        num_bb = img_feat.size(0)
        img_mask = _img_mask(self.rng(i), self.mask_prob, num_bb)
        img_mask_tgt = torch.cat([torch.zeros(len(input_ids), dtype=torch.bool), img_mask])
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, soft, attn_masks, img_mask, img_mask_tgt, types


def vcr_pretrain_collate(inputs, base, mlm_segments: int | None = None, **kwargs) -> dict:
    """``base`` (mlm_collate, mrfr_collate or mrc_collate, given ``kwargs``) of the VCR items, plus
    ``txt_type_ids`` [B, L] (each item's last entry, padded with 0). ``mlm_segments`` (MLM: 2 for QA text, 3
    when QAR text may be in the batch) is kept as ``batch["mlm_segments"]``: each segment is masked apart,
    which a fixed-shape batch's masked-row capacity allows for (:func:`villa_fast.data.batch.mlm_capacity`)."""
    batch = base([x[:-1] for x in inputs], **kwargs)
    batch["txt_type_ids"] = pad_sequence([x[-1] for x in inputs], batch_first=True, padding_value=0)
    if mlm_segments is not None:
        batch["mlm_segments"] = int(mlm_segments)
    return batch
