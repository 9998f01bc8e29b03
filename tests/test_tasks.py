"""A tiny end-to-end run (train, validate, predictions, robust evaluation) for every task."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.test_train_fixtures import task_config
from villa_fast.data import VcrTxtTokLmdb
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer

FINETUNE = ["vqa", "ve", "nlvr2", "vcr", "retrieval", "re"]


def _run(tmp_path, task, **changes):
    cfg = resolve_config(None, task_config(tmp_path, task, **changes))
    trainer = Trainer(cfg, quiet=True)
    history = trainer.train()
    return trainer, history, cfg


@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
@pytest.mark.parametrize("task", FINETUNE)
def test_finetune_end_to_end(tmp_path, task, adv):
    trainer, history, cfg = _run(tmp_path, task, adv_training=adv)
    out = trainer.output_dir
    steps = [e for e in history if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in steps)
    # warmup 1 step, then linear decay to 0 at step 4
    assert [round(e["lr"], 8) for e in steps] == [
        1e-3,
        round(2e-3 / 3, 8),
        round(1e-3 / 3, 8),
        1e-8,
    ]  # the last step: the authors' floor
    # (retrieval validates on candidate minibatches before the last, full evaluation: "minival/" keys)
    vals = [e for e in history if any(k.startswith(("val/", "minival/")) for k in e)]
    assert [e["step"] for e in vals] == [2, 4]
    main = f"val/{trainer.task.main_metric}"
    assert 0.0 <= vals[-1][main] <= 1.0
    assert (out / "ckpt" / "step_4" / "model.safetensors").is_file()
    assert (out / "ckpt" / "model_final.safetensors").is_file()
    assert json.loads((out / "log" / "hps.json").read_text())["task"] == task
    preds = sorted((out / "results").iterdir())
    assert [p.stem for p in preds] == ["results_2", "results_4"]
    if trainer.task.supports_robust:
        m = trainer.evaluate("val", robust=True)
        assert 0.0 <= m[f"robust_{trainer.task.main_metric}"] <= 1.0 and m["n"] == 24


def test_prediction_formats(tmp_path):
    trainer, _, _ = _run(tmp_path / "vqa", "vqa")
    preds = json.loads((trainer.output_dir / "results" / "results_4.json").read_text())
    assert len(preds) == 24 and set(preds[0]) == {"answer", "question_id"}
    assert preds[0]["answer"] in {f"a{k}" for k in range(5)}

    trainer, _, _ = _run(tmp_path / "nlvr2", "nlvr2")
    rows = list(csv.reader(open(trainer.output_dir / "results" / "results_4.csv")))
    assert len(rows) == 24 and all(r[1] in ("True", "False") for r in rows)

    trainer, _, _ = _run(tmp_path / "vcr", "vcr")
    preds = json.loads((trainer.output_dir / "results" / "results_4.json").read_text())
    assert len(preds) == 24 and all(len(v) == 8 for v in preds.values())  # 4 answers + 4 rationales


def test_vqa_score_is_soft():
    from villa_fast.tasks.vqa import vqa_score

    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0]])
    assert vqa_score(logits, targets).tolist() == pytest.approx([0.6, 0.3])


def test_recall_at_k():
    from villa_fast.tasks.retrieval import recall_at_k

    # 3 texts, 2 images; texts 0, 1 -> image a, text 2 -> image b
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]])
    r = recall_at_k(scores, ["t0", "t1", "t2"], ["a", "b"], {"t0": "a", "t1": "a", "t2": "b"}, ks=(1, 2))
    assert r["img_r1"] == pytest.approx(2 / 3)  # t1 ranks image a second
    assert r["img_r2"] == 1.0
    assert r["txt_r1"] == pytest.approx(0.5)  # image a's best text t0 ranks first; image b's t2 ranks second
    assert r["txt_r2"] == 1.0
    # evaluation stopped early: image c has no evaluated text and is left out of image -> text recall
    wide = torch.cat([scores, torch.tensor([[0.0], [0.0], [0.95]])], dim=1)
    r = recall_at_k(wide, ["t0", "t1", "t2"], ["a", "b", "c"], {"t0": "a", "t1": "a", "t2": "b"}, ks=(1, 2))
    assert r["txt_r1"] == pytest.approx(0.5) and r["img_r1"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
def test_pretrain_end_to_end(tmp_path, adv):
    trainer, history, _ = _run(tmp_path, "pretrain", adv_training=adv, num_train_steps=6, valid_steps=3)
    vals = [e for e in history if "val/itm_acc" in e]
    assert [e["step"] for e in vals] == [3, 6]
    assert {"val/mlm_acc", "val/mrfr_loss", "val/mrckl_acc"} <= set(vals[-1])
    # the tasks drawn by ratio: one task per step, reproducible from the seed
    src = trainer.source()
    picks = [src.pick(c) for c in range(200)]
    share = {k: picks.count(k) / 200 for k in set(picks)}
    assert share["tiny_mlm"] > share["tiny_mrfr"] and share["tiny_itm"] > share["tiny_mrckl"]
    assert picks == [src.pick(c) for c in range(200)]


def test_pretrain_adversarial_only_on_mlm_and_itm(tmp_path):
    cfg = resolve_config(None, task_config(tmp_path, "pretrain", adv_training=True))
    trainer = Trainer(cfg, quiet=True)
    calls = []
    step = trainer.adv_step.step
    trainer.adv_step.step = lambda batch, **kw: calls.append(batch["task"]) or step(batch, **kw)
    stream = trainer.source().batches()
    seen = []
    for _ in range(12):
        b = next(stream)
        seen.append(b["task"])
        trainer.micro_step(b)
    assert set(calls) == {t for t in seen if t in ("mlm", "itm")}
    assert any(t in ("mrfr", "mrckl") for t in seen)


def test_retrieval_hard_negatives_train_on_top_k(tmp_path):
    cfg = resolve_config(None, task_config(tmp_path, "retrieval"))
    trainer = Trainer(cfg, quiet=True)
    batch = next(trainer.source().batches())
    assert batch["attn_masks"].size(0) == 5  # the positive and negative_size=4 sampled negatives
    mined = trainer.task.prepare(trainer.model, batch)
    assert mined["attn_masks"].size(0) == 3 and mined["sample_size"] == 3  # positive + hard_neg_size=2


def test_ve_classes_follow_the_official_order():
    """The official SNLI-VE txt_dbs and fine-tuned checkpoints number the classes contradiction 0, entailment 1,
    neutral 2 (the authors' VE_ENT2IDX); the converter and the predictions use that order."""
    from villa_fast.data.convert import _VE_LABELS
    from villa_fast.tasks.vqa import VE_LABELS

    assert VE_LABELS == ("contradiction", "entailment", "neutral")
    assert {a: i for i, a in enumerate(VE_LABELS)} == _VE_LABELS


def test_ve_predictions_map_ids_to_answers(tmp_path):
    """SNLI-VE writes ``{question id: answer}`` as the authors' train_ve_adv.py; VQA a list of records."""
    trainer, _, _ = _run(tmp_path, "ve")
    preds = json.loads((trainer.output_dir / "results" / "results_4.json").read_text())
    assert isinstance(preds, dict) and len(preds) == 24
    assert set(preds.values()) <= {"contradiction", "entailment", "neutral"}


def test_vqa_predictions_carry_integer_question_ids():
    """As the VQA evaluation files hold them (the authors' inference writes int(qid)); other ids stay as they are."""
    from villa_fast.tasks.vqa import _question_id

    assert _question_id("262148000") == 262148000
    assert _question_id("val_000001") == "val_000001"


def test_build_task_names_an_unknown_task():
    from villa_fast.tasks import build_task
    from villa_fast.train.config import ConfigError

    with pytest.raises(ConfigError, match="'task' is 'VQA', not a task"):
        build_task({"task": "VQA"})
    with pytest.raises(ConfigError, match="'task' is not set"):
        build_task({})


def test_vcr_test_split_writes_the_leaderboard_csv(tmp_path):
    """On "test" every answer's four rationales are scored (20 rows a question) and the submission CSV is
    written: annot_id, answer_0..3, rationale_conditioned_on_a{i}_0..3, in annot_id order."""
    cfg = task_config(tmp_path / "vcr", "vcr")
    cfg.update(test_txt_db=cfg["val_txt_db"], test_img_db=cfg.get("val_img_db") or cfg["img_db"])
    trainer = Trainer(resolve_config(None, cfg), quiet=True)
    prefix = str(tmp_path / "pred" / "test")
    (tmp_path / "pred").mkdir()
    metrics = trainer.evaluate("test", predictions_prefix=prefix)
    n = int(metrics["n"])
    assert n == 24
    scores = json.loads((tmp_path / "pred" / "test.json").read_text())
    assert len(scores) == n and all(len(v) == 20 for v in scores.values())
    rows = list(csv.reader(open(tmp_path / "pred" / "test.csv")))
    assert rows[0][:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3", "rationale_conditioned_on_a0_0"]
    assert rows[0][-1] == "rationale_conditioned_on_a3_3" and len(rows[0]) == 21
    assert [r[0] for r in rows[1:]] == [f"val-{i}" for i in range(n)]  # numeric order: val-2 before val-10
    for r in rows[1:]:
        assert [float(x) for x in r[1:]] == pytest.approx(scores[r[0]])
    # the gold answer's rationales are the ones validation scores: the same numbers as on "val"
    val = trainer.evaluate("val", predictions_prefix=str(tmp_path / "pred" / "val"))
    assert val["n"] == n and not (tmp_path / "pred" / "val.csv").exists()
    val_scores = json.loads((tmp_path / "pred" / "val.json").read_text())
    db = VcrTxtTokLmdb(cfg["val_txt_db"], -1, task="qa,qar")
    for qid, v in val_scores.items():
        t, gold = scores[qid], int(db[qid]["qa_target"])
        assert v == pytest.approx(t[:4] + t[4 + 4 * gold : 8 + 4 * gold], abs=1e-5)


def test_re_sums_its_loss_and_consistency_term_over_the_batch(tmp_path):
    """Referring expressions train on the summed cross-entropy (the authors' ``loss.sum()``), and the VILLA step's
    KL sums likewise: a batch's task gradient is the batch size times the mean's, and the KL the rows' sum."""
    import torch.nn.functional as F

    from villa_fast import ops

    cfg = resolve_config(None, task_config(tmp_path, "re", adv_training=True))
    trainer = Trainer(cfg, quiet=True)
    assert trainer.task.main_metric == "acc_iou"
    assert trainer.adv_step.config.kl_reduction == "sum"
    batch = next(iter(trainer.source().batches()))
    model = trainer.model
    model.eval()
    logits = trainer.task.forward(model, batch)
    n = logits.size(0)
    assert n > 1
    loss = trainer.task.loss(model, logits, batch)
    mean = F.cross_entropy(logits.float(), batch["targets"].reshape(-1).long())
    torch.testing.assert_close(loss, mean * n)
    other = logits.detach() + torch.randn_like(logits)
    torch.testing.assert_close(
        ops.sym_kl(logits.detach(), other, "sum"), ops.sym_kl(logits.detach(), other, "batchmean") * n
    )


def test_pretraining_loaders_of_one_dataset_shuffle_and_mask_independently(tmp_path):
    """Each task's loader over the same db has a seed of its own: MRFR and MRC-kl see other batches and other
    masked regions (one shared seed made them identical), and a rebuilt source repeats its own."""
    cfg = resolve_config(None, task_config(tmp_path, "pretrain", train_batch_size=120))

    def first_batches(n=3):
        loaders = {k: v[1] for k, v in Trainer(cfg, quiet=True).source().loaders.items()}
        assert {"tiny_mrfr", "tiny_mrckl"} <= set(loaders)
        out = {}
        for key in ("tiny_mrfr", "tiny_mrckl"):
            it = iter(loaders[key])
            out[key] = [next(it) for _ in range(n)]
        return out

    a = first_batches()

    def same(x, y, key):
        return x[key].shape == y[key].shape and bool((x[key] == y[key]).all())

    pairs = list(zip(a["tiny_mrfr"], a["tiny_mrckl"], strict=True))
    assert not all(same(x, y, "input_ids") and same(x, y, "img_masks") for x, y in pairs)
    b = first_batches()
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            assert same(x, y, "input_ids") and same(x, y, "img_masks")


def test_pretraining_validation_reports_each_dataset_and_the_itm_ot_distances(tmp_path):
    """As the authors' validation reports each (task, dataset) loader: ``mlm_<name>_acc`` beside the task's pooled
    ``mlm_acc`` (weighted by targets), and ITM's OT figures."""
    base = task_config(tmp_path, "pretrain")
    val = base["val_datasets"][0]
    train = base["train_datasets"][0]
    other = {"name": "other", "db": train["db"], "img": train["img"], "tasks": ["mlm", "itm"]}
    cfg = resolve_config(None, {**base, "val_datasets": [val, other]})
    trainer = Trainer(cfg, quiet=True)
    state = trainer.task.eval_init()
    loader = trainer.task.eval_loader(trainer.ctx, "val")
    trainer.model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = trainer.task.forward(trainer.model, batch)
            trainer.task.eval_batch(state, trainer.model, logits, batch)
    m = trainer.task.eval_finish(state)
    name = val["name"]
    for t in ("mlm", "itm"):
        n_a, n_b = state[f"{t}_{name}_n"], state[f"{t}_other_n"]
        assert n_a > 0 and n_b > 0 and state[f"{t}_n"] == n_a + n_b
        pooled = (m[f"{t}_{name}_loss"] * n_a + m[f"{t}_other_loss"] * n_b) / (n_a + n_b)
        assert m[f"{t}_loss"] == pytest.approx(pooled)
    assert f"mrfr_{name}_loss" in m and "mrfr_other_loss" not in m
    # the OT term: positives and negatives counted apart; the loss is their summed difference per pair
    assert state["itm_n_pos"] > 0 and state["itm_n_neg"] > 0
    assert state["itm_n_pos"] + state["itm_n_neg"] == state["itm_n"]
    want = (state["itm_ot_pos"] - state["itm_ot_neg"]) / state["itm_n"]
    assert m["itm_ot_loss"] == pytest.approx(want) and m["itm_ot_pos"] > 0 and m["itm_ot_neg"] > 0


@pytest.mark.parametrize(
    ("task", "reduction"),
    [
        ("vqa", "batchmean"),
        ("ve", "batchmean"),
        ("nlvr2", "batchmean"),
        ("vcr", "mean"),
        ("re", "sum"),
        ("retrieval", "batchmean"),
    ],
)
def test_the_trainer_builds_the_villa_step_from_the_config_with_the_tasks_kl_reduction(tmp_path, task, reduction):
    """VILLA_SPEC section 2's table: each task's KL reduction (VQA's and VE's mean over all elements times the
    class count is the sum over classes averaged over rows; VCR's is the mean over all elements of its [4B, 2]
    rows; RE's loss and KL are summed); every adversarial key of the config reaches the step."""
    changes = {"adv_training": True, "adv_steps": 4, "adv_lr_txt": 0.011, "adv_lr_img": 0.022, "norm_type": "linf"}
    changes.update({"adv_max_norm": 0.33, "adv_init_mag": 0.44, "adv_kl_weight": 0.55, "adv_modality": ["image"]})
    trainer = Trainer(resolve_config(None, task_config(tmp_path, task, **changes)), quiet=True)
    c = trainer.adv_step.config
    assert c.kl_reduction == reduction == trainer.task.kl_reduction
    assert (c.steps, c.lr_txt, c.lr_img, c.norm_type) == (4, 0.011, 0.022, "linf")
    assert (c.max_norm, c.init_mag, c.kl_weight, c.modality) == (0.33, 0.44, 0.55, "image")


def test_the_optimizer_groups_the_heads_learning_rate_and_the_warmup_ramp(tmp_path):
    """VILLA_SPEC section 3: no weight decay on biases and LayerNorm weights, the head at lr_mul times the
    scheduled rate (VQA's default 10), a linear warmup then a linear decay, set before each optimizer step."""
    cfg = resolve_config(None, task_config(tmp_path, "vqa", warmup_steps=4, num_train_steps=8, learning_rate=1e-3))
    trainer = Trainer(cfg, quiet=True)
    assert cfg["lr_mul"] == 10.0
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for name, g in groups.items():
        members = [names[id(p)] for p in g["params"]]
        assert members, name
        head = not name.startswith("encoder")
        assert all(n.startswith("uniter.") != head for n in members), name
        decay = not name.endswith("no_decay")
        assert g["weight_decay"] == (cfg["weight_decay"] if decay else 0.0)
        assert all(("bias" in n or "LayerNorm.weight" in n) != decay for n in members), name
    assert any("LayerNorm.weight" in names[id(p)] for p in groups["encoder_no_decay"]["params"])
    lrs = []
    for _ in range(8):
        base = trainer.schedule.step()
        lrs.append(base)
        for g in trainer.optimizer.param_groups:
            assert g["lr"] == pytest.approx(base * (10.0 if g["name"].startswith("head") else 1.0))
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:7] == pytest.approx([7.5e-4, 5e-4, 2.5e-4]) and lrs[7] == 1e-8


def test_gradients_are_clipped_to_grad_norm_before_the_step(tmp_path):
    trainer = Trainer(resolve_config(None, task_config(tmp_path, "vqa", grad_norm=1e-4)), quiet=True)
    seen = []
    real = trainer.optimizer.step

    def step(*a, **kw):
        grads = [p.grad for p in trainer.params if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))
        return real(*a, **kw)

    trainer.optimizer.step = step
    history = trainer.train()
    norms = [e["grad_norm"] for e in history if "grad_norm" in e]
    assert seen and all(n == pytest.approx(1e-4, rel=1e-4) for n in seen)
    assert norms and all(n > 1e-3 for n in norms)  # the logged norm is the one before clipping


