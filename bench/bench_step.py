"""Time and peak memory per optimizer step of the VILLA adversarial step against its baselines.

Variants, all on the same UNITER-like encoder (SDPA attention, VQA head), K = 3, text + image perturbed,
adv lr 1e-3, alpha 1.5, AdamW, one optimizer step per micro-batch:

  released    the released loop transcribed (VILLA_SPEC section 2): clean logits kept in the graph,
              backward with retain_graph at every step; on a GPU fp16 autocast + GradScaler with the
              loss scale read back from the host as the released code does
  villa-once  VillaStep, clean_backward="once" (the default)
  villa-per   VillaStep, clean_backward="per_step" (same gradients, released cost)
  graphed     GraphedVillaStep with the fused capturable AdamW inside the graph (eager on the CPU)
  standard    one non-adversarial step: forward, task loss, backward, AdamW

Runs alternate between variants (one timed step each per round) and the median over rounds is reported,
with the ratio of the released loop's time to each variant (speed-up) and of each variant's time to the
standard step (cost). GPU: UNITER-base size at B = 32 and 128, bf16 for villa_fast and the standard step;
CPU: a 4 x 256 model at B = 16 in fp32. Results go to bench/out/bench_step.{csv,md}.

    python -m bench.bench_step [--rounds N] [--batches 32,128] [--tiny] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from villa_fast import AdversarialConfig, GraphedVillaStep, VillaStep

# ------------------------------------------------------------------------------------------------ model


@dataclass
class ModelCfg:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    vocab: int = 28996
    img_dim: int = 2048
    box_dim: int = 7
    n_ans: int = 3129
    dropout: float = 0.1


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

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.p if self.training else 0.0
        )
        x = self.ln_attn(x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d))))
        return self.ln_ffn(x + self.drop(self.down(F.gelu(self.up(x)))))


class UniterLike(nn.Module):
    """Single-stream text + region encoder of UNITER's shape (VILLA_SPEC section 4), with a VQA head.

    ``d_txt`` / ``d_img`` let the released-loop transcription pass perturbations explicitly; villa_fast
    injects them by hooks on ``word`` and ``img_proj`` instead.
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

    def forward(self, ids, img, box, mask, d_txt=None, d_img=None):
        w = self.word(ids)
        if d_txt is not None:
            w = w + d_txt
        pos = torch.arange(ids.shape[1], device=ids.device)
        t = self.drop(self.txt_ln(w + self.pos(pos) + self.typ.weight[0]))
        if d_img is not None:
            img = img + d_img
        i = self.img_ln(self.img_proj(img)) + self.box_ln(self.box_proj(box)) + self.typ.weight[1]
        x = torch.cat([t, self.drop(self.img_out_ln(i))], 1)
        bias = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0
        for blk in self.blocks:
            x = blk(x, bias)
        return self.head(torch.tanh(self.pooler(x[:, 0])))


