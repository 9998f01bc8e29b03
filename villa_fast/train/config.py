"""Training configuration: the official VILLA/UNITER JSON keys, validated, with command-line overrides.

Resolution order (as in the authors' scripts): the defaults below, then the JSON file, then
command-line flags that were given explicitly. Every key has one type; an unknown key or a value
of the wrong type raises :class:`ConfigError` naming the key. :func:`to_json` writes the resolved
configuration with the official key names.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "SCHEMA",
    "TASKS",
    "NO_LR_MUL_TASKS",
    "PRETRAIN_TASKS",
    "TASK_BATCH_DEFAULTS",
    "TASK_LR_MUL_DEFAULTS",
    "RESUME_DATA_KEYS",
    "RESUME_FIXED_KEYS",
    "ConfigError",
    "add_override_flags",
    "infer_task",
    "load_config",
    "overrides_from_args",
    "resolve_config",
    "resume_data_moves",
    "resume_differences",
    "to_json",
]

#: task names the trainer knows (``itm`` is an alias of ``retrieval``)
TASKS = ("vqa", "ve", "nlvr2", "vcr", "retrieval", "re", "pretrain")
#: pre-training tasks (a ``train_datasets`` entry's ``tasks``; ``-`` and ``_`` are ignored: ``mrc-kl``)
PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
_TASK_ALIASES = {"itm": "retrieval", "refcoco": "re", "refcoco+": "re", "refcocog": "re", "snli-ve": "ve"}


class ConfigError(ValueError):
    """A configuration key is unknown, ill-typed or out of range (the message names it)."""


@dataclass(frozen=True)
class Key:
    kind: str  # int | float | bool | str | str_list | float_list | dict_list | str_or_list
    default: Any
    help: str
    choices: tuple | None = None
    official: bool = True


def _k(kind, default, help, choices=None, official=True) -> Key:
    return Key(kind, default, help, choices, official)


# Defaults: the values every released config shares where one exists (VILLA_SPEC section 3), else the
# authors' argparse default. Keys marked official=False are this library's additions.
SCHEMA: dict[str, Key] = {
    # -- what to train, where the data and weights are -------------------------------------------
    "task": _k("str", None, "vqa, ve, nlvr2, vcr, retrieval (itm), re, pretrain", official=False),
    "model_config": _k("str", None, "UNITER model config JSON, or 'base' / 'large'"),
    "checkpoint": _k(
        "str",
        None,
        "initial weights (official .pt, safetensors or HF BERT); evaluate's weights when --weights is absent",
    ),
    "checkpoint_from": _k(
        "str",
        None,
        "accepted (pretrain or vcr_pretrain in the authors' VCR configs); loading tells a checkpoint with VCR's "
        "added embedding rows from one without by their shapes",
    ),
    "output_dir": _k("str", None, "directory for logs, checkpoints and predictions"),
    "train_txt_dbs": _k("str_list", None, "training txt_db directories"),
    "train_img_dbs": _k("str_list", None, "training img_db directories (VCR: 'gt_dir;det_dir')"),
    "train_txt_db": _k("str", None, "training txt_db (single-db configs)"),
    "train_img_db": _k("str", None, "training img_db (single-db configs)"),
    "val_txt_db": _k("str", None, "validation txt_db"),
    "val_img_db": _k("str", None, "validation img_db"),
    "test_txt_db": _k("str", None, "test txt_db"),
    "test_img_db": _k("str", None, "test img_db"),
    "ans2label": _k(
        "str",
        None,
        "VQA answer -> label JSON, or the authors' ans2label.pkl (default: ans2label.json of the first train txt_db; "
        "a run keeps a copy in output_dir/ckpt/ans2label.json)",
    ),
    "compressed_db": _k("bool", False, "image records are compressed npz"),
    "train_datasets": _k("dict_list", None, "pre-training: [{name, db, img, tasks, mix_ratio}]"),
    "val_datasets": _k("dict_list", None, "pre-training validation: [{name, db, img, tasks}]"),
    # -- data ------------------------------------------------------------------------------------
    "max_txt_len": _k("int", 60, "longest text kept (tokens, without CLS/SEP; RE training: shorter only)"),
    "conf_th": _k("float", 0.2, "detection confidence threshold (-1: fixed num_bb regions)"),
    "max_bb": _k("int", 100, "most regions per image"),
    "min_bb": _k("int", 10, "fewest regions per image"),
    "num_bb": _k("int", 36, "regions per image when conf_th is -1"),
    "train_batch_size": _k(
        "int",
        4096,
        "training batch per process: tokens, padding counted (vqa, ve, nlvr2, vcr, pretrain); "
        "examples (re; retrieval with sampled negatives); retrieval with hard negatives: positive pairs per "
        "optimizer step, each an image-side and a text-side micro-batch, losses divided by it",
    ),
    "val_batch_size": _k(
        "int",
        4096,
        "validation batch per process: tokens (vqa, ve, nlvr2, pretrain); examples (vcr, re); unused by retrieval",
    ),
    "n_workers": _k("int", 4, "DataLoader worker processes"),
    "pin_mem": _k("bool", False, "accepted; batches for a CUDA device are always pinned (and prefetched)"),
    # -- optimisation ----------------------------------------------------------------------------
    "gradient_accumulation_steps": _k(
        "int", 1, "micro-batches per optimizer step (retrieval with hard negatives: 1, train_batch_size sets them)"
    ),
    "learning_rate": _k("float", 3e-5, "peak learning rate"),
    "lr_mul": _k(
        "float",
        1.0,
        "learning-rate multiplier of the task head (default 10 for vqa and vcr, as the authors' scripts; their "
        "nlvr2, ve, retrieval and pre-training scripts ignore it, this library applies it to those heads too)",
    ),
    "valid_steps": _k("int", 1000, "validate (and checkpoint) every N optimizer steps"),
    "num_train_steps": _k("int", 100000, "optimizer steps to train"),
    "warmup_steps": _k("int", 4000, "linear warmup steps"),
    "decay": _k("str", "linear", "learning-rate decay after warmup", ("linear",)),
    "optim": _k(
        "str", "adamw", "optimizer (adamw: the authors' update rule)", ("adamw", "adamw_torch", "adam", "adamax")
    ),
    "betas": _k("float_list", [0.9, 0.98], "Adam betas"),
    "dropout": _k(
        "float", 0.1, "dropout probability of every dropout layer (not paired-attn's attention blocks, as the authors')"
    ),
    "weight_decay": _k("float", 0.01, "weight decay (none on bias and LayerNorm)"),
    "grad_norm": _k("float", 2.0, "gradient clipping norm (-1: off)"),
    "seed": _k("int", 42, "random seed"),
    "fp16": _k("bool", False, "float16 mixed precision with a loss scaler (CUDA)"),
    # -- adversarial training --------------------------------------------------------------------
    "adv_training": _k("bool", False, "VILLA adversarial training"),
    "adv_modality": _k("str_list", ["text"], "perturbed modalities: text, image, alter"),
    "adv_lr_txt": _k("float", 1e-3, "ascent step of the text perturbation"),
    "adv_lr_img": _k("float", 1e-3, "ascent step of the image perturbation"),
    "adv_steps": _k("int", 3, "adversarial steps K"),
    "norm_type": _k("str", "l2", "perturbation norm", ("l2", "linf")),
    "adv_max_norm": _k("float", 0.0, "projection radius (0: none)"),
    "adv_init_mag": _k("float", 0.0, "random init magnitude (0: zero init)"),
    "adv_kl_weight": _k("float", 1.5, "weight of the symmetric KL term"),
    # -- task options ----------------------------------------------------------------------------
    "model": _k("str", "paired-attn", "NLVR2 head", ("paired-attn", "paired", "triplet")),
    "use_img_type": _k("bool", True, "NLVR2: image type ids 1 / 2"),
    "negative_size": _k("int", 1, "retrieval: sampled negatives per positive"),
    "hard_neg_size": _k("int", 0, "retrieval: hardest negatives kept (0: no hard-negative mining)"),
    "inf_minibatch_size": _k("int", 400, "retrieval: images scored per text at once in evaluation"),
    "margin": _k("float", 0.2, "retrieval hinge margin"),
    "full_val": _k("bool", False, "retrieval: full evaluation at every validation (else minibatches; last full)"),
    "mrm_prob": _k("float", 0.15, "pre-training: region masking probability"),
    "itm_neg_prob": _k("float", 0.5, "pre-training: ITM negative probability"),
    "itm_ot_lambda": _k("float", 0.1, "pre-training: weight of the optimal-transport alignment term"),
    # -- bookkeeping keys found in the released files; accepted and unused ----------------------------
    "rank": _k("int", 0, "written by the authors' scripts; ignored"),
    # -- this library's keys ---------------------------------------------------------------------
    "bf16": _k("bool", False, "bfloat16 autocast (no scaler)", official=False),
    "device": _k(
        "str",
        "auto",
        "auto, cpu or cuda[:N] (several processes: auto or cuda, each its local rank's GPU)",
        official=False,
    ),
    "adv_clean_backward": _k("str", "once", "clean-pass backward", ("once", "per_step", "recompute"), official=False),
    "adv_graphed": _k("bool", False, "capture the VILLA step in a CUDA graph", official=False),
    "adv_max_graphs": _k("int", 16, "adv_graphed: most batch shapes captured (more run eagerly)", official=False),
    "compile_layers": _k("bool", False, "run the encoder layers through torch.compile", official=False),
    "tf32": _k(
        "str",
        "auto",
        "TF32 float32 matmuls on CUDA (auto: with fp16/bf16 autocast)",
        ("auto", "on", "off"),
        official=False,
    ),
    "adv_kl_reduction": _k(
        "str", None, "KL reduction (default per task)", ("batchmean", "mean", "sum"), official=False
    ),
    "adv_pretrain_tasks": _k("str_list", ["mlm", "itm"], "pre-training tasks trained adversarially", official=False),
    "mlm_prob": _k("float", 0.15, "pre-training: word masking probability", official=False),
    "vcr_pretrain_texts": _k(
        "str_list",
        ["qar"],
        "VCR pre-training: the texts trained on, 'qa' (question, gold answer) and/or 'qar' (and gold rationale); "
        "UNITER's pretrain_vcr.py builds both under one loader name, so its qar loaders replace the qa ones",
        official=False,
    ),
    "mlp": _k("int", 1, "referring expressions: 1 or 2 layer head", official=False),
    "save_steps": _k("int", None, "checkpoint every N steps (default: valid_steps)", official=False),
    "keep_checkpoints": _k("int", 2, "training checkpoints kept (0: all)", official=False),
    "log_steps": _k("int", 10, "log every N optimizer steps", official=False),
    "tensorboard": _k("bool", True, "write TensorBoard logs", official=False),
    "progress": _k("bool", True, "show a progress bar", official=False),
    "max_val_examples": _k(
        "int",
        0,
        "cap on validation examples over all processes, each stopping after the batch that reaches its share (0: all)",
        official=False,
    ),
    "attack_steps": _k("int", 3, "robust evaluation: attack steps K", official=False),
    "attack_eps": _k("float", 1.0, "robust evaluation: l2 radius of the attack per example", official=False),
    "attack_lr": _k(
        "float", None, "robust evaluation: step size (default 2.5 * attack_eps / attack_steps)", official=False
    ),
    "attack_modality": _k("str_list", ["text"], "robust evaluation: attacked modalities", official=False),
}


#: Batch sizes of the tasks whose batches count examples (``villa_fast.tasks``: ``Task.train_batch_unit`` /
#: ``val_batch_unit``) where no source sets the key, instead of the token budgets above: the released config's
#: value (re: train-refcoco-base-1gpu.json; vcr validation: both VCR configs), else the authors' argparse default
#: (retrieval: train_itm.py).
#: retrieval with hard negatives: ``train_batch_size`` (positive pairs per optimizer step) when no source sets it
HARD_NEGATIVE_TRAIN_BATCH = 32

#: the head's learning-rate multiplier where a config does not set one: the argparse default of the authors'
#: train_vqa_adv.py and train_vcr_adv.py (their RE script takes it from the config only; the other tasks' scripts
#: have no multiplier)
TASK_LR_MUL_DEFAULTS: dict[str, float] = {"vqa": 10.0, "vcr": 10.0}
#: tasks whose authors' scripts give the head no learning-rate multiplier
NO_LR_MUL_TASKS = ("nlvr2", "ve", "retrieval", "pretrain")

TASK_BATCH_DEFAULTS: dict[str, dict[str, int]] = {
    "re": {"train_batch_size": 128, "val_batch_size": 128},
    "vcr": {"val_batch_size": 10},
    "retrieval": {"train_batch_size": 128},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


_KIND_WORDS = {
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "str": "a string",
    "str_list": "a list of strings",
    "float_list": "a list of numbers",
    "dict_list": "a list of objects",
}


def _check(key: str, value: Any, where: str) -> Any:
    spec = SCHEMA[key]
    if value is None:
        # null means "unset" only for the keys whose default is unset (their code picks a value or goes without)
        if spec.default is None:
            return None
        raise ConfigError(
            f"{where}: key {key!r} needs a value, got null: set it to {_KIND_WORDS[spec.kind]} or leave the key "
            f"out for the default {spec.default!r}"
        )
    kind = spec.kind
    bad = None
    if kind == "int":
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not _is_int(value):
            bad = _KIND_WORDS["int"]
    elif kind == "float":
        if not _is_num(value):
            bad = _KIND_WORDS["float"]
        elif not math.isfinite(value):
            bad = "a finite number"
        else:
            value = float(value)
    elif kind == "bool":
        if not isinstance(value, bool):
            bad = _KIND_WORDS["bool"]
    elif kind == "str":
        if not isinstance(value, str):
            bad = _KIND_WORDS["str"]
    elif kind == "str_list":
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            bad = _KIND_WORDS["str_list"]
        else:
            value = list(value)
    elif kind == "float_list":
        if not isinstance(value, list | tuple) or not all(_is_num(v) for v in value):
            bad = _KIND_WORDS["float_list"]
        elif not all(math.isfinite(v) for v in value):
            bad = "a list of finite numbers"
        else:
            value = [float(v) for v in value]
    elif kind == "dict_list":
        if not isinstance(value, list | tuple) or not all(isinstance(v, Mapping) for v in value):
            bad = _KIND_WORDS["dict_list"]
        else:
            value = [dict(v) for v in value]
    if bad:
        raise ConfigError(f"{where}: key {key!r} must be {bad}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"{where}: key {key!r} must be one of {list(spec.choices)}, got {value!r}")
    return value


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(SCHEMA), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown config key {key!r}{hint}")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a JSON config file (not merged with defaults)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a directory: give the path of a JSON config file") from None
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    out = {}
    for key, value in raw.items():
        if key not in SCHEMA:
            raise _unknown(key, path)
        out[key] = _check(key, value, path)
    return out


def infer_task(path: str | os.PathLike | None) -> str | None:
    """The task named by an official config file name (``train-vqa-base-4gpu-adv.json`` -> ``vqa``)."""
    if path is None:
        return None
    name = os.path.basename(os.fspath(path)).lower()
    if name.startswith("pretrain"):
        return "pretrain"
    m = re.match(r"(?:train|demo)-([a-z0-9+]+)", name)
    if not m:
        return None
    word = m.group(1)
    word = _TASK_ALIASES.get(word, word)
    return word if word in TASKS else None


def normalize_task(task: str) -> str:
    t = _TASK_ALIASES.get(task, task)
    if t not in TASKS:
        raise ConfigError(f"key 'task' must be one of {list(TASKS)}, got {task!r}")
    return t


def resolve_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults <- ``base`` <- JSON file ``path`` <- ``overrides``; validated; ``task`` resolved.

    A batch size no source sets takes the task's default where its batches count examples
    (:data:`TASK_BATCH_DEFAULTS`), an ``lr_mul`` no source sets the authors' default for the task
    (:data:`TASK_LR_MUL_DEFAULTS`)."""
    cfg = {k: (list(v.default) if isinstance(v.default, list) else v.default) for k, v in SCHEMA.items()}
    given: set[str] = set()
    for src, where in ((base, "config"), (load_config(path) if path else None, None), (overrides, "override")):
        if not src:
            continue
        for key, value in src.items():
            if key not in SCHEMA:
                raise _unknown(key, where or os.fspath(path))
            cfg[key] = _check(key, value, where or os.fspath(path))
            given.add(key)
    if cfg["task"] is None:
        cfg["task"] = infer_task(path)
    if cfg["task"] is not None:
        cfg["task"] = normalize_task(cfg["task"])
    for key, value in TASK_BATCH_DEFAULTS.get(cfg["task"], {}).items():
        if key not in given or cfg[key] is None:
            cfg[key] = value
    if "lr_mul" not in given and cfg["task"] in TASK_LR_MUL_DEFAULTS:
        cfg["lr_mul"] = TASK_LR_MUL_DEFAULTS[cfg["task"]]
    if cfg["task"] == "retrieval" and (cfg["hard_neg_size"] or 0) > 0 and "train_batch_size" not in given:
        # positive pairs per optimizer step: train_itm_hard_negatives.py's default, not train_itm.py's
        cfg["train_batch_size"] = HARD_NEGATIVE_TRAIN_BATCH
    _validate(cfg)
    return cfg


