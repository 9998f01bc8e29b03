"""Forward+backward throughput of the UNITER model (VQA head) against the anchor model.

    python -m bench.bench_model                 # GPU: UNITER-base, B=32 and 128; CPU: a small model
    python -m bench.bench_model --batches 16 --iters 5 --small

Rows (same batch, same loss, one run):
  anchor-ref          ../shared/anchors/villa_eager_anchor.py, hand-written attention (fp16 autocast on GPU)
  anchor-mod          the anchor with SDPA (bf16 autocast on GPU)
  villa_fast          UniterForVqa: SDPA, fused QKV, fp32 embedding block (bf16 autocast on GPU)
  villa_fast-bf16emb  the same with the embedding block under autocast too (fp32_embeddings=False; GPU)
  villa_fast-plain    the same with matmul-softmax attention
  villa_fast-compiled torch.compile of the villa_fast model (GPU, with --compile)

Each row is one forward (B examples of 24 text tokens + 36 regions = 60 tokens per row) plus
backward through all parameters, no optimizer step; the variants run interleaved, one call each
per round. CPU rows run in fp32 on one thread (--threads). The anchor rows are
skipped, with a message, when the anchor file is not found (VILLA_ANCHOR, ../shared/anchors,
/work/shared/anchors). Results: a markdown table on stdout and a CSV under bench/out/.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from villa_fast.models import UniterConfig, UniterForVqa

TXT_LEN, N_REGIONS, N_ANS = 24, 36, 3129
ROOT = Path(__file__).resolve().parents[1]


def find_anchor() -> Path | None:
    candidates = [os.environ.get("VILLA_ANCHOR", "")]
    candidates += [str(ROOT.parent / "shared" / "anchors"), "/work/shared/anchors"]
    for c in candidates:
        if not c:
            continue
        p = Path(c)
        if p.is_dir():
            p = p / "villa_eager_anchor.py"
        if p.is_file():
            return p
    return None


def load_anchor(path: Path):
    spec = importlib.util.spec_from_file_location("villa_eager_anchor", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def model_config(small: bool) -> UniterConfig:
    if small:
        return UniterConfig(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=1024,
            vocab_size=2000,
            img_dim=512,
        )
    return UniterConfig.base()


def make_batch(cfg: UniterConfig, b: int, dev: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    total = TXT_LEN + N_REGIONS
    batch = {
        "input_ids": torch.randint(100, cfg.vocab_size, (b, TXT_LEN), generator=g),
        "position_ids": torch.arange(TXT_LEN).unsqueeze(0),
        "img_feat": torch.rand(b, N_REGIONS, cfg.img_dim, generator=g) * 2.0,
        "img_pos_feat": torch.rand(b, N_REGIONS, cfg.pos_dim, generator=g),
        "attn_masks": torch.ones(b, total, dtype=torch.long),
        "gather_index": torch.arange(total).unsqueeze(0).repeat(b, 1),
        "targets": (torch.rand(b, N_ANS, generator=g) < 2.0 / N_ANS).float(),
    }
    return {k: v.to(dev) for k, v in batch.items()}


def flops_per_step(cfg: UniterConfig, b: int) -> float:
    """Matmul FLOPs of forward+backward (3x forward) for B rows of 60 tokens."""
    h, f, n = cfg.hidden_size, cfg.intermediate_size, TXT_LEN + N_REGIONS
    per_token_layer = 2 * (4 * h * h + 2 * h * f) + 4 * n * h  # projections + FFN + QK^T and PV
    fwd = b * n * cfg.num_hidden_layers * per_token_layer
    fwd += b * N_REGIONS * 2 * cfg.img_dim * h  # image linear
    fwd += b * 2 * (h * h + h * 2 * h + 2 * h * N_ANS)  # pooler + VQA head
    return 3.0 * fwd


def time_round_robin(steps: dict, dev: torch.device, warmup: int, iters: int) -> dict[str, list[float]]:
    """Milliseconds per call of each step, the steps interleaved (one call of each per round) so
    that drift in machine load hits every variant alike. CUDA events on a GPU, perf_counter on CPU."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            if dev.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def peak_gib(fn, dev: torch.device) -> float:
    if dev.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def villa_fast_step(model, batch, dtype, dev):
    enabled = dtype in (torch.float16, torch.bfloat16)

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=enabled):
            logits = model(batch)
        model.loss(logits, batch).backward()
        model.zero_grad(set_to_none=True)

    return step


