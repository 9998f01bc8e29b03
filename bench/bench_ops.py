"""Benchmark of the fused ops against eager PyTorch and torch.compile of the same math.

    python -m bench.bench_ops [--quick] [--compile/--no-compile] [--reps N] [--out DIR]

Sizes: VQA (deltas 128x24x768 and 128x36x2048, logits 128x3129), masked-LM
(logits 2048x28996), the residual add + LayerNorm of UNITER-base (7680x768,
a bf16 dense output plus an fp32 residual) and the adversarial step's gradient
accumulation under its finiteness flag (add_if_ over the VQA model's parameter
shapes, against a masked fill per parameter plus a multi-tensor add) and the authors' AdamW
step over the same parameters (adamw_step_ against AdamW's multi-tensor foreach rule,
with host and with device step counts).

perturb_update and sym_kl are timed first on what the VILLA step gives them: fp32 deltas with fp32
gradients, no projection (max_norm = 0, the released configs), and fp32 logits. A second perturb_update
row times the l2 projection's worst case (every row starts on the sphere and is projected back every call,
so the in-place state does not drift into other work); bf16 gradients and logits come last, as extra rows
(eager against the fused backends: no torch.compile row).
The eager and compiled baselines compute the same function as the fused op in every row.

Prints a markdown table of median ms and GB/s against the bytes each op must move (its floor), and
writes it with the device, versions and date to bench_ops.md and bench_ops.csv in --out (default
bench/out), rewritten after every case so that a run stopped part-way keeps what it measured.
On the CPU the fused backend is the C++ one; add_layer_norm has no C++ kernel and
its Triton kernel is not timed there (the interpreter), so on the CPU that case
times the op through its reference backend.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.nn.functional as F

from bench._common import OUT_DIR, extension_status, markdown, meta, time_ms, write_csv
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


class _OnBackend:
    """A fused variant pinned to one backend: ``_run`` sets VILLA_FAST_BACKEND once around its timing (not on
    every call: setting a variable costs host time, and a changed environment makes the next op rescan it)."""

    def __init__(self, backend: str, fn) -> None:
        self.backend, self.fn = backend, fn

    def __call__(self):
        return self.fn()


def _with_backend(name: str, fn) -> _OnBackend:
    return _OnBackend(name, fn)


@contextlib.contextmanager
def _backend_env(name: str | None):
    """VILLA_FAST_BACKEND=``name`` inside the block (nothing changed for ``None``), restored after it."""
    if name is None:
        yield
        return
    old = os.environ.get("VILLA_FAST_BACKEND")
    os.environ["VILLA_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("VILLA_FAST_BACKEND", None)
        else:
            os.environ["VILLA_FAST_BACKEND"] = old


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def update_inputs(b: int, device, gdt: torch.dtype = torch.float32, radius: float = 0.0, seed: int = 0):
    """The VQA deltas (fp32, text [b, 24, 768] and image [b, 36, 2048]) and their gradients (``gdt``).

    ``radius`` > 0: every delta row starts ON the sphere of that radius, with a positive dot product with its
    gradient. Then every update leaves the ball (|d + s|^2 = r^2 + 2 s.d + |s|^2 > r^2) and every row is
    projected back to the sphere, as a positive combination of d and g, so s.d stays positive: each timed call
    does the same work (the step and the rescale of every row) however often it runs in place.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for shape in ((b, 24, 768), (b, 36, 2048)):
        grad = torch.randn(shape, device=device, generator=g)
        if radius > 0:
            mag = torch.randn(shape, device=device, generator=g).abs()
            delta = mag * grad.sign()
            delta *= radius / delta.flatten(1).norm(dim=1).view(-1, 1, 1)
        else:
            delta = torch.randn(shape, device=device, generator=g) * 1e-3
        out.append((delta, grad.to(gdt)))
    return out


def bench_update(device, b, reps, use_compile, rows, gdt=torch.float32, max_norm=0.0, copy_row=False):
    """Both VQA deltas, fp32 as in the VILLA step (fp32 deltas get fp32 gradients), or with ``gdt`` gradients.

    ``max_norm`` = 0 (the released configs, bench_step): the normalised step alone. Its in-place state drifts
    by lr per call, with no effect on the work. ``max_norm`` > 0: the deltas start on the sphere of that radius
    (``update_inputs``): every call projects every row, the worst case of the projection, and stays there. The
    eager and compiled baselines compute the same function on the same inputs (out of place, as the released
    code does), with the same ``max_norm``.
    """
    (dt, gt), (di, gi) = update_inputs(b, device, gdt, radius=max_norm)
    nbytes = (dt.numel() + di.numel()) * (4 + gt.element_size() + 4)  # read delta and grad, write delta
    proj = f"l2, projected onto the {max_norm:g} sphere every call" if max_norm > 0 else "l2, no projection"
    case = f"perturb_update txt {b}x24x768 + img {b}x36x2048 fp32, {_dt(gdt)} grad ({proj})"

    def eager():
        eager_update(dt, gt, 1e-3, max_norm)
        eager_update(di, gi, 1e-2, max_norm)

    variants = [("eager", eager)]
    if use_compile:
        cu = torch.compile(eager_update, dynamic=False)
        variants.append(("torch.compile", lambda: (cu(dt, gt, 1e-3, max_norm), cu(di, gi, 1e-2, max_norm))))
    for name in _fused_backends(device):
        fn = _with_backend(
            name,
            lambda: ops.perturb_update_multi_([dt, di], [gt, gi], lrs=[1e-3, 1e-2], norm_type="l2", max_norm=max_norm),
        )
        variants.append((name, fn))
    _run(case, variants, device, reps, nbytes, rows)
    if copy_row and device.type == "cuda":
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device, reps=reps)
        rows.append({"case": "device copy (same bytes)", "variant": "copy_", "ms": ms, "GB/s": nbytes / ms / 1e6})


