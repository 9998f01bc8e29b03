"""Per-task datasets and collates: batch keys, shapes, masks, the gather layout, padding."""

from __future__ import annotations

import pytest
import torch

from tests.test_data_helpers import IMG_ARGS, make_images, make_txt
from villa_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    ItmRankDataset,
    ItmRankDatasetHardNegFromImage,
    ItmRankDatasetHardNegFromText,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    Nlvr2PairedDataset,
    Nlvr2TripletDataset,
    PadBuckets,
    ReDataset,
    ReTxtTokLmdb,
    TxtTokLmdb,
    VcrDataset,
    VcrEvalDataset,
    VcrTxtTokLmdb,
    VeDataset,
    VqaDataset,
    itm_collate,
    itm_ot_collate,
    itm_rank_collate,
    itm_rank_hn_collate,
    mlm_collate,
    mrc_collate,
    mrfr_collate,
    nlvr2_paired_collate,
    nlvr2_triplet_collate,
    pad_batch,
    re_collate,
    vcr_collate,
    vcr_eval_collate,
    vqa_collate,
)

NAMES = [f"img{k:03d}.npz" for k in range(8)]


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    make_images(root / "img", n=8)
    for task in ("vqa", "nlvr2", "vcr", "re"):
        make_txt(root / task, NAMES, n=24, task=task)
    return root, DetectFeatLmdb(root / "img", **IMG_ARGS)


def check_layout(batch: dict, rows: int) -> None:
    """Shapes, masks and gather index agree with txt_lens / num_bbs."""
    ids, feat = batch["input_ids"], batch["img_feat"]
    tl, nb = batch["txt_lens"], batch["num_bbs"]
    assert ids.shape[0] == rows == len(tl) == len(nb) and ids.dtype == torch.long
    assert batch["position_ids"].tolist() == [list(range(ids.size(1)))]
    # region features stay in the img_db's float16 (the model widens them); boxes float32
    assert feat.dtype == torch.float16 and batch["img_pos_feat"].dtype == torch.float32
    assert batch["img_pos_feat"].shape == (*feat.shape[:2], 7)
    total = batch["attn_masks"].size(1)
    assert batch["gather_index"].shape == batch["attn_masks"].shape
    for i in range(rows):
        assert batch["txt_mask"][i].sum() == tl[i] and batch["img_mask"][i].sum() == nb[i]
        assert batch["attn_masks"][i].tolist() == [1] * (tl[i] + nb[i]) + [0] * (total - tl[i] - nb[i])
        gi = batch["gather_index"][i]
        assert gi[: tl[i]].tolist() == list(range(tl[i]))
        assert gi[tl[i] : tl[i] + nb[i]].tolist() == list(range(ids.size(1), ids.size(1) + nb[i]))
        assert ids[i, 0] == 101 and ids[i, tl[i] - 1] == 102 and (ids[i, tl[i] :] == 0).all()
        assert (feat[i, nb[i] :] == 0).all()
        pos = batch["img_pos_feat"][i, : nb[i]]
        torch.testing.assert_close(pos[:, 6], pos[:, 4] * pos[:, 5])


def test_vqa_and_ve(dbs):
    root, img = dbs
    ds = VqaDataset(10, TxtTokLmdb(root / "vqa", -1), img)
    batch = vqa_collate([ds[i] for i in range(5)])
    check_layout(batch, 5)
    assert batch["targets"].shape == (5, 10)
    assert batch["targets"][0, 0] == 1.0 and batch["targets"][0, 7] == pytest.approx(0.3)
    assert ds.lens[0] == len(ds.txt_db[ds.ids[0]]["input_ids"]) + batch["num_bbs"][0]
    ve = VeDataset(TxtTokLmdb(root / "vqa", -1), img)
    with pytest.raises(ValueError, match="out of range"):
        ve[3]  # label 3 does not exist among VE's 3 classes


def test_nlvr2_paired_and_triplet(dbs):
    root, img = dbs
    txt = TxtTokLmdb(root / "nlvr2", -1)
    paired = Nlvr2PairedDataset(txt, img)
    batch = nlvr2_paired_collate([paired[i] for i in range(3)])
    check_layout(batch, 6)
    assert batch["targets"].tolist() == [0, 1, 0]
    it = batch["img_type_ids"]
    for r in range(6):
        assert it[r, : batch["num_bbs"][r]].eq(r % 2 + 1).all() and it[r, batch["num_bbs"][r] :].eq(0).all()
    trip = Nlvr2TripletDataset(txt, img)
    batch = nlvr2_triplet_collate([trip[i] for i in range(3)])
    check_layout(batch, 3)
    assert batch["img_type_ids"][0].unique().tolist()[-2:] == [1, 2]