def test_vqa_scores_only_labelled_rows_and_an_unlabelled_split_has_no_accuracy(tmp_path):
    from villa_fast.data import vqa_eval_collate
    from villa_fast.tasks.vqa import VqaTask

    vocab = tmp_path / "ans2label.json"
    vocab.write_text(json.dumps({"yes": 0, "no": 1, "two": 2}))
    task = VqaTask(resolve_config(None, {"task": "vqa", "ans2label": str(vocab)}))

    def item(qid, target):
        ids = torch.tensor([101, 7, 8, 102])
        return qid, ids, torch.zeros(2, 4), torch.zeros(2, 7), torch.ones(6, dtype=torch.long), target

    yes = torch.tensor([1.0, 0.0, 0.0])
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 3.0]])  # predicts yes, no, two
    # labelled row 0 (right), unlabelled row 1, labelled row 2 (wrong): accuracy over the two labelled rows
    batch = vqa_eval_collate([item("1", yes), item("2", None), item("3", yes)])
    assert batch["labelled"].tolist() == [True, False, True]
    state = task.eval_init()
    task.eval_batch(state, None, logits, batch)
    m = task.eval_finish(state)
    assert m["acc"] == 0.5 and m["n"] == 3
    assert [p["answer"] for p in state["pred"]] == ["yes", "no", "two"]
    # no row labelled (the test split): predictions, no score
    batch = vqa_eval_collate([item("4", None), item("5", None)])
    assert batch["targets"] is None
    state = task.eval_init()
    task.eval_batch(state, None, logits[:2], batch)
    assert task.eval_finish(state) == {"n": 2}
    assert len(state["pred"]) == 2


