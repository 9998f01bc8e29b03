"""Where one optimizer step spends its time: device time per kernel category, the top kernels, and how busy
the device is over the step.

Runs the whole-step benchmark's variants (bench/bench_step.py: same model, batch, K and optimizer) under
``torch.profiler`` for a few steps after a warm-up, and prints for each variant and batch size:

- wall time per step (CUDA events, outside the profiler) and device-busy time per step (sum of kernel and
  copy durations inside it); busy / wall well under 1 means the host cannot launch kernels fast enough;
- device time per category (matmul, attention, LayerNorm, softmax and losses, embedding and indexing,
  optimizer, the VILLA ops, copies and casts, other element-wise kernels), per step and as a share;
- matmul throughput: the model's matmul FLOPs per step (12 forward-equivalents for the VILLA step with one
  clean backward, 3 for the standard step) over the matmul time, the number to hold against the chip's rate;
- the number of kernels per step, and how many run under 5 us (launch-latency bound: at B = 32 their count,
  not their work, sets the time of a replayed graph), per category as well;
- the 15 kernels with the most device time.

On a CPU the same tables list operators by self CPU time (a check that the script works, not a profile
to act on). Tables go to stdout and ``<out>/profile_step.md`` (rewritten after every variant); ``--trace``
also writes a Chrome trace of each profiled variant (``<out>/trace_<variant>_b<B>.json.gz``).

    python -m bench.profile_step [--batches 128] [--variants graphed,standard] [--steps 3] [--tiny] [--trace]
"""

from __future__ import annotations

import argparse
import gc
import gzip
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from bench import bench_step as bs
from bench._common import OUT_DIR, device_name, ops_backends, versions

