"""NLVR2 "triplet": the head, the one-row layout of both images, a tiny training run, the config."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F

from tests.test_data_helpers import IMG_ARGS, make_images, make_txt
from tests.test_models import make_batch, tiny_config
from tests.test_train_fixtures import task_config
from villa_fast.data import (
    DetectFeatLmdb,
    Nlvr2TripletDataset,
    Nlvr2TripletEvalDataset,
    TxtTokLmdb,
    nlvr2_triplet_collate,
    nlvr2_triplet_eval_collate,
)
from villa_fast.models import UniterForNlvr2Triplet, UniterModel, build_model, load_pretrained
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TXT, NBB = [5, 3, 6], [7, 4, 9]  # regions of both images per row
LEFT = [3, 2, 5]  # of which the left image's


def _triplet_batch(cfg) -> dict:
    batch = make_batch(cfg, TXT, NBB, seed=3)
    types = torch.zeros(len(TXT), max(NBB), dtype=torch.long)
    for i, (n, k) in enumerate(zip(NBB, LEFT, strict=True)):
        types[i, :k] = 1
        types[i, k:n] = 2
    batch["img_type_ids"] = types
    batch["targets"] = torch.tensor([1, 0, 1])
    return batch


# -- head --------------------------------------------------------------------------------------------
def test_head_shapes_loss_and_gradients():
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = build_model("nlvr2_triplet", cfg)
    assert isinstance(model, UniterForNlvr2Triplet)
    assert model.nlvr2_output.in_features == cfg.hidden_size and model.nlvr2_output.out_features == 2
    types = model.uniter.embeddings.token_type_embeddings.weight
    assert types.shape == (3, cfg.hidden_size)
    torch.testing.assert_close(types[2], types[1])  # the new image type starts as the image type

    batch = _triplet_batch(cfg)
    logits = model(batch)
    assert logits.shape == (3, 2)
    loss = model(batch, compute_loss=True)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["targets"]))
    loss.backward()
    assert model.nlvr2_output.weight.grad.abs().sum() > 0
    g = model.uniter.embeddings.token_type_embeddings.weight.grad
    assert g[1].abs().sum() > 0 and g[2].abs().sum() > 0  # both image types are used

    # the type ids reach the model: once row 2 differs from row 1, relabelling changes the output
    with torch.no_grad():
        types[2].add_(torch.randn(cfg.hidden_size))  # not a constant: LayerNorm would remove that
        model.nlvr2_output.weight.normal_()  # a head large enough to show the change
        ones = dict(batch, img_type_ids=(batch["img_type_ids"] > 0).long())
        assert (model(batch) - model(ones)).abs().max() > 1e-4


def test_checkpoint_type_embeddings_extended():
    cfg = tiny_config()
    src = UniterModel(cfg)
    with torch.no_grad():
        src.embeddings.token_type_embeddings.weight.normal_()
    sd = {f"uniter.{k}": v for k, v in src.state_dict().items()}
    model = UniterForNlvr2Triplet(cfg)
    report = load_pretrained(model, sd)
    assert "uniter.embeddings.token_type_embeddings.weight" in report.expanded
    w, w0 = model.uniter.embeddings.token_type_embeddings.weight, src.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(w[:2], w0)
    torch.testing.assert_close(w[2], w0[1])


# -- data --------------------------------------------------------------------------------------------
NAMES = [f"img{k:03d}.npz" for k in range(8)]


@pytest.fixture(scope="module")
def nlvr2_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nlvr2_triplet")
    make_images(root / "img", n=8)
    make_txt(root / "nlvr2", NAMES, n=12, task="nlvr2")
    return TxtTokLmdb(root / "nlvr2", -1), DetectFeatLmdb(root / "img", **IMG_ARGS)


def test_collate_layout_unequal_lengths(nlvr2_dbs):
    txt, img = nlvr2_dbs
    ds = Nlvr2TripletDataset(txt, img)
    rows = [0, 1, 2, 3]
    batch = nlvr2_triplet_collate([ds[i] for i in rows])
    tl, nb = batch["txt_lens"], batch["num_bbs"]
    assert len(set(tl)) > 1 and len(set(nb)) > 1  # the case worth testing: unequal rows
    max_tl, max_nb = batch["input_ids"].size(1), batch["img_feat"].size(1)
    total = batch["attn_masks"].size(1)
    assert total == max(t + n for t, n in zip(tl, nb, strict=True))
    assert batch["targets"].tolist() == [int(txt[ds.ids[i]]["target"]) for i in rows]
    for r, i in enumerate(rows):
        left, right = txt.txt2img[ds.ids[i]]
        n0, n1 = img.name2nbb[left], img.name2nbb[right]
        assert nb[r] == n0 + n1 and tl[r] == txt.id2len[ds.ids[i]] + 2
        assert ds.lens[i] == txt.id2len[ds.ids[i]] + n0 + n1
        types = batch["img_type_ids"][r].tolist()
        assert types == [1] * n0 + [2] * n1 + [0] * (max_nb - n0 - n1)
        torch.testing.assert_close(batch["img_feat"][r, : n0 + n1], torch.cat([img[left][0], img[right][0]]))
        assert batch["img_feat"][r, n0 + n1 :].eq(0).all()
        pos = batch["img_pos_feat"][r, : n0 + n1]
        torch.testing.assert_close(pos[:, 6], pos[:, 4] * pos[:, 5])
        gi = batch["gather_index"][r]
        assert gi[: tl[r]].tolist() == list(range(tl[r]))
        assert gi[tl[r] : tl[r] + nb[r]].tolist() == list(range(max_tl, max_tl + nb[r]))
        assert batch["attn_masks"][r].tolist() == [1] * (tl[r] + nb[r]) + [0] * (total - tl[r] - nb[r])
        assert batch["img_mask"][r].sum() == nb[r] and batch["txt_mask"][r].sum() == tl[r]

    ev = Nlvr2TripletEvalDataset(txt, img)
    eb = nlvr2_triplet_eval_collate([ev[i] for i in rows])
    assert eb["qids"] == [ds.ids[i] for i in rows]
    for key in ("input_ids", "img_feat", "img_type_ids", "gather_index", "attn_masks", "targets"):
        assert eb[key].equal(batch[key])

    plain = nlvr2_triplet_collate([Nlvr2TripletDataset(txt, img, use_img_type=False)[i] for i in rows])
    assert plain["img_type_ids"] is None  # the model's default: every region has type 1


# -- task ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
def test_task_trains_and_evaluates(tmp_path, adv):
    cfg = resolve_config(None, task_config(tmp_path, "nlvr2", model="triplet", adv_training=adv))
    trainer = Trainer(cfg, quiet=True)
    assert isinstance(trainer.model, UniterForNlvr2Triplet)
    assert (trainer.adv_step is not None) == adv
    history = trainer.train()
    steps = [e for e in history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    vals = [e for e in history if "val/acc" in e]
    assert [e["step"] for e in vals] == [2, 4] and all(0.0 <= e["val/acc"] <= 1.0 for e in vals)
    assert vals[-1]["val/n"] == 24
    rows = list(csv.reader(open(trainer.output_dir / "results" / "results_4.csv")))
    assert len(rows) == 24 and all(r[1] in ("True", "False") for r in rows)
    assert {r[0] for r in rows} == {f"val-{i}" for i in range(24)}
    m = trainer.evaluate("val", robust=True)
    assert 0.0 <= m["robust_acc"] <= 1.0 and m["n"] == 24


def test_config_with_triplet_parses(tmp_path):
    path = tmp_path / "train-nlvr2-base-1gpu-triplet.json"
    path.write_text(json.dumps({"model": "triplet", "use_img_type": True, "train_batch_size": 10240}))
    cfg = resolve_config(path)
    assert cfg["task"] == "nlvr2" and cfg["model"] == "triplet"
    from villa_fast.tasks import build_task

    cfg["model_config"] = str(tmp_path / "model.json")
    (tmp_path / "model.json").write_text(json.dumps(tiny_config().to_dict()))
    assert isinstance(build_task(cfg).build_model(), UniterForNlvr2Triplet)
    with pytest.raises(ConfigError, match="model"):
        resolve_config(None, {"task": "nlvr2", "model": "tripplet"})
