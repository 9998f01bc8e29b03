"""Referring expressions: which sentences are examples, and in what order, as in UNITER's ``data/re.py``.

The authors' rule (``ReTxtTokLmdb._get_sent_ids``, which ``ReDataset`` and ``ReEvalDataset`` both read):
the refs of ``refs.json`` in file order, each ref's ``sent_ids`` together and in their order, a sentence
kept when ``max_txt_len`` is -1 or its ``id2len.json`` length is strictly shorter than ``max_txt_len``
(while ``id2len`` itself keeps lengths up to ``max_txt_len``, the ``TxtTokLmdb`` rule). ``train_re.py``
opens the training database with the config's ``max_txt_len`` and evaluation databases (there and in
``inf_re.py``) with -1. The order of ``id2len.json`` plays no part.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.test_train_fixtures import META
from villa_fast.data import DetectFeatLmdb, ImgDbWriter, ReDataset, ReEvalDataset, ReTxtTokLmdb, TxtDbWriter
from villa_fast.data.codec import DataFormatError
from villa_fast.data.sampler import ExampleBatchSampler
from villa_fast.tasks import DataContext
from villa_fast.tasks.re import GT_NUM_BB, ReTask
from villa_fast.train.config import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")

IMG_DIM = 16
MAX = 8  # max_txt_len of the training config
N_GT = [3, 2, 2]  # ground-truth boxes of images 0, 1, 2 (ann ids 100 * k + j)

#: refs.json: neither in id order nor in the order of id2len.json, a ref's sentences not ascending
REFS = [
    {"ref_id": 30, "image_id": 1, "ann_id": 101, "sent_ids": [7, 2]},
    {"ref_id": 10, "image_id": 0, "ann_id": 2, "sent_ids": [5]},
    {"ref_id": 20, "image_id": 2, "ann_id": 200, "sent_ids": [1, 6, 3]},
    {"ref_id": 40, "image_id": 0, "ann_id": 0, "sent_ids": [4, 0]},
]
#: token lengths (without CLS / SEP) around the boundary: 2 and 5 have exactly MAX, 3 one more
LENS = {0: 3, 1: MAX - 1, 2: MAX, 3: MAX + 1, 4: 1, 5: MAX, 6: 5, 7: 2}
#: the order the records (and so id2len.json) are written in
WRITE_ORDER = [3, 0, 6, 1, 5, 7, 4, 2]

#: the authors' examples: training drops 2 and 5 (== MAX) and 3 (> MAX); evaluation keeps all, refs.json order
TRAIN_IDS = ["7", "1", "6", "4", "0"]
EVAL_IDS = ["7", "2", "5", "1", "6", "3", "4", "0"]


def _gt_name(k: int) -> str:
    return f"visual_grounding_coco_gt_{k:012}.npz"


def _spec(refs: list[dict], lens: dict, max_txt_len: int) -> list[str]:
    """The authors' rule, stated plainly."""
    return [str(s) for ref in refs for s in ref["sent_ids"] if max_txt_len == -1 or lens[str(s)] < max_txt_len]


#: a detector's scores on the ground-truth boxes, in annotation order: not sorted (region j must stay ann j)
GT_CONF = [0.5, 0.9, 0.7]


def _write_img_db(path) -> tuple[str, dict[str, np.ndarray]]:
    """The ground-truth-box db and each image's boxes in the order written (its ``ann_ids`` order)."""
    rng = np.random.default_rng(0)
    boxes = {}
    with ImgDbWriter(path, conf_th=-1, num_bb=GT_NUM_BB, compress=False) as w:
        for k, n in enumerate(N_GT):
            xy = rng.uniform(0, 0.5, (n, 2))
            wh = rng.uniform(0.1, 0.4, (n, 2))
            bb = np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)
            conf = np.array(GT_CONF[:n], np.float32)
            w.add(_gt_name(k), rng.normal(size=(n, IMG_DIM)).astype(np.float32), bb, conf)
            boxes[_gt_name(k)] = bb
    return str(path), boxes


