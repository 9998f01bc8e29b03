"""Time and peak memory per optimizer step of the VILLA adversarial step against its baselines.

Model (``--model``): ``uniter`` (default) is the library's ``villa_fast.models.UniterForVqa``, what users
train; ``local`` is a self-contained UNITER-like encoder defined here (SDPA attention, VQA head), kept for
comparison with earlier runs. Both read the same batch dict (the UNITER data modules' keys: input_ids,
position_ids, img_feat, img_pos_feat, attn_masks, gather_index, targets), 24 text tokens + 36 regions per
row, no padding. Every variant trains its own copy of one model (same initial weights), K = 3, text + image
perturbed, adv lr 1e-3, alpha 1.5, gradient clipping at 2.0, AdamW, one optimizer step per micro-batch.
The text delta is added to the output of the word embedding in every variant. The image delta: the
released transcription adds it to the raw region features (the input of the image linear layer); the
villa_fast variants inject it as the library does, at that layer's output as ``W delta`` (the same function
and gradients, kept clear of the features' TF32 rounding) when the layer is an ``nn.Linear``, as it is here.

  released    the released loop transcribed (VILLA_SPEC section 2): zero init, clean logits kept in the
              graph, backward with retain_graph at every step; on a GPU fp16 autocast + GradScaler with
              the loss scale read back from the host as the released code does; on the yardstick's model
              (hand-written attention, the embeddings under autocast) rather than this library's defaults
  villa-once  VillaStep, clean_backward="once" (the default)
  villa-per   VillaStep, clean_backward="per_step" (same gradients, released cost)
  graphed     GraphedVillaStep with clipping and the fused capturable AdamW inside the graph (eager on CPU)
  graphed+compile
              the same on a copy whose encoder layers run through torch.compile (UniterModel.compile_layers;
              ``uniter`` model only)
  graphed+fused-ln
              the same with layer_norm_impl="fused": residual add + LayerNorm in one kernel
              (villa_fast.ops.add_layer_norm; ``uniter`` model only)
  villa-recompute
              VillaStep with clean_backward="recompute": the clean pass's activations are not kept through the
              K steps (one more forward, less memory)
  graphed+recompute
              GraphedVillaStep with clean_backward="recompute": the clean pass draws from its own registered
              generator states, so its recomputation replays the same dropout masks inside the graph
              (these four are on by default on a GPU; ``--extra compile,fused-ln,recompute`` on the CPU)
  standard    one non-adversarial step: forward, task loss, backward, clipping, AdamW
  standard (graphed)
              the same step captured in one CUDA graph with the capturable AdamW (GPU only): the like-for-like
              baseline of the graphed VILLA step, where the eager standard step is bound by kernel launches

Runs alternate between variants (one timed step each per round) and the median over rounds is reported,
with the ratio of the released loop's time to each variant (speed-up) and of each variant's time to the
standard step (cost). GPU: UNITER-base size at B = 32 and 128, bf16 for villa_fast and the standard step;
CPU: a 4 x 256 model at B = 16 in fp32. Results go to bench/out/bench_step_<model><tag>.{csv,md}.

    python -m bench.bench_step [--model uniter|local] [--rounds N] [--batches 32,128] [--tiny] [--threads N]
                               [--extra compile,fused-ln,recompute] [--only graphed,standard] [--tag _x]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import functools
import gc
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench._common import ops_backends
from villa_fast import AdversarialConfig, GraphedVillaStep, VillaStep
from villa_fast.adversarial.graphed import clip_grad_norm_capturable_
from villa_fast.models import UniterConfig, UniterForVqa

MODELS = ("uniter", "local")
TXT_LEN, N_REGIONS = 24, 36
K, LR_ADV, ALPHA, CLIP = 3, 1e-3, 1.5, 2.0

# ------------------------------------------------------------------------------------------------ models


@dataclass
class ModelCfg:
    """Sizes shared by both models; the defaults are UNITER-base (``UniterConfig.base()``) with the VQA head."""

    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    vocab: int = 28996
    img_dim: int = 2048
    box_dim: int = 7
    n_ans: int = 3129
    dropout: float = 0.1


def model_cfg(size: str) -> ModelCfg:
    """``gpu``: UNITER-base; ``cpu``: 4 x 256 (same vocabulary, image and answer sizes); ``tiny``: 2 x 64."""
    if size == "gpu":
        return ModelCfg()
    if size == "cpu":
        return ModelCfg(hidden=256, layers=4, heads=4, ffn=1024)
    if size == "tiny":
        return ModelCfg(hidden=64, layers=2, heads=4, ffn=128, vocab=500, img_dim=96, n_ans=50)
    raise ValueError(f"unknown size {size!r}")


def uniter_config(c: ModelCfg) -> UniterConfig:
    return UniterConfig.base(
        vocab_size=c.vocab,
        hidden_size=c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        intermediate_size=c.ffn,
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.dropout,
        img_dim=c.img_dim,
        pos_dim=c.box_dim,
    )


class Block(nn.Module):
    """Post-LN transformer block (BERT layout) with fused scaled-dot-product attention."""

    def __init__(self, c: ModelCfg) -> None:
        super().__init__()
        self.heads = c.heads
        self.p = c.dropout
        self.qkv = nn.Linear(c.hidden, 3 * c.hidden)
        self.proj = nn.Linear(c.hidden, c.hidden)
        self.ln_attn = nn.LayerNorm(c.hidden, eps=1e-12)
        self.up = nn.Linear(c.hidden, c.ffn)
        self.down = nn.Linear(c.ffn, c.hidden)
        self.ln_ffn = nn.LayerNorm(c.hidden, eps=1e-12)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.p if self.training else 0.0
        )
        x = self.ln_attn(x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d))))
        return self.ln_ffn(x + self.drop(self.down(F.gelu(self.up(x)))))


class UniterLike(nn.Module):
    """Single-stream text + region encoder of UNITER's shape (VILLA_SPEC section 4), with a VQA head.

    Perturbations enter by hooks on ``word`` (output) and ``img_proj`` (input).
    """

    def __init__(self, c: ModelCfg) -> None:
        super().__init__()
        h = c.hidden
        self.word = nn.Embedding(c.vocab, h)
        self.pos = nn.Embedding(512, h)
        self.typ = nn.Embedding(2, h)
        self.txt_ln = nn.LayerNorm(h, eps=1e-12)
        self.img_proj = nn.Linear(c.img_dim, h)
        self.img_ln = nn.LayerNorm(h, eps=1e-12)
        self.box_proj = nn.Linear(c.box_dim, h)
        self.box_ln = nn.LayerNorm(h, eps=1e-12)
        self.img_out_ln = nn.LayerNorm(h, eps=1e-12)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.pooler = nn.Linear(h, h)
        self.head = nn.Sequential(
            nn.Linear(h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=1e-12), nn.Linear(2 * h, c.n_ans)
        )

    def forward(self, ids: Tensor, img: Tensor, box: Tensor, mask: Tensor) -> Tensor:
        w = self.word(ids)
        pos = torch.arange(ids.shape[1], device=ids.device)
        t = self.drop(self.txt_ln(w + self.pos(pos) + self.typ.weight[0]))
        i = self.img_ln(self.img_proj(img)) + self.box_ln(self.box_proj(box)) + self.typ.weight[1]
        x = torch.cat([t, self.drop(self.img_out_ln(i))], 1)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for blk in self.blocks:
            x = blk(x, bias)
        return self.head(torch.tanh(self.pooler(x[:, 0])))


def _uniter_forward(model: UniterForVqa, batch: dict) -> Tensor:
    return model(batch)


def _local_forward(model: UniterLike, batch: dict) -> Tensor:
    return model(batch["input_ids"], batch["img_feat"], batch["img_pos_feat"], batch["attn_masks"])


@dataclass
class Setup:
    """One model to benchmark: the base weights every variant copies, and where its perturbations enter."""

    kind: str
    cfg: ModelCfg
    model: nn.Module
    forward: Callable[[nn.Module, dict], Tensor]
    text_module: Callable[[nn.Module], nn.Module]
    image_module: Callable[[nn.Module], nn.Module]

    def describe(self) -> str:
        return describe(self.kind, self.cfg)


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def describe(kind: str, c: ModelCfg) -> str:
    if kind == "uniter":
        u = uniter_config(c)
        emb = "fp32 embedding block" if u.fp32_embeddings else "embeddings under autocast"
        what = f"villa_fast.models.UniterForVqa (attention {u.attn_impl}, {emb})"
    else:
        what = "local UniterLike (bench/bench_step.py)"
    return f"model {what}, {c.layers} x {c.hidden}, img_dim {c.img_dim}, {c.n_ans} answers"


def build_setup(kind: str, c: ModelCfg, device: torch.device, dtype: torch.dtype = torch.float32) -> Setup:
    """The base model (train mode) of ``kind``; seed the global generator first for reproducible weights."""
    if kind == "uniter":
        with torch.device(device):
            model = UniterForVqa(uniter_config(c), num_answer=c.n_ans)
        return Setup(
            kind,
            c,
            model.to(dtype=dtype).train(),
            _uniter_forward,
            lambda m: m.uniter.embeddings.word_embeddings,
            lambda m: m.uniter.img_embeddings.img_linear,
        )
    if kind == "local":
        with torch.device(device):
            model = UniterLike(c)
        return Setup(kind, c, model.to(dtype=dtype).train(), _local_forward, lambda m: m.word, lambda m: m.img_proj)
    raise ValueError(f"unknown model {kind!r}; choose one of {MODELS}")


def make_batch(c: ModelCfg, b: int, device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """B rows of 24 text tokens + 36 regions, no padding, in the UNITER data modules' batch format."""
    g = torch.Generator().manual_seed(0)
    total = TXT_LEN + N_REGIONS
    batch = {
        "input_ids": torch.randint(min(100, c.vocab // 2), c.vocab, (b, TXT_LEN), generator=g),
        "position_ids": torch.arange(TXT_LEN).unsqueeze(0),
        "img_feat": torch.rand(b, N_REGIONS, c.img_dim, generator=g, dtype=dtype) * 2.0,
        "img_pos_feat": torch.rand(b, N_REGIONS, c.box_dim, generator=g, dtype=dtype),
        "attn_masks": torch.ones(b, total, dtype=torch.long),
        "gather_index": torch.arange(total).unsqueeze(0).repeat(b, 1),
        "targets": (torch.rand(b, c.n_ans, generator=g) < 2.0 / c.n_ans).to(dtype),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _logits(z: Tensor) -> Tensor:
    """Logits for the losses: float32 (float64 stays float64)."""
    return z if z.dtype == torch.float64 else z.float()


def vqa_loss(logits: Tensor, batch: dict) -> Tensor:
    """``UniterForVqa.loss``: BCE-with-logits (mean) x number of answers, in float32 (float64 stays)."""
    z = _logits(logits)
    t = batch["targets"]
    return F.binary_cross_entropy_with_logits(z, t.to(z.dtype)) * t.shape[1]


# ------------------------------------------------------------------------------------- the variants


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


class ReleasedInjection:
    """The released code's injection points on the transcription's own model copy: the text delta is added
    to the word-embedding output, the image delta to the raw region features entering the image linear
    layer. The hooks add nothing while no delta is set (the clean pass)."""

    def __init__(self, text_module: nn.Embedding, image_module: nn.Module) -> None:
        self.hidden = text_module.embedding_dim
        self.text: Tensor | None = None
        self.image: Tensor | None = None
        text_module.register_forward_hook(self._text)
        image_module.register_forward_pre_hook(self._image)

    def _text(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor | None:
        return None if self.text is None else out + self.text

    def _image(self, module: nn.Module, args: tuple) -> tuple | None:
        return None if self.image is None else (args[0] + self.image, *args[1:])


def released_grads(
    model: nn.Module,
    forward: Callable[[nn.Module, dict], Tensor],
    inj: ReleasedInjection,
    scaler: torch.amp.GradScaler | None,
    amp_dtype: torch.dtype | None,
    batch: dict,
) -> None:
    """The released loop's gradient part (VILLA_SPEC section 2): zero init, clean logits in the graph,
    retain_graph every step, the loss scale read back from the host; parameter gradients go to ``.grad``."""
    ids, img = batch["input_ids"], batch["img_feat"]
    device = ids.device
    ddt = torch.float64 if img.dtype == torch.float64 else torch.float32
    dt = torch.zeros(*ids.shape, inj.hidden, dtype=ddt, device=device)
    di = torch.zeros(img.shape, dtype=ddt, device=device)
    with _autocast(device, amp_dtype):
        clean = _logits(forward(model, batch))
    clean_p, clean_lp = F.softmax(clean, 1), F.log_softmax(clean, 1)
    target = batch["targets"].to(clean.dtype)
    n_ans = target.shape[1]
    for step in range(K):
        dt.requires_grad_()
        di.requires_grad_()
        inj.text, inj.image = dt, di
        try:
            with _autocast(device, amp_dtype):
                out = _logits(forward(model, batch))
        finally:
            inj.text = inj.image = None
        task = F.binary_cross_entropy_with_logits(out, target) * n_ans
        kl = F.kl_div(F.log_softmax(out, 1), clean_p, reduction="none") + F.kl_div(
            clean_lp, F.softmax(out, 1), reduction="none"
        )
        loss = (task + ALPHA * kl.mean() * n_ans) / K
        if scaler is not None:
            scaled = scaler.scale(loss)
            scaled.backward(retain_graph=True)
            amp_scale = scaled.item() // loss.item()
        else:
            loss.backward(retain_graph=True)
            amp_scale = 1.0
        if step == K - 1:
            break
        new = []
        for d in (dt, di):
            g = d.grad.detach() / amp_scale
            den = torch.norm(g.reshape(g.shape[0], -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
            new.append((d + LR_ADV * g / den).detach())
        dt, di = new


def standard_grads(model: nn.Module, forward: Callable, amp_dtype: torch.dtype | None, batch: dict) -> None:
    with _autocast(batch["input_ids"].device, amp_dtype):
        logits = forward(model, batch)
    vqa_loss(logits, batch).backward()


def optimizer_step(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip at 2.0 (after unscaling), AdamW step, zero grads: the released code's accumulation boundary."""
    if scaler is not None:
        scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def villa_cfg(clean: str, dtype: torch.dtype | None) -> AdversarialConfig:
    return AdversarialConfig(
        steps=K,
        lr_txt=LR_ADV,
        lr_img=LR_ADV,
        kl_weight=ALPHA,
        modality="text+image",
        kl_reduction="batchmean",
        clean_backward=clean,
        amp_dtype=dtype,
    )


@dataclass
class Variant:
    """One way of training a copy of the base model.

    ``run()`` is one whole optimizer step; ``grads()`` is its gradient part only (added to ``.grad``, no
    clipping, no optimizer step), for checking that the variants compute the same gradients. ``note()``, if
    given, says after the timing how the variant ran when that differs from its name.
    """

    model: nn.Module
    run: Callable[[], object]
    grads: Callable[[], object]
    note: Callable[[], str] | None = None
    # the same step run eagerly, for the peak-memory column of a graphed variant: a replay allocates nothing
    # (its memory sits in the graph's private pool since the capture), the eager step allocates what it holds
    memory_run: Callable[[], object] | None = None


EXTRAS = ("compile", "fused-ln", "recompute")


def build_variants(
    setup: Setup, batch: dict, device: torch.device, extra: tuple[str, ...] | None = None
) -> dict[str, Variant]:
    """Every variant on its own deep copy of ``setup.model`` (same initial weights).

    ``extra``: optional variants (``compile``); default: all of them on a GPU, none on the CPU.
    """
    cuda = device.type == "cuda"
    if extra is None:
        extra = EXTRAS if cuda else ()
    unknown = set(extra) - set(EXTRAS)
    if unknown:
        raise ValueError(f"unknown extra variant(s) {sorted(unknown)}; choose from {EXTRAS}")
    low = torch.bfloat16 if cuda else None
    fwd = setup.forward
    variants: dict[str, Variant] = {}

    def adamw(m: nn.Module, capturable: bool = False) -> torch.optim.Optimizer:
        if cuda and capturable:
            return torch.optim.AdamW(m.parameters(), lr=torch.tensor(5e-5, device=device), fused=True, capturable=True)
        return torch.optim.AdamW(m.parameters(), lr=5e-5, fused=cuda)

    def released_copy() -> nn.Module:
        # the 2020 model the yardstick's faithful row runs: hand-written attention, embeddings under autocast
        # (this library's defaults, SDPA and float32 embeddings, would change the baseline's launch count)
        base = setup.model
        if not isinstance(base, UniterForVqa):
            return copy.deepcopy(base)
        with torch.device(device):
            m = UniterForVqa(
                base.uniter.config.replace(attn_impl="plain", fp32_embeddings=False), num_answer=setup.cfg.n_ans
            )
        m.load_state_dict(base.state_dict())
        return m.to(dtype=next(base.parameters()).dtype).train(base.training)

    m = released_copy()
    opt = torch.optim.AdamW(m.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    inj = ReleasedInjection(setup.text_module(m), setup.image_module(m))
    grads = functools.partial(released_grads, m, fwd, inj, scaler, torch.float16 if cuda else None, batch)

    def run_released(grads=grads, m=m, opt=opt, scaler=scaler):
        grads()
        optimizer_step(m, opt, scaler)

    variants["released"] = Variant(m, run_released, grads)

    eager = [("villa-once", "once"), ("villa-per", "per_step")]
    if "recompute" in extra:
        eager.append(("villa-recompute", "recompute"))
    for name, clean in eager:
        m = copy.deepcopy(setup.model)
        opt = adamw(m)
        vs = VillaStep(
            functools.partial(fwd, m),
            vqa_loss,
            villa_cfg(clean, low),
            text_embedding=setup.text_module(m),
            image_input=setup.image_module(m),
        )
        grads = functools.partial(vs.step, batch)

        def run_villa(grads=grads, m=m, opt=opt):
            grads()
            optimizer_step(m, opt)

        variants[name] = Variant(m, run_villa, grads)

    def fused_ln_copy() -> nn.Module:
        base = setup.model
        with torch.device(device):
            m = UniterForVqa(base.uniter.config.replace(layer_norm_impl="fused"), num_answer=setup.cfg.n_ans)
        m.load_state_dict(base.state_dict())
        return m.to(dtype=next(base.parameters()).dtype).train(base.training)

    def plain_copy() -> nn.Module:
        return copy.deepcopy(setup.model)

    def compiled_copy() -> nn.Module:
        m = copy.deepcopy(setup.model)
        # static shapes: each batch size gets kernels specialised to it (training with varying shapes would
        # leave the default, which turns the batch and length dimensions symbolic after a second shape)
        m.uniter.compile_layers(dynamic=False)
        return m

    graphed = [("graphed", plain_copy, "once")]
    if setup.kind == "uniter":
        if "compile" in extra:
            graphed.append(("graphed+compile", compiled_copy, "once"))
        if "fused-ln" in extra:
            graphed.append(("graphed+fused-ln", fused_ln_copy, "once"))
    if "recompute" in extra:
        graphed.append(("graphed+recompute", plain_copy, "recompute"))
    for name, make, clean in graphed:
        m = make()
        gs = GraphedVillaStep(
            functools.partial(fwd, m),
            vqa_loss,
            villa_cfg(clean, low),
            text_embedding=setup.text_module(m),
            image_input=setup.image_module(m),
            optimizer=adamw(m, capturable=True),
            max_grad_norm=CLIP,
        )
        variants[name if cuda else f"{name} (eager on CPU)"] = Variant(
            m,
            functools.partial(gs.step, batch),
            functools.partial(gs.step, batch, optimizer_step=False),
            note=lambda gs=gs: "" if gs.graphed or not cuda else "capture failed: ran eagerly",
            memory_run=functools.partial(gs._full, batch, None, None, True, keep_grads=True),
        )

    m = copy.deepcopy(setup.model)
    opt = adamw(m)
    grads = functools.partial(standard_grads, m, fwd, low, batch)

    def run_standard(grads=grads, m=m, opt=opt):
        grads()
        optimizer_step(m, opt)

    variants["standard"] = Variant(m, run_standard, grads)

    if cuda:
        m = copy.deepcopy(setup.model)
        gstd = GraphedStandard(m, fwd, low, batch, adamw(m, capturable=True))
        variants["standard (graphed)"] = Variant(
            m, gstd.run, functools.partial(standard_grads, m, fwd, low, batch), note=gstd.note, memory_run=gstd._step
        )
    return variants


class GraphedStandard:
    """The standard step (forward, loss, backward, capturable clipping, fused capturable AdamW, zeroing the
    gradients in place) captured in one CUDA graph after a warm-up on a side stream; eager if capture fails."""

    def __init__(self, model: nn.Module, fwd: Callable, amp_dtype: torch.dtype | None, batch: dict, opt) -> None:
        self.model, self.fwd, self.amp_dtype, self.batch, self.opt = model, fwd, amp_dtype, batch, opt
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = ""

    def _step(self) -> None:
        standard_grads(self.model, self.fwd, self.amp_dtype, self.batch)
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip_grad_norm_capturable_(params, CLIP)
        self.opt.step()
        torch._foreach_zero_([p.grad for p in params])  # in place: the graph keeps writing the same tensors

    def run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self.failed:
            self._step()
            return
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # allocate the gradients and the optimizer state outside the graph
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._step()
        except Exception as exc:  # report it in the table, keep timing the eager step
            self.failed = f"capture failed ({type(exc).__name__}): ran eagerly"
            return
        self.graph = graph

    def note(self) -> str:
        return self.failed


# ---------------------------------------------------------------------------------------------- timing


class CudaContextLost(RuntimeError):
    """A variant's error left the CUDA context unusable (a sticky error: an illegal address, a device-side
    assert): nothing more can run in this process. ``results`` holds what was timed before it, ``notes`` says
    which of those have fewer rounds than asked."""

    def __init__(self, msg: str, results: dict[str, dict], notes: dict[str, str]) -> None:
        super().__init__(msg)
        self.results, self.notes = results, notes


def _device_usable(cuda: bool) -> bool:
    """False when the CUDA context is lost: after a sticky error every CUDA call raises it again."""
    if not cuda:
        return True
    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    except Exception as exc:
        print(
            f"CUDA context lost: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True


def _failure(name: str, exc: BaseException, failed: dict[str, str], cuda: bool) -> bool:
    """Record a variant that raised: the table says why, and the others are still timed. Returns False when the
    error left the CUDA context unusable (nothing else can be timed)."""
    failed[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
    print(f"variant {name} {failed[name]}", file=sys.stderr, flush=True)
    return _device_usable(cuda)


def _progress(msg: str) -> None:
    """A flushed line per stage, so that a run stopped by its phase's timeout shows where it hung."""
    print(msg, file=sys.stderr, flush=True)


def time_variants(
    variants: dict[str, Variant], rounds: int, warmup: int, device: torch.device, failed: dict[str, str] | None = None
) -> dict[str, dict]:
    """Median, p20/p80 and peak memory per variant. A variant that raises (a compile or capture error, out of
    memory) is left out of the rest of the timing and named in ``failed`` with its error. An error that leaves
    the CUDA context unusable raises :class:`CudaContextLost` holding the variants timed in every round so far
    (their statistics over those rounds), the others named in ``failed``."""
    cuda = device.type == "cuda"
    failed = {} if failed is None else failed
    variants = dict(variants)
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {}

    def lost(culprit: str, r: int) -> CudaContextLost:
        why = f"the CUDA context was lost after {culprit}'s error"
        done = {k: v for k, v in variants.items() if k not in failed and r > 0 and len(times[k]) >= r}
        for k in variants:
            if k not in failed and k not in done:
                failed[k] = f"not timed: {why}"
        notes = {k: f"{len(times[k])} of {rounds} rounds: {why}" for k in done if len(times[k]) < rounds}
        res = _stats(done, times, cpu_times, peaks)
        return CudaContextLost(f"{why} (round {r + 1} of {rounds})", res, notes)

    for name, v in list(variants.items()):
        _progress(f"warming {name}")
        try:
            for _ in range(max(warmup, 1)):  # at least once: first-call costs (graph capture, JIT) stay out
                v.run()
        except Exception as exc:
            if not _failure(name, exc, failed, cuda):
                raise lost(name, 0) from exc
            del variants[name]
    if not _device_usable(cuda):
        raise lost("the warm-up", 0)
    for r in range(rounds):
        _progress(f"timing round {r + 1} of {rounds}")
        for name, v in list(variants.items()):
            try:
                _time_one(name, v, r, cuda, times, cpu_times, peaks)
            except Exception as exc:
                if not _failure(name, exc, failed, cuda):
                    raise lost(name, r) from exc
                del variants[name]
    return _stats(variants, times, cpu_times, peaks)


def _stats(variants: dict, times: dict, cpu_times: dict, peaks: dict) -> dict[str, dict]:
    out = {}
    for name in variants:
        ts = times[name]
        qs = statistics.quantiles(ts, n=5, method="inclusive") if len(ts) >= 2 else [ts[0]] * 4
        out[name] = {
            "median_ms": statistics.median(ts),
            "p20_ms": qs[0],
            "p80_ms": qs[-1],
            "cpu_ms": statistics.median(cpu_times[name]) if cpu_times[name] else math.nan,
            "peak_gib": peaks.get(name, math.nan),
        }
    return out


def _time_one(name: str, v: Variant, r: int, cuda: bool, times: dict, cpu_times: dict, peaks: dict) -> None:
    """One timed run of ``v`` (round ``r``), into ``times`` / ``cpu_times`` / ``peaks``."""
    if cuda:
        torch.cuda.synchronize()
        if r == 0 and v.memory_run is not None:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            v.memory_run()
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - before
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        v.run()
        end.record()
        torch.cuda.synchronize()
        times[name].append(start.elapsed_time(end))
        if r == 0:
            # this variant's parameters, gradients and optimizer state (16 B per fp32 parameter with
            # AdamW) plus the transient peak of its step above what was allocated before it
            params = sum(p.numel() for p in v.model.parameters())
            if v.memory_run is None:
                extra = torch.cuda.max_memory_allocated() - before
            static_grads = sum(p.grad.numel() * 4 for p in v.model.parameters() if p.grad is not None)
            peaks[name] = (params * 12 + static_grads + extra) / 2**30
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        v.run()
        times[name].append((time.perf_counter() - t0) * 1e3)
        cpu_times[name].append((time.process_time() - c0) * 1e3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default="uniter", help="the library's UniterForVqa or the local model")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 on GPU, 7 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128 GPU; 16 CPU)")
    ap.add_argument("--tiny", action="store_true", help="a 2 x 64 model, for a quick check")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    ap.add_argument(
        "--extra", default=None, help=f"optional variants, comma-separated, from {EXTRAS} (default: all on a GPU)"
    )
    ap.add_argument(
        "--only", default=None, help="time only the variants whose names start with these (released, standard kept)"
    )
    ap.add_argument("--out", default=None, help="folder for bench_step_<model><tag>.{md,csv} (default bench/out)")
    ap.add_argument("--tag", default="", help="suffix of the result files' names (a second run beside the first)")
    a = ap.parse_args(argv)
    extra = None if a.extra is None else tuple(x for x in a.extra.split(",") if x)
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    c = model_cfg("tiny" if a.tiny else "gpu" if cuda else "cpu")
    rounds = a.rounds or (10 if cuda else 7)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    batches = [int(x) for x in (a.batches or ("32,128" if cuda else "16")).split(",")]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        # the table's variant name says so already
        warnings.filterwarnings("ignore", "GraphedVillaStep runs eagerly: CUDA is not available", RuntimeWarning)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"device: {dev_name}; torch {torch.__version__}; triton {_triton_version()}; {stamp}; "
        f"{describe(a.model, c)}; {TXT_LEN} text + {N_REGIONS} regions, K={K}, text+image, clip {CLIP}; "
        + ("released: fp16 + GradScaler, villa_fast and standard: bf16" if cuda else "fp32")
        + "; released: plain attention, embeddings under autocast (the yardstick's model); "
        + ops_backends(device, c.n_ans)
        + " (add_layer_norm: graphed+fused-ln only; the optimizer is torch.optim.AdamW"
        + (", fused" if cuda else "")
        + ", not adamw_step_)"
    )
    if not cuda:
        header += (
            f"; on the CPU the ratio columns divide process CPU time (the CPU-time column: summed over all "
            f"{torch.get_num_threads()} threads), not the wall-clock median ms"
        )
    print(header, flush=True)
    rows = []
    footer = ""
    for i, b in enumerate(batches):
        _progress(f"B={b}: building the variants")
        torch.manual_seed(0)
        setup = build_setup(a.model, c, device)
        batch = make_batch(c, b, device)
        variants = build_variants(setup, batch, device, extra)
        if a.only:
            keep = ("released", "standard", *a.only.split(","))
            variants = {k: v for k, v in variants.items() if k.startswith(keep)}
        del setup
        failed: dict[str, str] = {}
        lost: CudaContextLost | None = None
        try:
            res = time_variants(variants, rounds, warmup, device, failed)
            notes = {name: v.note() for name, v in variants.items() if v.note is not None and name in res}
        except CudaContextLost as exc:  # write what was timed, then stop: no CUDA call can succeed any more
            lost, res, notes = exc, exc.results, dict(exc.notes)
            untimed = ", ".join(str(x) for x in batches[i + 1 :])
            footer = f"stopped at B = {b}: {exc}" + (f"; batch sizes not timed: {untimed}" if untimed else "")
        notes.update(failed)
        nan = {k: math.nan for k in ("median_ms", "p20_ms", "p80_ms", "cpu_ms", "peak_gib")}
        res.update({name: dict(nan) for name in variants if name in failed})
        # on a CPU shared with other jobs the process's CPU time (summed over its threads) is steadier than the
        # wall clock: the ratios use it there; both are reported
        key = "median_ms" if cuda else "cpu_ms"
        ref, std = res["released"][key], res["standard"][key]
        # the like-for-like baseline of the graphed rows (at B = 32 the eager standard step is launch-bound)
        std_g = res.get("standard (graphed)", {}).get(key, math.nan)
        for name in variants:
            r = res[name]
            rows.append(
                {
                    "model": a.model,
                    "batch": b,
                    "variant": f"{name} ({notes[name]})" if notes.get(name) else name,
                    **r,
                    "speedup_vs_released": ref / r[key],
                    "cost_vs_standard": r[key] / std,
                    "cost_vs_standard_graphed": r[key] / std_g,
                }
            )
        del variants, batch
        gc.collect()  # the variants' models, optimizers and graphs hold device memory until collected
        if cuda and lost is None:
            torch.cuda.empty_cache()
        # written after every batch size, so a run stopped part-way keeps what it measured
        text = write_results(rows, header, a.model + a.tag, dev_name, stamp, a.out, footer)
        print(f"B={b} done", flush=True)
        if lost is not None:
            print(footer, file=sys.stderr, flush=True)
            print("\n" + text, flush=True)
            raise SystemExit(3)
    print("\n" + text, flush=True)


def write_results(
    rows: list[dict], header: str, model: str, dev_name: str, stamp: str, out_dir: str | None = None, footer: str = ""
) -> str:
    """``out_dir`` (default bench/out)/bench_step_<model>.{md,csv}; returns the markdown (``footer``, when given,
    is a line after the table)."""
    md = [
        header,
        "",
        "| B | variant | median ms | p20-p80 ms | CPU-time ms | peak GiB | released / variant | variant / standard "
        "| variant / standard (graphed) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        cpu = "-" if math.isnan(r["cpu_ms"]) else f"{r['cpu_ms']:.1f}"
        md.append(
            f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
            f"{cpu} | {peak} | {r['speedup_vs_released']:.2f}x | {r['cost_vs_standard']:.2f} | "
            + ("-" if math.isnan(r["cost_vs_standard_graphed"]) else f"{r['cost_vs_standard_graphed']:.2f}")
            + " |"
        )
    if footer:
        md += ["", footer]
    text = "\n".join(md)
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"bench_step_{model}.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, f"bench_step_{model}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "torch", "date", *rows[0].keys()])
        w.writeheader()
        for r in rows:
            w.writerow({"device": dev_name, "torch": torch.__version__, "date": stamp, **r})
    return text


if __name__ == "__main__":
    main()
