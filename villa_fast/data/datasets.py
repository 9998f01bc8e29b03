"""Fine-tuning datasets and collate functions (VQA, VE, NLVR2, VCR, retrieval, referring expressions).

Names and item layouts follow the authors' modules; each collate returns the batch dict
described in :mod:`villa_fast.data.batch`.  Randomness (negative sampling) comes from a
generator seeded by ``(seed, epoch, index)``, so an example is the same whichever worker
loads it and a resumed epoch replays exactly; call ``set_epoch`` between epochs (the loader
of :mod:`villa_fast.data.sampler` does).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import ConcatDataset, Dataset

from villa_fast.data.batch import base_batch, get_gather_index, pad_tensors
from villa_fast.data.codec import DataFormatError
from villa_fast.data.db import VCR_PERSON_TAGS, DetectFeatLmdb, TxtTokLmdb, load_counts, load_json

__all__ = [
    "ConcatDatasetWithLens",
    "DetectFeatTxtTokDataset",
    "ItmRankDataset",
    "ItmRankDatasetHardNegFromImage",
    "ItmRankDatasetHardNegFromText",
    "ItmValDataset",
    "Nlvr2PairedDataset",
    "Nlvr2PairedEvalDataset",
    "Nlvr2TripletDataset",
    "Nlvr2TripletEvalDataset",
    "RE_DET_PREFIX",
    "RE_GT_PREFIX",
    "ReDataset",
    "ReEvalDataset",
    "ReTxtTokLmdb",
    "VcrDataset",
    "VcrEvalDataset",
    "VcrTxtTokLmdb",
    "VeDataset",
    "VeEvalDataset",
    "VqaDataset",
    "VqaEvalDataset",
    "example_rng",
    "itm_rank_collate",
    "itm_rank_hn_collate",
    "itm_val_collate",
    "nlvr2_paired_collate",
    "nlvr2_paired_eval_collate",
    "nlvr2_triplet_collate",
    "nlvr2_triplet_eval_collate",
    "re_collate",
    "re_det_img_name",
    "re_eval_collate",
    "re_image_size",
    "vcr_collate",
    "vcr_eval_collate",
    "ve_collate",
    "ve_eval_collate",
    "vqa_collate",
    "vqa_eval_collate",
]

logger = logging.getLogger(__name__)


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """A generator that depends only on (seed, epoch, index)."""
    return random.Random(((int(seed) * 1_000_003 + int(epoch)) * 2_147_483_647 + int(index)) & ((1 << 63) - 1))


def _names(img) -> list[str]:
    return [img] if isinstance(img, str) else list(img)


class DetectFeatTxtTokDataset(Dataset):
    """Base: text ids from ``txt_db.id2len`` (in its order; a subclass may choose others by
    overriding ``_texts``) with their image(s) from ``txt2img``.

    ``lens[i]`` (text + regions, the sampler's length) and ``pad_dims[i]`` (upper bounds of
    one row's text width with CLS/SEP and region count, used for fixed-shape padding) are
    computed up front.  Texts whose image is not in ``img_db`` raise ``KeyError`` naming
    them, or with ``skip_missing_images=True`` are skipped, counted in ``num_missing_img``
    and logged.

    Each text's ``txt2img`` entry must have the form the class reads (``images_per_text``: 1, an
    image name; 2, a list of two names), else a :class:`DataFormatError` names ``txt2img.json``
    and the text.  Items load the images of that entry (:meth:`_img_ref`), the ones ``lens`` and
    ``pad_dims`` were computed from; a record whose own ``img_fname`` names others is an error.
    """

    #: CLS + SEP(s) a row adds to the stored ``input_ids``
    n_special = 2
    #: images a text's ``txt2img`` entry names: 1 (a name) or 2 (a list of two names)
    images_per_text = 1
    #: what the two names of a 2-image entry are, for error messages
    img_pair_doc = ""

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, skip_missing_images: bool = False):
        if not isinstance(txt_db, TxtTokLmdb):
            raise TypeError(f"txt_db must be a TxtTokLmdb, got {type(txt_db).__name__}")
        if not isinstance(img_db, DetectFeatLmdb):
            raise TypeError(f"img_db must be a DetectFeatLmdb, got {type(img_db).__name__}")
        self.txt_db = txt_db
        self.img_db = img_db
        self.seed = 0
        self.epoch = 0
        txt2img = txt_db.txt2img
        if not isinstance(txt2img, dict):
            raise DataFormatError(
                f"{txt_db.db_dir}/txt2img.json: must map text ids to images, found a {type(txt2img).__name__}"
            )
        ids, txt_lens, self.num_missing_img = [], [], 0
        missing: list[tuple[str, str]] = []
        for id_, tl in self._texts():
            if id_ not in txt2img:
                raise DataFormatError(f"{txt_db.db_dir}/txt2img.json: no entry for text id {id_!r}")
            self._check_img_ref(id_, txt2img[id_])
            absent = self._missing_image(txt2img[id_])
            if absent is not None:
                missing.append((id_, absent))
                continue
            ids.append(id_)
            txt_lens.append(tl)
        if missing:
            if not skip_missing_images:
                id_, name = missing[0]
                raise DataFormatError(
                    f"{len(missing)} texts of {txt_db.db_dir} refer to images absent from {img_db.img_dir}; "
                    f"first: text {id_!r} -> image {name!r} (an img_db's keys are the .npz file names, extension "
                    "included; the data classes skip such texts with skip_missing_images=True)"
                )
            self.num_missing_img = len(missing)
            logger.warning("%s: skipped %d texts whose image is not in %s", txt_db.db_dir, len(missing), img_db.img_dir)
        self.ids: list[str] = ids
        self.txt_lens = txt_lens
        self._txt2img = {id_: txt2img[id_] for id_ in ids}
        self.lens, self.pad_dims = self._compute_lens()

    def _texts(self) -> Sequence[tuple[str, int]]:
        """``(text id, token length)`` of the candidate examples, in dataset order."""
        return list(self.txt_db.id2len.items())

    def _check_img_ref(self, id_: str, ref) -> None:
        """A :class:`DataFormatError` unless text ``id_``'s ``txt2img`` entry ``ref`` has the form this class reads."""
        n = self.images_per_text
        if n == 1:
            if isinstance(ref, str):
                return
            want = "an image name (a string)"
        else:
            if isinstance(ref, list | tuple) and len(ref) == n and all(isinstance(x, str) for x in ref):
                return
            want = f"a list of {n} image names{self.img_pair_doc}"
        raise DataFormatError(
            f"{self.txt_db.db_dir}/txt2img.json: text {id_!r} refers to {ref!r:.120}, but "
            f"{type(self).__name__} expects {want}"
        )

    def _img_ref(self, i: int, example: dict | None = None):
        """The image(s) of example ``i``: its checked ``txt2img`` entry, from which ``lens`` and ``pad_dims`` were
        computed. ``example`` (its record): a record ``img_fname`` naming other images is a DataFormatError
        (the official databases write the same names to both; features from elsewhere would not fit the shapes
        computed for the example)."""
        ref = self._txt2img[self.ids[i]]
        if example is not None and "img_fname" in example:
            own = example["img_fname"]
            if isinstance(own, str):
                own = [own]
            if not isinstance(own, list | tuple) or list(own) != _names(ref):
                raise DataFormatError(
                    f"{self._where(i)}: the record's img_fname {example['img_fname']!r:.120} disagrees with "
                    f"{self.txt_db.db_dir}/txt2img.json, which gives {ref!r:.120}"
                )
        return ref

    def _missing_image(self, img_ref) -> str | None:
        for name in _names(img_ref):
            if name not in self.img_db.name2nbb:
                return name
        return None

    def _compute_lens(self) -> tuple[list[int], list[tuple[int, int]]]:
        nbb = self.img_db.name2nbb
        lens, dims = [], []
        for id_, tl in zip(self.ids, self.txt_lens, strict=True):
            n = nbb[self._txt2img[id_]]
            lens.append(tl + n)
            dims.append((tl + self.n_special, n))
        return lens, dims

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def rng(self, i: int) -> random.Random:
        return example_rng(self.seed, self.epoch, i)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.txt_db[self.ids[i]]

    def _where(self, i: int) -> str:
        """Database and key of example ``i``, for error messages."""
        return f"{self.txt_db.db_dir} key {self.ids[i]!r}"

    def _get_img_feat(self, fname: str) -> tuple[Tensor, Tensor, int]:
        feat, bb = self.img_db[fname]
        img_bb = torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=-1)
        return feat, img_bb, feat.size(0)