def anchor_step(anchor, model, batch, dtype, dev):
    enabled = dtype in (torch.float16, torch.bfloat16)
    ids, img, box, mask, tgt = (
        batch["input_ids"],
        batch["img_feat"],
        batch["img_pos_feat"],
        batch["attn_masks"].float(),
        batch["targets"],
    )

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=enabled):
            logits = model(ids, img, box, mask)
        (F.binary_cross_entropy_with_logits(logits.float(), tgt) * tgt.size(1)).backward()
        model.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 32,128 GPU; 8,16 CPU)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 20 GPU, 5 CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="the small model even on a GPU")
    ap.add_argument("--compile", action="store_true", help="add a torch.compile row (GPU)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steady timings)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    a = ap.parse_args(argv)

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = dev.type == "cuda"
    small = a.small or not gpu
    cfg = model_config(small)
    batches = [int(x) for x in (a.batches or ("32,128" if gpu else "8,16")).split(",")]
    iters = a.iters or (20 if gpu else 5)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        device_name = torch.cuda.get_device_name()
    else:
        torch.set_num_threads(a.threads)
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(
        f"device: {device_name}; torch {torch.__version__}; model: "
        f"{'small ' if small else 'UNITER-base '}{cfg.num_hidden_layers}x{cfg.hidden_size}, "
        f"FFN {cfg.intermediate_size}, img_dim {cfg.img_dim}; {TXT_LEN}+{N_REGIONS} tokens per row",
        flush=True,
    )

    anchor_path = find_anchor()
    anchor = None
    if anchor_path is None:
        print("anchor model not found (set VILLA_ANCHOR): anchor rows skipped", flush=True)
    else:
        anchor = load_anchor(anchor_path)

    lowp = torch.bfloat16 if gpu else torch.float32
    rows = []
    for b in batches:
        batch = make_batch(cfg, b, dev)
        variants = []  # (name, kind, model factory, autocast dtype)
        if anchor is not None:
            acfg = anchor.Cfg(
                hidden=cfg.hidden_size,
                layers=cfg.num_hidden_layers,
                heads=cfg.num_attention_heads,
                ffn=cfg.intermediate_size,
                vocab=cfg.vocab_size,
                img_dim=cfg.img_dim,
                pos_dim=cfg.pos_dim,
                n_ans=N_ANS,
            )
            ref_dtype = torch.float16 if gpu else torch.float32
            variants.append(("anchor-ref", "anchor", lambda acfg=acfg: anchor.Uniter(acfg, False), ref_dtype))
            variants.append(("anchor-mod", "anchor", lambda acfg=acfg: anchor.Uniter(acfg, True), lowp))
        variants.append(("villa_fast", "ours", lambda: UniterForVqa(cfg, N_ANS), lowp))
        if gpu:
            emb = cfg.replace(fp32_embeddings=False)
            variants.append(("villa_fast-bf16emb", "ours", lambda emb=emb: UniterForVqa(emb, N_ANS), lowp))
        plain = cfg.replace(attn_impl="plain")
        variants.append(("villa_fast-plain", "ours", lambda plain=plain: UniterForVqa(plain, N_ANS), lowp))
        if a.compile and gpu:
            variants.append(("villa_fast-compiled", "compiled", lambda: UniterForVqa(cfg, N_ANS), lowp))

        steps, dtypes, mems = {}, {}, {}
        for name, kind, build, dtype in variants:
            torch.manual_seed(0)
            model = build().to(dev).train()
            if kind == "compiled":
                model.uniter = torch.compile(model.uniter)
            if kind == "anchor":
                step = anchor_step(anchor, model, batch, dtype, dev)
            else:
                step = villa_fast_step(model, batch, dtype, dev)
            try:
                step()  # compile / first-call costs stay out of the timing
                mems[name] = peak_gib(step, dev)
            except Exception as exc:  # report, keep the other rows
                print(f"B={b} {name}: failed: {exc!r}"[:400], flush=True)
                continue
            steps[name], dtypes[name] = step, dtype
        times = time_round_robin(steps, dev, a.warmup, iters)
        for name, ts in times.items():
            med = statistics.median(ts)
            q = statistics.quantiles(ts, n=5) if len(ts) >= 5 else [min(ts), max(ts)]
            tflops = flops_per_step(cfg, b) / (med * 1e-3) / 1e12
            rows.append(
                dict(
                    batch=b,
                    variant=name,
                    dtype=str(dtypes[name]).replace("torch.", ""),
                    median_ms=med,
                    p20_ms=q[0],
                    p80_ms=q[-1],
                    examples_per_s=b / (med * 1e-3),
                    tflops=tflops,
                    peak_gib=mems[name],
                )
            )
            print(
                f"B={b:4d} {name:20s} {med:9.2f} ms  ({b / (med * 1e-3):8.1f} ex/s, {tflops:6.2f} TFLOP/s)", flush=True
            )
        del steps
        if gpu:
            torch.cuda.empty_cache()

    # speedup against the anchor's modern variant (else its reference variant) in the same run
    print()
    print("| B | variant | dtype | median ms | p20-p80 ms | examples/s | TFLOP/s | vs anchor-mod | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next((x for x in rows if x["batch"] == r["batch"] and x["variant"] == "anchor-mod"), None)
        ratio = f"{base['median_ms'] / r['median_ms']:.2f}x" if base else "-"
        mem = "-" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        print(
            f"| {r['batch']} | {r['variant']} | {r['dtype']} | {r['median_ms']:.2f} | "
            f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f} | {r['examples_per_s']:.1f} | {r['tflops']:.2f} | {ratio} | {mem} |"
        )

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"bench_model-{dev.type}-{stamp}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["date", "device", "torch", "python", "model", *rows[0].keys()] if rows else ["date"])
        for r in rows:
            w.writerow(
                [
                    stamp,
                    device_name,
                    torch.__version__,
                    sys.version.split()[0],
                    "small" if small else "uniter-base",
                    *r.values(),
                ]
            )
    print(f"\nCSV: {path}")


if __name__ == "__main__":
    main()
