"""VCR second-stage pre-training (UNITER's pretrain_vcr.py): the text rows and their type ids, the masking per
segment, the model's VCR rows and how checkpoints load into it, training (standard, adversarial, fixed shapes)
and fine-tuning VCR from its checkpoint."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from tests.test_train_fixtures import META, build_task_data, task_config
from villa_fast.data import (
    DataFormatError,
    MlmDatasetForVcr,
    MrcDatasetForVcr,
    MrfrDatasetForVcr,
    VcrTxtTokLmdb,
    mlm_capacity,
    mlm_collate,
    mrc_collate,
    pad_batch,
    vcr_pretrain_collate,
)
from villa_fast.models import UniterForPretraining, UniterForVcr, load_pretrained
from villa_fast.models.heads import VCR_SPECIAL_TOKENS
from villa_fast.tasks.base import Task
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

CLS, SEP, MASK = META["CLS"], META["SEP"], META["MASK"]


@pytest.fixture(scope="module")
def vcr_data(tmp_path_factory):
    return build_task_data(tmp_path_factory.mktemp("vcr"), "vcr", n_txt=16, n_img=4, soft=True)


def _dbs(data):
    """The ground-truth-box and detection image databases of the fixture, as the trainer opens them."""
    from villa_fast.data import DetectFeatLmdb

    gt_dir, det_dir = data["img_db"].split(";")
    gt = DetectFeatLmdb(gt_dir, -1, 100, 10, 100, False)
    det = DetectFeatLmdb(det_dir, 0.2, 6, 2, 36, False)
    return gt, det


def _expected_rows(rec: dict, task: str) -> tuple[list[int], list[int]]:
    """[CLS] q [SEP] a [SEP] (r [SEP]) and the authors' pre-training type ids: [SEP] takes the type before."""
    q, a = list(rec["input_ids"]), list(rec["input_ids_as"][rec["qa_target"]])
    ids = [CLS, *q, SEP, *a, SEP]
    types = [0] * (len(q) + 2) + [2] * (len(a) + 1)
    if task == "qar":
        r = list(rec["input_ids_rs"][rec["qar_target"]])
        ids += [*r, SEP]
        types += [3] * (len(r) + 1)
    return ids, types


@pytest.mark.parametrize("task", ["qa", "qar"])
def test_text_rows_and_type_ids_follow_the_authors_pretraining_layout(vcr_data, task):
    gt, det = _dbs(vcr_data)
    tdb = VcrTxtTokLmdb(vcr_data["train_txt_db"], -1, task=task)
    ds = MrfrDatasetForVcr(0.15, tdb, gt, det)
    for i in range(len(ds)):
        rec = tdb[ds.ids[i]]
        ids, types = _expected_rows(rec, task)
        input_ids, img_feat, _, attn, img_mask, img_mask_tgt, type_ids = ds[i]
        assert input_ids.tolist() == ids and type_ids.tolist() == types
        # ground-truth regions first, then the detections
        n_gt, n_det = gt[rec["img_fname"][0]][0].size(0), det[rec["img_fname"][1]][0].size(0)
        assert img_feat.size(0) == n_gt + n_det == img_mask.numel()
        assert torch.equal(img_feat[:n_gt], gt[rec["img_fname"][0]][0])
        assert attn.numel() == len(ids) + n_gt + n_det and img_mask_tgt[: len(ids)].sum() == 0