def make_batch(c: ModelCfg, b: int, lt: int, ni: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "ids": torch.randint(min(1000, c.vocab // 2), c.vocab, (b, lt), generator=g).to(device),
        "img": torch.randn(b, ni, c.img_dim, generator=g).relu().to(device),
        "box": torch.rand(b, ni, c.box_dim, generator=g).to(device),
        "mask": torch.ones(b, lt + ni, device=device),
        "target": (torch.rand(b, c.n_ans, generator=g) < 2.0 / c.n_ans).float().to(device),
    }


def vqa_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    t = batch["target"]
    return F.binary_cross_entropy_with_logits(logits.float(), t) * t.shape[1]


def forward_of(model: UniterLike) -> Callable[[dict], torch.Tensor]:
    return lambda b: model(b["ids"], b["img"], b["box"], b["mask"])


# ------------------------------------------------------------------------------------- the variants

K, LR_ADV, ALPHA = 3, 1e-3, 1.5


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def released_step(model, opt, scaler, dtype, batch, device):
    """The released loop: zero init, clean logits in the graph, retain_graph every step, loss scale read back."""
    ids, img = batch["ids"], batch["img"]
    dt = torch.zeros(ids.shape[0], ids.shape[1], model.word.embedding_dim, device=device)
    di = torch.zeros_like(img)
    with _autocast(device, dtype):
        clean = model(ids, img, batch["box"], batch["mask"]).float()
    clean_p, clean_lp = F.softmax(clean, 1), F.log_softmax(clean, 1)
    n_ans = batch["target"].shape[1]
    for step in range(K):
        dt.requires_grad_()
        di.requires_grad_()
        with _autocast(device, dtype):
            out = model(ids, img, batch["box"], batch["mask"], dt, di).float()
        task = F.binary_cross_entropy_with_logits(out, batch["target"]) * n_ans
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
            g = d.grad.detach().float() / amp_scale
            den = torch.norm(g.view(g.shape[0], -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
            new.append((d + LR_ADV * g / den).detach())
        dt, di = new
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def standard_step(model, opt, dtype, batch, device):
    with _autocast(device, dtype):
        logits = model(batch["ids"], batch["img"], batch["box"], batch["mask"])
    vqa_loss(logits, batch).backward()
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


def build_variants(base: UniterLike, batch: dict, device: torch.device) -> dict[str, tuple[Callable, nn.Module]]:
    cuda = device.type == "cuda"
    low = torch.bfloat16 if cuda else None
    variants: dict[str, tuple[Callable, nn.Module]] = {}

    def adamw(m, capturable=False):
        if cuda and capturable:
            return torch.optim.AdamW(m.parameters(), lr=torch.tensor(5e-5, device=device), fused=True, capturable=True)
        return torch.optim.AdamW(m.parameters(), lr=5e-5, fused=cuda)

    m = copy.deepcopy(base)
    opt = torch.optim.AdamW(m.parameters(), lr=5e-5)
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    variants["released"] = (
        lambda m=m, o=opt, s=scaler: released_step(m, o, s, torch.float16 if cuda else None, batch, device),
        m,
    )
    for name, clean in (("villa-once", "once"), ("villa-per", "per_step")):
        m = copy.deepcopy(base)
        opt = adamw(m)
        vs = VillaStep(forward_of(m), vqa_loss, villa_cfg(clean, low), text_embedding=m.word, image_input=m.img_proj)

        def run(vs=vs, o=opt):
            vs.step(batch)
            o.step()
            o.zero_grad(set_to_none=True)

        variants[name] = (run, m)
    m = copy.deepcopy(base)
    opt = adamw(m, capturable=True)
    gs = GraphedVillaStep(
        forward_of(m), vqa_loss, villa_cfg("once", low), text_embedding=m.word, image_input=m.img_proj, optimizer=opt
    )
    variants["graphed" if cuda else "graphed (eager on CPU)"] = (lambda gs=gs: gs.step(batch), m)
    m = copy.deepcopy(base)
    opt = adamw(m)
    variants["standard"] = (lambda m=m, o=opt: standard_step(m, o, low, batch, device), m)
    return variants


# ---------------------------------------------------------------------------------------------- timing


def time_variants(variants: dict, rounds: int, warmup: int, device: torch.device) -> dict[str, dict]:
    cuda = device.type == "cuda"
    for fn, _ in variants.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}
    peaks: dict[str, float] = {}
    for r in range(rounds):
        for name, (fn, model) in variants.items():
            if cuda:
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end))
                if r == 0:
                    # this variant's parameters, gradients and optimizer state (16 B per fp32 parameter with
                    # AdamW) plus the transient peak of its step above what was allocated before it
                    params = sum(p.numel() for p in model.parameters())
                    extra = torch.cuda.max_memory_allocated() - before
                    static_grads = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
                    peaks[name] = (params * 12 + static_grads + extra) / 2**30
            else:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                cpu_times[name].append((time.process_time() - c0) * 1e3)
    out = {}
    for name, ts in times.items():
        qs = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        out[name] = {
            "median_ms": statistics.median(ts),
            "p20_ms": qs[0],
            "p80_ms": qs[-1],
            "cpu_ms": statistics.median(cpu_times[name]) if cpu_times[name] else math.nan,
            "peak_gib": peaks.get(name, math.nan),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 10 on GPU, 7 on CPU)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128 GPU; 16 CPU)")
    ap.add_argument("--tiny", action="store_true", help="a 2 x 64 model, for a quick check")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadier on a shared machine)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if a.tiny:
        c = ModelCfg(hidden=64, layers=2, heads=4, ffn=128, vocab=500, img_dim=96, n_ans=50)
    elif cuda:
        c = ModelCfg()
    else:
        c = ModelCfg(hidden=256, layers=4, heads=4, ffn=1024)
    rounds = a.rounds or (10 if cuda else 7)
    warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    batches = [int(x) for x in (a.batches or ("32,128" if cuda else "16")).split(",")]
    lt, ni = 24, 36
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        dev_name = torch.cuda.get_device_name()
    else:
        dev_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = (
        f"device: {dev_name}; torch {torch.__version__}; {stamp}; model {c.layers} x {c.hidden}, "
        f"{lt} text + {ni} regions, K={K}, text+image; "
        + ("released: fp16 + GradScaler, villa_fast and standard: bf16" if cuda else "fp32")
    )
    print(header, flush=True)
    rows = []
    for b in batches:
        torch.manual_seed(0)
        base = UniterLike(c).to(device).train()
        batch = make_batch(c, b, lt, ni, device)
        variants = build_variants(base, batch, device)
        res = time_variants(variants, rounds, warmup, device)
        # on a CPU shared with other jobs the process's CPU time (one thread) is steadier than the wall clock:
        # the ratios use it there; both are reported
        key = "median_ms" if cuda else "cpu_ms"
        ref, std = res["released"][key], res["standard"][key]
        for name, r in res.items():
            rows.append(
                {
                    "batch": b,
                    "variant": name,
                    **r,
                    "speedup_vs_released": ref / r[key],
                    "cost_vs_standard": r[key] / std,
                }
            )
        del variants, base
        if cuda:
            torch.cuda.empty_cache()
    md = [
        header,
        "",
        "| B | variant | median ms | p20-p80 ms | CPU-time ms | peak GiB | released / variant | variant / standard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = "-" if math.isnan(r["peak_gib"]) else f"{r['peak_gib']:.2f}"
        cpu = "-" if math.isnan(r["cpu_ms"]) else f"{r['cpu_ms']:.1f}"
        md.append(
            f"| {r['batch']} | {r['variant']} | {r['median_ms']:.1f} | {r['p20_ms']:.1f}-{r['p80_ms']:.1f} | "
            f"{cpu} | {peak} | {r['speedup_vs_released']:.2f}x | {r['cost_vs_standard']:.2f} |"
        )
    text = "\n".join(md)
    print(text, flush=True)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_step.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(out_dir, "bench_step.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "torch", "date", *rows[0].keys()])
        w.writeheader()
        for r in rows:
            w.writerow({"device": dev_name, "torch": torch.__version__, "date": stamp, **r})


if __name__ == "__main__":
    main()