@pytest.mark.parametrize("task", ["qa", "qar"])
def test_vcr(dbs, task):
    root, img = dbs
    txt = VcrTxtTokLmdb(root / "vcr", -1, task=task)
    ds = VcrDataset(txt, img_db_gt=img, img_db=img)
    batch = vcr_collate([ds[i] for i in range(2)])
    check_layout(batch, 8)
    rec = txt[ds.ids[0]]
    assert batch["targets"].shape == (8, 1)
    label = rec[f"{task}_target"]
    assert batch["targets"][:4, 0].tolist() == [int(k == label) for k in range(4)]
    # [CLS] and the question 0; each [SEP] takes the type of the segment it opens (the last one closes its own)
    q = len(rec["input_ids"])
    for k in range(4):
        types = batch["txt_type_ids"][k, : batch["txt_lens"][k]].tolist()
        if task == "qa":
            want = [0] * (1 + q) + [2] * (len(rec["input_ids_as"][k]) + 2)
        else:
            gold = len(rec["input_ids_as"][rec["qa_target"]])
            want = [0] * (1 + q) + [2] * (gold + 1) + [3] * (len(rec["input_ids_rs"][k]) + 2)
        assert types == want
    assert ds.pad_dims[0][0] >= batch["txt_lens"][0]


def _authors_eval_types(rec: dict, split: str) -> list[list[int]]:
    """Type ids of one question's evaluation rows, written as the layout of UNITER's VcrEvalDataset."""
    q = [0] * (1 + len(rec["input_ids"]))
    rows = [q + [2] * (len(a) + 2) for a in rec["input_ids_as"]]
    for k, a in enumerate(rec["input_ids_as"]):
        if split == "test" or k == rec["qa_target"]:
            rows += [q + [2] * (len(a) + 1) + [3] * (len(r) + 2) for r in rec["input_ids_rs"]]
    return rows


def test_vcr_eval(dbs):
    root, img = dbs
    ds = VcrEvalDataset("val", VcrTxtTokLmdb(root / "vcr", -1), img_db=img)
    batch = vcr_eval_collate([ds[0], ds[1]])
    check_layout(batch, 16)
    assert batch["qa_targets"].shape == (2, 1) and batch["qids"] == ds.ids[:2]
    for split, n in (("val", 8), ("test", 20)):
        ds = VcrEvalDataset(split, VcrTxtTokLmdb(root / "vcr", -1), img_db=img)
        rec = ds.txt_db[ds.ids[0]]
        rows = ds[0][0]
        assert len(rows) == n and [r[1].tolist() for r in rows] == _authors_eval_types(rec, split)


def test_retrieval(dbs):
    root, img = dbs
    txt = TxtTokLmdb(root / "vqa", -1)
    ds = ItmRankDataset(txt, img, neg_sample_size=2)
    batch = itm_rank_collate([ds[0], ds[1]])
    check_layout(batch, 10)
    assert batch["sample_size"] == 5
    ds.set_epoch(0, seed=1)
    a = [x[0].tolist() for x in ds[0]]
    assert a == [x[0].tolist() for x in ds[0]]  # same (seed, epoch, index): same negatives
    hn = ItmRankDatasetHardNegFromText(txt, img, neg_sample_size=3)
    batch = itm_rank_hn_collate([hn[0]])
    check_layout(batch, 4)
    assert batch["img_feat"][0, : batch["num_bbs"][0]].equal(img[ds._txt2img[ds.ids[0]]][0])
    hi = ItmRankDatasetHardNegFromImage(txt, img, neg_sample_size=3)
    check_layout(itm_rank_hn_collate([hi[0]]), 4)


def test_referring_expressions(dbs, tmp_path):
    root, img = dbs
    import json

    images = [{"id": k, "ann_ids": [1000 * k + j for j in range(img.name2nbb[NAMES[k]])]} for k in range(8)]
    (root / "re" / "images.json").write_text(json.dumps(images))
    ds = ReDataset(ReTxtTokLmdb(root / "re", -1), img)
    batch = re_collate([ds[i] for i in range(4)])
    check_layout(batch, 4)
    assert batch["targets"].flatten().tolist() == [0, 1, 2, 0]
    for i in range(4):
        n = batch["num_bbs"][i]
        assert batch["obj_masks"][i, :n].eq(0).all() and batch["obj_masks"][i, n:].eq(1).all()


