"""Tiny txt_db / img_db builders for the trainer, task and CLI tests (and a test of the builders)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from villa_fast.data import ImgDbWriter, TxtDbWriter

VOCAB = 40
META = {"CLS": 1, "SEP": 2, "MASK": 3, "UNK": 4, "v_range": [5, VOCAB], "vocab_size": VOCAB}
IMG_DIM = 16
MAX_BB = 6


def tiny_model_config(path: Path, hidden: int = 32, layers: int = 1) -> str:
    cfg = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "img_dim": IMG_DIM,
    }
    path.write_text(json.dumps(cfg))
    return str(path)


def _img_db(
    path: Path, names: list[str], rng, *, fixed: int | None = None, soft: bool = False, num_bb: int | None = None
) -> str:
    if fixed:  # a fixed number of regions per image, stored as a conf_th = -1 database
        kw = {"conf_th": -1, "num_bb": num_bb or fixed}
    else:
        kw = {"conf_th": 0.2, "max_bb": MAX_BB, "min_bb": 2}
    with ImgDbWriter(path, compress=False, **kw) as w:
        for name in names:
            n = fixed or int(rng.integers(3, MAX_BB + 1))
            xy = rng.uniform(0, 0.5, (n, 2))
            wh = rng.uniform(0.1, 0.5, (n, 2))
            bb = np.concatenate([xy, xy + wh, wh], axis=1).astype(np.float32)
            w.add(
                name,
                features=rng.normal(0, 1, (n, IMG_DIM)).astype(np.float32),
                norm_bb=bb,
                conf=rng.uniform(0.5, 1.0, n).astype(np.float32),
                soft_labels=rng.dirichlet(np.ones(1601), n).astype(np.float32) if soft else None,
            )
    return str(path)


def _ids(rng, lo: int = 3, hi: int = 9) -> list[int]:
    return [int(x) for x in rng.integers(META["v_range"][0], VOCAB, int(rng.integers(lo, hi)))]


def build_task_data(root: Path, task: str, n_txt: int = 48, n_img: int = 12, seed: int = 0, soft: bool = False) -> dict:
    """Train and val databases for ``task``; returns config keys pointing at them. ``soft``: VCR's image
    databases with soft labels (for VCR pre-training's MRC)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out: dict = {"model_config": tiny_model_config(root / "model.json")}
    imgs = [f"img_{i:03d}.npz" for i in range(n_img)]
    if task == "vcr":
        gt = _img_db(root / "vcr_gt", imgs, rng, fixed=3, num_bb=100, soft=soft)
        out["img_db"] = f"{gt};{_img_db(root / 'vcr_det', imgs, rng, soft=soft)}"
    elif task == "re":
        out["img_db"] = _img_db(root / "img", imgs, rng, fixed=4)
    else:
        out["img_db"] = _img_db(root / "img", imgs, rng, soft=task == "pretrain")
    for split, n in (("train", n_txt), ("val", n_txt // 2)):
        d = root / f"txt_{split}"
        extra: dict = {}
        id2len_qa, id2len_qar, images = {}, {}, {}
        with TxtDbWriter(d, META) as w:
            for i in range(n):
                id_ = f"{split}-{i}"
                img = imgs[int(rng.integers(n_img))] if task != "retrieval" else imgs[i % n_img]
                rec: dict = {"input_ids": _ids(rng), "img_fname": img}
                txt_len = None
                if task == "vqa":
                    rec["target"] = {"labels": [int(rng.integers(5))], "scores": [1.0]}
                elif task == "ve":
                    rec["target"] = {"labels": [int(rng.integers(3))], "scores": [1.0]}
                elif task == "nlvr2":
                    rec["img_fname"] = [img, imgs[(imgs.index(img) + 1) % n_img]]
                    rec["target"] = int(rng.integers(2))
                elif task == "vcr":
                    rec["img_fname"] = [img, img]
                    rec["input_ids_as"] = [_ids(rng, 2, 5) for _ in range(4)]
                    rec["input_ids_rs"] = [_ids(rng, 2, 5) for _ in range(4)]
                    rec["qa_target"] = int(rng.integers(4))
                    rec["qar_target"] = int(rng.integers(4))
                    q = len(rec["input_ids"])
                    ma = max(map(len, rec["input_ids_as"]))
                    mr = max(map(len, rec["input_ids_rs"]))
                    # the official VCR txt_dbs' convention: a question's four rows priced together
                    id2len_qa[id_], id2len_qar[id_] = (q + ma) * 4, (q + ma) * 4 + mr
                    txt_len = id2len_qar[id_]
                elif task == "re":
                    image_id = imgs.index(img)
                    ann_ids = [image_id * 10 + k for k in range(4)]
                    k = int(rng.integers(4))
                    # the referred box in pixels and the image size: what the IoU accuracy (acc_iou) reads
                    box = [40.0 * k, 30.0 * k, 160.0, 120.0]
                    rec.update(image_id=image_id, ann_id=ann_ids[k], ann_ids=ann_ids, bbox=box)
                    images[image_id] = {"id": image_id, "ann_ids": ann_ids, "width": 640, "height": 480}
                w.add(id_, rec, txt_len)
            if task == "vqa":
                extra["ans2label.json"] = {f"a{k}": k for k in range(5)}
            if task == "vcr":
                extra["id2len_qa.json"], extra["id2len_qar.json"] = id2len_qa, id2len_qar
            if task == "re":
                extra["images.json"] = list(images.values())
            w.extra_json.update(extra)
        out[f"{split}_txt_db"] = str(d)
    return out


def task_config(root: Path, task: str, **changes) -> dict:
    """A complete config (official keys) for a tiny run of ``task`` under ``root``; ``"pretrain_vcr"`` is
    pre-training on the VCR data (UNITER's second stage: mlm, mrfr, mrckl)."""
    vcr_pretrain = task == "pretrain_vcr"
    if vcr_pretrain:
        data = build_task_data(root / "data", "vcr", soft=True)
        task = "pretrain"
    else:
        data = build_task_data(root / "data", task)
    cfg = {
        "task": task,
        "model_config": data["model_config"],
        "output_dir": str(root / "out"),
        "val_txt_db": data["val_txt_db"],
        "val_img_db": data["img_db"],
        "max_txt_len": 60,
        "conf_th": 0.2,
        "max_bb": MAX_BB,
        "min_bb": 2,
        "num_bb": 36,
        "train_batch_size": 400 if task != "vcr" else 2400,
        "val_batch_size": 1600 if task != "vcr" else 3200,
        "learning_rate": 1e-3,
        "num_train_steps": 4,
        "warmup_steps": 1,
        "valid_steps": 2,
        "seed": 7,
        "n_workers": 0,
        "device": "cpu",
        "progress": False,
        "tensorboard": False,
        "log_steps": 1,
        "dropout": 0.1,
        "adv_steps": 2,
        "adv_lr_txt": 1e-2,
        "adv_lr_img": 1e-2,
    }
    if vcr_pretrain:
        cfg.pop("val_txt_db")
        cfg.pop("val_img_db")
        cfg.update(train_batch_size=2400, val_batch_size=3200)
        for split, key in (("train", "train_datasets"), ("val", "val_datasets")):
            entry = {"name": "vcr", "db": [data[f"{split}_txt_db"]], "img": [data["img_db"]]}
            entry["tasks"] = ["mlm", "mrfr", "mrckl"]
            if split == "train":
                entry["mix_ratio"] = [2, 1, 1]
            cfg[key] = [entry]
    elif task == "pretrain":
        cfg.pop("val_txt_db")
        cfg.pop("val_img_db")
        cfg["train_datasets"] = [
            {
                "name": "tiny",
                "db": [data["train_txt_db"]],
                "img": [data["img_db"]],
                "tasks": ["itm", "mlm", "mrfr", "mrckl"],
                "mix_ratio": [2, 2, 1, 1],
            }
        ]
        cfg["val_datasets"] = [
            {
                "name": "tiny",
                "db": [data["val_txt_db"]],
                "img": [data["img_db"]],
                "tasks": ["itm", "mlm", "mrfr", "mrckl"],
            }
        ]
    else:
        cfg["train_txt_db"] = data["train_txt_db"]
        cfg["train_img_db"] = data["img_db"]
    if task == "re":  # ground-truth boxes: a fixed number of regions, as the official RE configs
        cfg.update(conf_th=-1, num_bb=4)
    if task == "retrieval":
        cfg.update(negative_size=4, hard_neg_size=2, train_batch_size=1)
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("task", ["vqa", "vcr", "re"])
def test_builders_write_readable_databases(tmp_path, task):
    from villa_fast.data import TxtTokLmdb

    data = build_task_data(tmp_path, task, n_txt=8, n_img=4)
    db = TxtTokLmdb(data["train_txt_db"], 60)
    assert len(db.id2len) == 8
    assert Path(data["model_config"]).is_file()