def _write_txt_db(path, refs, lens: dict, order, *, with_refs: bool = True) -> str:
    """The sentences of ``order`` written in that order, with the image and ann of their ref in ``refs``
    (image 0, ann 0 for a sentence under no ref); ``lens``: their token lengths."""
    owner = {str(s): ref for ref in refs for s in ref["sent_ids"]}
    images = [
        {"id": k, "ann_ids": [100 * k + j for j in range(n)], "width": 640, "height": 480} for k, n in enumerate(N_GT)
    ]
    with TxtDbWriter(path, META) as w:
        for sid in order:
            ref = owner.get(str(sid), {"image_id": 0, "ann_id": 0})
            rec = {
                "sent_id": sid,
                "input_ids": [META["v_range"][0] + (sid + j) % 7 for j in range(lens[str(sid)])],
                "img_fname": _gt_name(ref["image_id"]),
                "image_id": ref["image_id"],
                "ann_id": ref["ann_id"],
                "bbox": [10.0, 20.0, 100.0, 80.0],
            }
            w.add(str(sid), rec)
        w.extra_json["images.json"] = images
        if with_refs:
            w.extra_json["refs.json"] = refs
    return str(path)


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("re_order")
    lens = {str(k): v for k, v in LENS.items()}
    img, boxes = _write_img_db(root / "re_coco_gt")
    return {
        "img": img,
        "boxes": boxes,
        "txt": _write_txt_db(root / "txt", REFS, lens, WRITE_ORDER),
        "no_refs": _write_txt_db(root / "txt_no_refs", REFS, lens, WRITE_ORDER, with_refs=False),
        "root": root,
    }


def _img(dbs) -> DetectFeatLmdb:
    return DetectFeatLmdb(dbs["img"], conf_th=-1, num_bb=GT_NUM_BB, compress=False)


def _task(dbs, txt: str | None = None) -> ReTask:
    txt = txt or dbs["txt"]
    cfg = {"task": "re", "max_txt_len": MAX, "compressed_db": False, "train_batch_size": 2, "val_batch_size": 3}
    cfg.update(train_txt_db=txt, train_img_db=dbs["img"], val_txt_db=txt, val_img_db=dbs["img"])
    model_config = dbs["root"] / "model.json"  # the region width of these databases (the loaders check it)
    model_config.write_text(json.dumps({"img_dim": IMG_DIM}))
    cfg["model_config"] = str(model_config)
    return ReTask(resolve_config(None, cfg))


def test_ground_truth_regions_stay_in_annotation_order(dbs):
    """Region j of an image is its j-th ann_id's box (the target index), whatever the scores it was written with."""
    db = _img(dbs)
    for name, bb in dbs["boxes"].items():
        np.testing.assert_array_equal(db[name][1].numpy(), bb.astype(np.float16).astype(np.float32))


def test_the_written_order_is_not_the_refs_order(dbs):
    id2len = json.loads((dbs["root"] / "txt" / "id2len.json").read_text())
    assert list(id2len) == [str(s) for s in WRITE_ORDER] != EVAL_IDS
    assert _spec(REFS, id2len, MAX) == TRAIN_IDS and _spec(REFS, id2len, -1) == EVAL_IDS