def test_mlm_masks_each_segment_and_keeps_the_rest(vcr_data):
    gt, det = _dbs(vcr_data)
    tdb = VcrTxtTokLmdb(vcr_data["train_txt_db"], -1, task="qar")
    ds = MlmDatasetForVcr(tdb, gt, det, mask_prob=0.15)
    for i in range(len(ds)):
        rec = tdb[ds.ids[i]]
        ids, types = _expected_rows(rec, "qar")
        input_ids, _, _, _, labels, type_ids = ds[i]
        assert type_ids.tolist() == types and input_ids.numel() == len(ids)
        targets = labels != -1
        # [CLS] and every [SEP] are never targets; untargeted tokens are unchanged; targets hold the original
        assert not targets[[k for k, t in enumerate(ids) if t in (CLS, SEP)]].any()
        assert input_ids[~targets].tolist() == [t for t, m in zip(ids, targets.tolist(), strict=True) if not m]
        assert labels[targets].tolist() == [t for t, m in zip(ids, targets.tolist(), strict=True) if m]
        # at least one target in the question, the answer and the rationale
        for seg_type in (0, 2, 3):
            seg = [k for k, t in enumerate(type_ids.tolist()) if t == seg_type and ids[k] not in (CLS, SEP)]
            assert targets[seg].any(), (i, seg_type)
        assert ds[i][4].tolist() == labels.tolist()  # reproducible: (seed, epoch, index)


def test_qa_and_qar_text_of_one_question_are_masked_independently(vcr_data):
    gt, det = _dbs(vcr_data)
    qa = MlmDatasetForVcr(VcrTxtTokLmdb(vcr_data["train_txt_db"], -1, task="qa"), gt, det)
    qar = MlmDatasetForVcr(VcrTxtTokLmdb(vcr_data["train_txt_db"], -1, task="qar"), gt, det)
    assert qa.ids == qar.ids
    same = 0
    for i in range(len(qa)):
        a, b = qa[i][4], qar[i][4]
        same += a.tolist() == b[: a.numel()].tolist()
    assert same < len(qa) // 2  # one stream would give the same masks on the shared prefix every time


def test_a_record_without_targets_is_refused_by_name(vcr_data, tmp_path):
    from villa_fast.data import TxtDbWriter

    src = VcrTxtTokLmdb(vcr_data["val_txt_db"], -1, task="qar")
    out = tmp_path / "txt_test"
    with TxtDbWriter(out, META) as w:
        for id_ in list(src.id2len)[:2]:
            rec = dict(src[id_])
            rec["qa_target"] = -1
            w.add(id_, rec, src.id2len[id_])
        w.extra_json.update({"id2len_qa.json": {k: src.id2len[k] for k in list(src.id2len)[:2]}})
        w.extra_json.update({"id2len_qar.json": {k: src.id2len[k] for k in list(src.id2len)[:2]}})
    gt, det = _dbs(vcr_data)
    ds = MlmDatasetForVcr(VcrTxtTokLmdb(out, -1, task="qar"), gt, det)
    with pytest.raises(DataFormatError, match="qa_target"):
        ds[0]


def test_collate_adds_type_ids_and_the_mlm_segments(vcr_data):
    gt, det = _dbs(vcr_data)
    tdb = VcrTxtTokLmdb(vcr_data["train_txt_db"], -1, task="qar")
    items = [MlmDatasetForVcr(tdb, gt, det)[i] for i in range(4)]
    batch = vcr_pretrain_collate(items, base=mlm_collate, mlm_segments=3, mask_prob=0.15)
    width = max(x[0].numel() for x in items)
    assert batch["txt_type_ids"].shape == batch["input_ids"].shape == (4, width)
    assert batch["txt_type_ids"][0, : items[0][5].numel()].tolist() == items[0][5].tolist()
    assert batch["mlm_segments"] == 3 and batch["mlm_prob"] == 0.15
    # padded to a fixed shape, the masked rows are sized for three forced targets per row
    padded = pad_batch(batch, width + 2, batch["img_feat"].size(1))
    assert padded["mlm_index"].numel() == mlm_capacity(4, width + 2, 0.15, segments=3)
    assert padded["txt_type_ids"].shape == (4, width + 2)
    items = [MrcDatasetForVcr(0.15, tdb, gt, det)[i] for i in range(4)]
    batch = vcr_pretrain_collate(items, base=mrc_collate)
    assert batch["label_targets"].shape == (int(batch["img_masks"].sum()), 1601)
    assert "mlm_segments" not in batch


