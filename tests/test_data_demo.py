"""The embedded demo task: deterministic, written once, and it needs the image."""

from __future__ import annotations

import collections
import json

import pytest
import torch

from villa_fast.data import DetectFeatLmdb, TxtTokLmdb, VqaDataset, vqa_collate
from villa_fast.data.demo import ANSWERS, build_demo_data, demo_model_config, demo_vocab
from villa_fast.models import UniterConfig


def _content(paths: dict) -> dict:
    img = DetectFeatLmdb(paths["img_db"], **paths["img_db_args"])
    txt = TxtTokLmdb(paths["train_txt_db"], -1)
    ids = sorted(txt.id2len)[:50]
    return {
        "recs": [txt[i] for i in ids],
        "nbb": img.name2nbb,
        "feat": torch.cat([img[n][0] for n in list(img.name2nbb)[:20]]),
    }


def test_demo_is_deterministic_and_written_once(tmp_path):
    kw = {"n_train": 200, "n_val": 40}
    a = build_demo_data(tmp_path / "a", seed=3, **kw)
    b = build_demo_data(tmp_path / "b", seed=3, **kw)
    c = build_demo_data(tmp_path / "c", seed=4, **kw)
    ca, cb, cc = _content(a), _content(b), _content(c)
    assert ca["recs"] == cb["recs"] and ca["nbb"] == cb["nbb"] and ca["feat"].equal(cb["feat"])
    assert ca["recs"] != cc["recs"]
    for name in ("id2len.json", "txt2img.json", "meta.json"):
        assert (tmp_path / "a/txt_db/train" / name).read_bytes() == (tmp_path / "b/txt_db/train" / name).read_bytes()
    stamp = (tmp_path / "a/img_db/nbb_th0.2_max10_min4.json").stat().st_mtime_ns
    assert build_demo_data(tmp_path / "a", seed=3, **kw) == a
    assert (tmp_path / "a/img_db/nbb_th0.2_max10_min4.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        build_demo_data(tmp_path / "a", seed=5, **kw)
    # the demo's own directory: demo data of other settings (or an earlier builder) is rebuilt, anything else kept
    d = build_demo_data(tmp_path / "a", seed=5, rebuild_stale=True, **kw)
    assert _content(d)["recs"] != ca["recs"] and json.loads((tmp_path / "a/DONE").read_text())["seed"] == 5
    (tmp_path / "x").mkdir()
    (tmp_path / "x/DONE").write_text("not demo data")
    with pytest.raises(FileExistsError):
        build_demo_data(tmp_path / "x", seed=5, rebuild_stale=True, **kw)
    assert (tmp_path / "x/DONE").read_text() == "not demo data"
    cfg = json.loads((tmp_path / "a/model_config.json").read_text())
    assert cfg == demo_model_config() and cfg["vocab_size"] == len(demo_vocab())
    UniterConfig.from_dict(cfg)  # model keys only: the trainer reads the file as it is
    assert cfg["img_dim"] == a["img_dim"] == DetectFeatLmdb(a["img_db"], **a["img_db_args"]).img_dim
    assert json.loads((tmp_path / "a/txt_db/train/meta.json").read_text())["img_dim"] == cfg["img_dim"]


def _load(paths, split):
    img = DetectFeatLmdb(paths["img_db"], **paths["img_db_args"])
    ds = VqaDataset(paths["num_answers"], TxtTokLmdb(paths[f"{split}_txt_db"], -1), img)
    batch = vqa_collate([ds[i] for i in range(len(ds))])
    batch["img_feat"] = batch["img_feat"].float()  # stored float16; this test's own analysis runs in float32
    return batch


@pytest.mark.slow
def test_demo_needs_the_image(tmp_path):
    """Text-only (the best answer per exact question) scores far below a ridge model on image x question."""
    torch.manual_seed(0)
    paths = build_demo_data(tmp_path / "demo", seed=0)
    tr, va = _load(paths, "train"), _load(paths, "val")
    assert tr["input_ids"].size(0) == 4000 and va["input_ids"].size(0) == 1000
    assert paths["num_answers"] == len(ANSWERS) == tr["targets"].size(1)
    y_tr, y_va = tr["targets"].argmax(1), va["targets"].argmax(1)

    table = collections.defaultdict(collections.Counter)
    for ids, y in zip(tr["input_ids"].tolist(), y_tr.tolist(), strict=True):
        table[tuple(ids)][y] += 1
    fallback = collections.Counter(y_tr.tolist()).most_common(1)[0][0]
    pred = [
        table[tuple(ids)].most_common(1)[0][0] if tuple(ids) in table else fallback for ids in va["input_ids"].tolist()
    ]
    acc_text = (torch.tensor(pred) == y_va).float().mean().item()

    vocab = len(demo_vocab())
    valid = tr["img_mask"].bool()
    mu = tr["img_feat"][valid].mean(0)
    basis = torch.linalg.svd(tr["img_feat"][valid] - mu, full_matrices=False).Vh[:16].T

    def features(b):
        m = b["img_mask"].float()[..., None]
        z = torch.cat([(b["img_feat"] - mu) @ basis, b["img_pos_feat"][..., :1]], -1)
        z = torch.cat([z.relu(), (-z).relu()], -1) * m
        pooled = torch.cat([z.sum(1), (z - 1e4 * (1 - m)).amax(1), torch.ones(z.size(0), 1)], -1)
        bow = torch.zeros(z.size(0), vocab).scatter_add_(1, b["input_ids"], b["txt_mask"].float())
        return torch.einsum("bi,bj->bij", bow, pooled).flatten(1).double()

    x = features(tr)
    w = torch.linalg.solve(x.T @ x + 10 * torch.eye(x.size(1), dtype=x.dtype), x.T @ tr["targets"].double())
    acc_img = ((features(va) @ w).argmax(1) == y_va).float().mean().item()
    assert acc_text < 0.5
    assert acc_img > acc_text + 0.15