def test_the_answer_vocabulary_reads_json_and_the_authors_pickle_and_stays_with_the_run(tmp_path):
    import pickle

    from villa_fast.tasks.vqa import read_answer_vocab
    from villa_fast.train.config import ConfigError

    vocab = {"yes": 0, "no": 1, "two": 2}
    (tmp_path / "a.json").write_text(json.dumps(vocab))
    (tmp_path / "a.pkl").write_bytes(pickle.dumps(vocab))
    assert read_answer_vocab(str(tmp_path / "a.json")) == read_answer_vocab(str(tmp_path / "a.pkl")) == vocab
    # a pickle that names any class or function is refused, never run
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"yes": 0, "x": torch.Size([1])}))
    with pytest.raises(ConfigError, match="refusing to load"):
        read_answer_vocab(str(tmp_path / "evil.pkl"))
    (tmp_path / "gap.json").write_text(json.dumps({"yes": 0, "no": 2}))
    with pytest.raises(ConfigError, match=r"labels must be 0\.\.1"):
        read_answer_vocab(str(tmp_path / "gap.json"))
    # without the key, the first training txt_db's ans2label.json; a wrong txt_db path is named as such
    from villa_fast.tasks.vqa import VqaTask

    typo = {"task": "vqa", "train_txt_dbs": [str(tmp_path / "typo")], "train_img_dbs": [str(tmp_path / "img")]}
    task = VqaTask(resolve_config(None, typo))
    with pytest.raises(FileNotFoundError, match="missing txt_db directory: .*typo"):
        _ = task.num_answers
    # a run keeps the vocabulary its labels mean beside its checkpoints
    trainer = Trainer(resolve_config(None, task_config(tmp_path / "run", "vqa", num_train_steps=1)), quiet=True)
    trainer.train()
    kept = json.loads((tmp_path / "run" / "out" / "ckpt" / "ans2label.json").read_text())
    assert kept == trainer.task.ans2label and len(kept) == trainer.task.num_answers