def _validate(cfg: dict[str, Any]) -> None:
    def positive(key: str, allow_zero: bool = False) -> None:
        v = cfg[key]
        if v is not None and (v < 0 or (v == 0 and not allow_zero)):
            raise ConfigError(f"key {key!r} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for key in (
        "train_batch_size",
        "val_batch_size",
        "gradient_accumulation_steps",
        "num_train_steps",
        "adv_max_graphs",
    ):
        positive(key)
    for key in (
        "warmup_steps",
        "n_workers",
        "adv_max_norm",
        "adv_init_mag",
        "adv_kl_weight",
        "weight_decay",
        "adv_lr_txt",
        "adv_lr_img",
        "attack_eps",
        "attack_lr",
        "itm_ot_lambda",
        "max_val_examples",
        "keep_checkpoints",  # 0: keep all
        "hard_neg_size",  # 0: no hard-negative mining
    ):
        positive(key, allow_zero=True)
    for key in ("lr_mul", "negative_size", "inf_minibatch_size"):
        positive(key)
    if cfg["hard_neg_size"] > cfg["negative_size"]:
        raise ConfigError(
            f"key 'hard_neg_size' ({cfg['hard_neg_size']}) keeps the hardest of 'negative_size' "
            f"({cfg['negative_size']}) sampled negatives: it cannot be larger"
        )
    for key in ("valid_steps", "adv_steps", "log_steps", "attack_steps"):
        positive(key)
    if cfg["save_steps"] is not None:
        positive("save_steps")
    for key in ("mlm_prob", "mrm_prob", "itm_neg_prob"):
        if not 0.0 <= cfg[key] <= 1.0:
            raise ConfigError(f"key {key!r} is a probability: it must be in [0, 1], got {cfg[key]!r}")
    if not 0.0 <= cfg["dropout"] < 1.0:
        raise ConfigError(f"key 'dropout' must be in [0, 1), got {cfg['dropout']!r}")
    if len(cfg["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in cfg["betas"]):
        raise ConfigError(f"key 'betas' must be two numbers in [0, 1), got {cfg['betas']!r}")
    if cfg["learning_rate"] <= 0:
        raise ConfigError(f"key 'learning_rate' must be > 0, got {cfg['learning_rate']!r}")
    if cfg["fp16"] and cfg["bf16"]:
        raise ConfigError("keys 'fp16' and 'bf16' cannot both be true")
    mods = set(cfg["adv_modality"])
    if not mods or not mods <= {"text", "image", "alter"}:
        raise ConfigError(f"key 'adv_modality' must list text, image and/or alter, got {cfg['adv_modality']!r}")
    if "alter" in mods and mods != {"text", "image", "alter"}:
        raise ConfigError("key 'adv_modality': 'alter' needs both 'text' and 'image'")
    att = set(cfg["attack_modality"])
    if not att or not att <= {"text", "image"}:
        raise ConfigError(f"key 'attack_modality' must list text and/or image, got {cfg['attack_modality']!r}")
    texts = cfg["vcr_pretrain_texts"]
    if not texts or set(texts) - {"qa", "qar"} or len(set(texts)) != len(texts):
        raise ConfigError(f"key 'vcr_pretrain_texts' must list 'qa' and/or 'qar' once each, got {texts!r}")
    bad = {t for t in cfg["adv_pretrain_tasks"] if t.replace("-", "").replace("_", "") not in PRETRAIN_TASKS}
    if bad:
        raise ConfigError(f"key 'adv_pretrain_tasks' has unknown tasks {sorted(bad)}")
    for name in ("train_datasets", "val_datasets"):
        for i, ds in enumerate(cfg[name] or []):
            for need in ("db", "img", "tasks"):
                if need not in ds:
                    raise ConfigError(f"key {name!r}[{i}] needs {need!r}")
            extra = set(ds) - {"name", "db", "img", "tasks", "mix_ratio"}
            if extra:
                raise ConfigError(f"key {name!r}[{i}] has unknown keys {sorted(extra)}")
            for field_ in ("db", "img", "tasks"):
                value = ds[field_]
                if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
                    raise ConfigError(
                        f"key {name!r}[{i}]: {field_!r} must be a non-empty list of strings, got {value!r}"
                    )
            unknown = [t for t in ds["tasks"] if t.replace("-", "").replace("_", "") not in PRETRAIN_TASKS]
            if unknown:
                raise ConfigError(
                    f"key {name!r}[{i}]: unknown pre-training tasks {unknown}; expected {list(PRETRAIN_TASKS)}"
                )
            if "mix_ratio" in ds:
                ratios = ds["mix_ratio"]
                if not isinstance(ratios, list | tuple) or not all(_is_num(r) for r in ratios):
                    raise ConfigError(f"key {name!r}[{i}]: mix_ratio must be a list of numbers, got {ratios!r}")
                if not isinstance(ds["tasks"], list | tuple) or len(ratios) != len(ds["tasks"]):
                    raise ConfigError(f"key {name!r}[{i}]: mix_ratio and tasks differ in length")
                if not all(math.isfinite(r) and r >= 0 for r in ratios):
                    raise ConfigError(f"key {name!r}[{i}]: mix_ratio must be finite numbers >= 0, got {ratios!r}")
                if name == "train_datasets" and ratios and not any(r > 0 for r in ratios):
                    label = f" ({ds['name']!r})" if "name" in ds else ""
                    raise ConfigError(
                        f"key {name!r}[{i}]{label}: mix_ratio is all zeros, so none of its tasks would ever be "
                        "drawn: give at least one task a ratio > 0, or leave the entry out"
                    )


#: keys that set the training trajectory: a resumed run must keep the checkpoint's values. The others
#: (output paths and data locations, workers, logging, validation and checkpoint cadence, progress bar,
#: TensorBoard, device, evaluation settings, execution choices such as tf32 or compile_layers) may change.
#: ``model_config`` is a path: the trainer compares the model it builds with the one the checkpoint's weights
#: record instead.
RESUME_FIXED_KEYS = (
    "task",
    "max_txt_len",
    "conf_th",
    "max_bb",
    "min_bb",
    "num_bb",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_mul",
    "num_train_steps",
    "warmup_steps",
    "decay",
    "optim",
    "betas",
    "dropout",
    "weight_decay",
    "grad_norm",
    "seed",
    "fp16",
    "bf16",
    "adv_training",
    "adv_modality",
    "adv_lr_txt",
    "adv_lr_img",
    "adv_steps",
    "norm_type",
    "adv_max_norm",
    "adv_init_mag",
    "adv_kl_weight",
    "adv_clean_backward",
    "adv_graphed",
    "adv_max_graphs",  # under adv_graphed it sets token-counted tasks' padded shapes: compared only then
    "adv_kl_reduction",
    "adv_pretrain_tasks",
    "model",
    "use_img_type",
    "negative_size",
    "hard_neg_size",
    "margin",
    "mrm_prob",
    "itm_neg_prob",
    "itm_ot_lambda",
    "mlm_prob",
    "vcr_pretrain_texts",
    "mlp",
    "train_datasets",
)


def _trajectory_value(key: str, value: Any) -> Any:
    if key == "train_datasets" and value:
        # the task mix, not where the databases are
        return [{k: v for k, v in ds.items() if k not in ("db", "img")} for ds in value]
    return value


#: tasks whose token-counted training batches adv_max_graphs sizes under adv_graphed (the padded shapes are
#: fitted per graph budget); for the others it only caps the captured graphs
_PADDED_BY_GRAPHS = frozenset({"vqa", "ve", "nlvr2", "vcr", "pretrain"})


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for the :data:`RESUME_FIXED_KEYS` on which a checkpoint's
    configuration and the current one differ; keys the saved configuration lacks are not compared."""
    out = []
    for key in RESUME_FIXED_KEYS:
        if key not in saved or key not in current:
            continue
        if key == "adv_max_graphs" and not (
            (saved.get("adv_graphed") or current.get("adv_graphed")) and current.get("task") in _PADDED_BY_GRAPHS
        ):
            continue
        old, new = _trajectory_value(key, saved[key]), _trajectory_value(key, current[key])
        if old != new:
            out.append((key, saved[key], current[key]))
    return out


#: where the data is: free to change on resume (data moved to another disk), but a warning names the change,
#: since the run then assumes the same examples under the same keys
RESUME_DATA_KEYS = ("train_txt_dbs", "train_img_dbs", "train_txt_db", "train_img_db")


def resume_data_moves(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for the training data's locations that differ from the checkpoint's
    (:data:`RESUME_DATA_KEYS` and the ``db`` / ``img`` of ``train_datasets``)."""
    out = [(k, saved[k], current.get(k)) for k in RESUME_DATA_KEYS if k in saved and saved[k] != current.get(k)]
    old, new = saved.get("train_datasets") or [], current.get("train_datasets") or []
    for i, (a, b) in enumerate(zip(old, new, strict=False)):
        for k in ("db", "img"):
            if a.get(k) != b.get(k):
                out.append((f"train_datasets[{i}].{k}", a.get(k), b.get(k)))
    return out


def to_json(cfg: Mapping[str, Any]) -> str:
    """The resolved configuration as JSON, official key names, keys in schema order."""
    return json.dumps({k: cfg[k] for k in SCHEMA if k in cfg}, indent=4) + "\n"


# -- command line --------------------------------------------------------------------------------
def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<key>`` flag per config key (official spelling; ``--key-with-dashes`` also works).

    Flags default to "not given", so only explicit flags override the JSON file.
    """
    group = parser.add_argument_group("config keys (override the JSON file)")
    for key, spec in SCHEMA.items():
        names = [f"--{key}"]
        if "_" in key:
            names.append(f"--{key.replace('_', '-')}")
        kw: dict[str, Any] = {"dest": f"cfg__{key}", "default": argparse.SUPPRESS, "help": spec.help}
        if spec.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif spec.kind == "int":
            kw["type"] = int
        elif spec.kind == "float":
            kw["type"] = float
        elif spec.kind == "str_list":
            kw["nargs"] = "+"
        elif spec.kind == "float_list":
            kw["nargs"] = "+"
            kw["type"] = float
        elif spec.kind == "dict_list":
            kw["type"] = json.loads
            kw["metavar"] = "JSON"
        if spec.choices and spec.kind == "str":
            kw["choices"] = list(spec.choices)
        group.add_argument(*names, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k[len("cfg__") :]: v for k, v in vars(args).items() if k.startswith("cfg__")}


def dataset_pairs(cfg: Mapping[str, Any], split: str = "train") -> list[tuple[str, str]]:
    """(txt_db, img_db) pairs of a split from either the list keys or the single keys."""
    if split == "train":
        txts = cfg.get("train_txt_dbs") or ([cfg["train_txt_db"]] if cfg.get("train_txt_db") else [])
        imgs = cfg.get("train_img_dbs") or ([cfg["train_img_db"]] if cfg.get("train_img_db") else [])
    else:
        txts = [cfg[f"{split}_txt_db"]] if cfg.get(f"{split}_txt_db") else []
        imgs = [cfg[f"{split}_img_db"]] if cfg.get(f"{split}_img_db") else []
    if not txts:
        raise ConfigError(f"no {split} text database: set '{split}_txt_db'" + ("(s)" if split == "train" else ""))
    if len(imgs) == 1 and len(txts) > 1:
        imgs = imgs * len(txts)
    if len(imgs) != len(txts):
        raise ConfigError(f"{split}: {len(txts)} text databases but {len(imgs)} image databases")
    return list(zip(txts, imgs, strict=True))
