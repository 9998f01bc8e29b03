"""Benchmark of the fused ops against eager PyTorch and torch.compile of the same math.

    python -m bench.bench_ops [--quick] [--compile/--no-compile] [--reps N] [--out DIR]

Sizes: VQA (deltas 128x24x768 and 128x36x2048, logits 128x3129), masked-LM
(logits 2048x28996), the residual add + LayerNorm of UNITER-base (7680x768,
a bf16 dense output plus an fp32 residual) and the adversarial step's gradient
accumulation under its finiteness flag (add_if_ over the VQA model's parameter
shapes, against a masked fill per parameter plus a multi-tensor add) and the authors' AdamW
step over the same parameters (adamw_step_ against AdamW's multi-tensor foreach rule,
with host and with device step counts). Prints a markdown table of median ms
and GB/s against the bytes each op must move, and writes it with the device,
versions and date to bench_ops.md and bench_ops.csv in --out (default bench/out),
rewritten after every case so that a run stopped part-way keeps what it measured.
On the CPU the fused backend is the C++ one; add_layer_norm has no C++ kernel and
its Triton kernel is not timed there (the interpreter), so on the CPU that case
times the op through its reference backend.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from bench._common import OUT_DIR, markdown, meta, time_ms, write_csv
from villa_fast import ops

# ---------------------------------------------------------------- the released code's math, in eager PyTorch


def eager_update(delta: torch.Tensor, grad: torch.Tensor, lr: float, max_norm: float) -> torch.Tensor:
    den = grad.view(grad.size(0), -1).norm(dim=1).clamp(min=1e-8).view(-1, *([1] * (grad.dim() - 1)))
    delta = delta + lr * grad.float() / den
    if max_norm > 0:
        n = delta.view(delta.size(0), -1).norm(p=2, dim=1)
        over = (n > max_norm).to(delta)
        w = (max_norm / n * over + (1 - over)).view(-1, *([1] * (delta.dim() - 1)))
        delta = delta * w
    return delta


def eager_sym_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.float(), b.float()
    return (
        F.kl_div(F.log_softmax(a, 1), F.softmax(b, 1), reduction="none")
        + F.kl_div(F.log_softmax(b, 1), F.softmax(a, 1), reduction="none")
    ).mean()


def eager_add_layer_norm(x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x + r, (x.shape[-1],), w, b, 1e-12)


def eager_init(like: torch.Tensor, mask: torch.Tensor, mag: float) -> torch.Tensor:
    d = torch.zeros(like.shape, device=like.device).uniform_(-1, 1) * mask.unsqueeze(2)
    dims = mask.sum(1) * like.shape[-1]
    return d * (mag / dims.sqrt()).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------- cases


def _fused_backends(device: torch.device) -> list[str]:
    return [b for b in ops.available_backends(device) if b != "reference"]


def _with_backend(name: str, fn):
    def run():
        old = os.environ.get("VILLA_FAST_BACKEND")
        os.environ["VILLA_FAST_BACKEND"] = name
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("VILLA_FAST_BACKEND", None)
            else:
                os.environ["VILLA_FAST_BACKEND"] = old

    return run


def bench_update(device, b, reps, use_compile, rows):
    gdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    dt = torch.randn(b, 24, 768, device=device) * 1e-3
    di = torch.randn(b, 36, 2048, device=device) * 1e-3
    gt = torch.randn(b, 24, 768, device=device).to(gdt)
    gi = torch.randn(b, 36, 2048, device=device).to(gdt)
    es = gt.element_size()
    nbytes = (dt.numel() + di.numel()) * (4 + es + 4)  # read delta and grad, write delta
    case = f"perturb_update txt {b}x24x768 + img {b}x36x2048 (l2, proj)"

    def eager():
        eager_update(dt, gt, 1e-3, 1.0)
        eager_update(di, gi, 1e-2, 1.0)

    variants = [("eager", eager)]
    if use_compile:
        cu = torch.compile(eager_update, dynamic=False)
        variants.append(("torch.compile", lambda: (cu(dt, gt, 1e-3, 1.0), cu(di, gi, 1e-2, 1.0))))
    for name in _fused_backends(device):
        fn = _with_backend(
            name, lambda: ops.perturb_update_multi_([dt, di], [gt, gi], lrs=[1e-3, 1e-2], norm_type="l2", max_norm=1.0)
        )
        variants.append((name, fn))
    _run(case, variants, device, reps, nbytes, rows)
    if device.type == "cuda":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, reps=reps)
        rows.append({"case": "device copy (same bytes)", "variant": "copy_", "ms": ms, "GB/s": nbytes / ms / 1e6})


def bench_init(device, b, reps, use_compile, rows):
    like = torch.empty(b, 36, 2048, device=device)
    mask = (torch.rand(b, 36, device=device) > 0.2).float()
    nbytes = like.numel() * 4 * 3  # write the draws, then read and write them once more when scaled apart
    case = f"perturb_init {b}x36x2048 (l2, masked)"
    variants = [("eager", lambda: eager_init(like, mask, 0.1))]
    if use_compile:
        ci = torch.compile(eager_init, dynamic=False)
        variants.append(("torch.compile", lambda: ci(like, mask, 0.1)))
    for name in _fused_backends(device):
        variants.append((name, _with_backend(name, lambda: ops.perturb_init(like, mask, init_mag=0.1, norm_type="l2"))))
    _run(case, variants, device, reps, nbytes, rows)


def bench_sym_kl(device, n, c, reps, use_compile, rows):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    bb = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    nbytes = 4 * n * c * a.element_size()  # read both logits, write both gradients
    case = f"sym_kl fwd+bwd {n}x{c} {str(dtype).replace('torch.', '')}"

    def eager():
        return torch.autograd.grad(eager_sym_kl(a, bb), (a, bb))

    variants = [("eager", eager)]
    if use_compile:
        ck = torch.compile(eager_sym_kl, dynamic=False)
        variants.append(("torch.compile", lambda: torch.autograd.grad(ck(a, bb), (a, bb))))
    for name in _fused_backends(device):
        variants.append((name, _with_backend(name, lambda: torch.autograd.grad(ops.sym_kl(a, bb, "mean"), (a, bb)))))
    _run(case, variants, device, reps, nbytes, rows)


def bench_add_layer_norm(device, m, h, reps, use_compile, rows):
    xdt = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(m, h, device=device, dtype=xdt, requires_grad=True)
    r = torch.randn(m, h, device=device, requires_grad=True)
    w = torch.ones(h, device=device, requires_grad=True)
    b = torch.zeros(h, device=device, requires_grad=True)
    dy = torch.randn(m, h, device=device)
    ex, er = x.element_size(), r.element_size()
    # forward reads x, r and writes y (fp32); backward reads dy, x, r and writes dx, dr
    nbytes = m * h * (3 * (ex + er) + 2 * 4)
    case = f"add_layer_norm fwd+bwd {m}x{h} {str(xdt).replace('torch.', '')} + float32"
    leaves = (x, r, w, b)

    def eager():
        return torch.autograd.grad(eager_add_layer_norm(x, r, w, b), leaves, dy)

    variants = [("eager", eager)]
    if use_compile:
        cl = torch.compile(eager_add_layer_norm, dynamic=False)
        variants.append(("torch.compile", lambda: torch.autograd.grad(cl(x, r, w, b), leaves, dy)))
    if device.type == "cuda":
        fused = [n for n in ("triton",) if n in ops.available_backends(device)]
    else:
        print("  add_layer_norm: Triton is not timed on the CPU (interpreter); timing the reference", file=sys.stderr)
        fused = ["reference"]
    for name in fused:
        fn = _with_backend(name, lambda: torch.autograd.grad(ops.add_layer_norm(x, r, w, b), leaves, dy))
        variants.append((name, fn))
    _run(case, variants, device, reps, nbytes, rows)


def _param_shapes(quick: bool) -> list[tuple[int, ...]]:
    """The parameter shapes of UniterForVqa (UNITER-base; 2 x 256 with --quick), built on the meta device."""
    from villa_fast.models import UniterConfig, UniterForVqa

    cfg = UniterConfig.base()
    if quick:
        cfg = cfg.replace(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
    with torch.device("meta"):
        model = UniterForVqa(cfg, num_answer=3129)
    return [tuple(p.shape) for p in model.parameters()]


def bench_add_if(device, quick, reps, rows):
    """The step's gradient accumulation under its finiteness flag: a masked fill per parameter and a
    multi-tensor add (what the step did before add_if_) against add_if_."""
    shapes = _param_shapes(quick)
    accs = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    ok = torch.tensor(True, device=device)
    nbytes = sum(a.numel() for a in accs) * 4 * 3  # read acc and grad, write acc
    case = f"accumulate {len(shapes)} UNITER{'-tiny' if quick else '-base'} VQA gradients under a flag"

    def eager():
        bad = ~ok
        for g in grads:
            g.masked_fill_(bad, 0.0)
        torch._foreach_add_(accs, grads)

    variants = [("masked_fill+add", eager), ("foreach_add (no flag)", lambda: torch._foreach_add_(accs, grads))]
    for name in _fused_backends(device):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter: correctness only
        variants.append((name, _with_backend(name, lambda: ops.add_if_(accs, grads, ok))))
    _run(case, variants, device, reps, nbytes, rows)


def bench_adamw(device, quick, reps, rows):
    """One step of the authors' AdamW over the VQA model's parameters: the multi-tensor (foreach) rule that
    AdamW runs on the reference backend, with host and with device step counts (capturable), against
    adamw_step_ (the step counts, lr, and GradScaler's scale and flag on the device)."""
    from villa_fast.train.optim import AdamW

    shapes = _param_shapes(quick)
    params = [torch.randn(s, device=device) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    kw = {"betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.01}
    plain = AdamW(params, lr=1e-4, **kw)
    capturable = AdamW(params, lr=torch.tensor(1e-4, device=device), capturable=True, **kw)
    for opt in (plain, capturable):
        _with_backend("reference", opt.step)()  # creates the state: timed steps only update it
    state = [capturable.state[p] for p in params]
    ms, vs = [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state]
    steps = [s["step"] for s in state]
    grads = [p.grad for p in params]
    scale, found_inf = torch.ones((), device=device), torch.zeros(1, device=device)
    nbytes = sum(p.numel() for p in params) * 4 * 7  # read p, g, m, v; write p, m, v
    case = f"AdamW step, {len(shapes)} UNITER{'-tiny' if quick else '-base'} VQA parameters"

    def fused(**extra):
        return lambda: ops.adamw_step_(params, grads, ms, vs, steps, beta1=0.9, beta2=0.98, eps=1e-6, **extra)

    variants = [
        ("foreach", _with_backend("reference", plain.step)),
        ("foreach capturable", _with_backend("reference", capturable.step)),
    ]
    hyper = {"lr": capturable.param_groups[0]["lr"], "weight_decay": 0.01, "correct_bias": True}
    for name in _fused_backends(device):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter: correctness only
        variants.append((name, _with_backend(name, fused(**hyper))))
        variants.append(
            (f"{name} +scale/flag", _with_backend(name, fused(**hyper, grad_scale=scale, found_inf=found_inf)))
        )
    _run(case, variants, device, reps, nbytes, rows)


def _run(case, variants, device, reps, nbytes, rows):
    """Time each variant; one that raises (a torch.compile or kernel error) gets a row saying so, and the
    case's other variants are still timed."""
    base = None
    for name, fn in variants:
        try:
            ms = time_ms(fn, device, reps=reps)
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:120]
            rows.append({"case": case, "variant": f"{name} (failed: {why})", "ms": math.nan, "GB/s": math.nan})
            print(f"  {case:60s} {name:14s} failed: {why}", file=sys.stderr, flush=True)
            continue
        base = ms if base is None else base
        rows.append({"case": case, "variant": name, "ms": ms, "GB/s": nbytes / ms / 1e6, "speedup": base / ms})
        print(f"  {case:60s} {name:14s} {ms:9.3f} ms", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (a CPU demo in seconds)")
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="include torch.compile of the eager math (default: on a GPU only)",
    )
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=OUT_DIR, help="folder of bench_ops.csv and bench_ops.md")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    reps = args.reps or (50 if device.type == "cuda" else (3 if args.quick else 5))
    torch.manual_seed(0)
    rows: list[dict] = []
    info = meta(device)
    b = 16 if args.quick else 128
    ln_rows = 7680 if device.type == "cuda" else (256 if args.quick else 1024)
    cases = [
        lambda: bench_update(device, b, reps, use_compile, rows),
        lambda: bench_init(device, b, reps, use_compile, rows),
        lambda: bench_sym_kl(device, 128, 3129, reps, use_compile, rows),
        lambda: bench_sym_kl(device, 128 if args.quick else 2048, 28996, reps, use_compile, rows),
        lambda: bench_add_layer_norm(device, ln_rows, 768, reps, use_compile, rows),
        lambda: bench_add_if(device, args.quick, reps, rows),
        lambda: bench_adamw(device, args.quick, reps, rows),
    ]
    for i, case in enumerate(cases):
        if use_compile:
            # compiled code is cached per function: a shape met after another would be compiled for dynamic
            # shapes, which a fixed-shape user never runs; each case starts from an empty cache (static shapes)
            torch._dynamo.reset()
        case()
        # the tables so far, after every case: a run stopped part-way keeps what it measured
        path = write_csv("bench_ops.csv", rows, info, args.out)
        table = _table(rows, info, done=i + 1 == len(cases))
        with open(os.path.join(args.out, "bench_ops.md"), "w") as f:
            f.write(table + "\n")
    print("\n" + table)
    print(f"\nCSV: {path}")
    return rows


def _table(rows: list[dict], info: dict[str, str], done: bool) -> str:
    head = f"bench_ops on {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}"
    if not done:
        head += " (stopped part-way: the cases measured so far)"
    return "\n".join(
        [
            head,
            "(speedup is against eager PyTorch in the same run; GB/s against the bytes each op must move)\n",
            markdown(rows, ["case", "variant", "ms", "GB/s", "speedup"]),
        ]
    )


if __name__ == "__main__":
    main()
