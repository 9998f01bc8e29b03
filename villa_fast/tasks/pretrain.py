"""Pre-training: MLM, MRFR, MRC, MRC-kl and ITM (with the optimal-transport alignment term), one task
per accumulation cycle drawn by mix ratio; MLM and ITM adversarial by default (VILLA_SPEC section 5).

Under ``adv_graphed`` the adversarial tasks' training batches are padded to fixed shapes (sizes fitted to
each loader's data, ``adv_max_graphs`` shared among those loaders), and an MLM batch predicts a fixed number
of masked-token rows (:func:`villa_fast.data.batch.mlm_rows`), the padding rows left out of its loss and
consistency term: every adversarial pre-training step can be captured in a CUDA graph. The standard-step
tasks (MRFR, MRC) keep the authors' unpadded batches.

A ``train_datasets`` / ``val_datasets`` entry whose text databases are VCR's (they hold ``id2len_qar.json``)
is VCR second-stage pre-training, as UNITER's ``pretrain_vcr.py``: MLM, MRFR and MRC(-kl) on the question with
its gold answer and rationale (``vcr_pretrain_texts``), the images ``"gt_dir;det_dir"``, and the model grows
VCR's 4 text types and 81 person-tag tokens (:class:`~villa_fast.models.UniterForPretraining` ``vcr=True``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from villa_fast.tasks.base import DataContext, Task
from villa_fast.train.config import PRETRAIN_TASKS, ConfigError

__all__ = ["MixSource", "PretrainTask"]

logger = logging.getLogger(__name__)

_TASK_NAMES = PRETRAIN_TASKS


def _norm(task: str) -> str:
    t = task.replace("-", "").replace("_", "")
    if t not in _TASK_NAMES:
        raise ConfigError(f"unknown pre-training task {task!r}; expected one of {list(_TASK_NAMES)}")
    return t


class MixSource:
    """Batches of several loaders: each accumulation cycle draws one loader by ratio and takes
    ``accum`` consecutive batches from it (tagged with ``batch["task"]``).

    The draw for cycle ``c`` depends only on ``(seed, c)``, and each loader keeps its own
    position, so the state is ``{"cycle", "loaders"}``.
    """

    def __init__(self, loaders: dict[str, tuple[str, Any, float]], accum: int, seed: int):
        self.loaders = loaders  # key -> (task, loader, ratio)
        self.accum = accum
        self.seed = seed
        self.cycle = 0
        self._keys = list(loaders)
        self._weights = [loaders[k][2] for k in self._keys]

    def pick(self, cycle: int) -> str:
        rng = random.Random((self.seed * 1_000_003 + cycle) & ((1 << 63) - 1))
        return rng.choices(self._keys, weights=self._weights)[0]

    def batches(self) -> Iterator[dict]:
        from villa_fast.train.trainer import LoaderSource

        streams = {k: LoaderSource(v[1]).batches() for k, v in self.loaders.items()}
        while True:
            key = self.pick(self.cycle)
            self.cycle += 1  # the state after this cycle's last batch points at the next cycle
            task = self.loaders[key][0]
            for _ in range(self.accum):
                batch = next(streams[key])
                batch["task"] = task
                yield batch

    def state_dict(self) -> dict:
        return {"cycle": self.cycle, "loaders": {k: v[1].state_dict() for k, v in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.cycle = int(state["cycle"])
        for k, s in state["loaders"].items():
            self.loaders[k][1].load_state_dict(s)


class _Chain:
    """Evaluation: every (dataset, task) loader in turn, batches tagged with their task and dataset name."""

    def __init__(self, parts: list[tuple[str, str, Any]]):
        self.parts = parts

    def __iter__(self):
        for task, dataset, loader in self.parts:
            for batch in loader:
                batch["task"] = task
                batch["dataset"] = dataset
                yield batch

    def load_state_dict(self, state: dict) -> None:
        for _, _, loader in self.parts:
            loader.load_state_dict(state)


def _entry_name(entry: Mapping[str, Any], i: int) -> str:
    return str(entry.get("name", i))


class PretrainTask(Task):
    name = "pretrain"
    kl_reduction = "batchmean"
    main_metric = "mlm_acc"
    supports_robust = False
    fixed_shape_training = True

    def __init__(self, cfg):
        super().__init__(cfg)
        self._ot: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._ot_last: Tensor | None = None

    def build_model(self):
        from villa_fast.models import UniterForPretraining

        return UniterForPretraining(self.model_config(), ot_weight=self.cfg["itm_ot_lambda"], vcr=self.is_vcr())

    def model_vocab_size(self, model_config) -> int:
        from villa_fast.models.heads import VCR_SPECIAL_TOKENS

        return super().model_vocab_size(model_config) + (VCR_SPECIAL_TOKENS if self.is_vcr() else 0)

    def is_vcr(self) -> bool:
        """Whether any dataset entry is VCR's (the model then has VCR's types and tokens)."""
        entries = [*(self.cfg.get("train_datasets") or []), *(self.cfg.get("val_datasets") or [])]
        return any(self._vcr_entry(e, "datasets") for e in entries)

    @staticmethod
    def _vcr_entry(entry: dict, where: str) -> bool:
        """An entry whose text databases are VCR's (``id2len_qar.json``); all of its databases or none."""
        flags = {(Path(db) / "id2len_qar.json").is_file() for db in entry["db"]}
        if len(flags) > 1:
            raise ConfigError(f"{where} {entry.get('name', '')!r}: mixes VCR text databases with others")
        return flags == {True}

    def _vcr_dataset(self, task: str, pairs: list[tuple[str, str]], max_len: int, padded: bool = False):
        from villa_fast import data as d

        c = self.cfg
        if task == "itm":
            raise ConfigError("VCR pre-training has no itm task (UNITER's second stage trains mlm, mrfr, mrckl)")
        texts = list(c["vcr_pretrain_texts"])
        sets = []
        for txt, img in pairs:
            gt, det = self.gt_det_img_dbs(img)
            if gt is None and det is None:
                raise ConfigError(f"VCR pre-training: no image database in {img!r}")
            for kind in texts:
                tdb = d.VcrTxtTokLmdb(txt, max_len, task=kind)
                if task == "mlm":
                    sets.append(d.MlmDatasetForVcr(tdb, gt, det, mask_prob=c["mlm_prob"], exact_region_counts=padded))
                elif task == "mrfr":
                    sets.append(d.MrfrDatasetForVcr(c["mrm_prob"], tdb, gt, det))
                else:
                    sets.append(d.MrcDatasetForVcr(c["mrm_prob"], tdb, gt, det))
        if task == "mlm":
            segments = 3 if "qar" in texts else 2
            collate = functools.partial(
                d.vcr_pretrain_collate, base=d.mlm_collate, mlm_segments=segments, mask_prob=c["mlm_prob"]
            )
        else:
            base = d.mrfr_collate if task == "mrfr" else d.mrc_collate
            collate = functools.partial(d.vcr_pretrain_collate, base=base)
        return (sets[0] if len(sets) == 1 else d.ConcatDatasetWithLens(sets)), collate

    def _dataset(self, task: str, pairs: list[tuple[str, str]], max_len: int, vcr: bool = False, padded=False):
        """``padded``: the training loader pads to fixed shapes (a VCR db then bounds regions by their counts)."""
        from villa_fast import data as d

        if vcr:
            return self._vcr_dataset(task, pairs, max_len, padded)
        c = self.cfg
        sets = []
        for txt, img in pairs:
            tdb, idb = d.TxtTokLmdb(txt, max_len), self.img_db(img)
            if task == "mlm":
                sets.append(d.MlmDataset(tdb, idb, mask_prob=c["mlm_prob"]))
            elif task == "mrfr":
                sets.append(d.MrfrDataset(c["mrm_prob"], tdb, idb))
            elif task in ("mrc", "mrckl"):
                sets.append(d.MrcDataset(c["mrm_prob"], tdb, idb))
            else:
                sets.append(d.ItmDataset(tdb, idb, neg_sample_p=c["itm_neg_prob"]))
        collate = {
            "mlm": functools.partial(d.mlm_collate, mask_prob=c["mlm_prob"]),
            "mrfr": d.mrfr_collate,
            "mrc": d.mrc_collate,
            "mrckl": d.mrc_collate,
            "itm": d.itm_ot_collate if c["itm_ot_lambda"] > 0 else d.itm_collate,
        }[task]
        return (sets[0] if len(sets) == 1 else d.ConcatDatasetWithLens(sets)), collate

    @staticmethod
    def _entry_pairs(entry: dict, where: str) -> list[tuple[str, str]]:
        dbs, imgs = list(entry["db"]), list(entry["img"])
        if len(imgs) == 1 and len(dbs) > 1:
            imgs = imgs * len(dbs)
        if len(dbs) != len(imgs):
            raise ConfigError(f"{where} {entry.get('name', '')!r}: {len(dbs)} text dbs but {len(imgs)} image dbs")
        return list(zip(dbs, imgs, strict=True))

    def train_source(self, ctx: DataContext) -> MixSource:
        entries = self.cfg.get("train_datasets")
        if not entries:
            raise ConfigError("task pretrain needs config key 'train_datasets'")
        # under adv_graphed the adversarial MLM and ITM loaders share the graph budget; the others stay unpadded
        # (an adversarial MRM batch predicts its masked regions only: data-dependent rows, one graph per batch)
        adv = {_norm(t) for t in self.cfg["adv_pretrain_tasks"]} & {"mlm", "itm"}
        odd = {_norm(t) for t in self.cfg["adv_pretrain_tasks"]} - adv
        if odd and self.cfg.get("adv_training") and self.cfg.get("adv_graphed"):
            logger.warning(
                "task pretrain: adv_graphed with adversarial %s: their batches are not padded (one CUDA graph per "
                "new shape, up to adv_max_graphs, then eager)",
                ", ".join(sorted(odd)),
            )
        n_adv = sum(_norm(t) in adv for e in entries for t in e["tasks"])
        share = max(1, int(self.cfg.get("adv_max_graphs") or 16) // max(n_adv, 1))
        loaders = {}
        for i, entry in enumerate(entries):
            pairs = self._entry_pairs(entry, "train_datasets")
            vcr = self._vcr_entry(entry, "train_datasets")
            ratios = entry.get("mix_ratio") or [1] * len(entry["tasks"])
            for task, ratio in zip(entry["tasks"], ratios, strict=True):
                t = _norm(task)
                padded = t in adv and bool(self.cfg.get("adv_training") and self.cfg.get("adv_graphed"))
                ds, collate = self._dataset(t, pairs, self.cfg["max_txt_len"], vcr, padded)
                key = f"{entry.get('name', i)}_{t}"
                # a seed of its own per loader: each task shuffles and masks independently (as the authors' loaders
                # draw from one global stream); one shared seed would give MRFR and MRC the same batches and masks
                own = dataclasses.replace(ctx, seed=ctx.seed + zlib.crc32(key.encode()))
                loader = self.batch_loader(ds, collate, own, train=True, graphs=share if t in adv else 0)
                loaders[key] = (t, loader, float(ratio))
        return MixSource(loaders, self.cfg["gradient_accumulation_steps"], ctx.seed)

    def has_split(self, split: str) -> bool:
        return bool(self.cfg.get(f"{split}_datasets"))

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        parts = []
        for i, entry in enumerate(self.cfg.get(f"{split}_datasets") or []):
            pairs = self._entry_pairs(entry, f"{split}_datasets")
            vcr = self._vcr_entry(entry, f"{split}_datasets")
            for task in entry["tasks"]:
                t = _norm(task)
                ds, collate = self._dataset(t, pairs, -1, vcr)
                parts.append((t, _entry_name(entry, i), self.batch_loader(ds, collate, ctx, train=False)))
        return _Chain(parts)

    # -- step ----------------------------------------------------------------------------------
    def forward(self, model, batch):
        out = model(batch)
        # the ITM loss needs the OT distance of the same forward: kept under the logits tensor itself (a weak key:
        # the entry lives as long as the logits, however many forwards run before their losses, as in ``alter``).
        # The logits are returned in float32 (the adversarial step computes its losses in float32: casting a
        # float32 tensor returns it as is), so the loss receives this very tensor; the newest forward's is the
        # fallback for a caller that hands the loss a copy
        logits = out["logits"]
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        self._ot[logits] = self._ot_last = out.get("ot_dist")
        return logits

    def loss(self, model, logits, batch):
        m = getattr(model, "module", model)
        ot = self._ot.get(logits, self._ot_last)
        return m.loss({"task": batch["task"], "logits": logits, "ot_dist": ot}, batch)

    def adversarial_for(self, batch) -> bool:
        return batch["task"] in {_norm(t) for t in self.cfg["adv_pretrain_tasks"]}

    def step_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        # tensors (nested ones too) and the task name: the per-row length lists, the OT inputs' scatter_max and
        # the masking probability would make a graph signature per batch; forward and loss do not read them
        def keep(d: Mapping[str, Any]) -> dict[str, Any]:
            out: dict[str, Any] = {}
            for k, v in d.items():
                if isinstance(v, Tensor):
                    out[k] = v
                elif isinstance(v, Mapping):
                    out[k] = keep(v)
            return out

        return {**keep(batch), "task": batch["task"]}

    def kl_mask(self, batch: Mapping[str, Any]) -> Tensor | None:
        # fixed-shape MLM batches predict padding rows too (mlm_labels -1): the consistency term leaves them out
        if batch.get("task") == "mlm" and isinstance(batch.get("mlm_labels"), Tensor):
            return batch["mlm_labels"] != -1
        return None

    # -- evaluation ----------------------------------------------------------------------------
    def _eval_groups(self) -> list[str]:
        """The metric groups: each task over every dataset (``mlm``), and each dataset's own (``mlm_coco``), as the
        authors' validation reports each (task, dataset) loader."""
        groups = list(_TASK_NAMES)
        for split in ("val", "test"):
            for i, entry in enumerate(self.cfg.get(f"{split}_datasets") or []):
                for task in entry["tasks"]:
                    g = f"{_norm(task)}_{_entry_name(entry, i)}"
                    if g not in groups:
                        groups.append(g)
        return groups

    def eval_init(self):
        # every counter present from the start, so all ranks reduce the same keys; as the authors' validate_*:
        # a summed loss per target (token, region or pair) for every task, an accuracy for all but MRFR, and for
        # ITM the OT distances of the positive and the negative pairs
        state: dict[str, Any] = {"n": 0.0, "pred": []}
        for g in self._eval_groups():
            state[f"{g}_n"] = 0.0
            state[f"{g}_loss"] = 0.0
            if not g.startswith("mrfr"):
                state[f"{g}_correct"] = 0.0
            if g.startswith("itm"):
                for k in ("ot_pos", "ot_neg", "n_pos", "n_neg"):
                    state[f"{g}_{k}"] = 0.0
        return state

    def eval_batch(self, state, model, logits, batch) -> None:
        t = batch["task"]
        z = logits.float()
        own = f"{t}_{batch['dataset']}" if "dataset" in batch else None

        def add(key: str, value: float) -> None:
            # key is "<task>_<counter>": counted for the task and for the batch's dataset
            value = float(value)
            state[key] = state.get(key, 0.0) + value
            if own is not None:
                k = own + key[len(t) :]
                state[k] = state.get(k, 0.0) + value

        if t == "mlm":
            if "mlm_labels" in batch:  # one row per entry, -1 on the padding rows
                labels = batch["mlm_labels"].to(z.device)
                z = z[labels != -1]
            else:  # the rows are the masked positions of txt_labels
                labels = batch["txt_labels"].to(z.device)
            labels = labels[labels != -1]
            add("mlm_correct", (z.argmax(1) == labels).sum())
            add("mlm_loss", F.cross_entropy(z, labels, reduction="sum"))
            add("mlm_n", labels.numel())
        elif t == "itm":
            tgt = batch["targets"].to(z.device).reshape(-1)
            add("itm_correct", (z.argmax(1) == tgt).sum())
            add("itm_loss", F.cross_entropy(z, tgt.long(), reduction="sum"))
            add("itm_n", tgt.numel())
            ot = self._ot.get(logits)
            if ot is not None:
                ot, pos = ot.float().reshape(-1), tgt == 1
                add("itm_ot_pos", ot[pos].sum())
                add("itm_ot_neg", ot[~pos].sum())
                add("itm_n_pos", pos.sum())
                add("itm_n_neg", (~pos).sum())
        elif t == "mrfr":
            add("mrfr_loss", F.mse_loss(z, batch["feat_targets"].float(), reduction="sum") / max(z.size(1), 1))
            add("mrfr_n", z.size(0))
        else:
            soft = batch["label_targets"].float().to(z.device)
            if t == "mrckl":
                add("mrckl_loss", F.kl_div(F.log_softmax(z, dim=-1), soft, reduction="sum"))
            else:
                target = soft[:, 1:].argmax(dim=-1) + 1
                add("mrc_loss", F.cross_entropy(z, target, ignore_index=0, reduction="sum"))
            if t == "mrc":  # the background class (0) is never the answer: the argmax over classes 1..
                z, soft = z[:, 1:], soft[:, 1:]
            # MRC-kl: the argmax over every class, background included, of the prediction and of the target
            add(f"{t}_correct", (z.argmax(1) == soft.argmax(1)).sum())
            add(f"{t}_n", z.size(0))
        state["n"] += 1

    def eval_finish(self, state) -> dict[str, float]:
        out: dict[str, float] = {}
        for g in self._eval_groups():
            n = state.get(f"{g}_n")
            if not n:
                continue
            if f"{g}_correct" in state:
                out[f"{g}_acc"] = state[f"{g}_correct"] / n
            if f"{g}_loss" in state:
                out[f"{g}_loss"] = state[f"{g}_loss"] / n
            if state.get(f"{g}_n_pos") or state.get(f"{g}_n_neg"):
                # the authors' OT figures: the summed distance of the positives less the negatives' per pair, and
                # the mean distance of each
                pos, neg = state[f"{g}_ot_pos"], state[f"{g}_ot_neg"]
                out[f"{g}_ot_loss"] = (pos - neg) / n
                out[f"{g}_ot_pos"] = pos / max(state[f"{g}_n_pos"], 1.0)
                out[f"{g}_ot_neg"] = neg / max(state[f"{g}_n_neg"], 1.0)
        out["n"] = state["n"]
        return out