class ConcatDatasetWithLens(ConcatDataset):
    """Concatenation that keeps ``lens`` / ``pad_dims`` (and ``pad_bounds``, ``pad_prices``) for token bucketing."""

    def __init__(self, datasets):
        super().__init__(datasets)
        rows = {getattr(d, "rows_per_example", 1) for d in self.datasets}
        if len(rows) != 1:
            raise ValueError(f"datasets with different rows per example cannot be concatenated: {sorted(rows)}")
        self.rows_per_example = rows.pop()
        self._gather()

    def _gather(self) -> None:
        self.lens = [n for d in self.datasets for n in d.lens]
        self.pad_dims = [p for d in self.datasets for p in getattr(d, "pad_dims", [(n, 0) for n in d.lens])]
        self.pad_bounds = [b for d in self.datasets for b in getattr(d, "pad_bounds", [])]
        priced = [getattr(d, "pad_prices", None) for d in self.datasets]
        if any(p is not None for p in priced):
            if any(p is None for p in priced):
                raise ValueError("datasets priced by pad_prices cannot be concatenated with datasets priced by shape")
            self.pad_prices = [n for p in priced for n in p]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch, seed)
        self._gather()  # lengths that follow the epoch (ITM's negatives) follow it here too


# ----------------------------------------------------------------------------- VQA / VE


def _vqa_target(example: dict, num_answers: int, where: str) -> Tensor:
    """Soft scores ``[num_answers]`` of a record (its ``labels`` / ``scores`` already checked by the reader)."""
    target = torch.zeros(num_answers)
    tgt = example.get("target")
    if tgt is None:
        return target
    if not isinstance(tgt, dict):
        raise DataFormatError(
            f"{where}: 'target' is a {type(tgt).__name__}, not the map of answer labels and scores this task needs"
        )
    labels, scores = tgt.get("labels"), tgt.get("scores")
    if labels is not None and len(labels):
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if int(labels.max()) >= num_answers or int(labels.min()) < 0:
            raise DataFormatError(f"{where}: answer label out of range [0, {num_answers}): {labels.tolist()}")
        target.scatter_(0, labels, torch.as_tensor(list(scores), dtype=torch.float32))
    return target


