"""Tiny databases for the data tests (built in a temporary directory)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from villa_fast.data.db import ImgDbWriter, TxtDbWriter

D = 16  # feature width of the test images
META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [104, 200], "tokenizer": "test"}
IMG_ARGS = {"conf_th": 0.2, "max_bb": 8, "min_bb": 3, "num_bb": 8}


def make_images(img_dir: Path, n: int = 12, seed: int = 0, compress: bool = True, soft: bool = True) -> dict:
    """n images with 2-9 detections of mixed confidence; returns the raw arrays by name."""
    rng = np.random.default_rng(seed)
    raw = {}
    with ImgDbWriter(img_dir, compress=compress, **IMG_ARGS) as w:
        for k in range(n):
            m = int(rng.integers(2, 10))
            xy = rng.uniform(0, 0.5, (m, 2))
            wh = rng.uniform(0.1, 0.5, (m, 2))
            bb = np.concatenate([xy, xy + wh, wh], 1).astype(np.float32)
            arrays = {
                "features": rng.normal(size=(m, D)).astype(np.float32),
                "norm_bb": bb,
                "conf": rng.uniform(0, 1, m).astype(np.float32),
            }
            if soft:
                arrays["soft_labels"] = rng.dirichlet(np.ones(5), m).astype(np.float32)
            name = f"img{k:03d}.npz"
            w.add(name, **arrays)
            raw[name] = arrays
    return raw


def make_txt(txt_dir: Path, images: list[str], n: int = 40, seed: int = 0, task: str = "vqa", max_len: int = 12):
    """n text records of length 1..max_len over the given images."""
    rng = np.random.default_rng(seed)
    recs = {}
    with TxtDbWriter(txt_dir, dict(META)) as w:
        for k in range(n):
            ids = rng.integers(104, 200, int(rng.integers(1, max_len + 1))).tolist()
            rec = {"input_ids": ids, "img_fname": images[k % len(images)]}
            if task == "vqa":
                rec["target"] = {"labels": [int(k % 5), 7], "scores": [1.0, 0.3]}
            elif task == "nlvr2":
                rec["img_fname"] = [images[k % len(images)], images[(k + 1) % len(images)]]
                rec["target"] = k % 2
            elif task == "vcr":
                rec["img_fname"] = [images[k % len(images)], images[(k + 3) % len(images)]]
                rec["input_ids_as"] = [rng.integers(104, 200, int(rng.integers(1, 5))).tolist() for _ in range(4)]
                rec["input_ids_rs"] = [rng.integers(104, 200, int(rng.integers(1, 6))).tolist() for _ in range(4)]
                rec["qa_target"] = k % 4
                rec["qar_target"] = (k + 1) % 4
            elif task == "re":
                rec["image_id"] = k % len(images)
                rec["ann_id"] = 1000 * (k % len(images)) + k % 3
            id_ = f"t{k:04d}"
            txt_len = None
            if task == "vcr":
                q = len(ids)
                ma = max(map(len, rec["input_ids_as"]))
                mr = max(map(len, rec["input_ids_rs"]))
                w.extra_json.setdefault("id2len_qa.json", {})[id_] = q + ma
                w.extra_json.setdefault("id2len_qar.json", {})[id_] = q + ma + mr
                txt_len = q + ma + mr
            w.add(id_, rec, txt_len)
            recs[id_] = rec
    return recs
