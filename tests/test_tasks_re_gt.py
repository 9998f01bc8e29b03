"""Referring expressions: a ground-truth-boxes image database keeps every box whatever the config's
conf_th / num_bb (the authors' rule in UNITER's train_re.py / inf_re.py), detections keep the config's."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from tests.test_train_fixtures import META, task_config, tiny_model_config
from villa_fast.data import ImgDbWriter, ReEvalDataset, TxtDbWriter, re_det_img_name
from villa_fast.tasks import DataContext
from villa_fast.tasks.re import GT_NUM_BB, ReTask, is_gt_img_db
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

IMG_DIM = 16
#: ground-truth boxes per image: more than the config's num_bb and min_bb / max_bb below would keep
N_GT = [3, 7, 12]
#: what the config asks of detections
CONF_TH, MAX_BB, MIN_BB, NUM_BB = 0.5, 5, 2, 2


def _gt_name(k: int) -> str:
    return f"visual_grounding_coco_gt_{k:012}.npz"


def _boxes(rng, n: int) -> np.ndarray:
    xy = rng.uniform(0, 0.5, (n, 2))
    wh = rng.uniform(0.1, 0.5, (n, 2))
    return np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)


def _write_img_db(path, names, counts, rng, **selection) -> None:
    with ImgDbWriter(path, compress=False, **selection) as w:
        for name, n in zip(names, counts, strict=True):
            conf = np.linspace(0.9, 0.1, n).astype(np.float32)  # most boxes under the config's conf_th
            w.add(name, rng.normal(size=(n, IMG_DIM)).astype(np.float32), _boxes(rng, n), conf)


def _write_txt_db(path, n_txt: int, rng) -> None:
    images = [
        {"id": k, "ann_ids": [100 * k + j for j in range(n)], "width": 640, "height": 480} for k, n in enumerate(N_GT)
    ]
    with TxtDbWriter(path, META) as w:
        for i in range(n_txt):
            k = i % len(N_GT)
            rec = {
                "input_ids": [int(x) for x in rng.integers(META["v_range"][0], META["vocab_size"], 5)],
                "img_fname": _gt_name(k),
                "image_id": k,
                "ann_id": 100 * k + N_GT[k] - 1 - i % 2,  # among the last boxes: a cut region set loses them
                "bbox": [10.0, 20.0, 100.0, 80.0],
            }
            w.add(str(i), rec)
        w.extra_json["images.json"] = images


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("re_gt")
    rng = np.random.default_rng(0)
    gt_names = [_gt_name(k) for k in range(len(N_GT))]
    det_names = [re_det_img_name(n) for n in gt_names]
    # the official layouts: gt boxes in feat_numbb100, detections by confidence threshold
    _write_img_db(root / "re_coco_gt", gt_names, N_GT, rng, conf_th=-1, num_bb=GT_NUM_BB)
    _write_img_db(root / "re_coco_det", det_names, [10] * 3, rng, conf_th=CONF_TH, max_bb=MAX_BB, min_bb=MIN_BB)
    _write_txt_db(root / "txt_train", 12, rng)
    _write_txt_db(root / "txt_val", 6, rng)
    return root


def _cfg(root, tmp_path, **changes) -> dict:
    cfg = task_config(tmp_path, "re")
    cfg.update(
        model_config=tiny_model_config(tmp_path / "model.json"),
        train_txt_db=str(root / "txt_train"),
        train_img_db=str(root / "re_coco_gt"),
        val_txt_db=str(root / "txt_val"),
        val_img_db=str(root / "re_coco_det"),
        conf_th=CONF_TH,
        max_bb=MAX_BB,
        min_bb=MIN_BB,
        num_bb=NUM_BB,
        compressed_db=False,
        train_batch_size=1000,
        val_batch_size=1000,
    )
    cfg.update(changes)
    return resolve_config(None, cfg)


@pytest.mark.parametrize(
    "path, gt",
    [
        ("/img/re_coco_gt", True),
        ("/img/re_coco_gt/", True),
        ("re_coco_gt_compressed", True),
        ("/data/coco_gt_feats/refcoco", True),  # the authors test the whole path as given
        ("/img/re_coco_det/", False),
        ("/img/re_coco_det_gt", False),
        ("/img/vg_gt", False),
    ],
)
def test_gt_database_is_named_by_coco_gt_in_its_path(path, gt):
    assert is_gt_img_db(path) is gt


def test_gt_database_keeps_every_box_whatever_the_config(dbs, tmp_path, caplog):
    task = ReTask(_cfg(dbs, tmp_path))
    with caplog.at_level(logging.INFO, logger="villa_fast.tasks.re"):
        gt = task.re_img_db(str(dbs / "re_coco_gt"))
    assert (gt.conf_th, gt.num_bb) == (-1, GT_NUM_BB) and gt.db_path.endswith("feat_numbb100")
    for k, n in enumerate(N_GT):
        feat, bb = gt[_gt_name(k)]
        assert feat.shape == (n, IMG_DIM) and bb.shape == (n, 6)
    [rec] = [r for r in caplog.records if r.name == "villa_fast.tasks.re"]
    msg = rec.getMessage()
    assert "re_coco_gt" in msg and "every box" in msg and "conf_th=-1" in msg and f"num_bb={GT_NUM_BB}" in msg
    assert f"conf_th={CONF_TH}" in msg and f"num_bb={NUM_BB}" in msg  # the config's values it set aside
    # detections: the config's selection, no log line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="villa_fast.tasks.re"):
        det = task.re_img_db(str(dbs / "re_coco_det"))
    assert not [r for r in caplog.records if r.name == "villa_fast.tasks.re"]
    assert (det.conf_th, det.max_bb, det.min_bb, det.num_bb) == (CONF_TH, MAX_BB, MIN_BB, NUM_BB)
    assert det.db_path.endswith(f"feat_th{CONF_TH}_max{MAX_BB}_min{MIN_BB}")
    assert det[re_det_img_name(_gt_name(0))][0].shape[0] == 5  # conf > 0.5: 5 of 10, within [2, 5]


@pytest.mark.parametrize("split", ["train", "val"])
def test_loaders_read_gt_databases_in_full(dbs, tmp_path, split):
    # train on gt (as the official config) and, here, validate on gt too: both splits keep every box
    cfg = _cfg(dbs, tmp_path, val_img_db=str(dbs / "re_coco_gt"))
    task = ReTask(cfg)
    loader = task.train_loader(DataContext()) if split == "train" else task.eval_loader(DataContext(), "val")
    seen = {}
    for batch in loader:
        for k in range(len(batch["num_bbs"])):
            target = int(batch["targets"][k])
            assert target >= 0  # the referred box is among the regions: none was cut
            seen[target] = batch["num_bbs"][k]
    assert set(seen.values()) == set(N_GT)
    if split == "val":
        assert loader.dataset.use_gt_feat is True


def test_gt_database_without_feat_numbb100_says_what_is_read(dbs, tmp_path):
    rng = np.random.default_rng(1)
    _write_img_db(tmp_path / "my_coco_gt", [_gt_name(0)], [3], rng, conf_th=-1, num_bb=36)
    task = ReTask(_cfg(dbs, tmp_path))
    with pytest.raises(FileNotFoundError, match=r"feat_numbb100.*coco_gt.*--conf-th -1 --num-bb 100"):
        task.re_img_db(str(tmp_path / "my_coco_gt"))


def test_train_on_gt_with_detection_settings_validate_on_det(dbs, tmp_path):
    trainer = Trainer(_cfg(dbs, tmp_path, num_train_steps=2, valid_steps=2), quiet=True)
    history = trainer.train()
    val = [e for e in history if "val/acc_iou" in e]
    assert len(val) == 1 and val[0]["val/n_iou"] == 6
    ds = trainer.eval_loader("val").dataset
    assert isinstance(ds, ReEvalDataset) and ds.use_gt_feat is False
    assert (ds.img_db.conf_th, ds.img_db.num_bb) == (CONF_TH, NUM_BB)