# first match wins; names are matched lower-case
CATEGORIES: list[tuple[str, str]] = [
    ("villa ops", r"perturb|sym_kl|villa_fast"),
    ("attention", r"fmha|flash|attention|_efficient_attention|cudnn.*sdpa|sdpa"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|matmul|\baten::mm\b|addmm|\baten::bmm\b|sm90_|sm80_|wgmma"),
    ("layernorm", r"layer_?norm"),
    ("optimizer", r"adam|multi_tensor|foreach|clip_grad|optimizer"),
    ("softmax and losses", r"softmax|cross_entropy|binary_cross|nll|kl_div|logsigmoid|log_sigmoid"),
    ("embedding and indexing", r"embedding|index|gather|scatter|cat_|catarray"),
    ("dropout and random numbers", r"dropout|bernoulli|philox|rand"),
    ("copies and casts", r"memcpy|memset|copy|to_copy|_to_|cast|fill"),
    (
        "element-wise and reductions",
        r"elementwise|vectorized|unrolled|reduce|triton_|gelu|fused|norm|"
        r"\baten::(add|mul|sub|div|neg|exp|log|where|clamp|sum|mean|abs|sqrt|rsqrt|pow|tanh|all|any|isfinite)",
    ),
]

VILLA_FWD_EQ = 12.0  # forward-equivalents of the VILLA step with one clean backward at K = 3
STD_FWD_EQ = 3.0


def category(name: str) -> str:
    low = name.lower()
    for cat, pattern in CATEGORIES:
        if re.search(pattern, low):
            return cat
    return "other"


def matmul_flops(c: bs.ModelCfg, b: int) -> float:
    """Matmul FLOPs of one forward pass of the benchmark model on B rows of 24 + 36 tokens."""
    h, f, n = c.hidden, c.ffn, bs.TXT_LEN + bs.N_REGIONS
    per_token_layer = 2 * (4 * h * h + 2 * h * f) + 4 * n * h  # projections, FFN, QK^T and PV
    fwd = b * n * c.layers * per_token_layer
    fwd += b * bs.N_REGIONS * 2 * c.img_dim * h  # image linear
    fwd += b * 2 * (h * h + h * 2 * h + 2 * h * c.n_ans)  # pooler and VQA head
    return float(fwd)


def _self_device_us(evt) -> float:
    for attr in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(evt, attr, None)
        if v:
            return float(v)
    return 0.0


def kernel_times(prof, cuda: bool) -> dict[str, tuple[float, int]]:
    """{name: (total microseconds, calls)}: device kernels and copies on a GPU, operators' self time on a CPU."""
    out: dict[str, tuple[float, int]] = {}
    for evt in prof.key_averages():
        if cuda:
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = _self_device_us(evt)
        else:
            us = float(evt.self_cpu_time_total)
        if us > 0:
            out[evt.key] = (us, int(evt.count))
    return out


def wall_ms(run, cuda: bool, steps: int) -> float:
    times = []
    for _ in range(steps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_variant(name: str, v: bs.Variant, steps: int, warmup: int, cuda: bool, trace: str | None) -> dict:
    for _ in range(warmup):
        v.run()
    if cuda:
        torch.cuda.synchronize()
    wall = wall_ms(v.run, cuda, max(steps, 3))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            v.run()
        if cuda:
            torch.cuda.synchronize()
    kt = kernel_times(prof, cuda)
    if trace:
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(raw)
            with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    per_step = {k: (us / steps / 1e3, calls / steps) for k, (us, calls) in kt.items()}
    cats: dict[str, float] = {}
    for k, (ms, _) in per_step.items():
        cats[category(k)] = cats.get(category(k), 0.0) + ms
    return {"variant": name, "wall_ms": wall, "busy_ms": sum(cats.values()), "cats": cats, "kernels": per_step}


def _fwd_equivalents(variant: str) -> float:
    """Forward-equivalents of a step: the released loop and per_step 1 + 5K, recompute one forward more than
    the default one clean backward (1 + 3K + 2), the standard step 3."""
    if variant.startswith("standard"):
        return STD_FWD_EQ
    if variant.startswith(("released", "villa-per")):
        return 16.0
    if "recompute" in variant:
        return VILLA_FWD_EQ + 1
    return VILLA_FWD_EQ


def report(res: dict, b: int, flops_fwd: float) -> str:
    busy, wall = res["busy_ms"], res["wall_ms"]
    fwd_eq = _fwd_equivalents(res["variant"])
    lines = [
        f"### {res['variant']}, B = {b}",
        "",
        f"wall {wall:.2f} ms per step; device busy {busy:.2f} ms ({100 * busy / wall:.0f}% of the wall time)",
    ]
    if busy == 0:
        lines.append("no device activity was recorded (kernels replayed inside a CUDA graph may not be traced)")
        return "\n".join(lines)
    mm = res["cats"].get("matmul", 0.0)
    if mm > 0:
        tflops = flops_fwd * fwd_eq / (mm * 1e-3) / 1e12
        lines.append(
            f"matmul: {flops_fwd * fwd_eq / 1e12:.2f} TFLOP per step ({fwd_eq:.0f} forward-equivalents) in "
            f"{mm:.2f} ms = {tflops:.1f} TFLOP/s"
        )
    kernels = res["kernels"].values()
    n = sum(calls for _, calls in kernels)
    if n > 0:
        # kernels under 5 us are bound by launch latency and scheduling, not by their work: in a replayed graph
        # their count times ~1-3 us is a floor that only fusion (fewer kernels) lowers
        short = [(ms, calls) for ms, calls in kernels if calls and ms * 1e3 / calls < 5.0]
        lines.append(
            f"kernels: {n:.0f} per step, {busy * 1e3 / n:.1f} us on average; {sum(c for _, c in short):.0f} of them "
            f"under 5 us each, {sum(ms for ms, _ in short):.2f} ms together"
        )
    calls_by_cat: dict[str, float] = {}
    for k, (_, calls) in res["kernels"].items():
        calls_by_cat[category(k)] = calls_by_cat.get(category(k), 0.0) + calls
    lines += ["", "| category | ms per step | share of busy | kernels per step |", "|---|---|---|---|"]
    for cat, ms in sorted(res["cats"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.3f} | {100 * ms / busy:.1f}% | {calls_by_cat.get(cat, 0.0):g} |")
    lines += ["", "| kernel (top 15 by time) | category | ms per step | calls per step |", "|---|---|---|---|"]
    top = sorted(res["kernels"].items(), key=lambda kv: -kv[1][0])[:15]
    for k, (ms, calls) in top:
        short = k if len(k) <= 90 else k[:87] + "..."
        short = short.replace("|", "/")
        lines.append(f"| `{short}` | {category(k)} | {ms:.3f} | {calls:g} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=bs.MODELS, default="uniter")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 128 GPU, 8 CPU)")
    ap.add_argument(
        "--variants",
        default=None,
        help="variants of bench_step to profile, names as in its table (default: graphed, villa-once and the "
        "graphed standard step on a GPU, where the eager villa-once shows the same kernels outside a graph; "
        "graphed and standard on a CPU)",
    )
    ap.add_argument("--extra", default=None, help="bench_step's optional variants to build (default: all on a GPU)")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a 2 x 64 model, for a quick check")
    ap.add_argument("--trace", action="store_true", help="write a gzipped Chrome trace per variant and batch")
    ap.add_argument("--out", default=OUT_DIR)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    c = bs.model_cfg("tiny" if a.tiny else "gpu" if cuda else "cpu")
    batches = [int(x) for x in (a.batches or ("128" if cuda else "8")).split(",")]
    default = "graphed,villa-once,standard (graphed)" if cuda else "graphed,standard"
    wanted = [x for x in (a.variants or default).split(",") if x]
    extra = None if a.extra is None else tuple(x for x in a.extra.split(",") if x)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    warnings.filterwarnings("ignore", "GraphedVillaStep runs eagerly", RuntimeWarning)
    os.makedirs(a.out, exist_ok=True)
    v = versions()
    head = (
        f"profile_step on {device_name(device)}; torch {v['torch']}, triton {v['triton']}; "
        f"{bs.describe(a.model, c)}; {bs.TXT_LEN} text + {bs.N_REGIONS} regions, K={bs.K}; "
        f"{ops_backends(device, c.n_ans)} (add_layer_norm: graphed+fused-ln only; the optimizer is "
        f"torch.optim.AdamW, not adamw_step_)"
    )
    print(head, flush=True)
    sections = [head]
    for b in batches:
        torch.manual_seed(0)
        setup = bs.build_setup(a.model, c, device)
        batch = bs.make_batch(c, b, device)
        variants = bs.build_variants(setup, batch, device, extra)
        names = {n.split(" (eager on CPU)")[0]: n for n in variants}
        missing = [w for w in wanted if w not in names]
        if missing:
            raise SystemExit(f"profile_step: no variant {missing}; this run has {sorted(names)}")
        for w in wanted:
            n = names[w]
            safe = re.sub(r"[^a-z0-9]+", "_", w.lower()).strip("_")
            trace = os.path.join(a.out, f"trace_{safe}_b{b}.json.gz") if a.trace else None
            try:
                res = profile_variant(n, variants[n], a.steps, a.warmup, cuda, trace)
            except Exception as exc:  # say so and profile the other variants
                first = str(exc).splitlines()[0] if str(exc) else ""
                text = f"### {n}, B = {b}: failed ({type(exc).__name__}: {first})"
                print("\n" + text, flush=True)
                sections.append(text)
                _write(a.out, sections, done=False)
                if cuda:
                    torch.cuda.empty_cache()
                continue
            text = report(res, b, matmul_flops(c, b))
            print("\n" + text, flush=True)
            sections.append(text)
            _write(a.out, sections, done=False)
        del variants, setup, batch
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return _write(a.out, sections, done=True)


def _write(out: str, sections: list[str], done: bool) -> str:
    """profile_step.md as it stands: rewritten after every variant, so a run stopped part-way keeps its
    finished sections."""
    md = "\n\n".join(sections) + ("\n" if done else "\n\n(stopped part-way: the variants profiled so far)\n")
    with open(os.path.join(out, "profile_step.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