def bench_init(device, b, reps, use_compile, rows):
    like = torch.empty(b, 36, 2048, device=device)
    mask = (torch.rand(b, 36, device=device) > 0.2).float()
    # the floor: the output written once and the mask read (the draws themselves need not touch memory)
    nbytes = like.numel() * 4 + mask.numel() * 4
    case = f"perturb_init {b}x36x2048 (l2, masked)"
    variants = [("eager", lambda: eager_init(like, mask, 0.1))]
    if use_compile:
        ci = torch.compile(eager_init, dynamic=False)
        variants.append(("torch.compile", lambda: ci(like, mask, 0.1)))
    for name in _fused_backends(device):
        variants.append((name, _with_backend(name, lambda: ops.perturb_init(like, mask, init_mag=0.1, norm_type="l2"))))
    _run(case, variants, device, reps, nbytes, rows)


def bench_sym_kl(device, n, c, reps, use_compile, rows, dtype=torch.float32):
    """fp32 logits are the VILLA step's case (it casts the logits to fp32 before the loss); bf16 is an extra."""
    a = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    bb = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    nbytes = 4 * n * c * a.element_size()  # read both logits, write both gradients
    case = f"sym_kl fwd+bwd {n}x{c} {_dt(dtype)}"

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
    with _backend_env("reference"):
        for opt in (plain, capturable):
            opt.step()  # creates the state: timed steps only update it
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
            with _backend_env(fn.backend if isinstance(fn, _OnBackend) else None):
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
    n_kl = 128 if args.quick else 2048
    bf16 = torch.bfloat16
    # what the VILLA step runs first (fp32 deltas, gradients and logits; no projection, as the released configs),
    # then the projection's worst case, then the other ops; the bf16 inputs last, as extra rows
    cases = [
        lambda: bench_update(device, b, reps, use_compile, rows, copy_row=True),
        lambda: bench_sym_kl(device, 128, 3129, reps, use_compile, rows),
        lambda: bench_sym_kl(device, n_kl, 28996, reps, use_compile, rows),
        lambda: bench_update(device, b, reps, use_compile, rows, max_norm=1.0),
        lambda: bench_init(device, b, reps, use_compile, rows),
        lambda: bench_add_layer_norm(device, ln_rows, 768, reps, use_compile, rows),
        lambda: bench_add_if(device, args.quick, reps, rows),
        lambda: bench_adamw(device, args.quick, reps, rows),
        # (no torch.compile row for the extras: its cold compiles would take the time of the phase that runs this)
        lambda: bench_update(device, b, reps, False, rows, gdt=bf16),
        lambda: bench_sym_kl(device, 128, 3129, reps, False, rows, dtype=bf16),
        lambda: bench_sym_kl(device, n_kl, 28996, reps, False, rows, dtype=bf16),
    ]
    for i, case in enumerate(cases):
        if use_compile:
            # compiled code is cached per function: a shape met after another would be compiled for dynamic
            # shapes, which a fixed-shape user never runs; each case starts from an empty cache (static shapes)
            torch._dynamo.reset()
        case()
        # the tables so far, after every case: a run stopped part-way keeps what it measured
        path = write_csv("bench_ops.csv", rows, info, args.out)
        table = _table(rows, info, done=i + 1 == len(cases), device=device)
        with open(os.path.join(args.out, "bench_ops.md"), "w") as f:
            f.write(table + "\n")
    print("\n" + table)
    print(f"\nCSV: {path}")
    return rows


def _table(rows: list[dict], info: dict[str, str], done: bool, device: torch.device | None = None) -> str:
    head = f"bench_ops on {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['date']}"
    fused = ", ".join(_fused_backends(device)) if device is not None else "?"
    head += f"; fused backends timed: {fused or 'none'}; {extension_status(device or torch.device('cpu'))}"
    if not done:
        head += " (stopped part-way: the cases measured so far)"
    return "\n".join(
        [
            head,
            "(speedup is against eager PyTorch in the same run; GB/s against the bytes each op must move, its floor;"
            " the fp32 rows are the VILLA step's inputs, the bf16 rows extras)\n",
            markdown(rows, ["case", "variant", "ms", "GB/s", "speedup"]),
        ]
    )


if __name__ == "__main__":
    main()