def test_training_keeps_sentences_strictly_shorter_than_max_txt_len_in_refs_order(dbs):
    txt = ReTxtTokLmdb(dbs["txt"], MAX)
    # id2len keeps lengths up to max_txt_len (TxtTokLmdb); the examples only those strictly shorter
    assert set(txt.id2len) == {str(k) for k, n in LENS.items() if n <= MAX} and txt.num_too_long == 1
    assert txt.sent_ids == TRAIN_IDS and txt.num_at_max_len == 2
    assert txt.ref_sents == [(30, ["7"]), (10, []), (20, ["1", "6"]), (40, ["4", "0"])]
    ds = ReDataset(txt, _img(dbs))
    assert ds.ids == TRAIN_IDS
    assert [len(ds[i][0]) - 2 for i in range(len(ds))] == [LENS[int(s)] for s in TRAIN_IDS]  # CLS / SEP added
    nbb = ds.img_db.name2nbb
    assert ds.lens == [LENS[int(s)] + nbb[_gt_name(txt[s]["image_id"])] for s in TRAIN_IDS]  # in the same order
    # the target is the referred ann among the image's ann_ids
    assert [int(ds[i][5]) for i in range(len(ds))] == [1, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "length, kept_in_training", [(MAX - 1, True), (MAX, False), (MAX + 1, False)], ids=["shorter", "equal", "longer"]
)
def test_length_boundary(dbs, tmp_path, length, kept_in_training):
    refs = [{"ref_id": 1, "image_id": 0, "ann_id": 1, "sent_ids": [0, 1]}]
    lens = {"0": 2, "1": length}
    path = _write_txt_db(tmp_path / "txt", refs, lens, [1, 0])
    train = ReDataset(ReTxtTokLmdb(path, MAX), _img(dbs))
    assert train.ids == (["0", "1"] if kept_in_training else ["0"])
    # evaluation reads the database with max_txt_len -1: every sentence, whatever its length
    assert ReEvalDataset(ReTxtTokLmdb(path, -1), _img(dbs)).ids == ["0", "1"]


def test_evaluation_keeps_every_sentence_in_refs_order(dbs):
    txt = ReTxtTokLmdb(dbs["txt"], -1)
    assert txt.sent_ids == EVAL_IDS and txt.num_at_max_len == 0
    ds = ReEvalDataset(txt, _img(dbs))
    assert ds.ids == EVAL_IDS and [ds[i][0] for i in range(len(ds))] == EVAL_IDS
    # an evaluation dataset over a length-limited db follows the same rule as the authors' (one txt_db rule)
    assert ReEvalDataset(ReTxtTokLmdb(dbs["txt"], MAX), _img(dbs)).ids == TRAIN_IDS


def test_task_loaders_follow_the_authors(dbs):
    task = _task(dbs)
    train = task.train_loader(DataContext(seed=3))
    assert train.dataset.ids == TRAIN_IDS
    sampler = train.sampler
    assert isinstance(sampler, ExampleBatchSampler)
    # one group per ref that keeps a sentence: consecutive runs of the refs.json order
    assert task.ref_groups([train.dataset]) == [[0], [1, 2], [3, 4]]
    for epoch in range(4):  # shuffled by ref each epoch, a ref's sentences together and in order
        flat = [train.dataset.ids[i] for b in sampler.epoch_batches(epoch) for i in b]
        blocks, rest = [], list(flat)
        while rest:
            size = {"7": 1, "1": 2, "4": 2}[rest[0]]
            blocks.append(rest[:size])
            rest = rest[size:]
        assert sorted(blocks) == sorted([["7"], ["1", "6"], ["4", "0"]])
    unshuffled = ExampleBatchSampler(len(train.dataset), 2, shuffle=False)
    assert [train.dataset.ids[i] for b in unshuffled.epoch_batches() for i in b] == TRAIN_IDS  # the authors' epoch
    ev = task.eval_loader(DataContext())
    assert ev.dataset.ids == EVAL_IDS
    assert [q for b in ev for q in b["qids"]] == EVAL_IDS


