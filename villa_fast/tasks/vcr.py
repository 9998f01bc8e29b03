"""VCR: Q->A and QA->R as 4-way choices over per-candidate rows; Q->AR is both right."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from villa_fast.tasks.base import EXAMPLES, DataContext, Task

__all__ = ["VcrTask"]


class VcrTask(Task):
    name = "vcr"
    data_kinds = ("vcr",)
    kl_reduction = "mean"  # the released loop averages the KL over all [4B, 2] elements
    main_metric = "acc"
    #: training batches count tokens (TokenBucketSampler); validation batches count questions: VILLA's
    #: train_vcr_adv.py validates through DataLoader(batch_size=val_batch_size, shuffle=False) (its argparse help
    #: says tokens, the code counts examples; the released configs give 10). A question is 8 rows on "val", 20 on
    #: "test" (4 answers, then 4 rationales per answer considered).
    val_batch_unit = EXAMPLES
    fixed_shape_training = True

    def step_batch(self, batch):
        # the VCR forward and loss read tensors only: txt_lens / num_bbs (lists) stay out of graph keys
        return {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    def build_model(self):
        from villa_fast.models import UniterForVcr

        return UniterForVcr(self.model_config())

    def model_vocab_size(self, model_config) -> int:
        from villa_fast.models.heads import VCR_SPECIAL_TOKENS

        return super().model_vocab_size(model_config) + VCR_SPECIAL_TOKENS

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens, VcrDataset, VcrTxtTokLmdb, vcr_collate

        sets = []
        # fixed shapes (adv_graphed) bound the regions by the records' counts (the gt db lists 100 for every image)
        exact = bool(self.cfg.get("adv_training") and self.cfg.get("adv_graphed"))
        for txt, img in self.pairs("train"):
            gt, det = self.gt_det_img_dbs(img)
            for sub in ("qa", "qar"):
                tdb = VcrTxtTokLmdb(txt, self.cfg["max_txt_len"], task=sub)
                sets.append(VcrDataset(tdb, gt, det, exact_region_counts=exact))
        return self.batch_loader(ConcatDatasetWithLens(sets), vcr_collate, ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        from villa_fast.data import VcrEvalDataset, VcrTxtTokLmdb, vcr_eval_collate

        (txt, img), *_ = self.pairs(split)
        gt, det = self.gt_det_img_dbs(img)
        ds = VcrEvalDataset("val" if split != "test" else "test", VcrTxtTokLmdb(txt, -1, task="qa,qar"), gt, det)
        return self.batch_loader(ds, vcr_eval_collate, ctx, train=False)

    def n_examples(self, batch) -> int:
        return int(batch["attn_masks"].size(0)) // 4

    @staticmethod
    def _split_scores(logits, batch):
        qids = batch["qids"]
        scores = logits.float()[:, 1].reshape(len(qids), -1)  # [n, 4 + 4 (val) or 4 + 16 (test)]
        qa_t = batch["qa_targets"].to(scores.device).reshape(-1)
        qar_t = batch["qar_targets"].to(scores.device).reshape(-1)
        qa_scores = scores[:, :4]
        if scores.size(1) > 8:  # rationales for every answer: take the gold answer's four
            idx = 4 + qa_t.clamp(min=0).unsqueeze(1) * 4 + torch.arange(4, device=scores.device)
            qar_scores = scores.gather(1, idx)
        else:
            qar_scores = scores[:, 4:8]
        return scores, qa_scores, qar_scores, qa_t, qar_t

    def has_labels(self, batch) -> bool:
        return bool((batch["qa_targets"] >= 0).all() and (batch["qar_targets"] >= 0).all())

    def attack_loss(self, model, logits, batch):
        # the attack ascends the Q->A and QA->R cross-entropies over each question's candidates
        _, qa, qar, qa_t, qar_t = self._split_scores(logits, batch)
        return F.cross_entropy(qa, qa_t) + F.cross_entropy(qar, qar_t)

    def eval_init(self):
        keys = ("n", "labelled", "correct", "correct_qa", "correct_qar", "loss_qa", "loss_qar")
        return {**dict.fromkeys(keys, 0.0), "pred": []}

    sum_keys = ("n", "labelled", "correct", "correct_qa", "correct_qar", "loss_qa", "loss_qar")

    def eval_batch(self, state, model, logits, batch) -> None:
        qids = batch["qids"]
        scores, qa_scores, qar_scores, qa_t, qar_t = self._split_scores(logits, batch)
        keep = (qa_t >= 0) & (qar_t >= 0)  # test questions have no gold answer or rationale
        if bool(keep.any()):
            qa_scores, qar_scores, qa_t, qar_t = qa_scores[keep], qar_scores[keep], qa_t[keep], qar_t[keep]
            state["loss_qa"] += float(F.cross_entropy(qa_scores, qa_t, reduction="sum"))
            state["loss_qar"] += float(F.cross_entropy(qar_scores, qar_t, reduction="sum"))
            qa_ok = qa_scores.argmax(1) == qa_t
            qar_ok = qar_scores.argmax(1) == qar_t
            state["correct_qa"] += float(qa_ok.sum())
            state["correct_qar"] += float(qar_ok.sum())
            state["correct"] += float((qa_ok & qar_ok).sum())
            state["labelled"] += float(keep.sum())
        state["n"] += len(qids)
        state["pred"].extend([q, s] for q, s in zip(qids, scores.tolist(), strict=True))

    def eval_finish(self, state):
        """Accuracies over the labelled questions: ``acc`` Q->AR (both right), ``acc_qa``, ``acc_qar``; the
        cross-entropies over each question's four candidates, ``loss_qa`` and ``loss_qar`` (the authors'
        ``vcr_qa_loss`` / ``vcr_qar_loss``), and ``loss``, their sum. A split without labels: ``n`` only."""
        m = state["labelled"]
        if not m:
            return {"n": state["n"]}
        return {
            "acc": state["correct"] / m,  # Q->AR
            "acc_qa": state["correct_qa"] / m,
            "acc_qar": state["correct_qar"] / m,
            "loss_qa": state["loss_qa"] / m,
            "loss_qar": state["loss_qar"] / m,
            "loss": (state["loss_qa"] + state["loss_qar"]) / m,
            "n": state["n"],
        }

    def write_predictions(self, preds, path_prefix: str) -> str:
        """``<prefix>.json``: {annot_id: [candidate scores]}, the JSON the authors' VCR inference writes (4 Q->A
        scores, then 4 QA->R scores for the gold answer on "val", for each answer in turn on "test"). On "test",
        also ``<prefix>.csv``, the leaderboard's submission file: one row per question in annot_id order
        (``test-0``, ``test-1``, ...), columns ``annot_id``, ``answer_0..3`` and
        ``rationale_conditioned_on_a{i}_0..3`` for i = 0..3 (the scores, as the authors' file holds them)."""
        import csv
        import json

        path = f"{path_prefix}.json"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(dict(preds), fh)
        if preds and all(len(scores) == 20 for _, scores in preds):
            cols = [f"answer_{j}" for j in range(4)]
            cols += [f"rationale_conditioned_on_a{i}_{j}" for i in range(4) for j in range(4)]
            with open(f"{path_prefix}.csv", "w", encoding="utf-8", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["annot_id", *cols])
                for qid, scores in sorted(preds, key=lambda p: _annot_order(p[0])):
                    w.writerow([qid, *(repr(float(x)) for x in scores)])
        return path


def _annot_order(annot_id: str) -> tuple:
    """``test-12`` sorts by 12 (the leaderboard's order); an id of another form sorts after, by its text."""
    head, _, num = str(annot_id).rpartition("-")
    return (0, head, int(num), "") if head and num.isdigit() else (1, "", 0, str(annot_id))
