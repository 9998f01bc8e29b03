"""What every task tells the trainer: model, data, loss, metrics, prediction files."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from villa_fast.train.config import ConfigError, dataset_pairs

__all__ = ["EXAMPLES", "TOKENS", "Accumulation", "DataContext", "Task", "load_model_config"]

logger = logging.getLogger(__name__)

#: a batch size that counts tokens, padding included (the authors' ``TokenBucketSampler``)
TOKENS = "tokens"
#: a batch size that counts examples (dataset items; the authors' plain ``DataLoader(batch_size=...)``)
EXAMPLES = "examples"


class Accumulation(NamedTuple):
    """How one optimizer step is formed, per process: ``micro_batches`` micro-batches whose gradients are summed,
    the sum multiplied by ``loss_scale`` (the same as each micro-batch's whole loss multiplied by it, the factor
    being one for the step; under VILLA its task loss and KL term alike)."""

    micro_batches: int
    loss_scale: float = 1.0


@dataclass
class DataContext:
    """Where the loaders run: seed, rank and world size for sharding, worker count."""

    seed: int = 42
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    device: torch.device | None = None


def load_model_config(spec: str | None) -> dict[str, Any]:
    """A UNITER model config as a dict: from a JSON path, or "base" / "large" (None: base)."""
    from villa_fast.models import UniterConfig

    if spec is None or spec == "base":
        return UniterConfig.base().to_dict()
    if spec == "large":
        return UniterConfig.large().to_dict()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"model_config not found: {spec}")
    with open(spec, encoding="utf-8") as fh:
        return json.load(fh)


class Task:
    """Base class. Subclasses set ``name`` and implement the data and metric hooks."""

    name = ""
    #: KL reduction of the adversarial consistency term for this task's logits (VILLA_SPEC section 2)
    kl_reduction = "batchmean"
    #: the headline metric key of :meth:`eval_finish`
    main_metric = "acc"
    #: robust evaluation (an embedding-space attack on the task loss) is meaningful
    supports_robust = True
    #: the VILLA step applies (the KL needs a distribution over classes)
    supports_adversarial = True
    #: what ``train_batch_size`` counts, as in the authors' script for the task: :data:`TOKENS` (token-bucket
    #: batches, padding counted), :data:`EXAMPLES` (batches of that many dataset items), or None where the value
    #: forms no loader batch. Per process in every case. :meth:`batch_loader` follows it.
    train_batch_unit: str | None = TOKENS
    #: what ``val_batch_size`` counts (same values)
    val_batch_unit: str | None = TOKENS
    #: example-counted training leaves out each epoch's last, shorter batch (the authors' ``drop_last``)
    train_drop_last = False
    #: the training batches (one text and one region set per row, from ``base_batch``) can be padded to a few
    #: fixed shapes (:class:`villa_fast.data.PadBuckets`), which a CUDA-graphed step needs (``adv_graphed``)
    fixed_shape_training = False

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = cfg
        self._img_dbs: dict[tuple, Any] = {}

    # -- model -------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def model_config(self) -> dict[str, Any]:
        return load_model_config(self.cfg["model_config"])

    def model_vocab_size(self, model_config: Mapping[str, Any]) -> int:
        """Word embeddings of the task's model (VCR's model adds its person tags to the config's vocabulary)."""
        return int(model_config.get("vocab_size", 28996))

    #: the ``task`` a txt_db's meta.json may name for this task's data, checked where this package's converter
    #: wrote the db (its meta.json carries :data:`~villa_fast.data.db.CONVERTER_MARK`); the official databases'
    #: meta.json holds the authors' preprocessing options, whose ``task`` ("nlvr", ...) is not checked; empty: any
    data_kinds: tuple[str, ...] = ()

    def check_data_fits_model(self, dataset) -> None:
        """Refuse, naming the database, data the model cannot embed (on a GPU an out-of-range index is a
        device-side assert that ends the process): token ids past the model's vocabulary (a txt_db's ``v_range``
        and special tokens: a txt_db tokenised for another BERT), text rows longer than its position embeddings
        (evaluation reads every text, whatever ``max_txt_len``), region features of another width than its
        ``img_dim``; a txt_db our converter built for another task's data (:attr:`data_kinds`). Read from each db's
        meta, lengths and first record: nothing per example."""
        mc = self.model_config()
        vocab = self.model_vocab_size(mc)
        max_pos = int(mc.get("max_position_embeddings", 512))
        img_dim = int(mc.get("img_dim", 2048))
        where = f"model_config {self.cfg.get('model_config') or 'base'}"
        from villa_fast.data.db import written_by_converter

        seen: set[int] = set()
        for part in _dataset_parts(dataset):
            tdb = getattr(part, "txt_db", None)
            if tdb is not None and id(tdb) not in seen and hasattr(tdb, "v_range"):
                seen.add(id(tdb))
                meta = getattr(tdb, "meta", None) or {}
                # only our converter's "task" is one of our task names; the authors' prepro.py writes its own
                made_for = meta.get("task") if written_by_converter(meta) else None
                if self.data_kinds and isinstance(made_for, str) and made_for not in self.data_kinds:
                    raise ConfigError(
                        f"{tdb.db_dir}: a txt_db built for task {made_for!r} (meta.json) cannot train or evaluate "
                        f"task {self.name}, which reads {' or '.join(repr(k) for k in self.data_kinds)} databases"
                    )
                top = max(int(tdb.v_range[1]) - 1, int(tdb.cls_), int(tdb.sep), int(tdb.mask))
                if top >= vocab:
                    raise ConfigError(
                        f"{tdb.db_dir}: its token ids reach {top} (meta.json v_range / CLS / SEP / MASK) but the "
                        f"model embeds {vocab} words ({where}): the text was tokenised with another vocabulary"
                    )
            dims = getattr(part, "pad_dims", None)
            if tdb is not None and dims and getattr(part, "pad_dims_exact", True):
                longest = max(range(len(dims)), key=lambda i: dims[i][0])
                if dims[longest][0] > max_pos:
                    ids = getattr(part, "ids", None)
                    which = f"text {ids[longest]!r}" if ids is not None and longest < len(ids) else "a text"
                    raise ConfigError(
                        f"{tdb.db_dir}: {which} makes a row of {dims[longest][0]} tokens with [CLS] / [SEP], past "
                        f"the model's {max_pos} position embeddings ({where}): lower max_txt_len (training) or leave "
                        "such texts out of the database"
                    )
            for attr in ("img_db", "img_db_gt", "img_db_det"):
                idb = getattr(part, attr, None)
                if idb is None or id(idb) in seen or not getattr(idb, "name2nbb", None):
                    continue
                seen.add(id(idb))
                if int(idb.img_dim) != img_dim:
                    raise ConfigError(
                        f"{idb.img_dir}: region features are {idb.img_dim} wide but the model takes img_dim "
                        f"{img_dim} ({where})"
                    )

    # -- data --------------------------------------------------------------------------------------
    def img_db(self, path: str, *, conf_th: float | None = None, num_bb: int | None = None):
        """An image database, opened once per (path, selection) as the authors' ImageLmdbGroup does."""
        from villa_fast.data import DetectFeatLmdb

        c = self.cfg
        key = (path, c["conf_th"] if conf_th is None else conf_th, c["num_bb"] if num_bb is None else num_bb)
        if key not in self._img_dbs:
            self._img_dbs[key] = DetectFeatLmdb(path, key[1], c["max_bb"], c["min_bb"], key[2], c["compressed_db"])
        return self._img_dbs[key]

    def gt_det_img_dbs(self, spec: str):
        """VCR's ``"gt_dir;det_dir"``: the ground-truth-box db (all its boxes: conf_th -1, up to 100 regions)
        and the detections db (the config's selection), either None when absent; a folder whose name contains
        "gt" is the ground-truth one, as in the authors' scripts."""
        gt, det = None, None
        for part in (p for p in spec.split(";") if p):
            if "gt" in part.rstrip("/").split("/")[-1]:
                gt = self.img_db(part, conf_th=-1, num_bb=100)
            else:
                det = self.img_db(part)
        return gt, det

    def pairs(self, split: str) -> list[tuple[str, str]]:
        return dataset_pairs(self.cfg, split)

    def has_split(self, split: str) -> bool:
        return bool(self.cfg.get(f"{split}_txt_db")) and bool(self.cfg.get(f"{split}_img_db"))

    def batch_unit(self, split: str = "train") -> str | None:
        """What the batch size of ``split`` counts: ``train_batch_unit`` for "train", else ``val_batch_unit``."""
        return self.train_batch_unit if split == "train" else self.val_batch_unit

    def batch_loader(self, dataset, collate, ctx: DataContext, *, train: bool, groups=None, graphs=None):
        """The loader of ``dataset`` whose batches follow the task's batch unit (:meth:`batch_unit`):
        :meth:`token_loader` for :data:`TOKENS`, :meth:`example_loader` for :data:`EXAMPLES`.
        ``groups`` (example-counted training only): index lists kept together when shuffling. ``graphs``: the
        CUDA graphs this loader's shapes may take under ``adv_graphed`` (:meth:`pad_buckets`)."""
        self.check_data_fits_model(dataset)
        unit = self.batch_unit("train" if train else "val")
        key = "train_batch_size" if train else "val_batch_size"
        if unit == TOKENS:
            if groups is not None:
                raise ValueError("groups apply to example-counted batches only")
            loader = self.token_loader(dataset, collate, ctx, train=train, graphs=graphs)
        elif unit == EXAMPLES:
            loader = self.example_loader(dataset, collate, ctx, train=train, groups=groups, graphs=graphs)
        else:
            raise ValueError(f"task {self.name}: {key} forms no loader batch (batch unit {unit!r})")
        logger.info("task %s: %s=%d counts %s per batch per process", self.name, key, self.cfg[key], unit)
        return loader

    def example_loader(self, dataset, collate, ctx: DataContext, *, train: bool, groups=None, graphs=None):
        from villa_fast.data.sampler import build_example_dataloader

        c = self.cfg
        return build_example_dataloader(
            dataset,
            collate,
            batch_size=c["train_batch_size"] if train else c["val_batch_size"],
            is_train=train,
            drop_last=self.train_drop_last,
            groups=groups,
            seed=ctx.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=ctx.num_workers,
            device=ctx.device if train else None,
            pad_buckets=self.pad_buckets(graphs=graphs) if train else None,
        )

    def token_loader(self, dataset, collate, ctx: DataContext, *, train: bool, graphs=None):
        from villa_fast.data import build_dataloader

        c = self.cfg
        return build_dataloader(
            dataset,
            collate,
            batch_size_tokens=c["train_batch_size"] if train else c["val_batch_size"],
            is_train=train,
            seed=ctx.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_workers=ctx.num_workers,
            pad_buckets=self.pad_buckets(dataset, graphs=graphs) if train else None,
            device=ctx.device if train else None,
        )

    def pad_buckets(self, dataset=None, graphs: int | None = None):
        """The fixed training shapes when the VILLA step is captured in CUDA graphs (``adv_graphed``): one
        graph per shape, so a handful of padded shapes instead of one per batch. None otherwise (the authors'
        batches, padded to their longest row). A task whose batches cannot be padded so trains unpadded, with
        a warning: its graphed step captures a graph per new shape (up to GraphedVillaStep's limit).

        Token-counted batches group examples by shape, so the sizes are fitted to the training set's
        per-example bounds (``dataset.pad_dims``, and ``dataset.pad_bounds`` where examples change across
        epochs): those that pad least, ``sqrt(graphs)`` per dimension at most
        (``graphs``: the loader's share of ``adv_max_graphs``, all of it by default; 0 = not padded), the
        largest the data's largest (:meth:`PadBuckets.fit`). An example-counted batch is padded to its longest
        row, near the data's largest for any sizeable batch: there, and without ``pad_dims``, the default
        sizes."""
        c = self.cfg
        if not (c.get("adv_training") and c.get("adv_graphed")) or graphs == 0:
            return None
        if not self.fixed_shape_training:
            logger.warning("task %s: adv_graphed with variable batch shapes: one CUDA graph per new shape", self.name)
            return None
        from villa_fast.data import PadBuckets

        dims = getattr(dataset, "pad_dims", None)
        if dims and self.train_batch_unit == TOKENS:
            # sizes examples reach in other epochs (ITM's re-drawn negatives) must fit the largest shape too
            dims = list(dims) + list(getattr(dataset, "pad_bounds", []))
            n = max(1, math.isqrt(int(graphs or c.get("adv_max_graphs") or 16)))
            buckets = PadBuckets.fit(dims, n, n)
            logger.info("task %s: adv_graphed pads training batches to %s", self.name, buckets)
            return buckets
        return PadBuckets()

    def train_loader(self, ctx: DataContext):
        raise NotImplementedError

    def accumulation(self) -> Accumulation:
        """Micro-batches per optimizer step and the factor on their summed gradients: by default
        ``gradient_accumulation_steps`` and 1 (the authors sum micro-batch gradients, unscaled). A task whose
        authors' script accumulates otherwise says so here."""
        return Accumulation(int(self.cfg["gradient_accumulation_steps"]), 1.0)

    def eval_loader(self, ctx: DataContext, split: str = "val"):
        raise NotImplementedError

    # -- step --------------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, batch: dict) -> dict:
        """Per-batch fix-ups before the forward (e.g. hard-negative mining)."""
        return batch

    def step_batch(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """What the adversarial step receives of a prepared training batch (``forward`` and ``loss`` run on it).

        A CUDA-graphed step (``adv_graphed``) captures one graph per input signature, non-tensor values
        included (they are frozen into the graph): a task whose forward and loss read tensors only drops
        the rest here, since per-row lengths kept as lists would make every batch a signature of its own.
        """
        return batch

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        return model(batch)

    def loss(self, model: nn.Module, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return _unwrap(model).loss(logits, batch)

    def attack_loss(self, model: nn.Module, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """The loss the robust-evaluation attack ascends, on an evaluation batch."""
        return self.loss(model, logits, batch)

    def has_labels(self, batch: Mapping[str, Any]) -> bool:
        """Whether every example of an evaluation batch has its gold label (robust evaluation attacks the loss
        against it; a test split without labels cannot be attacked so)."""
        return True

    def n_examples(self, batch: Mapping[str, Any]) -> int:
        return int(batch["attn_masks"].size(0))

    def adversarial_for(self, batch: Mapping[str, Any]) -> bool:
        """Whether this batch takes the VILLA step when adversarial training is on."""
        return True

    def adv_masks(self, batch: Mapping[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        return batch.get("txt_mask"), batch.get("img_mask")

    def kl_mask(self, batch: Mapping[str, Any]) -> Tensor | None:
        """The logit rows the VILLA step's consistency term counts (``VillaStep(kl_mask_fn=...)``): None = all;
        a task whose logits carry padding rows (fixed-shape masked-token predictions) names its real rows."""
        return None

    # -- evaluation --------------------------------------------------------------------------------
    def validation_split(self, final: bool) -> str:
        """The split validated every ``valid_steps`` during training (``final``: at the last step)."""
        return "val"

    #: further labelled splits evaluated at each validation when the config names their databases (the authors'
    #: NLVR2 and SNLI-VE scripts evaluate "test" beside "val")
    also_validate: tuple[str, ...] = ()

    def validation_splits(self, final: bool) -> list[str]:
        """Every split evaluated at a validation during training, those the config has databases for."""
        return [s for s in (self.validation_split(final), *self.also_validate) if self.has_split(s)]

    def run_files(self) -> dict[str, str]:
        """Files the task keeps with a training run: ``{path relative to output_dir: text}``, written at its start."""
        return {}

    def check_run_files(self, output_dir: str | os.PathLike) -> None:
        """Before a resume writes :meth:`run_files` again: raise ``ConfigError`` if the run in ``output_dir`` kept
        files that this configuration would replace with others (a task whose run files define its checkpoints
        overrides this; the default keeps none that matter)."""

    def eval_init(self) -> dict[str, Any]:
        return {"n": 0.0, "correct": 0.0, "loss": 0.0, "pred": []}

    def eval_batch(self, state: dict[str, Any], model: nn.Module, logits: Tensor, batch: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def eval_finish(self, state: dict[str, Any]) -> dict[str, float]:
        n = max(state["n"], 1.0)
        return {"acc": state["correct"] / n, "loss": state["loss"] / n, "n": state["n"]}

    #: keys of the eval state summed over ranks (the rest is gathered)
    sum_keys = ("n", "correct", "loss")

    def write_predictions(self, preds: list, path_prefix: str) -> str | None:
        """Write the predictions as the authors' inference scripts do; returns the file name."""
        path = f"{path_prefix}.json"
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(preds, fh)
        return path


def _dataset_parts(dataset) -> list:
    """The datasets under concatenations and thin wrappers (``datasets`` / ``dataset`` attributes)."""
    out, todo = [], [dataset]
    while todo:
        d = todo.pop()
        if hasattr(d, "datasets"):
            todo.extend(d.datasets)
        elif hasattr(d, "dataset") and not hasattr(d, "txt_db"):
            todo.append(d.dataset)
        else:
            out.append(d)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def require(cfg: Mapping[str, Any], key: str, task: str) -> Any:
    v = cfg.get(key)
    if v in (None, "", []):
        raise ConfigError(f"task {task} needs config key {key!r}")
    return v