def test_mlm_capacity_counts_one_forced_target_per_segment():
    assert mlm_capacity(64, 40, 0.15, segments=3) > mlm_capacity(64, 40, 0.15)
    with pytest.raises(ValueError, match="segments"):
        mlm_capacity(4, 8, 0.15, segments=0)


# ----------------------------------------------------------------------------------------------- the model


def test_the_model_grows_vcr_types_and_tokens_and_a_first_stage_checkpoint_leaves_the_mlm_head_fresh(tmp_path):
    from tests.test_train_fixtures import tiny_model_config

    cfg = tiny_model_config(tmp_path / "m.json")
    torch.manual_seed(0)
    first = UniterForPretraining(cfg)
    torch.manual_seed(1)
    model = UniterForPretraining(cfg, vcr=True)
    words = model.uniter.embeddings.word_embeddings.weight
    types = model.uniter.embeddings.token_type_embeddings.weight
    assert words.shape[0] == first.config.vocab_size + VCR_SPECIAL_TOKENS and types.shape[0] == 4
    assert model.cls.predictions.bias.numel() == words.shape[0]
    assert model.source_config.vocab_size == first.config.vocab_size
    # the authors' new head keeps nn.Linear's own init (a non-zero bias), the first stage's is BERT's (zero)
    assert model.cls.predictions.transform.dense.bias.abs().sum() > 0
    assert first.cls.predictions.transform.dense.bias.abs().sum() == 0
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("cls.")}
    report = load_pretrained(model, first.state_dict())
    n = first.config.vocab_size
    assert torch.equal(words[:n], first.uniter.embeddings.word_embeddings.weight)
    t0 = first.uniter.embeddings.token_type_embeddings.weight[0]
    assert torch.equal(types[2], t0) and torch.equal(types[3], t0)
    # the authors' init_word_embedding builds a new MLM head: the first stage's is not loaded
    assert sorted(report.reinitialised) == sorted(head_before) and not report.missing
    for k, v in head_before.items():
        assert torch.equal(model.state_dict()[k], v)
    # a VCR-stage checkpoint has the rows: everything loads, the head included
    again = UniterForPretraining(cfg, vcr=True)
    report = load_pretrained(again, model.state_dict())
    assert not report.reinitialised and not report.missing and not report.expanded
    assert torch.equal(again.cls.predictions.bias, model.cls.predictions.bias)
    z = again({"task": "mlm", **_tiny_mlm_batch(words.shape[0])})["logits"]
    assert z.shape[-1] == n + VCR_SPECIAL_TOKENS