def test_robust_evaluation_refuses_a_split_without_gold_labels(tmp_path):
    from villa_fast.tasks.vcr import VcrTask
    from villa_fast.tasks.vqa import VqaTask
    from villa_fast.train.config import ConfigError

    vqa = VqaTask.__new__(VqaTask)
    assert vqa.has_labels({"targets": torch.zeros(2, 3)})
    assert not vqa.has_labels({"targets": None})
    assert not vqa.has_labels({"targets": torch.zeros(2, 3), "labelled": torch.tensor([True, False])})
    vcr = VcrTask.__new__(VcrTask)
    assert vcr.has_labels({"qa_targets": torch.tensor([1, 0]), "qar_targets": torch.tensor([2, 3])})
    assert not vcr.has_labels({"qa_targets": torch.tensor([-1, -1]), "qar_targets": torch.tensor([-1, -1])})
    trainer = Trainer(resolve_config(None, task_config(tmp_path, "vqa")), quiet=True)
    assert "robust_acc" in trainer.evaluate("val", robust=True)
    trainer.task.has_labels = lambda batch: False  # as on an unlabelled test split
    with pytest.raises(ConfigError, match=r"'val' split of task vqa has examples without one"):
        trainer.evaluate("val", robust=True)


def test_vcr_metrics_count_labelled_questions_and_report_both_losses():
    import torch.nn.functional as F

    from villa_fast.tasks.vcr import VcrTask

    task = VcrTask.__new__(VcrTask)
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 8, generator=g)  # per question: 4 Q->A then 4 QA->R candidate scores
    logits = torch.stack([torch.zeros_like(scores), scores], dim=-1).reshape(-1, 2)
    qa_t, qar_t = torch.tensor([int(scores[0, :4].argmax()), 0, -1]), torch.tensor([1, 2, -1])
    batch = {"qids": ["val-0", "val-1", "test-0"], "qa_targets": qa_t, "qar_targets": qar_t}
    state = task.eval_init()
    task.eval_batch(state, None, logits, batch)
    m = task.eval_finish(state)
    assert m["n"] == 3 and state["labelled"] == 2  # the third question has no labels
    qa_ok = scores[:2, :4].argmax(1) == qa_t[:2]
    qar_ok = scores[:2, 4:].argmax(1) == qar_t[:2]
    assert m["acc_qa"] == float(qa_ok.float().mean()) and m["acc_qar"] == float(qar_ok.float().mean())
    assert m["acc"] == float((qa_ok & qar_ok).float().mean())
    want_qa = F.cross_entropy(scores[:2, :4], qa_t[:2])
    want_qar = F.cross_entropy(scores[:2, 4:], qar_t[:2])
    assert m["loss_qa"] == pytest.approx(float(want_qa)) and m["loss_qar"] == pytest.approx(float(want_qar))
    assert m["loss"] == pytest.approx(float(want_qa + want_qar))
    state = task.eval_init()
    task.eval_batch(state, None, logits[16:], {"qids": ["test-0"], "qa_targets": qa_t[2:], "qar_targets": qar_t[2:]})
    assert task.eval_finish(state) == {"n": 1}


