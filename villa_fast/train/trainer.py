"""The training loop: standard or VILLA adversarial fine-tuning and pre-training.

One optimizer step = the task's micro-batches per process (``Task.accumulation``:
``gradient_accumulation_steps`` unless the authors' script for the task accumulates otherwise, as
retrieval with hard negatives does). As in the authors' scripts, micro-batch gradients are summed
(not averaged) and the processes' sums are averaged (one all-reduce per optimizer step: their
horovod ``allreduce_`` averages by default); the result is multiplied by the task's loss scale (1
unless the task says otherwise), then the schedule sets the
learning rates, gradients are clipped to ``grad_norm`` and AdamW steps. A VILLA micro-batch runs the
adversarial step (``villa_fast.VillaStep``), which does its own backward passes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from villa_fast.tasks import DataContext, Task, build_task
from villa_fast.train import distributed as vdist
from villa_fast.train.checkpoint import (
    atomic_save_weights,
    atomic_write_text,
    checkpoint_model_config,
    latest_checkpoint,
    load_weights,
    read_train_state,
    rng_state,
    run_files,
    save_checkpoint,
    set_rng_state,
    step_checkpoints,
)
from villa_fast.train.config import NO_LR_MUL_TASKS, ConfigError, resume_data_moves, resume_differences, to_json
from villa_fast.train.optim import WarmupLinear, build_optimizer, set_dropout, zero_grads_of_stepped
from villa_fast.train.robust import EmbeddingAttack

__all__ = ["LoaderSource", "Trainer", "resolve_device", "set_seed"]

logger = logging.getLogger("villa_fast.train")


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The training device: ``auto`` (this process's GPU, else the CPU), or ``spec``; a bare ``cuda`` takes the
    process's local rank. Several processes cannot share one named GPU (``cuda:0`` for every rank would put them
    all on GPU 0): with ``world_size > 1`` a CUDA index is refused."""
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    elif dev.type == "cuda" and world_size > 1:
        raise ConfigError(
            f"device {spec!r} names one GPU for all {world_size} processes: use 'cuda' or 'auto' (each process "
            "takes the GPU of its local rank)"
        )
    return dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_iter(loader) -> Iterator[dict]:
    """One epoch of ``loader``. Creating a DataLoader iterator draws a seed from the global torch
    generator; that draw is kept out of the training RNG stream, so a run resumed mid-epoch (which
    creates its iterator at a different point) sees the same random numbers as an uninterrupted one."""
    it = iter(loader)
    with torch.random.fork_rng(devices=[]):
        first = next(it, None)
    if first is None:
        return
    yield first
    yield from it


class LoaderSource:
    """An endless stream of batches over epochs of one resumable loader."""

    def __init__(self, loader):
        self.loader = loader

    def batches(self) -> Iterator[dict]:
        empty = 0
        while True:
            # an epoch resumed right after its last batch yields nothing; two empty epochs in a row cannot
            empty += 1
            for batch in _epoch_iter(self.loader):
                empty = 0
                yield batch
            if empty > 1:
                n = len(getattr(self.loader, "dataset", ()) or ())
                raise ConfigError(
                    f"the training data yields no batch: its {n} examples do not fill one batch of train_batch_size "
                    "(the last incomplete batch is dropped, as the authors' samplers do; a token budget also needs "
                    "its examples to fit): lower train_batch_size or train on more data"
                )

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def _few(names: list[str], n: int = 5) -> str:
    """The first ``n`` names, and how many more."""
    head = ", ".join(names[:n])
    return head + (f" ... ({len(names) - n} more)" if len(names) > n else "")


def _append_text(path: Path, text: str) -> None:
    """Append ``text`` to ``path``; a failure names the file (a full disk's error carries no file name)."""
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