def _tiny_mlm_batch(vocab: int) -> dict:
    ids = torch.tensor([[CLS, vocab - 1, MASK, SEP]])
    labels = torch.tensor([[-1, -1, 7, -1]])
    return {
        "input_ids": ids,
        "txt_type_ids": torch.tensor([[0, 0, 3, 3]]),
        "position_ids": torch.arange(4).unsqueeze(0),
        "img_feat": torch.randn(1, 2, 16),
        "img_pos_feat": torch.rand(1, 2, 7),
        "attn_masks": torch.ones(1, 6, dtype=torch.long),
        "gather_index": torch.arange(6).unsqueeze(0),
        "txt_labels": labels,
    }


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
def test_vcr_pretraining_trains_validates_and_fine_tunes_vcr_from_its_checkpoint(tmp_path, adv):
    cfg = resolve_config(None, task_config(tmp_path / "pre", "pretrain_vcr", adv_training=adv))
    trainer = Trainer(cfg, quiet=True)
    assert trainer.model.vcr
    history = trainer.train()
    steps = [e for e in history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    vals = [e for e in history if "val/mlm_acc" in e]
    assert [e["step"] for e in vals] == [2, 4] and {"val/mrfr_loss", "val/mrckl_acc"} <= set(vals[-1])
    # the losses the authors' validate_mlm / validate_mrc report too, per target
    assert vals[-1]["val/mlm_loss"] > 0 and vals[-1]["val/mrckl_loss"] >= 0
    if adv:  # MLM is adversarial, MRFR and MRC-kl take standard steps
        calls = []
        step = trainer.adv_step.step
        trainer.adv_step.step = lambda batch, **kw: calls.append(batch["task"]) or step(batch, **kw)
        stream = trainer.source().batches()
        for _ in range(12):
            batch = next(stream)
            if trainer.task.adversarial_for(batch):
                trainer.adv_step.step(batch)
        assert set(calls) == {"mlm"}
    out = trainer.output_dir
    # log/model.json is the encoder config before the VCR rows, as for VCR fine-tuning
    assert json.loads((out / "log" / "model.json").read_text())["vocab_size"] == META["vocab_size"]
    # VCR fine-tuning from this checkpoint ("checkpoint_from": "vcr_pretrain"): every encoder row fits as is
    vcr = UniterForVcr(cfg["model_config"])
    report = load_pretrained(vcr, out / "ckpt" / "model_final.safetensors")
    assert not report.expanded and not [k for k in report.missing if k.startswith("uniter.")]
    assert torch.equal(
        vcr.uniter.embeddings.word_embeddings.weight, trainer.model.uniter.embeddings.word_embeddings.weight
    )


def test_both_texts_and_fixed_shapes(tmp_path):
    cfg = resolve_config(
        None,
        task_config(tmp_path, "pretrain_vcr", adv_training=True, adv_graphed=True, vcr_pretrain_texts=["qa", "qar"]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "GraphedVillaStep runs eagerly: CUDA is not available"
        trainer = Trainer(cfg, quiet=True)
        src = trainer.source()
        mlm = src.loaders["vcr_mlm"][1]
        # QA and QAR examples both: twice the rows of QAR alone
        assert len(mlm.dataset) == 2 * len(VcrTxtTokLmdb(cfg["train_datasets"][0]["db"][0], 60, task="qar").id2len)
        shapes = set()
        for batch in _batches_of(src, "mlm", 6):
            assert batch["mlm_index"].numel() == mlm_capacity(*batch["input_ids"].shape, 0.15, segments=3)
            assert batch["txt_type_ids"].shape == batch["input_ids"].shape
            shapes.add((tuple(batch["input_ids"].shape), batch["img_feat"].size(1)))
        assert len(shapes) <= cfg["adv_max_graphs"]
        history = trainer.train()
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in history if "loss" in e)


def _batches_of(src, task, n):
    out = []
    for b in src.batches():
        if b["task"] == task:
            out.append(b)
            if len(out) == n:
                return out
    return out


def test_vcr_pretraining_refuses_itm_and_bad_text_kinds(tmp_path):
    cfg = task_config(tmp_path, "pretrain_vcr")
    cfg["train_datasets"][0]["tasks"] = ["mlm", "itm"]
    cfg["train_datasets"][0]["mix_ratio"] = [1, 1]
    with pytest.raises(ConfigError, match="no itm task"):
        Trainer(resolve_config(None, cfg), quiet=True).source()
    with pytest.raises(ConfigError, match="vcr_pretrain_texts"):
        resolve_config(None, task_config(tmp_path / "b", "pretrain_vcr", vcr_pretrain_texts=["qa", "r"]))


def test_gt_and_detection_databases_are_told_apart_by_folder_name(tmp_path):
    data = build_task_data(tmp_path, "vcr", n_txt=4, n_img=2)
    task = Task(resolve_config(None, task_config(tmp_path / "c", "vcr")))
    gt, det = task.gt_det_img_dbs(data["img_db"])
    # the folder's own name decides (this test's own folder name has "gt" in it)
    assert gt is not None and det is not None
    assert gt.img_dir.rstrip("/").endswith("vcr_gt") and det.img_dir.rstrip("/").endswith("vcr_det")
    assert task.gt_det_img_dbs(data["img_db"].split(";")[1]) == (None, det)
