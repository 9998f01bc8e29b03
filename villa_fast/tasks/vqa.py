"""VQA (soft-score BCE over the answer vocabulary) and SNLI-VE (the same with 3 classes)."""

from __future__ import annotations

import json
import os
import pickle

import torch
import torch.nn.functional as F
from torch import Tensor

from villa_fast.tasks.base import DataContext, Task
from villa_fast.train.config import ConfigError

__all__ = ["VeTask", "VqaTask", "read_answer_vocab", "vqa_score"]

#: SNLI-VE class order of the official txt_dbs and fine-tuned checkpoints (the authors' VE_ENT2IDX)
VE_LABELS = ("contradiction", "entailment", "neutral")


def _question_id(q):
    """The id as the VQA evaluation files hold it: an integer for the official (numeric) ids, else as is."""
    return int(q) if isinstance(q, str) and q.isdigit() else q


class _PlainUnpickler(pickle.Unpickler):
    """Builds dicts, strings and numbers only: any class or function the file names is refused (never run)."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: an answer vocabulary holds strings and ints")


def read_answer_vocab(path: str) -> dict[str, int]:
    """The VQA answer vocabulary ``{answer: label}`` from a JSON file or the authors' pickle (``ans2label.pkl``,
    read by an unpickler that builds plain values only); the labels must be 0..n-1, each once."""
    where = f"answer vocabulary {path}"
    try:
        if str(path).endswith(".pkl"):
            with open(path, "rb") as fh:
                vocab = _PlainUnpickler(fh).load()
        else:
            with open(path, encoding="utf-8") as fh:
                vocab = json.load(fh)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{where}: cannot be read ({exc})") from None
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError(f"{where}: must map answers to labels, got {type(vocab).__name__}")
    bad = [k for k, v in vocab.items() if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise ConfigError(f"{where}: answers must be strings and labels integers (e.g. {bad[0]!r})")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ConfigError(f"{where}: the labels must be 0..{len(vocab) - 1}, each once")
    return vocab


def vqa_score(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row VQA soft score of the arg-max answer: ``targets[i, argmax logits[i]]``."""
    return targets.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)