def _plain(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def tf32_wanted(setting: str, amp_dtype: torch.dtype | None) -> bool | None:
    """The TF32 choice for float32 matmuls on CUDA: True / False to set, None to leave torch's flag alone
    ("auto" without autocast)."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    if setting == "auto":
        return True if amp_dtype in (torch.float16, torch.bfloat16) else None
    raise ValueError(f"tf32 must be 'auto', 'on' or 'off', got {setting!r}")


class Trainer:
    """Builds model, optimizer, data and (optionally) the VILLA step from a resolved config.

    Args:
        cfg: a configuration from :func:`villa_fast.train.config.resolve_config`.
        task: the task glue (default: from ``cfg["task"]``).
        resume: continue from the newest checkpoint in ``output_dir/ckpt`` (if any). Without it, training
            refuses an ``output_dir`` that already holds checkpoints or a history of another run.
        quiet: no progress bar and no log lines (the history is still recorded).
    """

    def __init__(self, cfg: Mapping[str, Any], *, task: Task | None = None, resume: bool = False, quiet: bool = False):
        self.cfg = dict(cfg)
        self.task = task or build_task(self.cfg)
        self.quiet = quiet
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        dev = resolve_device(self.cfg["device"], int(os.environ.get("LOCAL_RANK", "0")), world)
        self.dist = vdist.init_distributed(dev.type)
        self.device = resolve_device(self.cfg["device"], self.dist.local_rank, self.dist.world_size)
        set_seed(self.cfg["seed"])
        self.ctx = DataContext(
            seed=self.cfg["seed"],
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=self.cfg["n_workers"],
            device=self.device,
        )
        self.output_dir = Path(self.cfg["output_dir"]) if self.cfg.get("output_dir") else None
        self._resume = resume
        self.model = self._build_model()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, self.cfg)
        if self.cfg["lr_mul"] != 1.0 and self.cfg["task"] in NO_LR_MUL_TASKS:
            logger.warning(
                "lr_mul %g multiplies the %s head's learning rate; the authors' %s script has no such multiplier",
                self.cfg["lr_mul"],
                self.cfg["task"],
                self.cfg["task"],
            )
        self.schedule = WarmupLinear(
            self.optimizer, self.cfg["learning_rate"], self.cfg["warmup_steps"], self.cfg["num_train_steps"]
        )
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self._set_tf32()
        self.adv_step = self._build_adv_step() if self.cfg["adv_training"] else None
        self._adv_skipped: Tensor | None = None  # this optimizer step's left-out adversarial steps
        self._skipped_since_log: Tensor | None = None
        # the log window: summed micro-batch losses (on the device) and their count since the last log entry;
        # checkpointed with the step, so that a resumed run logs what the uninterrupted one logs
        self._loss_sum = torch.zeros((), device=self.device)
        self._n_micro = 0
        self.accumulation = self._accumulation()
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self._source = None
        self._eval_loaders: dict[str, Any] = {}
        self._tb = None
        self._tb_purge: int | None = None  # set on resume: the step from which the old TensorBoard events go

    # -- construction ------------------------------------------------------------------------------
    def _build_model(self) -> nn.Module:
        from villa_fast.models import load_pretrained

        model = self.task.build_model()
        ckpt = self.cfg.get("checkpoint")
        if ckpt and self._resume and self._ckpt_dir() is not None and step_checkpoints(self._ckpt_dir()):
            # every weight comes from the training checkpoint: the initial weights file is not read (it may have
            # moved since the run started)
            self._log(f"resuming: the training checkpoint's weights replace the initial {ckpt}, which is not read")
            ckpt = None
        if ckpt:
            report = load_pretrained(model, ckpt)
            self._check_pretrained(model, ckpt, report)
            self._log(f"loaded {ckpt}: {report}")
        set_dropout(model, self.cfg["dropout"])
        if self.cfg["compile_layers"]:
            # the embedding block (where perturbations enter) stays eager; see UniterModel.compile_layers
            model.uniter.compile_layers()
        model.to(self.device)
        vdist.broadcast_params(model)
        model.train()
        return model

    def _check_pretrained(self, model: nn.Module, ckpt: str, report) -> None:
        """Initial weights that fit no key of the model are an error; encoder weights the model keeps at their
        random initialisation are a warning. A task head (the keys outside ``uniter.``) missing from the
        checkpoint is expected (a pre-trained checkpoint has none): the load report (INFO) lists it."""
        own = list(model.state_dict())
        missing = set(report.missing)
        if all(k in missing for k in own):
            from villa_fast.models.checkpoint import read_state_dict

            theirs = sorted(read_state_dict(ckpt))
            raise ConfigError(
                f"key 'checkpoint': no weight of {ckpt} fits the {type(model).__name__} of task {self.task.name}: "
                f"the file holds {_few(theirs) if theirs else 'no tensors'}, the model expects {_few(own)}. "
                "Point 'checkpoint' at UNITER/VILLA weights (official .pt or safetensors) or Hugging Face BERT "
                "weights, or leave it out to start from random initialisation"
            )
        encoder = [k for k in report.missing if k.startswith("uniter.")]
        if encoder and self.dist.is_main:
            logger.warning(
                f"{ckpt} lacks {len(encoder)} encoder weights of the model, which keep their random initialisation: "
                f"{_few(encoder)}"
            )

    def _set_tf32(self) -> None:
        """TF32 for the float32 matmuls left under autocast (the float32 embedding block's image projection).

        TF32 keeps 10 mantissa bits, as float16 does and 3 more than bfloat16, and makes that projection several
        times faster. It rounds the region features to that resolution; the image perturbation enters as its
        own product added to the projection's output (villa_fast.adversarial.hooks), so it is not rounded
        against the features. Plain float32 training keeps full float32 matmuls unless ``tf32`` is "on". Sets
        torch's global flag."""
        if self.device.type != "cuda":
            return
        want = tf32_wanted(self.cfg["tf32"], self.amp_dtype)
        if want is not None:
            torch.backends.cuda.matmul.allow_tf32 = want
            self._log(f"TF32 float32 matmuls {'on' if want else 'off'} (tf32={self.cfg['tf32']})")

    def _amp_dtype(self) -> torch.dtype | None:
        if self.cfg["bf16"]:
            return torch.bfloat16
        if self.cfg["fp16"]:
            if self.device.type == "cuda":
                return torch.float16
            if self.dist.is_main:
                logger.warning("fp16 needs a GPU: training in float32 on the %s", self.device.type.upper())
        return None

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _accumulation(self):
        acc = self.task.accumulation()
        n, scale = acc.micro_batches, acc.loss_scale
        bad_n = isinstance(n, bool) or not isinstance(n, int) or n < 1
        bad_scale = isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 < scale < math.inf
        if bad_n or bad_scale:
            raise ValueError(
                f"task {self.task.name}: micro-batches per optimizer step must be a positive integer and the loss "
                f"scale a positive number, got {n!r} and {scale!r}"
            )
        return acc

    def _build_adv_step(self):
        try:
            from villa_fast.adversarial import AdversarialConfig, GraphedVillaStep, VillaStep
        except ImportError as exc:  # pragma: no cover - depends on the installed package
            raise RuntimeError(f"adv_training needs villa_fast.adversarial ({exc})") from exc
        if not self.task.supports_adversarial:
            raise ValueError(f"task {self.task.name} has no adversarial training")
        c = self.cfg
        acfg = AdversarialConfig.from_villa_config(
            c,
            kl_reduction=c["adv_kl_reduction"] or self.task.kl_reduction,
            clean_backward=c["adv_clean_backward"],
            amp_dtype=self.amp_dtype,
        )
        m = self.model
        # graphed: the model's buffers are restored after each capture's warm-up with the rest
        extra = {"max_graphs": c["adv_max_graphs"], "model": m} if c["adv_graphed"] else {}
        cls = GraphedVillaStep if c["adv_graphed"] else VillaStep
        return cls(
            lambda b: self.task.forward(m, b),
            lambda z, b: self.task.loss(m, z, b),
            acfg,
            text_embedding=m.uniter.embeddings.word_embeddings,
            image_input=m.uniter.img_embeddings.img_linear,
            scaler=self.scaler,
            # every trainable parameter: pre-training tasks reach different heads
            params=self.params,
            kl_mask_fn=self.task.kl_mask,
            **extra,
        )

    # -- logging -----------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            logger.info(msg)

    def _on_main(self, what: str, fn):
        """``fn()`` on rank 0 (its result there, None elsewhere), called by every rank: a failure there (a full
        disk, a permission) is raised on every rank, instead of leaving the others waiting in the next
        collective until the process group's timeout."""
        out, err, failure = None, None, None
        if self.dist.is_main:
            try:
                out = fn()
            except Exception as exc:
                if not self.dist.enabled:
                    raise
                failure, err = exc, f"{type(exc).__name__}: {exc}"
        if self.dist.enabled:
            err = vdist.broadcast_object(err)
            if err is not None:
                if failure is not None:
                    raise failure
                raise RuntimeError(f"rank 0 failed to {what}: {err}")
        return out

    def _tensorboard(self):
        if self._tb is None and self.cfg["tensorboard"] and self.output_dir and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover
                self.cfg["tensorboard"] = False
                return None
            # a resumed run rewrites the steps after its checkpoint: the killed run's events past it are dropped
            # (the step is fixed when the run resumes: the writer opens at the first entry, steps later)
            purge = {"purge_step": self._tb_purge} if self._tb_purge is not None else {}
            self._tb = SummaryWriter(str(self.output_dir / "log"), **purge)
        return self._tb

    def _record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        tb = self._tensorboard()
        if tb is not None:
            for k, v in entry.items():
                if k != "step" and isinstance(v, int | float) and math.isfinite(v):
                    tb.add_scalar(k, v, entry["step"])
        if self.output_dir:
            path = self.output_dir / "log" / "history.jsonl"
            self._on_main(f"append to {path}", lambda: _append_text(path, json.dumps(entry) + "\n"))

    def _rewrite_history(self) -> None:
        """history.jsonl as of the loaded checkpoint: entries a killed run logged after it are dropped (its
        resumed continuation logs them again)."""
        if self.output_dir and self.dist.is_main:
            path = self.output_dir / "log" / "history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(json.dumps(e) + "\n" for e in self.history), encoding="utf-8")
            os.replace(tmp, path)

    # -- data --------------------------------------------------------------------------------------
    def _to_device(self, batch):
        from villa_fast.data import move_to_device

        return move_to_device(batch, self.device) if self.device.type != "cpu" else batch

    def source(self):
        if self._source is None:
            make = getattr(self.task, "train_source", None)
            self._source = make(self.ctx) if make else LoaderSource(self.task.train_loader(self.ctx))
        return self._source

    # -- one optimizer step ------------------------------------------------------------------------
    def micro_step(self, batch: dict) -> Tensor:
        """Forward and backward of one micro-batch (standard or adversarial); returns the detached loss."""
        with self._autocast():  # a task's own forwards before the step (hard-negative mining) in the run's precision
            batch = self.task.prepare(self.model, batch)
        use_adv = self.adv_step is not None and self.task.adversarial_for(batch)
        if use_adv:
            txt_mask, img_mask = self.task.adv_masks(batch)
            result = self.adv_step.step(self.task.step_batch(batch), txt_mask=txt_mask, img_mask=img_mask)
            # adversarial steps left out as non-finite never reach .grad, so the loss scaler cannot see them:
            # counted here (on the device) for its back-off and for the log
            skipped = result.skipped_steps.detach()
            self._adv_skipped = skipped.clone() if self._adv_skipped is None else self._adv_skipped.add_(skipped)
            return result.loss.detach().float()
        with self._autocast():
            logits = self.task.forward(self.model, batch)
            loss = self.task.loss(self.model, logits, batch)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.detach().float()

    def reduce_gradients(self) -> None:
        """Average the processes' gradients (each the sum of its micro-batches'), as the authors' horovod
        all-reduce does; nothing with one process."""
        vdist.all_reduce_grads(self.params, self.dist.world_size, average=True)

    def optimizer_step(self) -> dict[str, float | Tensor]:
        """All-reduce, loss scale, schedule, clip, step, zero: once per ``accumulation.micro_batches`` micro-batches.

        The loss scale multiplies the summed gradients once: the same, up to rounding (exactly for a power of
        two), as multiplying every micro-batch's loss by it, the VILLA step's whole objective (task loss and KL
        term) included, since the factor is one for the whole step."""
        self.reduce_gradients()
        # after the all-reduce: a parameter no rank has a gradient for, but stepped before, steps with zeros
        zero_grads_of_stepped(self.optimizer)
        if self.accumulation.loss_scale != 1.0:
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.accumulation.loss_scale)
        lr = self.schedule.step()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm: Tensor | float = float("nan")
        if self.cfg["grad_norm"] > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg["grad_norm"])
        skipped, self._adv_skipped = self._adv_skipped, None
        if self.adv_step is not None and self.dist.enabled:
            # summed over the ranks (on the device): every rank backs its loss scale off alike, as the gradients,
            # all-reduced while scaled, need one scale on all ranks; the log counts every rank's left-out steps
            if skipped is None:
                skipped = torch.zeros((), dtype=torch.int64, device=self.device)
            vdist.all_reduce_tensor_(skipped)
        if self.scaler is not None:
            if skipped is not None:
                # a left-out (overflowing) adversarial step skips the optimizer step and backs the scale off, as
                # the released loop's overflow in its accumulated gradients did (device-side, no sync)
                self.adv_step.skip_if_left_out(self.optimizer, skipped)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if skipped is not None:
            self._skipped_since_log = skipped if self._skipped_since_log is None else self._skipped_since_log + skipped
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return {"lr": lr, "grad_norm": grad_norm}

    # -- checkpoints -------------------------------------------------------------------------------
    def _ckpt_dir(self) -> Path | None:
        return self.output_dir / "ckpt" if self.output_dir else None

    def save(self) -> Path | None:
        """A training checkpoint of the current step (all ranks call it; rank 0 writes)."""
        if self._ckpt_dir() is None:
            return None
        rngs = vdist.all_gather_objects(rng_state())
        return self._on_main(f"write the step {self.global_step} checkpoint", lambda: self._write_checkpoint(rngs))

    def _write_checkpoint(self, rngs: list) -> Path:
        state = {
            "step": self.global_step,
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "rng": rngs,
            "data": self.source().state_dict(),
            "history": self.history,
            "log_window": {
                "loss_sum": float(self._loss_sum),
                "micro_batches": self._n_micro,
                "adv_skipped": int(self._skipped_since_log) if self._skipped_since_log is not None else 0,
            },
            "world_size": self.dist.world_size,
            "config": to_json(self.cfg),
        }
        return save_checkpoint(self._ckpt_dir(), self.global_step, self.model, state, keep=self.cfg["keep_checkpoints"])

    def load(self, path: str | os.PathLike) -> None:
        """Resume from the training checkpoint ``path`` (all ranks call it with the same path): its training state
        is read and checked against this run (:meth:`_read_resume_state`) before any weight is loaded."""
        self._restore(path, self._read_resume_state(path))

    def _read_resume_state(self, path: str | os.PathLike) -> dict:
        """The training state of ``path``, once it is known to fit this run: the same number of processes, the
        same trajectory keys and model (:meth:`_check_resume_config`). Loads and writes nothing, so a refused
        resume leaves the model and the run's files as they were; a changed model is reported as such, not as
        weights that do not fit."""
        # read on the CPU (the random states must be CPU tensors); the optimizer state goes to the parameters'
        # device as it loads
        state = read_train_state(path, map_location="cpu")
        if state["world_size"] != self.dist.world_size:
            raise ConfigError(
                f"cannot resume from {path}: it was written by a run with {state['world_size']} processes and this "
                f"run has {self.dist.world_size}; each process's data position and random state are saved, so "
                f"resume with {state['world_size']} processes, or start a new run in another or an empty output_dir"
            )
        saved = state.get("config")
        # without a saved configuration (a checkpoint from before it was saved) only the model is compared
        self._check_resume_config(path, (json.loads(saved) if isinstance(saved, str) else saved) or {})
        return state

    def _restore(self, path: str | os.PathLike, state: dict) -> None:
        """Load ``path``'s weights and apply its training state ``state`` (from :meth:`_read_resume_state`)."""
        load_weights(path, self.model, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.source().load_state_dict(state["data"])
        self.global_step = int(state["step"])
        self.history = list(state["history"])
        window = state.get("log_window", {})
        self._loss_sum.fill_(float(window.get("loss_sum", 0.0)))
        self._n_micro = int(window.get("micro_batches", 0))
        skipped = int(window.get("adv_skipped", 0))
        self._skipped_since_log = torch.tensor(skipped, device=self.device) if skipped else None
        set_rng_state(state["rng"][self.dist.rank])
        self._rewrite_history()
        self._log(f"resumed from {path} at step {self.global_step}")

    def _check_resume_config(self, path: str | os.PathLike, saved: Mapping[str, Any]) -> None:
        """The checkpoint's configuration and the current one agree on the keys that set the training
        trajectory (:data:`villa_fast.train.config.RESUME_FIXED_KEYS`), and on the model's architecture."""
        diffs = resume_differences(saved, self.cfg)
        moved = resume_data_moves(saved, self.cfg)
        if moved:
            logger.warning(
                "resuming from %s with the training data elsewhere (%s): the run continues as if the databases "
                "held the same examples under the same keys",
                path,
                "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in moved),
            )
        model = checkpoint_model_config(path)
        if model is not None:
            built_from = getattr(self.model, "source_config", None) or self.model.uniter.config
            now = json.loads(json.dumps(built_from.to_dict()))
            # the architecture; the *_impl fields choose kernels, not the model
            keys = sorted(k for k in set(model) | set(now) if not k.endswith("_impl") and model.get(k) != now.get(k))
            if keys:
                diffs.append(("model_config", {k: model.get(k) for k in keys}, {k: now.get(k) for k in keys}))
        if diffs:
            lines = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs)
            raise ConfigError(
                f"cannot resume from {path}: keys that set the training trajectory differ ({lines}). Resume with "
                "the checkpoint's values, or start a new run in another or an empty output_dir"
            )

    def resume_checkpoint(self) -> Path | None:
        """The checkpoint a resumed run continues from: rank 0's newest in ``output_dir/ckpt``, the same on
        every rank (None: none there, or no output_dir)."""
        if self._ckpt_dir() is None:
            return None
        last = latest_checkpoint(self._ckpt_dir()) if self.dist.is_main else None
        last = vdist.broadcast_object(str(last) if last is not None else None)
        return Path(last) if last is not None else None

    # -- training ----------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        """A new run (not resumed) refuses an output_dir where another run left checkpoints or a history:
        pruning, history.jsonl and a later resume would mix the two."""
        if self._resume or self.output_dir is None:
            return
        found = vdist.broadcast_object(run_files(self.output_dir) if self.dist.is_main else None)
        if found:
            raise ConfigError(
                f"output_dir {self.output_dir} already holds a training run ({_few(found)}): pass --resume "
                "(Trainer(resume=True)) to continue it, or set output_dir to another or an empty directory to "
                "start a new run"
            )

    def _open_data(self) -> None:
        """Open every database the run will read (training, and each split validation evaluates) before anything
        is written or trained: a wrong path or a malformed database stops the run at once, not at its first
        validation. Leaves the random streams as they were."""
        state = rng_state()
        try:
            self.source()
            for final in (False, True):
                for split in self.task.validation_splits(final=final):
                    self.eval_loader(split)
        finally:
            set_rng_state(state)

    def _check_run_files(self) -> None:
        """A resumed run keeps the files that define it: the task refuses a config that would write other ones
        (VQA: another answer vocabulary than the one its checkpoints were trained with). Checked on rank 0, which
        writes them; refused on every rank."""
        check = self.task.check_run_files
        if self.output_dir is None:
            return
        err, failure = None, None
        if self.dist.is_main:
            try:
                check(self.output_dir)
            except Exception as exc:  # every rank must leave the broadcast below, whatever rank 0 met
                failure = exc
                err = (isinstance(exc, ConfigError), str(exc) or type(exc).__name__)
        if self.dist.enabled:
            err = vdist.broadcast_object(err)
        if failure is not None:
            raise failure
        if err is not None:
            raise ConfigError(err[1]) if err[0] else RuntimeError(f"rank 0 failed to check the run files: {err[1]}")

    def _prepare_output(self) -> None:
        if self.output_dir:
            self._on_main(f"prepare output_dir {self.output_dir}", self._write_run_files)

    def _write_run_files(self) -> None:
        """The run's description (log/hps.json, log/model.json) and the task's run files, each written
        atomically: a failed write leaves the previous one whole."""
        if self.output_dir:
            for sub in ("ckpt", "log", "results"):
                (self.output_dir / sub).mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output_dir / "log" / "hps.json", to_json(self.cfg))
            # the config the model is built from (VCR's adds its rows to it again when rebuilt)
            mc = getattr(self.model, "source_config", self.model.uniter.config).to_dict()
            atomic_write_text(self.output_dir / "log" / "model.json", json.dumps(mc, indent=2))
            for rel, text in self.task.run_files().items():
                (self.output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.output_dir / rel, text)

    def train(self) -> list[dict[str, Any]]:
        """Train to ``num_train_steps``, validating and checkpointing every ``valid_steps`` /
        ``save_steps``; returns the history (one entry per log / validation)."""
        c = self.cfg
        self._check_output_dir()
        self._open_data()
        last = state = None
        if self._resume:
            # a resume is checked before anything is written: a refused one leaves the run's files as they were
            last = self.resume_checkpoint()
            if last is not None:
                state = self._read_resume_state(last)
                self._check_run_files()
        self._prepare_output()
        if self._resume:
            if last is not None:
                self._restore(last, state)
            else:
                self._rewrite_history()  # nothing to resume: a history left without a checkpoint starts over
                if self.dist.is_main:
                    logger.warning("resume: no checkpoint in %s: training starts from step 0", self._ckpt_dir())
            self._tb_purge = self.global_step + 1
        total, accum = c["num_train_steps"], self.accumulation.micro_batches
        save_every = c["save_steps"] or c["valid_steps"]
        pbar = None
        if c["progress"] and self.dist.is_main and not self.quiet:
            from tqdm import tqdm

            pbar = tqdm(total=total, initial=self.global_step, desc=f"{self.task.name}", dynamic_ncols=True)
        self.model.train()
        n_ex, t0 = 0, time.perf_counter()
        stream = self.source().batches()
        while self.global_step < total:
            for _ in range(accum):
                batch = self._to_device(next(stream))
                n_ex += self.task.n_examples(batch)
                self._loss_sum += self.micro_step(batch)
                self._n_micro += 1
            info = self.optimizer_step()
            step = self.global_step
            if step % c["log_steps"] == 0 or step == total:
                dt = time.perf_counter() - t0
                loss = float(self._loss_sum) / max(self._n_micro, 1)
                ex_s = n_ex * self.dist.world_size / max(dt, 1e-9)
                gn = info["grad_norm"]
                entry = {"step": step, "loss": loss, "lr": info["lr"], "ex_per_s": ex_s, "grad_norm": float(gn)}
                if self.adv_step is not None:
                    # adversarial steps left out as non-finite since the last log (read here only)
                    entry["adv_skipped"] = int(self._skipped_since_log) if self._skipped_since_log is not None else 0
                    self._skipped_since_log = None
                self._record(entry)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{ex_s:.0f}")
                self._loss_sum.zero_()
                self._n_micro, n_ex, t0 = 0, 0, time.perf_counter()
            if pbar is not None:
                pbar.update(1)
            if step % c["valid_steps"] == 0 or step == total:
                for split in self.task.validation_splits(final=step == total):
                    metrics = self.evaluate(split, write_predictions=True)
                    self._record({"step": step, **{f"{split}/{k}": v for k, v in metrics.items()}})
                    where = "" if split == self.task.validation_split(final=step == total) else f" {split}"
                    self._log(f"step {step}{where}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                t0 = time.perf_counter()  # validation time is not training throughput
            if step % save_every == 0 or step == total:
                self.save()
        if pbar is not None:
            pbar.close()
        stats = getattr(self.adv_step, "stats", None)
        if stats is not None:
            st = stats()
            self._log(
                f"graphed VILLA step: {st['graphs']} batch shapes captured, {st['eager_signatures']} run eagerly "
                f"(adv_max_graphs={self.cfg['adv_max_graphs']})"
            )
        if self._tb is not None:
            self._tb.flush()
        if self.output_dir:
            final = self.output_dir / "ckpt" / "model_final.safetensors"
            self._on_main(f"write {final}", lambda: atomic_save_weights(self.model, final))
        return self.history

    # -- evaluation --------------------------------------------------------------------------------
    def eval_loader(self, split: str):
        if split not in self._eval_loaders:
            self._eval_loaders[split] = self.task.eval_loader(self.ctx, split)
        return self._eval_loaders[split]

    def attack(self) -> EmbeddingAttack:
        c = self.cfg
        m = self.model
        return EmbeddingAttack(
            m.uniter.embeddings.word_embeddings,
            m.uniter.img_embeddings.img_linear,
            steps=c["attack_steps"],
            eps=c["attack_eps"],
            lr=c["attack_lr"],
            modalities=c["attack_modality"],
            norm_type=c["norm_type"],
        )

    def evaluate(
        self,
        split: str = "val",
        *,
        robust: bool = False,
        write_predictions: bool = False,
        predictions_prefix: str | None = None,
    ) -> dict:
        """Metrics on ``split`` (all ranks take part; every rank returns the same numbers).

        With ``robust``, also the metrics under :class:`EmbeddingAttack`, keys prefixed ``robust_``.
        ``write_predictions`` writes the clean predictions under ``output_dir/results``;
        ``predictions_prefix`` writes them to that path prefix instead (the task picks the extension).
        """
        task, model = self.task, self.model
        if robust and not task.supports_robust:
            raise ValueError(f"task {task.name} has no robust evaluation")
        was_training = model.training
        model.eval()
        attack = self.attack() if robust else None
        clean, adv = task.eval_init(), task.eval_init()
        limit = self.cfg["max_val_examples"]
        if limit:  # a cap over all processes: each takes its share (a batch may overshoot it)
            limit = -(-int(limit) // self.dist.world_size)
        # evaluation draws nothing from the training random stream (loader seeds, the attack's initial
        # perturbation): a run validated at another cadence, or resumed with another valid_steps, trains alike
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices):
            self._evaluate_loop(split, model, attack, clean, adv, limit, was_training)
        clean = self._reduce(clean)  # every rank's examples
        out = task.eval_finish(clean)
        if attack is not None:
            out.update({f"robust_{k}": v for k, v in task.eval_finish(self._reduce(adv)).items() if k != "n"})
        if predictions_prefix or (write_predictions and self.output_dir):
            name = f"results_{self.global_step}" if split != "test" else f"test_results_{self.global_step}"
            prefix = predictions_prefix or str(self.output_dir / "results" / name)

            def write() -> None:
                Path(prefix).parent.mkdir(parents=True, exist_ok=True)
                task.write_predictions(clean["pred"], prefix)

            self._on_main(f"write the predictions {prefix}", write)
        return _plain(out)

    def _evaluate_loop(self, split, model, attack, clean, adv, limit, was_training) -> None:
        task = self.task
        try:
            for batch in _epoch_iter(self.eval_loader(split)):
                batch = task.prepare(model, self._to_device(batch))
                with torch.no_grad(), self._autocast():
                    logits = task.forward(model, batch)
                task.eval_batch(clean, model, logits, batch)
                if attack is not None:
                    if not task.has_labels(batch):
                        raise ConfigError(
                            f"robust evaluation attacks the loss against the gold labels, and the {split!r} split "
                            f"of task {task.name} has examples without one (a test split): evaluate it without "
                            "robust"
                        )
                    with self._autocast():
                        z = attack(lambda b: task.forward(model, b), lambda z, b: task.attack_loss(model, z, b), batch)
                    task.eval_batch(adv, model, z, batch)
                if limit and clean["n"] >= limit:
                    break
        finally:
            model.train(was_training)
            self.eval_loader(split).load_state_dict({"epoch": 0, "batch_index": 0})

    def _reduce(self, state: dict) -> dict:
        if not self.dist.enabled:
            return state
        keys = [k for k, v in state.items() if isinstance(v, int | float)]
        sums = vdist.all_reduce_sum([float(state[k]) for k in keys], self.device)
        out = dict(state)
        out.update(zip(keys, sums, strict=True))
        for k, v in state.items():
            if isinstance(v, list):
                out[k] = [x for part in vdist.all_gather_objects(v) for x in part]
        return out

    def close(self) -> None:
        """Flush the logs and leave the process group (a gloo group left open aborts at exit)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        import torch.distributed as dist

        if self.dist.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