def test_mlm(dbs):
    root, img = dbs
    ds = MlmDataset(TxtTokLmdb(root / "vqa", -1), img)
    items = [ds[i] for i in range(len(ds))]
    batch = mlm_collate(items[:6])
    check_layout(batch, 6)
    labels = batch["txt_labels"]
    assert labels.shape == batch["input_ids"].shape
    assert (labels[:, 0] == -1).all() and (labels[~batch["txt_mask"].bool()] == -1).all()
    for i in range(6):
        assert (labels[i] != -1).sum() >= 1
    # masking statistics over many draws: 15% targets, 80% of them [MASK]
    n_tok = n_tgt = n_mask = 0
    for epoch in range(30):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            ids, _, _, _, lab = ds[i]
            sel = lab != -1
            n_tok += len(lab) - 2
            n_tgt += int(sel.sum())
            n_mask += int((ids[sel] == 103).sum())
    assert 0.13 < n_tgt / n_tok < 0.2 and 0.72 < n_mask / n_tgt < 0.88


def test_mrfr_and_mrc(dbs):
    root, img = dbs
    txt = TxtTokLmdb(root / "vqa", -1)
    ds = MrfrDataset(0.15, txt, img)
    items = [ds[i] for i in range(4)]
    batch = mrfr_collate(items)
    check_layout(batch, 4)
    m = batch["img_masks"]
    assert m.dtype == torch.bool and m.shape == batch["img_feat"].shape[:2] and (m.sum(1) >= 1).all()
    assert batch["feat_targets"].shape == (int(m.sum()), batch["img_feat"].size(2))
    assert (batch["img_feat"][m] == 0).all()
    assert batch["img_mask_tgt"].shape == batch["attn_masks"].shape
    assert batch["img_mask_tgt"].sum() == m.sum()
    clean = img[ds._txt2img[ds.ids[0]]][0]
    torch.testing.assert_close(batch["feat_targets"][: int(m[0].sum())], clean[m[0, : clean.size(0)]])
    mrc = MrcDataset(0.15, txt, img)
    batch = mrc_collate([mrc[i] for i in range(4)])
    assert batch["label_targets"].shape == (int(batch["img_masks"].sum()), 5)
    torch.testing.assert_close(
        batch["label_targets"].sum(1), torch.ones(len(batch["label_targets"])), atol=2e-3, rtol=0
    )


def test_itm_and_ot(dbs):
    root, img = dbs
    ds = ItmDataset(TxtTokLmdb(root / "vqa", -1), img, neg_sample_p=0.5)
    ds.set_epoch(0, seed=0)
    labels0 = list(ds.labels)
    assert 0 < sum(labels0) < len(labels0)
    for i, lab in enumerate(labels0):
        assert (ds.train_imgs[i] == ds._txt2img[ds.ids[i]]) == bool(lab)
    ds.set_epoch(1)
    assert ds.labels != labels0
    batch = itm_ot_collate([ds[i] for i in range(5)])
    check_layout(batch, 5)
    assert batch["targets"].tolist() == ds.labels[:5]
    ot = batch["ot_inputs"]
    tl = batch["txt_lens"]
    assert ot["txt_pad"].shape == batch["input_ids"].shape and ot["img_pad"].shape == batch["img_feat"].shape[:2]
    assert ot["txt_pad"].sum(1).tolist() == [batch["input_ids"].size(1) - t for t in tl]
    assert ot["scatter_max"] == int(ot["ot_scatter"].max())
    for i in range(5):
        # text keeps its position, regions land after the padded text block
        assert ot["ot_scatter"][i, tl[i]].item() == batch["input_ids"].size(1)
    assert set(itm_collate([ds[0]])) >= {"targets", "gather_index"}


def test_pad_batch(dbs):
    root, img = dbs
    ds = MlmDataset(TxtTokLmdb(root / "vqa", -1), img)
    batch = mlm_collate([ds[i] for i in range(3)])
    padded = pad_batch(batch, 20, 9)
    check_layout(padded, 3)
    assert padded["input_ids"].shape == (3, 20) and padded["img_feat"].shape[1] == 9
    assert padded["attn_masks"].shape == (3, 29) and (padded["txt_labels"][:, -3:] == -1).all()
    pb = PadBuckets(txt=(8, 16, 32), img=(4, 8, 16))
    out = pb(batch)
    assert out["input_ids"].size(1) in (8, 16, 32) and out["img_feat"].size(1) in (4, 8, 16)
    ds2 = ItmDataset(TxtTokLmdb(root / "vqa", -1), img)
    b2 = pad_batch(itm_ot_collate([ds2[i] for i in range(3)]), 20, 9)
    assert b2["ot_inputs"]["txt_pad"].shape == (3, 20) and b2["ot_inputs"]["ot_scatter"].shape == (3, 29)