class VqaTask(Task):
    name = "vqa"
    data_kinds = ("vqa",)
    kl_reduction = "batchmean"  # mean over all elements * num_answers == sum over answers, mean over rows
    main_metric = "acc"
    fixed_shape_training = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._ans2label: dict[str, int] | None = None

    # -- answers -------------------------------------------------------------------------------
    def _vocab_path(self) -> str:
        """Where the answer vocabulary is read: key 'ans2label', else the first training (or validation) txt_db's
        ans2label.json."""
        path = self.cfg.get("ans2label")
        if not path:
            first = self.pairs("train")[0][0] if self._has_train() else self.cfg.get("val_txt_db")
            if first and not os.path.isdir(first):
                raise FileNotFoundError(f"missing txt_db directory: {first}")
            path = os.path.join(first or "", "ans2label.json")
        return path

    @property
    def ans2label(self) -> dict[str, int]:
        if self._ans2label is None:
            path = self._vocab_path()
            if not os.path.isfile(path):
                raise ConfigError(
                    f"task vqa: answer vocabulary not found at {path} (set config key 'ans2label' to the authors' "
                    "utils/ans2label.json, 3129 answers, or their ans2label.pkl)"
                )
            self._ans2label = read_answer_vocab(path)
        return self._ans2label

    def run_files(self) -> dict[str, str]:
        # the vocabulary the run's labels mean, kept beside its checkpoints (as the authors' ckpt/ans2label.json)
        return {"ckpt/ans2label.json": json.dumps(self.ans2label)}

    def check_run_files(self, output_dir: str | os.PathLike) -> None:
        """Refuse to resume the run in ``output_dir`` with another answer vocabulary than the one it kept
        (``ckpt/ans2label.json``: what its checkpoints' answer labels index, and what ``evaluate`` reads). The same
        answers under the same labels pass, whatever file they come from; a run that kept none passes.

        Raises:
            ConfigError: the configured vocabulary differs from the kept one (or the kept one cannot be read).
        """
        if "ckpt/ans2label.json" not in self.run_files():
            return  # a task with a fixed set of classes (VE) keeps no vocabulary
        kept_path = os.path.join(output_dir, "ckpt", "ans2label.json")
        if not os.path.isfile(kept_path):
            return
        kept, now = read_answer_vocab(kept_path), self.ans2label
        if kept == now:
            return
        changed = sorted(a for a in set(kept) | set(now) if kept.get(a) != now.get(a))
        raise ConfigError(
            f"task vqa: cannot resume the run in {output_dir} with another answer vocabulary: it was trained with "
            f"{kept_path} ({len(kept)} answers), the config gives {self._vocab_path()} ({len(now)} answers; "
            f"{len(changed)} answers differ, e.g. {changed[0]!r}). Resume with --ans2label {kept_path}, or start a "
            "new run in another or an empty output_dir"
        )

    def _has_train(self) -> bool:
        return bool(self.cfg.get("train_txt_dbs") or self.cfg.get("train_txt_db"))

    @property
    def num_answers(self) -> int:
        return len(self.ans2label)

    @property
    def label2ans(self) -> dict[int, str]:
        return {v: k for k, v in self.ans2label.items()}

    # -- model / data ----------------------------------------------------------------------------
    def build_model(self):
        from villa_fast.models import UniterForVqa

        return UniterForVqa(self.model_config(), num_answer=self.num_answers)

    def _dataset(self, txt_path: str, img_path: str, max_len: int, eval_: bool):
        from villa_fast.data import TxtTokLmdb, VqaDataset, VqaEvalDataset

        cls = VqaEvalDataset if eval_ else VqaDataset
        return cls(self.num_answers, TxtTokLmdb(txt_path, max_len), self.img_db(img_path))

    def _collates(self):
        from villa_fast.data import vqa_collate, vqa_eval_collate

        return vqa_collate, vqa_eval_collate

    def train_loader(self, ctx: DataContext):
        from villa_fast.data import ConcatDatasetWithLens

        sets = [self._dataset(t, i, self.cfg["max_txt_len"], False) for t, i in self.pairs("train")]
        ds = sets[0] if len(sets) == 1 else ConcatDatasetWithLens(sets)
        return self.batch_loader(ds, self._collates()[0], ctx, train=True)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        (txt, img), *_ = self.pairs(split)
        ds = self._dataset(txt, img, -1, True)
        return self.batch_loader(ds, self._collates()[1], ctx, train=False)

    def step_batch(self, batch):
        # the VQA/VE forward and loss read tensors only: txt_lens / num_bbs (lists) stay out of graph keys
        return {k: v for k, v in batch.items() if isinstance(v, Tensor)}

    # -- metrics ---------------------------------------------------------------------------------
    def has_labels(self, batch) -> bool:
        return batch.get("targets") is not None and "labelled" not in batch

    def eval_init(self):
        return {**super().eval_init(), "labelled": 0.0}

    sum_keys = ("n", "correct", "loss", "labelled")

    def eval_batch(self, state, model, logits, batch) -> None:
        logits = logits.float()
        targets = batch.get("targets")
        if targets is not None:
            targets = targets.to(logits.device).float()
            scored, keep = logits, batch.get("labelled")
            if keep is not None:
                keep = keep.to(logits.device)
                scored, targets = logits[keep], targets[keep]
            state["loss"] += float(F.binary_cross_entropy_with_logits(scored, targets, reduction="sum"))
            state["correct"] += float(vqa_score(scored, targets).sum())
            state["labelled"] += scored.size(0)
        state["n"] += logits.size(0)
        labels = logits.argmax(dim=1).tolist()
        l2a = self.label2ans
        state["pred"].extend(
            {"answer": l2a[k], "question_id": _question_id(q)} for k, q in zip(labels, batch["qids"], strict=True)
        )

    def eval_finish(self, state) -> dict[str, float]:
        # over the labelled rows only; a split without targets (VQA's test) has predictions and no score. The VQA
        # loss is summed over answers, as the authors' validation reports it
        labelled = state.get("labelled", state["n"])
        if not labelled:
            return {"n": state["n"]}
        return {"acc": state["correct"] / labelled, "loss": state["loss"] / labelled, "n": state["n"]}


class VeTask(VqaTask):
    """SNLI-VE: three classes, in the official order (contradiction 0, entailment 1, neutral 2)."""

    name = "ve"
    data_kinds = ("ve",)
    also_validate = ("test",)  # train_ve_adv.py validates test beside val

    @property
    def ans2label(self) -> dict[str, int]:
        return {a: i for i, a in enumerate(VE_LABELS)}

    def run_files(self) -> dict[str, str]:
        return {}  # the fixed three classes

    def build_model(self):
        from villa_fast.models import UniterForVqa

        return UniterForVqa(self.model_config(), num_answer=3)

    def _dataset(self, txt_path: str, img_path: str, max_len: int, eval_: bool):
        from villa_fast.data import TxtTokLmdb, VeDataset, VeEvalDataset

        cls = VeEvalDataset if eval_ else VeDataset
        return cls(TxtTokLmdb(txt_path, max_len), self.img_db(img_path))

    def _collates(self):
        from villa_fast.data import ve_collate, ve_eval_collate

        return ve_collate, ve_eval_collate

    def write_predictions(self, preds: list, path_prefix: str) -> str | None:
        """``{question id: answer}``, as the authors' ``train_ve_adv.py`` writes its results."""
        path = f"{path_prefix}.json"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({str(p["question_id"]): p["answer"] for p in preds}, fh)
        return path