def test_without_refs_json_the_examples_follow_id2len(dbs):
    txt = ReTxtTokLmdb(dbs["no_refs"], MAX)
    assert not txt.has_refs and txt.ref_sents == []
    want = [str(s) for s in WRITE_ORDER if LENS[s] < MAX]
    assert txt.sent_ids == want and txt.num_at_max_len == 2
    assert ReDataset(txt, _img(dbs)).ids == want
    assert ReEvalDataset(ReTxtTokLmdb(dbs["no_refs"], -1), _img(dbs)).ids == [str(s) for s in WRITE_ORDER]
    task = _task(dbs, dbs["no_refs"])
    loader = task.train_loader(DataContext())
    assert loader.dataset.ids == want and task.ref_groups([loader.dataset]) is None  # one group per sentence


@pytest.mark.parametrize("max_txt_len", [-1, 1, 3, 4, 6])
def test_random_databases_match_the_rule(tmp_path, dbs, max_txt_len):
    rng = np.random.default_rng(max_txt_len + 10)
    ids = [int(x) for x in rng.permutation(40)]
    refs, at = [], 0
    while at < len(ids):
        n = int(rng.integers(1, 4))
        k = int(rng.integers(len(N_GT)))
        refs.append(
            {"ref_id": int(rng.integers(10**6)), "image_id": k, "ann_id": 100 * k, "sent_ids": ids[at : at + n]}
        )
        at += n
    lens = {str(s): int(rng.integers(1, 7)) for s in ids}
    path = _write_txt_db(tmp_path / "txt", refs, lens, [int(x) for x in rng.permutation(40)])
    want = _spec(refs, lens, max_txt_len)
    assert ReDataset(ReTxtTokLmdb(path, max_txt_len), _img(dbs)).ids == want
    assert ReEvalDataset(ReTxtTokLmdb(path, max_txt_len), _img(dbs)).ids == want


def test_refs_and_id2len_that_disagree_are_counted_and_logged(dbs, tmp_path, caplog):
    refs = [{"ref_id": 1, "image_id": 0, "ann_id": 1, "sent_ids": [3, 99, 0]}]
    path = _write_txt_db(tmp_path / "txt", refs, {"0": 2, "3": 4, "5": 3, "6": 1}, [6, 5, 3, 0])  # 5, 6: no ref
    with caplog.at_level(logging.INFO, logger="villa_fast.data.datasets"):
        txt = ReTxtTokLmdb(path, -1)
    assert txt.sent_ids == ["3", "0"]
    assert (txt.num_missing_sents, txt.num_unreferenced) == (1, 2)
    assert "lists 1 sentences that id2len.json lacks; skipped (first: '99')" in caplog.text
    assert "2 sentences are under no ref of refs.json and are no example (first: '6')" in caplog.text
    assert ReEvalDataset(txt, _img(dbs)).ids == ["3", "0"]


@pytest.mark.parametrize("max_txt_len", [MAX, -1], ids=["train", "eval"])
def test_bad_refs_are_named(dbs, tmp_path, max_txt_len):
    lens = {"0": 2, "1": 3}
    twice = [
        {"ref_id": 1, "image_id": 0, "ann_id": 1, "sent_ids": [0, 1]},
        {"ref_id": 2, "image_id": 0, "ann_id": 0, "sent_ids": [1]},
    ]
    path = _write_txt_db(tmp_path / "twice", twice, lens, [0, 1])
    with pytest.raises(DataFormatError, match=r"twice/refs.json: sentence 1 is under refs 1 and 2"):
        ReTxtTokLmdb(path, max_txt_len)
    path = _write_txt_db(tmp_path / "no_list", [dict(twice[0], sent_ids="0 1")], lens, [0, 1])
    with pytest.raises(DataFormatError, match=r"no_list/refs.json: entry 0 needs a 'sent_ids' list"):
        ReTxtTokLmdb(path, max_txt_len)
    path = _write_txt_db(tmp_path / "not_list", twice, lens, [0, 1])
    (tmp_path / "not_list" / "refs.json").write_text(json.dumps({"refs": twice}))
    with pytest.raises(DataFormatError, match=r"not_list/refs.json: must be a list of refs, got dict"):
        ReTxtTokLmdb(path, max_txt_len)