@pytest.mark.parametrize("task", ["nlvr2", "ve"])
def test_nlvr2_and_ve_validate_the_test_split_beside_val_as_the_authors(tmp_path, task):
    base = task_config(tmp_path, task, num_train_steps=2, valid_steps=1)
    cfg = resolve_config(None, {**base, "test_txt_db": base["val_txt_db"], "test_img_db": base["val_img_db"]})
    trainer = Trainer(cfg, quiet=True)
    history = trainer.train()
    val = [e for e in history if "val/acc" in e]
    test = [e for e in history if "test/acc" in e]
    assert [e["step"] for e in val] == [e["step"] for e in test] == [1, 2]
    assert all(a["val/acc"] == b["test/acc"] for a, b in zip(val, test, strict=True))  # the same db here
    names = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert any(n.startswith("test_results_2") for n in names) and any(n.startswith("results_2") for n in names)
    # without test databases, val alone
    trainer = Trainer(resolve_config(None, {**base, "output_dir": str(tmp_path / "out2")}), quiet=True)
    assert not [e for e in trainer.train() if "test/acc" in e]


def test_too_little_training_data_is_a_config_error_that_says_why(tmp_path):
    from villa_fast.train.config import ConfigError

    # a token budget larger than the whole training set: the sampler drops the incomplete last batch
    trainer = Trainer(resolve_config(None, task_config(tmp_path / "a", "ve", train_batch_size=10**6)), quiet=True)
    with pytest.raises(ConfigError, match=r"its \d+ examples do not fill one batch of train_batch_size"):
        trainer.train()
    cfg = resolve_config(None, task_config(tmp_path / "b", "retrieval", negative_size=10000))
    with pytest.raises(ValueError, match=r"negative_size 10000 needs as many other images"):
        Trainer(cfg, quiet=True).train()