class VqaDataset(DetectFeatTxtTokDataset):
    """Items ``(input_ids, img_feat, img_pos_feat, attn_masks, target [num_answers] soft scores)``."""

    def __init__(self, num_answers: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_answers = num_answers

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        target = _vqa_target(example, self.num_answers, self._where(i))
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, target


def vqa_collate(inputs) -> dict:
    input_ids, img_feats, img_pos_feats, _, targets = map(list, zip(*inputs, strict=True))
    batch = base_batch(input_ids, img_feats, img_pos_feats)
    batch["targets"] = torch.stack(targets, dim=0)
    return batch


class VqaEvalDataset(VqaDataset):
    """Items ``(qid, ...)``; the target is ``None`` when the record has none (test split)."""

    def __getitem__(self, i: int):
        example = DetectFeatTxtTokDataset.__getitem__(self, i)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        target = _vqa_target(example, self.num_answers, self._where(i)) if "target" in example else None
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return self.ids[i], input_ids, img_feat, img_pos_feat, attn_masks, target


def vqa_eval_collate(inputs) -> dict:
    qids = [x[0] for x in inputs]
    targets = [x[-1] for x in inputs]
    batch = base_batch([x[1] for x in inputs], [x[2] for x in inputs], [x[3] for x in inputs])
    batch["qids"] = qids
    have = [t is not None for t in targets]
    if not any(have):  # an unlabelled split (VQA's test2015)
        batch["targets"] = None
    else:
        like = targets[have.index(True)]
        batch["targets"] = torch.stack([t if t is not None else torch.zeros_like(like) for t in targets], dim=0)
        if not all(have):  # rows without a target are scored by no metric
            batch["labelled"] = torch.tensor(have)
    return batch


class VeDataset(VqaDataset):
    """SNLI-VE: VQA with 3 classes (soft score 1 on the gold label)."""

    def __init__(self, *args, **kwargs):
        super().__init__(3, *args, **kwargs)


class VeEvalDataset(VqaEvalDataset):
    def __init__(self, *args, **kwargs):
        super().__init__(3, *args, **kwargs)


ve_collate = vqa_collate
ve_eval_collate = vqa_eval_collate


# ----------------------------------------------------------------------------- NLVR2


class _Nlvr2Base(DetectFeatTxtTokDataset):
    images_per_text = 2
    img_pair_doc = " (the statement's two images)"

    def __init__(self, txt_db, img_db, use_img_type: bool = True, **kwargs):
        super().__init__(txt_db, img_db, **kwargs)
        self.use_img_type = use_img_type

    def _label(self, example: dict, i: int) -> int:
        target = example.get("target")
        if target is None or isinstance(target, dict):
            what = "no 'target'" if target is None else "a map 'target'"
            raise DataFormatError(f"{self._where(i)}: {what}, not the 0 / 1 label NLVR2 needs")
        return int(target)


class Nlvr2PairedDataset(_Nlvr2Base):
    """Two rows per example ``[txt, img_k]`` with image type ids k+1; target 0/1."""

    rows_per_example = 2

    def _compute_lens(self):
        nbb = self.img_db.name2nbb
        lens, dims = [], []
        for id_, tl in zip(self.ids, self.txt_lens, strict=True):
            ns = [nbb[n] for n in self._txt2img[id_]]
            lens.append(2 * tl + sum(ns))
            dims.append((tl + 2, max(ns)))
        return lens, dims

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        outs = []
        for k, img in enumerate(self._img_ref(i, example)):
            img_feat, img_pos_feat, num_bb = self._get_img_feat(img)
            input_ids = self.txt_db.combine_inputs(example["input_ids"])
            attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
            img_type_ids = torch.full((num_bb,), k + 1, dtype=torch.long) if self.use_img_type else None
            outs.append((input_ids, img_feat, img_pos_feat, attn_masks, img_type_ids))
        return tuple(outs), self._label(example, i)


def nlvr2_paired_collate(inputs) -> dict:
    rows = [row for outs, _ in inputs for row in outs]
    batch = base_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    type_ids = [r[4] for r in rows]
    batch["img_type_ids"] = None if type_ids[0] is None else pad_sequence(type_ids, batch_first=True, padding_value=0)
    batch["targets"] = torch.tensor([t for _, t in inputs], dtype=torch.long)
    return batch


class Nlvr2PairedEvalDataset(Nlvr2PairedDataset):
    def __getitem__(self, i: int):
        outs, target = super().__getitem__(i)
        return self.ids[i], outs, target


def nlvr2_paired_eval_collate(inputs) -> dict:
    batch = nlvr2_paired_collate([(outs, t) for _, outs, t in inputs])
    batch["qids"] = [q for q, _, _ in inputs]
    return batch


class Nlvr2TripletDataset(_Nlvr2Base):
    """One row per example ``[txt, img0 regions, img1 regions]`` with image type ids 1/2."""

    def _compute_lens(self):
        nbb = self.img_db.name2nbb
        lens, dims = [], []
        for id_, tl in zip(self.ids, self.txt_lens, strict=True):
            n = sum(nbb[x] for x in self._txt2img[id_])
            lens.append(tl + n)
            dims.append((tl + 2, n))
        return lens, dims

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        feats, poss, types = [], [], []
        for k, img in enumerate(self._img_ref(i, example)):
            f, p, n = self._get_img_feat(img)
            feats.append(f)
            poss.append(p)
            types.append(torch.full((n,), k + 1, dtype=torch.long))
        img_feat, img_pos_feat = torch.cat(feats), torch.cat(poss)
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        attn_masks = torch.ones(len(input_ids) + img_feat.size(0), dtype=torch.long)
        img_type_ids = torch.cat(types) if self.use_img_type else None
        return input_ids, img_feat, img_pos_feat, attn_masks, img_type_ids, self._label(example, i)


def nlvr2_triplet_collate(inputs) -> dict:
    """Rows ``[txt, img0 regions, img1 regions, padding]``; ``img_type_ids`` [B, N] 1 / 2, padded with 0."""
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    types = [x[4] for x in inputs]
    batch["img_type_ids"] = None if types[0] is None else pad_sequence(types, batch_first=True, padding_value=0)
    batch["targets"] = torch.tensor([x[5] for x in inputs], dtype=torch.long)
    return batch


class Nlvr2TripletEvalDataset(Nlvr2TripletDataset):
    """Items ``(identifier, *triplet item)``."""

    def __getitem__(self, i: int):
        return (self.ids[i], *super().__getitem__(i))


def nlvr2_triplet_eval_collate(inputs) -> dict:
    batch = nlvr2_triplet_collate([x[1:] for x in inputs])
    batch["qids"] = [x[0] for x in inputs]
    return batch


# ----------------------------------------------------------------------------- VCR


class VcrTxtTokLmdb(TxtTokLmdb):
    """VCR text db; ``task`` is ``"qa"``, ``"qar"`` or ``"qa,qar"`` and picks ``id2len_{task}.json``.

    Its token ids reach past the vocabulary by the person tags (``v_range[1] + n``, n < 81), and its lengths
    price a question's rows rather than count a record's ``input_ids``."""

    ids_past_vocab = VCR_PERSON_TAGS
    id2len_counts_tokens = False

    def __init__(self, db_dir: str | Path, max_txt_len: int = 120, task: str = "qa,qar"):
        if task not in ("qa", "qar", "qa,qar"):
            raise ValueError(f"VCR task must be 'qa', 'qar' or 'qa,qar', got {task!r}")
        self.task = task
        self.id2len_name = f"id2len_{'qar' if task == 'qa,qar' else task}.json"
        super().__init__(db_dir, max_txt_len)


class VcrDataset(DetectFeatTxtTokDataset):
    """Four rows per question (one per candidate); ``txt_type_ids`` 0 question, 2 answer, 3 rationale.

    ``img_fname`` of a record is ``[gt_boxes_image, detected_image]``; pass ``img_db_gt``,
    ``img_db`` or both (their regions are concatenated, ground-truth boxes first).
    ``lens`` (and ``pad_prices``) are the authors' price of a question, its ``id2len`` plus its dbs'
    ``name2nbb``; ``pad_dims`` bound its longest row and, with ``exact_region_counts`` (fixed-shape
    training), its regions by the records' own counts (:meth:`DetectFeatLmdb.region_counts`), else by
    ``name2nbb``.
    Q->A rows: ``[CLS] q [SEP] a_k [SEP]``; QA->R rows: ``[CLS] q [SEP] a_gt [SEP] r_k [SEP]``.
    ``[CLS]`` and the question are type 0; each ``[SEP]`` that opens a segment takes that
    segment's type, as does the closing ``[SEP]``: Q->A ``0 0.. 2 2.. 2``, QA->R
    ``0 0.. 2 2.. 3 3.. 3``.
    Targets are [4B, 1] with 1 on the correct candidate.
    """

    images_per_text = 2
    img_pair_doc = " ([ground-truth boxes image, detections image])"

    def __init__(
        self,
        txt_db: VcrTxtTokLmdb,
        img_db_gt: DetectFeatLmdb | None = None,
        img_db=None,
        *,
        exact_region_counts: bool = False,
        **kwargs,
    ):
        if img_db_gt is None and img_db is None:
            raise ValueError("VcrDataset needs img_db_gt, img_db or both")
        if not isinstance(txt_db, VcrTxtTokLmdb):
            raise TypeError("txt_db must be a VcrTxtTokLmdb")
        self.img_db_gt, self.img_db_det = img_db_gt, img_db
        self.exact_region_counts = bool(exact_region_counts)
        self.task = txt_db.task
        if type(self) is VcrDataset and self.task == "qa,qar":
            raise ValueError("train VCR with task 'qa' or 'qar' separately ('qa,qar' is for VcrEvalDataset)")
        super().__init__(txt_db, img_db if img_db is not None else img_db_gt, **kwargs)

    def _missing_image(self, img_ref) -> str | None:
        for db, name in self._pick(img_ref):
            if name not in db.name2nbb:
                return name
        return None

    def _pick(self, pair) -> list[tuple[DetectFeatLmdb, str]]:
        out = []
        if self.img_db_gt is not None:
            out.append((self.img_db_gt, pair[0]))
        if self.img_db_det is not None:
            out.append((self.img_db_det, pair[1]))
        return out

    def _compute_lens(self):
        # lens: the authors' price of a question, the task's id2len plus its regions; with the official lengths
        # (a question's four rows priced together) that is about four rows of text, so the padded text bound
        # (pad_dims) is the longest row the question can make, and a fixed-shape batch is priced by pad_prices
        # (the same lens) rather than by its padded rows, keeping the authors' questions per batch
        # (regions: name2nbb, the authors' price, in lens; with exact_region_counts the records' own counts bound
        # the padded regions, which for the ground-truth-box db are far fewer than the num_bb it lists)
        qa_base = self._official_qa_base()
        #: the text bound is a row's exact width only for Q->A rows under the official lengths (QA->R's allows for
        #: the longest answer, not the gold one; other conventions bound by the priced length)
        self.pad_dims_exact = qa_base is not None and self.task == "qa"
        counts = {}
        if self.exact_region_counts:
            counts = {id(db): db.region_counts() for db in (self.img_db_gt, self.img_db_det) if db is not None}
        lens, dims = [], []
        for id_, tl in zip(self.ids, self.txt_lens, strict=True):
            picked = self._pick(self._txt2img[id_])
            n = sum(db.name2nbb[name] for db, name in picked)
            lens.append(tl + n)
            if counts:
                n = sum(counts[id(db)][name] for db, name in picked)
            if qa_base is None:
                bound = tl + (3 if self.task == "qa" else 4)
            elif self.task == "qa":  # [CLS] q [SEP] a [SEP]
                bound = qa_base[id_] + 3
            else:  # [CLS] q [SEP] a [SEP] r [SEP], the longest rationale being id2len_qar - id2len_qa
                bound = qa_base[id_] + (tl - 4 * qa_base[id_]) + 4
            dims.append((bound, n))
        self.pad_prices = list(lens)
        return lens, dims

    def _official_qa_base(self) -> dict[str, int] | None:
        """``q + longest answer`` per example when the db's lengths follow the official VCR txt_dbs
        (``id2len_qa = (q + longest answer) * 4``, ``id2len_qar = id2len_qa + longest rationale``), checked on
        up to 32 records spread over the db; None otherwise (the padded text bound is then the task's id2len
        plus the special tokens, which holds a row under any convention). A record that breaks the convention
        unchecked only pads its batch to a larger shape."""
        path = Path(self.txt_db.db_dir, "id2len_qa.json")
        if not self.ids or not path.is_file():
            return None
        qa = load_json(path, "VCR id2len_qa file")
        if not isinstance(qa, dict) or any(not isinstance(qa.get(id_), int) for id_ in self.ids):
            return None
        step = max(1, len(self.ids) // 32)
        for k in range(0, len(self.ids), step):
            id_ = self.ids[k]
            ex = self.txt_db[id_]
            base = len(ex["input_ids"]) + max((len(a) for a in ex["input_ids_as"]), default=0)
            if qa[id_] != 4 * base:
                return None
            if self.task != "qa":
                longest_r = max((len(r) for r in ex["input_ids_rs"]), default=0)
                if self.txt_lens[k] != 4 * base + longest_r:
                    return None
        return {id_: qa[id_] // 4 for id_ in self.ids}

    def _get_img_feat(self, pair) -> tuple[Tensor, Tensor, int]:
        feats, poss = [], []
        for db, name in self._pick(pair):
            f, bb = db[name]
            feats.append(f)
            poss.append(torch.cat([bb, bb[:, 4:5] * bb[:, 5:6]], dim=-1))
        feat, pos = torch.cat(feats), torch.cat(poss)
        return feat, pos, feat.size(0)

    def _rows(self, example: dict, task: str) -> tuple[list[list[int]], list[list[int]]]:
        cls_, sep = self.txt_db.cls_, self.txt_db.sep
        q = list(example["input_ids"])
        if task == "qar":
            label = int(example["qa_target"])
            if label < 0:
                raise DataFormatError(f"{self.txt_db.db_dir}: QA->R needs qa_target >= 0")
            answer = list(example["input_ids_as"][label])
            # the [SEP] before the answer is of the answer's type, the one before the rationale of the rationale's
            prefix = [cls_] + q + [sep] + answer + [sep]
            prefix_types = [0] * (len(q) + 1) + [2] * (len(answer) + 1) + [3]
            choices, ctype = example["input_ids_rs"], 3
        else:
            prefix = [cls_] + q + [sep]
            prefix_types = [0] * (len(q) + 1) + [2]
            choices, ctype = example["input_ids_as"], 2
        ids = [prefix + list(c) + [sep] for c in choices]
        types = [prefix_types + [ctype] * (len(c) + 1) for c in choices]
        return ids, types

    def __getitem__(self, i: int):
        example = self.txt_db[self.ids[i]]
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        ids, types = self._rows(example, self.task)
        label = int(example[f"{self.task}_target"])
        outs = []
        for k, (row, tt) in enumerate(zip(ids, types, strict=True)):
            outs.append(
                (
                    torch.tensor(row, dtype=torch.long),
                    torch.tensor(tt, dtype=torch.long),
                    img_feat,
                    img_pos_feat,
                    torch.ones(len(row) + num_bb, dtype=torch.long),
                    torch.tensor([int(k == label)], dtype=torch.long),
                )
            )
        return tuple(outs)


def vcr_collate(inputs) -> dict:
    rows = [r for outs in inputs for r in outs]
    batch = base_batch([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    batch["txt_type_ids"] = pad_sequence([r[1] for r in rows], batch_first=True, padding_value=0)
    batch["targets"] = torch.stack([r[5] for r in rows], dim=0)
    return batch


class VcrEvalDataset(VcrDataset):
    """All 4 Q->A rows, then 4 QA->R rows per candidate answer (only the gold one on ``val``)."""

    def __init__(self, split: str, *args, **kwargs):
        self.split = split
        super().__init__(*args, **kwargs)
        if self.task != "qa,qar":
            raise ValueError("VcrEvalDataset needs task 'qa,qar'")

    def __getitem__(self, i: int):
        example = self.txt_db[self.ids[i]]
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._img_ref(i, example))
        ids, types = self._rows(example, "qa")
        answers = range(len(example["input_ids_as"]))
        if self.split == "val":
            answers = [int(example["qa_target"])]
        for a in answers:
            ex = dict(example, qa_target=a)
            more_ids, more_types = self._rows(ex, "qar")
            ids += more_ids
            types += more_types
        outs = [
            (
                torch.tensor(r, dtype=torch.long),
                torch.tensor(t, dtype=torch.long),
                img_feat,
                img_pos_feat,
                torch.ones(len(r) + num_bb, dtype=torch.long),
            )
            for r, t in zip(ids, types, strict=True)
        ]
        qa = torch.tensor([int(example.get("qa_target", -1))])
        qar = torch.tensor([int(example.get("qar_target", -1))])
        return tuple(outs), self.ids[i], qa, qar


def vcr_eval_collate(inputs) -> dict:
    rows = [r for outs, _, _, _ in inputs for r in outs]
    batch = base_batch([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    batch["txt_type_ids"] = pad_sequence([r[1] for r in rows], batch_first=True, padding_value=0)
    batch["qids"] = [q for _, q, _, _ in inputs]
    batch["qa_targets"] = torch.stack([x[2] for x in inputs])
    batch["qar_targets"] = torch.stack([x[3] for x in inputs])
    return batch


# ----------------------------------------------------------------------------- retrieval


def sample_negative(rng: random.Random, pool: Sequence, positives: Sequence, num: int) -> list:
    """``num`` distinct items of ``pool`` none of which is in ``positives`` (retry until found)."""
    pos = set(positives)
    for attempt in range(1000):
        out = rng.sample(pool, num)
        if not pos.intersection(out):
            return out
        if attempt == 10 and len(pool) - len(pos.intersection(pool)) < num:
            break
    raise ValueError(f"cannot draw {num} negatives from a pool of {len(pool)} with {len(pos)} positives")


class ItmRankDataset(DetectFeatTxtTokDataset):
    """Image-text retrieval with sampled negatives: per text, rows ``[pos, neg images, neg texts]``."""

    def __init__(self, txt_db, img_db, neg_sample_size: int = 1, **kwargs):
        if neg_sample_size < 1:
            raise ValueError("ItmRankDataset needs at least 1 negative sample")
        super().__init__(txt_db, img_db, **kwargs)
        self.neg_sample_size = neg_sample_size
        self.img2txts = defaultdict(list)
        for id_, img in self._txt2img.items():
            self.img2txts[img].append(id_)
        self.img_name_list = list(self.img2txts)
        n_img = len(self.img_name_list)
        n_txt = len(self.ids) - max((len(v) for v in self.img2txts.values()), default=0)
        if self.ids and min(n_img - 1, n_txt) < neg_sample_size:
            raise ValueError(
                f"{txt_db.db_dir}: negative_size {neg_sample_size} needs as many other images and other texts for "
                f"every example; the data has {n_img} images and {len(self.ids)} texts (at most {n_img - 1} other "
                f"images, {n_txt} other texts): lower negative_size"
            )

    def __getitem__(self, i: int):
        rng = self.rng(i)
        txt_id = self.ids[i]
        img = self._txt2img[txt_id]
        pairs = [(txt_id, img)]
        pairs += [(txt_id, n) for n in sample_negative(rng, self.img_name_list, [img], self.neg_sample_size)]
        pairs += [(t, img) for t in sample_negative(rng, self.ids, self.img2txts[img], self.neg_sample_size)]
        out = []
        for t, im in pairs:
            input_ids = self.txt_db.combine_inputs(self.txt_db[t]["input_ids"])
            feat, pos, nbb = self._get_img_feat(im)
            out.append((input_ids, feat, pos, torch.ones(len(input_ids) + nbb, dtype=torch.long)))
        return out


def itm_rank_collate(inputs) -> dict:
    sample_size = len(inputs[0])
    if any(len(x) != sample_size for x in inputs):
        raise ValueError("all examples of a retrieval batch need the same number of rows")
    rows = [r for x in inputs for r in x]
    batch = base_batch([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    batch["sample_size"] = sample_size
    return batch


def _one_text_many_images(input_ids: Tensor, feats, poss) -> dict:
    n = len(feats)
    batch = base_batch([input_ids] * n, feats, poss)
    return batch


class ItmRankDatasetHardNegFromText(ItmRankDataset):
    """One text against its image and ``neg_sample_size`` other images (gt first); one item = one batch."""

    def __getitem__(self, i: int):
        rng = self.rng(i)
        txt_id = self.ids[i]
        img = self._txt2img[txt_id]
        imgs = [img] + sample_negative(rng, self.img_name_list, [img], self.neg_sample_size)
        input_ids = self.txt_db.combine_inputs(self.txt_db[txt_id]["input_ids"])
        feats, poss, _ = zip(*map(self._get_img_feat, imgs), strict=True)
        return _one_text_many_images(input_ids, list(feats), list(poss))


class ItmRankDatasetHardNegFromImage(ItmRankDataset):
    """One image against its text and ``neg_sample_size`` other texts (gt first); one item = one batch."""

    def __getitem__(self, i: int):
        rng = self.rng(i)
        txt_id = self.ids[i]
        img = self._txt2img[txt_id]
        txt_ids = [txt_id] + sample_negative(rng, self.ids, self.img2txts[img], self.neg_sample_size)
        feat, pos, _ = self._get_img_feat(img)
        ids = [self.txt_db.combine_inputs(self.txt_db[t]["input_ids"]) for t in txt_ids]
        return base_batch(ids, [feat] * len(ids), [pos] * len(ids))


def itm_rank_hn_collate(inputs) -> dict:
    if len(inputs) != 1:
        raise ValueError("hard-negative retrieval items are whole batches: use batch size 1")
    return inputs[0]


class ItmValDataset(DetectFeatTxtTokDataset):
    """Retrieval validation: a text against its image and the next ``mini_batch_size - 1`` images.

    When ``mini_batch_size`` is every image (the full evaluation), the images are read and padded once, on the
    first item, and kept (:meth:`_image_bank`; the split's region features, e.g. about 150-400 MB of float16 for
    Flickr30k's 1000 images): each item is then the bank in the item's order, one gather, instead of reading and
    padding every image again for every text (the same batch, element for element)."""

    def __init__(self, txt_db, img_db, mini_batch_size: int = 400, **kwargs):
        super().__init__(txt_db, img_db, **kwargs)
        self.all_img_ids = list(dict.fromkeys(self._txt2img.values()))
        if not 0 < mini_batch_size <= len(self.all_img_ids):
            raise ValueError(f"mini_batch_size must be in [1, {len(self.all_img_ids)}]")
        self.bs = mini_batch_size
        self._img_pos = {n: k for k, n in enumerate(self.all_img_ids)}
        self._bank: tuple[Tensor, Tensor, Tensor] | None = None

    def _image_bank(self) -> tuple[Tensor, Tensor, Tensor]:
        """Every image's padded features [M, N, D], boxes [M, N, 7] and region counts [M], in ``all_img_ids``
        order."""
        if self._bank is None:
            feats, poss, _ = zip(*map(self._get_img_feat, self.all_img_ids), strict=True)
            nbbs = [int(f.size(0)) for f in feats]
            n = max(nbbs)
            self._bank = (
                pad_tensors(feats, nbbs, max_len=n),
                pad_tensors(poss, nbbs, max_len=n),
                torch.tensor(nbbs, dtype=torch.long),
            )
        return self._bank

    def __getitem__(self, i: int):
        txt_id = self.ids[i]
        gt = self._txt2img[txt_id]
        k = self._img_pos[gt]
        m = len(self.all_img_ids)
        input_ids = self.txt_db.combine_inputs(self.txt_db[txt_id]["input_ids"])
        if self.bs == m:
            return self._from_bank(input_ids, k)
        imgs = [gt] + [self.all_img_ids[(k + j) % m] for j in range(1, self.bs)]
        feats, poss, _ = zip(*map(self._get_img_feat, imgs), strict=True)
        return _one_text_many_images(input_ids, list(feats), list(poss))

    def _from_bank(self, input_ids: Tensor, k: int) -> dict:
        """:func:`base_batch` of one text against every image from image ``k`` on (wrapping around), built from
        the bank: every row has the same text length, so the packed rows need no gather beyond the identity."""
        feat, pos, nbbs = self._image_bank()
        m, n = nbbs.numel(), feat.size(1)

        def rotated(t: Tensor) -> Tensor:  # rows k.., then ..k: two slices (a float16 index_select is far slower)
            return torch.cat([t[k:], t[:k]]) if k else t.clone()

        nbb = rotated(nbbs)
        tl = int(input_ids.size(0))
        out_size = tl + n
        width = torch.arange(out_size).unsqueeze(0)
        return {
            "input_ids": input_ids.unsqueeze(0).repeat(m, 1),
            "position_ids": torch.arange(tl, dtype=torch.long).unsqueeze(0),
            "img_feat": rotated(feat),
            "img_pos_feat": rotated(pos),
            "attn_masks": (width < (tl + nbb).unsqueeze(1)).long(),
            "gather_index": width.repeat(m, 1),
            "txt_lens": [tl] * m,
            "num_bbs": nbb.tolist(),
            "txt_mask": torch.ones(m, tl, dtype=torch.long),
            "img_mask": (torch.arange(n).unsqueeze(0) < nbb.unsqueeze(1)).long(),
        }


itm_val_collate = itm_rank_hn_collate


# ----------------------------------------------------------------------------- referring expressions


#: key prefixes of the official referring-expression img_dbs (``re_coco_gt`` and ``re_coco_det``); the
#: suffix is the COCO image id on 12 digits and ``.npz``
RE_GT_PREFIX = "visual_grounding_coco_gt_"
RE_DET_PREFIX = "visual_grounding_det_coco_"


def re_det_img_name(name: str) -> str:
    """The detections key of an official ground-truth-boxes key; any other name comes back unchanged."""
    return RE_DET_PREFIX + name[len(RE_GT_PREFIX) :] if name.startswith(RE_GT_PREFIX) else name


def re_image_size(entry: dict, where: str, keys: tuple[str, str] = ("width", "height")) -> tuple | None:
    """The image size ``(width, height)`` in pixels that ``entry`` gives under ``keys``, as stored; None
    when it gives neither (a None value counts as absent). Half a size, or a value that is not a positive
    finite number, is a :class:`DataFormatError` naming ``where`` and the key."""
    wk, hk = keys
    w, h = entry.get(wk), entry.get(hk)
    if w is None and h is None:
        return None
    if w is None or h is None:
        have, miss = (wk, hk) if h is None else (hk, wk)
        raise DataFormatError(f"{where}: has {have!r} but no {miss!r} (give the image size as both or neither)")
    for key, v in ((wk, w), (hk, h)):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
            raise DataFormatError(f"{where}: {key!r} must be a positive number of pixels, got {v!r}")
    return w, h


class ReTxtTokLmdb(TxtTokLmdb):
    """Referring-expression text db.

    Side files: ``images.json`` (``[{id, ann_ids, height, width, ...}]``, ``ann_ids`` in the order of
    the image's ground-truth regions, ``width`` / ``height`` the image size in pixels, both or neither),
    and when present ``refs.json`` (``[{ref_id, sent_ids, ...}]``), ``annotations.json``
    (``[{id, bbox, ...}]``, ``Anns`` by id) and ``categories.json``. Records hold ``image_id``,
    ``ann_id`` and, in the official databases, ``bbox`` (the referred box, COCO ``[x, y, w, h]`` in
    pixels). The official databases have no ``txt2img.json``: it is then built from ``refs.json`` (each
    sentence id -> its image's ground-truth-boxes key).

    The examples, :attr:`sent_ids`, are chosen and ordered as in UNITER's ``data/re.py``
    (``ReTxtTokLmdb._get_sent_ids``, read by ``ReDataset`` and ``ReEvalDataset`` alike): the refs of
    ``refs.json`` in file order, each ref's ``sent_ids`` together in their order, a sentence kept when
    ``max_txt_len`` is -1 or its token length (``id2len.json``, without CLS/SEP) is strictly less than
    ``max_txt_len``. ``id2len`` keeps lengths up to ``max_txt_len`` inclusive, as every txt_db (the
    authors' ``TxtTokLmdb`` rule), so a sentence of exactly ``max_txt_len`` tokens is in ``id2len`` but
    is no example (``num_at_max_len`` counts them, logged). The authors' ``train_re.py`` opens the
    training db with the config's ``max_txt_len`` and evaluation dbs with -1: every sentence.

    Where ``refs.json`` and ``id2len.json`` disagree the authors' code has no rule: sentences under no
    ref are never read, and a listed sentence missing from their length-filtered ``id2len`` (longer than
    ``max_txt_len``, or absent from the file) stops it with a ``KeyError``. Here a longer sentence is
    left out by the length rule; sentences under no ref are no example (``num_unreferenced``) and listed
    sentences absent from ``id2len.json`` are skipped (``num_missing_sents``), both logged. A ref without
    a ``sent_ids`` list, or a sentence under two refs, is a :class:`DataFormatError` naming the file.
    Without ``refs.json`` the examples are those of ``id2len`` in its order, under the same length rule.
    ``ref_sents`` holds ``(ref_id, its example ids)`` per ref, in ``refs.json`` order.
    """

    def __init__(self, db_dir: str | Path, max_txt_len: int = 120):
        super().__init__(db_dir, max_txt_len)
        images = load_json(Path(self.db_dir, "images.json"), "referring-expression images.json")
        self.Images = {img["id"]: img for img in images}
        for img in images:
            re_image_size(img, f"{self.db_dir}/images.json image {img['id']!r}")
        self.has_refs = Path(self.db_dir, "refs.json").is_file()
        for name in ("refs", "annotations", "categories"):
            path = Path(self.db_dir, f"{name}.json")
            setattr(self, name, load_json(path, f"{name}.json") if path.is_file() else [])
        self.Anns = {ann["id"]: ann for ann in self.annotations}
        self.num_at_max_len = self.num_missing_sents = self.num_unreferenced = 0
        self.sent_ids, self.ref_sents = self._get_sent_ids()

    def keeps_len(self, txt_len: int) -> bool:
        """Whether a sentence of ``txt_len`` tokens is an example: the authors' ``sent_len < max_txt_len``."""
        return self.max_txt_len == -1 or txt_len < self.max_txt_len

    def _get_sent_ids(self) -> tuple[list[str], list[tuple[object, list[str]]]]:
        at_max = 0
        if not self.has_refs:
            sent_ids = []
            for id_, tl in self.id2len.items():
                if self.keeps_len(tl):
                    sent_ids.append(id_)
                else:
                    at_max += 1
            self._log_at_max(at_max)
            return sent_ids, []
        all_lens = (
            self.id2len
            if self.max_txt_len == -1
            else load_counts(Path(self.db_dir, self.id2len_name), "txt_db id2len file")
        )
        where = f"{self.db_dir}/refs.json"
        if not isinstance(self.refs, list):
            raise DataFormatError(f"{where}: must be a list of refs, got {type(self.refs).__name__}")
        sent_ids: list[str] = []
        ref_sents: list[tuple[object, list[str]]] = []
        owner: dict[str, object] = {}
        missing: list[str] = []
        for n, ref in enumerate(self.refs):
            listed = ref.get("sent_ids") if isinstance(ref, dict) else None
            if not isinstance(listed, list):
                raise DataFormatError(f"{where}: entry {n} needs a 'sent_ids' list, got {ref!r:.80}")
            ref_id = ref.get("ref_id", f"#{n}")
            kept = []
            for sent in listed:
                key = str(sent)
                if key in owner:
                    raise DataFormatError(f"{where}: sentence {sent!r} is under refs {owner[key]!r} and {ref_id!r}")
                owner[key] = ref_id
                tl = all_lens.get(key)
                if tl is None:
                    missing.append(key)
                elif self.keeps_len(tl):
                    kept.append(key)
                elif tl == self.max_txt_len:
                    at_max += 1
            ref_sents.append((ref_id, kept))
            sent_ids.extend(kept)
        unreferenced = [id_ for id_ in all_lens if id_ not in owner]
        self.num_missing_sents = len(missing)
        self.num_unreferenced = len(unreferenced)
        if missing:
            logger.warning(
                "%s lists %d sentences that %s lacks; skipped (first: %r)",
                where,
                len(missing),
                self.id2len_name,
                missing[0],
            )
        if unreferenced:
            logger.warning(
                "%s/%s: %d sentences are under no ref of refs.json and are no example (first: %r)",
                self.db_dir,
                self.id2len_name,
                len(unreferenced),
                unreferenced[0],
            )
        self._log_at_max(at_max)
        return sent_ids, ref_sents

    def _log_at_max(self, at_max: int) -> None:
        self.num_at_max_len = at_max
        if at_max:
            logger.info(
                "%s: left out %d sentences of exactly max_txt_len=%d tokens "
                "(referring expressions keep sentences strictly shorter, as the authors' data/re.py)",
                self.db_dir,
                at_max,
                self.max_txt_len,
            )

    @property
    def txt2img(self) -> dict:
        if self._txt2img is None and self.refs and not Path(self.db_dir, "txt2img.json").is_file():
            self._txt2img = {
                str(sent_id): f"{RE_GT_PREFIX}{int(ref['image_id']):012}.npz"
                for ref in self.refs
                for sent_id in ref["sent_ids"]
            }
        return super().txt2img


def _re_target(txt_db: ReTxtTokLmdb, example: dict, num_bb: int, where: str) -> int:
    """Index of the record's ``ann_id`` among its image's ``ann_ids`` (the regions must be those boxes)."""
    img = txt_db.Images.get(example["image_id"])
    if img is None:
        raise DataFormatError(f"{where}: image_id {example['image_id']!r} not in images.json")
    if len(img["ann_ids"]) != num_bb:
        raise DataFormatError(f"{where}: {len(img['ann_ids'])} ann_ids but {num_bb} regions")
    if example["ann_id"] not in img["ann_ids"]:
        raise DataFormatError(f"{where}: ann_id {example['ann_id']!r} not among the image's ann_ids")
    return img["ann_ids"].index(example["ann_id"])


class ReDataset(DetectFeatTxtTokDataset):
    """Items with ``obj_masks`` (0 on real regions, padded with 1) and the target region index.

    The examples are the txt_db's :attr:`ReTxtTokLmdb.sent_ids`, in that order (the authors' ``refs.json``
    order and ``max_txt_len`` rule), less any whose image is missing (see ``skip_missing_images``).
    The regions must be the image's ground-truth boxes: the target is the position of the
    record's ``ann_id`` in its image's ``ann_ids``.
    """

    def __init__(self, txt_db: ReTxtTokLmdb, img_db: DetectFeatLmdb, **kwargs):
        if not isinstance(txt_db, ReTxtTokLmdb):
            raise TypeError("txt_db must be a ReTxtTokLmdb")
        super().__init__(txt_db, img_db, **kwargs)

    def _texts(self) -> list[tuple[str, int]]:
        lens = self.txt_db.id2len
        return [(id_, lens[id_]) for id_ in self.txt_db.sent_ids]

    def __getitem__(self, i: int):
        example = super().__getitem__(i)
        img_feat, img_pos_feat, num_bb = self._get_img_feat(self._txt2img[self.ids[i]])
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        target = _re_target(self.txt_db, example, num_bb, f"{self.txt_db.db_dir} key {self.ids[i]!r}")
        obj_masks = torch.zeros(num_bb, dtype=torch.uint8)
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return input_ids, img_feat, img_pos_feat, attn_masks, obj_masks, torch.tensor([target])


def re_collate(inputs) -> dict:
    batch = base_batch([x[0] for x in inputs], [x[1] for x in inputs], [x[2] for x in inputs])
    n = batch["img_feat"].size(1)
    batch["obj_masks"] = pad_tensors([x[4].unsqueeze(-1) for x in inputs], pad=1, max_len=n).squeeze(-1)
    batch["targets"] = torch.stack([x[5] for x in inputs], dim=0)
    return batch


class ReEvalDataset(ReDataset):
    """Evaluation items, on the images' ground-truth boxes ("gt") or on detected boxes ("det").

    The examples are those of :class:`ReDataset`, in its order; the authors, and ``ReTask``, open
    evaluation databases with ``max_txt_len = -1``: every sentence.

    Items ``(sent_id, input_ids, img_feat, img_pos_feat, attn_masks, obj_masks, target, obj_boxes,
    tgt_box)``:

    * ``target`` [1]: the referred region's index as in :class:`ReDataset`, or -1 where the regions
      are detections (no region is the referred object);
    * ``obj_boxes`` [n, 4] float64: the regions as ``[x, y, w, h]`` in pixels,
      ``(x1 * W, y1 * H, w * W, h * H)`` from ``img_pos_feat`` (normalised ``x1, y1, x2, y2, w, h``)
      and the image size ``W, H``: the ``width`` / ``height`` pair of the image's ``images.json`` entry
      (where the authors read it), else the pair of the record (never one from each); None when
      neither gives it;
    * ``tgt_box`` [4] float64: the referred box ``[x, y, w, h]`` in pixels (the record's ``bbox``, else
      the ``annotations.json`` entry of its ``ann_id``); None when unknown.

    ``use_gt_feat``: True reads the txt_db's image keys (ground-truth boxes) and requires a target
    index for every text; False reads the detections keys (the official renaming by
    :func:`re_det_img_name`); None (default) decides per image: the txt_db's key when the img_db
    holds it, else the detections key, with a target index when the regions are as many as the
    image's ``ann_ids`` and were read under the txt_db's key.
    """

    def __init__(self, txt_db: ReTxtTokLmdb, img_db: DetectFeatLmdb, use_gt_feat: bool | None = None, **kwargs):
        self.use_gt_feat = use_gt_feat
        super().__init__(txt_db, img_db, **kwargs)

    def _img_name(self, name: str) -> str:
        if self.use_gt_feat or (self.use_gt_feat is None and name in self.img_db.name2nbb):
            return name
        return re_det_img_name(name)

    def _missing_image(self, img_ref) -> str | None:
        name = self._img_name(img_ref)
        return None if name in self.img_db.name2nbb else name

    def _compute_lens(self):
        # read each text's image under the key chosen for this database; keep the txt_db's key
        self._txt_db_img = self._txt2img
        self._txt2img = {id_: self._img_name(name) for id_, name in self._txt_db_img.items()}
        return super()._compute_lens()

    def __getitem__(self, i: int):
        id_ = self.ids[i]
        example = self.txt_db[id_]
        name = self._txt2img[id_]
        img_feat, img_pos_feat, num_bb = self._get_img_feat(name)
        input_ids = self.txt_db.combine_inputs(example["input_ids"])
        where = f"{self.txt_db.db_dir} key {id_!r}"
        img = self.txt_db.Images.get(example["image_id"])
        if img is None:
            raise DataFormatError(f"{where}: image_id {example['image_id']!r} not in images.json")
        target = -1
        if self.use_gt_feat or (
            self.use_gt_feat is None and name == self._txt_db_img[id_] and len(img["ann_ids"]) == num_bb
        ):
            target = _re_target(self.txt_db, example, num_bb, where)
        size = re_image_size(img, f"{self.txt_db.db_dir}/images.json image {example['image_id']!r}")
        if size is None:
            size = re_image_size(example, where)
        obj_boxes = None
        if size is not None:
            width, height = float(size[0]), float(size[1])
            pos = img_pos_feat.double()
            obj_boxes = torch.stack(
                [pos[:, 0] * width, pos[:, 1] * height, pos[:, 4] * width, pos[:, 5] * height], dim=1
            )
        bbox = example.get("bbox")
        if bbox is None:
            bbox = self.txt_db.Anns.get(example["ann_id"], {}).get("bbox")
        tgt_box = None
        if bbox is not None:
            tgt_box = torch.tensor([float(v) for v in bbox], dtype=torch.float64)
            if tgt_box.shape != (4,):
                raise DataFormatError(f"{where}: bbox must be [x, y, w, h], got {list(bbox)}")
        obj_masks = torch.zeros(num_bb, dtype=torch.uint8)
        attn_masks = torch.ones(len(input_ids) + num_bb, dtype=torch.long)
        return id_, input_ids, img_feat, img_pos_feat, attn_masks, obj_masks, torch.tensor([target]), obj_boxes, tgt_box


def re_eval_collate(inputs) -> dict:
    """:func:`re_collate` plus ``qids`` (sentence ids), ``obj_boxes`` [B, N, 4] and ``tgt_box`` [B, 4]
    (float64 pixels ``[x, y, w, h]``; NaN at padded regions and where a box is unknown)."""
    batch = re_collate([x[1:7] for x in inputs])
    batch["qids"] = [x[0] for x in inputs]
    n = batch["img_feat"].size(1)
    obj_boxes = torch.full((len(inputs), n, 4), float("nan"), dtype=torch.float64)
    tgt_box = torch.full((len(inputs), 4), float("nan"), dtype=torch.float64)
    for k, x in enumerate(inputs):
        if x[7] is not None:
            obj_boxes[k, : x[7].size(0)] = x[7]
        if x[8] is not None:
            tgt_box[k] = x[8]
    batch["obj_boxes"] = obj_boxes
    batch["tgt_box"] = tgt_box
    return batch


# keep the authors' helper importable from here as well
__all__ += ["get_gather_index", "pad_tensors", "sample_negative"]
