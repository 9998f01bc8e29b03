"""Ahead-of-time compilation of every Triton kernel for sm_90 (H100/H200), on a machine without a GPU.

    python -m bench.triton_aot [--json] [--only SUBSTRING]

The real launchers of kernels/*.py (perturb_update, perturb_init, sym_kl, add_layer_norm forward and
backward, add_if, adamw_step) are called with CPU tensors of the project's shapes, so they pick BLOCK,
num_warps, the grid and the dtype-dependent arguments exactly as they do on the GPU; each launch then compiles for
GPUTarget("cuda", 90, 32) instead of running. Two hooks make that happen, and both are undone on exit:

- a minimal Triton driver whose current target is sm_90 (there is no CUDA driver here);
- JITFunction.run is wrapped to compile only (Triton's own ``warmup`` path) and to record, per launch,
  the kernel, the grid, the constexprs and tensor dtypes it was given, and ptxas' resource report.

The ptxas report is the log of Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG), so registers and spills
are those of the cubin Triton built; every kernel is compiled afresh (TRITON_ALWAYS_COMPILE), since a
hit in Triton's disk cache would skip ptxas. Tensors come from torch.empty: nothing is computed and the
pages of the large ones are never touched. The add_layer_norm backward sizes its grid by the SM count,
which is set to an H100 SXM's (132, as on an H200).

A new kernel needs a launcher call in :func:`cases` (tests/test_triton_aot.py fails for a @triton.jit
function of kernels/ that no call compiles). A kernel behind @triton.autotune would benchmark its configs
on launch, which cannot run here; none of the kernels is autotuned.

Must run in a process without TRITON_INTERPRET (under the interpreter @triton.jit builds no compilable
kernels); the test suite sets it, so tests/test_triton_aot.py runs this module in a subprocess.
Numbers come from this machine's Triton and its bundled ptxas (both printed); another Triton version on
the GPU machine may allocate registers a little differently.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ARCH = 90
H100_SMS = 132
# sm_90 limits: per SM 64K 32-bit registers, 64 resident warps, 32 resident blocks and 228 KB of shared
# memory (1 KB of it reserved per block); one block may use at most 227 KB.
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MAX_SMEM_PER_BLOCK = 227 * 1024

# ------------------------------------------------------------------------------------------ the shapes

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32
_SHORT = {BF16: "bf16", FP16: "fp16", FP32: "fp32"}
TXT, IMG = (128, 24, 768), (128, 36, 2048)  # UNITER/VQA: text and image embedding deltas
ROWS = 128 * (24 + 36)  # rows of one UNITER-base layer's residual add + LayerNorm at that batch


@dataclass(frozen=True)
class Case:
    """One call of a launcher: ``call(module)`` runs it on the module of kernels/ named ``module``."""

    module: str
    label: str
    call: Callable[[object], object]


def _update_case(shapes, gdt, norm, max_norm, scale, tag):
    def call(k):
        deltas = [torch.empty(s) for s in shapes]
        grads = [torch.empty(s, dtype=gdt) for s in shapes]
        return k.perturb_update(
            deltas=deltas,
            grads=grads,
            lrs=[1e-3] * len(shapes),
            norm_type=norm,
            max_norm=max_norm,
            grad_scale=torch.ones(1) if scale else None,
        )

    label = f"{tag} grad {_SHORT[gdt]} {norm} max_norm={max_norm:g}{' scale' if scale else ''}"
    return Case("perturb_update", label, call)


def _init_case(shape, masked, norm):
    def call(k):
        mask = torch.empty(shape[:-1]) if masked else None
        return k.perturb_init(noise=torch.empty(shape), mask=mask, init_mag=1.0, norm_type=norm)

    return Case("perturb_init", f"{'x'.join(map(str, shape))} {norm}{' mask' if masked else ''}", call)


def _sym_kl_case(shape, dt, need_grad):
    def call(k):
        a, b = torch.empty(shape, dtype=dt), torch.empty(shape, dtype=dt)
        return k.sym_kl(a=a, b=b, reduction="batchmean", need_grad=need_grad)

    return Case("sym_kl", f"{shape[0]}x{shape[1]} {_SHORT[dt]}{' +grad' if need_grad else ''}", call)


def _ln_tensors(h, xdt, rdt):
    # a model cast to one dtype has weights of that dtype; under autocast (x in bf16, the residual
    # stream in fp32) the parameters stay fp32
    wdt = FP32 if xdt != rdt else xdt
    return torch.empty(ROWS, h, dtype=xdt), torch.empty(ROWS, h, dtype=rdt), torch.empty(h, dtype=wdt)


def _ln_fwd_case(h, xdt, rdt, bias=True):
    def call(k):
        x, r, w = _ln_tensors(h, xdt, rdt)
        return k.add_layer_norm_fwd(x=x, residual=r, weight=w, bias=torch.empty_like(w) if bias else None, eps=1e-12)

    label = f"fwd {ROWS}x{h} x {_SHORT[xdt]} res {_SHORT[rdt]}{'' if bias else ' no bias'}"
    return Case("add_layer_norm", label, call)


def _ln_bwd_case(h, xdt, rdt):
    def call(k):
        x, r, w = _ln_tensors(h, xdt, rdt)
        dy = torch.empty(ROWS, h, dtype=torch.promote_types(xdt, rdt))
        mean, rstd = torch.empty(ROWS), torch.empty(ROWS)
        return k.add_layer_norm_bwd(grad_y=dy, x=x, residual=r, weight=w, mean=mean, rstd=rstd)

    return Case("add_layer_norm", f"bwd {ROWS}x{h} x {_SHORT[xdt]} res {_SHORT[rdt]}", call)


def _add_if_case(dt):
    def call(k):
        shapes = [(3072, 768), (768,)]  # a UNITER-base FFN weight and a bias
        accs = [torch.empty(s, dtype=dt) for s in shapes]
        vals = [torch.empty(s, dtype=dt) for s in shapes]
        return k.add_if(accs=accs, vals=vals, ok=torch.empty(1, dtype=torch.bool))

    return Case("add_if", f"FFN weight + bias {_SHORT[dt]}", call)


def _adamw_step_case(gdt, device_scalars, correct_bias=True, weight_decay=0.01):
    def call(k):
        shapes = [(3072, 768), (768,)]  # a UNITER-base FFN weight and a bias
        params = [torch.empty(s) for s in shapes]
        scalar = torch.ones(()) if device_scalars else None
        return k.adamw_step(
            params=params,
            grads=[torch.empty(s, dtype=gdt) for s in shapes],
            exp_avgs=[torch.empty(s) for s in shapes],
            exp_avg_sqs=[torch.empty(s) for s in shapes],
            steps=[torch.zeros(()) for _ in shapes],
            lr=1e-4,
            lr_tensor=scalar,
            beta1=0.9,
            beta2=0.98,
            eps=1e-6,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            grad_scale=scalar,
            found_inf=None if scalar is None else torch.zeros(1),
        )

    label = f"FFN weight + bias grad {_SHORT[gdt]}"
    label += " lr/scale/found_inf on the device" if device_scalars else " float lr"
    label += "" if correct_bias else " no bias correction"
    label += "" if weight_decay else " no decay"
    return Case("adamw_step", label, call)


def cases() -> list[Case]:
    """The launcher calls whose kernels are compiled: the shapes and options the project uses."""
    out = []
    for gdt in (BF16, FP16, FP32):
        for norm in ("l2", "linf"):
            for max_norm in (0.0, 0.2):
                for scale in (False, True):
                    out.append(_update_case([TXT, IMG], gdt, norm, max_norm, scale, "txt+img"))
    # text-only attacks (adv_modality ["text"]) on batches of up to 21 tokens keep a row in registers:
    # the launcher's largest single-pass block (16384, 16 warps)
    for gdt in (BF16, FP16, FP32):
        for norm in ("l2", "linf"):
            out.append(_update_case([(128, 21, 768)], gdt, norm, 0.2, True, "txt 128x21x768"))
    for masked in (False, True):
        for norm in ("l2", "linf"):
            out.append(_init_case(IMG, masked, norm))
    for shape in ((128, 3129), (2048, 28996)):
        for dt in (FP32, BF16, FP16):
            for need_grad in (True, False):
                out.append(_sym_kl_case(shape, dt, need_grad))
    for h in (768, 1000):
        for xdt, rdt in ((FP32, FP32), (BF16, BF16), (FP16, FP16), (BF16, FP32)):
            out.append(_ln_fwd_case(h, xdt, rdt))
            out.append(_ln_bwd_case(h, xdt, rdt))
    out.append(_ln_fwd_case(768, BF16, FP32, bias=False))
    for dt in (FP32, BF16, FP16):
        out.append(_add_if_case(dt))
    # the trainer's plain step, and the GradScaler / CUDA-graph step (tensor lr, scale and flag on the device)
    for gdt in (FP32, BF16, FP16):
        for device_scalars in (False, True):
            out.append(_adamw_step_case(gdt, device_scalars))
    out.append(_adamw_step_case(FP32, False, correct_bias=False, weight_decay=0.0))
    return out


# ---------------------------------------------------------------------------------------- the records


@dataclass
class Usage:
    """ptxas' report for one compiled kernel (bytes, except registers)."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # Triton's dynamic shared memory plus any static smem ptxas reports
    source: str  # "triton ptxas log" or "ptxas -v rerun"
    warnings: list[str] = field(default_factory=list)


@dataclass
class Compiled:
    """One distinct compiled kernel and the launches that picked it."""

    kernel: str  # module:function
    constexprs: dict[str, object]
    dtypes: dict[str, str]  # tensor argument -> dtype
    scalars: dict[str, str]  # scalar argument -> the type the kernel was compiled for (fp32, fp64, i32, ...)
    num_warps: int
    num_stages: int
    arch: int
    ptx_target: str
    cubin_bytes: int
    usage: Usage
    blocks_per_sm: int
    occupancy: float  # resident warps / 64, an upper bound from registers, shared memory and warps
    cases: list[str] = field(default_factory=list)
    grids: list[list[int]] = field(default_factory=list)


@dataclass
class Report:
    triton: str
    ptxas: str
    target: str
    kernels_dir: str
    compiled: list[Compiled]
    launches: dict[str, list[str]]  # case label -> kernels it launched
    errors: dict[str, str]  # case label -> why it did not compile
    jit_functions: dict[str, list[str]]  # module:function -> the jit functions of its module it calls


def occupancy(registers: int, num_warps: int, shared: int) -> tuple[int, float]:
    """(blocks per SM, resident warps / 64) on sm_90: registers go per warp in units of 256, shared
    memory per block in units of 128 bytes plus the 1 KB the driver keeps per block."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = (REGS_PER_SM // per_warp) // num_warps
    by_smem = SMEM_PER_SM // (math.ceil(shared / 128) * 128 + SMEM_RESERVED_PER_BLOCK)
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps, by_regs, by_smem)
    return blocks, blocks * num_warps / MAX_WARPS_PER_SM


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str, name: str) -> dict[str, int] | None:
    """Registers, spills, stack and static smem of entry ``name`` from a ``ptxas -v`` log; None without it."""
    start = log.find(f"Compiling entry function '{name}'")
    if start < 0:
        return None
    part = log[start:]
    nxt = part.find("Compiling entry function", 1)
    part = part if nxt < 0 else part[:nxt]
    regs, frame = _RE_REGS.search(part), _RE_FRAME.search(part)
    if regs is None or frame is None:
        return None
    smem = _RE_SMEM.search(part)
    return {
        "registers": int(regs.group(1)),
        "stack": int(frame.group(1)),
        "spill_stores": int(frame.group(2)),
        "spill_loads": int(frame.group(3)),
        "static_smem": int(smem.group(1)) if smem else 0,
    }


def _ptxas() -> str:
    from triton import knobs

    return knobs.nvidia.ptxas.path


def _ptxas_version() -> str:
    out = subprocess.run([_ptxas(), "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release [\d.]+, V([\d.]+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1]


def _rerun_ptxas(ptx: str) -> str:
    """``ptxas -v`` on the kernel's PTX, for when Triton printed no log (a Triton without the knob)."""
    arch = re.search(r"^\.target (sm_\w+)", ptx, re.MULTILINE)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [_ptxas(), "-v", "-lineinfo", f"--gpu-name={arch.group(1) if arch else f'sm_{ARCH}a'}", str(src)]
        proc = subprocess.run(cmd + ["-o", str(Path(d) / "k.cubin")], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed on the kernel's PTX:\n{proc.stderr[-4000:]}")
    return proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------- the hooks


def _fake_driver_class():
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class Sm90CompileOnlyDriver(DriverBase):
        """Just enough of a driver for JITFunction.run to compile: an sm_90 target, device 0, stream 0."""

        @classmethod
        def is_active(cls):
            return False  # never picked on its own: only set_active installs it

        def map_python_to_cpp_type(self, ty: str) -> str:
            raise NotImplementedError("compile-only driver: no launcher is built")

        def get_current_target(self):
            return GPUTarget("cuda", ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver: nothing runs")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            pass

        def get_current_stream(self, device=None):
            return 0

    return Sm90CompileOnlyDriver


class _Recorder:
    def __init__(self) -> None:
        self.case = ""
        self.by_hash: dict[str, Compiled] = {}
        self.launches: dict[str, list[str]] = {}
        self.touched: list[object] = []

    def record(self, fn, kernel, args, kwargs, grid, log: str) -> None:
        name = f"{fn.fn.__module__.rsplit('.', 1)[-1]}:{fn.fn.__name__}"
        self.launches.setdefault(self.case, []).append(name)
        if fn not in self.touched:
            self.touched.append(fn)
        params = inspect.signature(fn.fn).parameters
        bound = inspect.signature(fn.fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
        grid = list(grid(bound.arguments) if callable(grid) else grid)
        seen = self.by_hash.get(kernel.hash)
        if seen is None:
            seen = self.by_hash[kernel.hash] = self._describe(fn, name, kernel, bound.arguments, log)
        if self.case not in seen.cases:
            seen.cases.append(self.case)
        if grid not in seen.grids:
            seen.grids.append(grid)

    @staticmethod
    def _describe(fn, name, kernel, arguments, log: str) -> Compiled:
        constexprs = {p.name: arguments.get(p.name) for p in fn.params if p.is_constexpr}
        dtypes = {k: str(v.dtype).replace("torch.", "") for k, v in arguments.items() if torch.is_tensor(v)}
        signature = getattr(getattr(kernel, "src", None), "signature", None) or {}
        scalars = {
            k: str(t) for k, t in signature.items() if isinstance(t, str) and t != "constexpr" and not t.startswith("*")
        }
        md = kernel.metadata
        stats, source = parse_ptxas_log(log, md.name), "triton ptxas log"
        if stats is None:
            log, source = _rerun_ptxas(kernel.asm["ptx"]), "ptxas -v rerun"
            stats = parse_ptxas_log(log, md.name)
            if stats is None:
                raise RuntimeError(f"no resource report for {md.name} in the ptxas log:\n{log[-2000:]}")
        warnings = [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()]
        shared = int(md.shared) + stats.pop("static_smem")
        usage = Usage(shared=shared, source=source, warnings=warnings, **stats)
        blocks, occ = occupancy(usage.registers, md.num_warps, shared)
        target = re.search(r"^\.target (\S+)", kernel.asm["ptx"], re.MULTILINE)
        return Compiled(
            kernel=name,
            constexprs=constexprs,
            dtypes=dtypes,
            scalars=scalars,
            num_warps=md.num_warps,
            num_stages=md.num_stages,
            arch=md.target.arch,
            ptx_target=target.group(1) if target else "?",
            cubin_bytes=len(kernel.asm["cubin"]) if kernel.asm["cubin"][:4] == b"\x7fELF" else 0,
            usage=usage,
            blocks_per_sm=blocks,
            occupancy=occ,
        )


@contextlib.contextmanager
def _compile_only(rec: _Recorder, modules: dict[str, object]) -> Iterator[None]:
    """Install the sm_90 driver, compile-only launches, a fresh ptxas log per compile; undo all on exit."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    original_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        log = io.StringIO()
        # Triton prints the ptxas log (and, on a failure, the reproducer) to stdout
        with contextlib.redirect_stdout(log):
            kernel = original_run(self, *args, grid=grid, warmup=True, **kwargs)
        rec.record(self, kernel, args, kwargs, grid, log.getvalue())
        return kernel

    previous = driver._active  # the lazily created default would fail here: no CUDA driver
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    driver.set_active(_fake_driver_class()())
    JITFunction.run = run
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True
    pinned = []
    for mod in modules.values():
        if hasattr(mod, "_sm_count"):
            pinned.append((mod, mod._sm_count))
            mod._sm_count = lambda device: H100_SMS
    try:
        yield
    finally:
        for mod, f in pinned:
            mod._sm_count = f
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
        JITFunction.run = original_run
        driver._active = previous
        for fn in rec.touched:
            fn.device_caches.clear()  # their binders hold the sm_90 target


# ----------------------------------------------------------------------------------------- the check


def jit_functions(kernels_dir: Path) -> dict[str, list[str]]:
    """Every @triton.jit function in kernels_dir/*.py, as module:function -> jit functions it calls."""

    def is_jit(dec: ast.expr) -> bool:
        dec = dec.func if isinstance(dec, ast.Call) else dec
        return (isinstance(dec, ast.Attribute) and dec.attr == "jit") or (isinstance(dec, ast.Name) and dec.id == "jit")

    out = {}
    for path in sorted(kernels_dir.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        fns = [n for n in tree.body if isinstance(n, ast.FunctionDef) and any(map(is_jit, n.decorator_list))]
        names = {f.name for f in fns}
        for f in fns:
            called = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            out[f"{path.stem}:{f.name}"] = sorted(called & names)
    return out


def _import_kernels(names) -> dict[str, object]:
    from triton.runtime.jit import JITFunction

    mods = {}
    for name in names:
        mod = importlib.import_module(f"villa_fast.kernels.{name}")
        jitted = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
        if any(not isinstance(v, JITFunction) for v in jitted):
            raise RuntimeError(
                f"villa_fast.kernels.{name} was imported under TRITON_INTERPRET: its kernels cannot be compiled; "
                "run in a process without TRITON_INTERPRET"
            )
        mods[name] = mod
    return mods


def compile_all(selected: list[Case] | None = None) -> Report:
    """Compile every kernel the launchers launch for ``selected`` (default: :func:`cases`) for sm_90."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: @triton.jit builds interpreted kernels; unset it")
    import triton

    selected = cases() if selected is None else selected
    mods = _import_kernels(sorted({c.module for c in selected}))
    rec = _Recorder()
    errors = {}
    with _compile_only(rec, mods):
        for case in selected:
            rec.case = f"{case.module}: {case.label}"
            try:
                case.call(mods[case.module])
            except Exception as exc:  # one failing configuration must not hide the others
                errors[rec.case] = f"{type(exc).__name__}: {exc}"[-4000:]
            rec.launches.setdefault(rec.case, [])
    kernels_dir = Path(importlib.import_module("villa_fast.kernels").__file__).resolve().parent
    return Report(
        triton=triton.__version__,
        ptxas=_ptxas_version(),
        target=f"cuda sm_{ARCH} (GPUTarget('cuda', {ARCH}, 32))",
        kernels_dir=str(kernels_dir),
        compiled=list(rec.by_hash.values()),
        launches=rec.launches,
        errors=errors,
        jit_functions=jit_functions(kernels_dir),
    )


def uncovered(report: Report) -> list[str]:
    """The jit functions of kernels/ neither compiled as a kernel nor called from one that was."""
    reached = {c.kernel for c in report.compiled}
    todo = list(reached)
    while todo:
        name = todo.pop()
        mod = name.split(":")[0]
        for callee in report.jit_functions.get(name, []):
            if f"{mod}:{callee}" not in reached:
                reached.add(f"{mod}:{callee}")
                todo.append(f"{mod}:{callee}")
    return sorted(set(report.jit_functions) - reached)


# ----------------------------------------------------------------------------------------- the output


def _fmt_const(v) -> str:
    return str(int(v)) if isinstance(v, bool) else str(v)


def format_report(report: Report) -> str:
    header = ["kernel", "config", "warps", "grid", "regs", "spill st/ld", "stack", "smem", "blk/SM", "occ", "cases"]
    rows = []
    for c in sorted(report.compiled, key=lambda c: (c.kernel, c.cases[0])):
        config = " ".join(f"{k}={_fmt_const(v)}" for k, v in c.constexprs.items())
        ptrs = sorted({d for d in c.dtypes.values()})
        u = c.usage
        rows.append(
            [
                c.kernel.split(":")[1].strip("_").removesuffix("_kernel"),
                f"{config} [{','.join(ptrs)}]",
                c.num_warps,
                " ".join("x".join(map(str, g)) for g in c.grids),
                u.registers,
                f"{u.spill_stores}/{u.spill_loads}",
                u.stack,
                u.shared,
                c.blocks_per_sm,
                f"{100 * c.occupancy:.0f}%",
                "; ".join(x.split(": ", 1)[1] for x in c.cases),
            ]
        )
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            str(v).ljust(w) if i in (0, 1, 10) else str(v).rjust(w)
            for i, (v, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [
        f"triton {report.triton}, ptxas {report.ptxas}, target {report.target}; kernels from {report.kernels_dir}",
        f"{len(report.compiled)} distinct kernels from {len(report.launches)} launcher calls; "
        "occ = resident warps / 64 (upper bound: registers, shared memory, warps)",
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
    ]
    spilled = [c for c in report.compiled if c.usage.spill_stores or c.usage.spill_loads]
    warned = {w for c in report.compiled for w in c.usage.warnings}
    missing = uncovered(report)
    out.append("")
    out.append(f"spills: {len(spilled)} of {len(report.compiled)} kernels" + (":" if spilled else ""))
    out += [f"  {c.kernel} {c.constexprs}: {c.usage.spill_stores}/{c.usage.spill_loads} bytes" for c in spilled]
    out += [f"ptxas warning: {w}" for w in sorted(warned)]
    out.append("jit functions not compiled (nor called from a compiled kernel): " + (", ".join(missing) or "none"))
    for case, err in report.errors.items():
        out.append(f"FAILED {case}: {err}")
    return "\n".join(out)


def to_json(report: Report) -> str:
    return json.dumps(asdict(report), indent=1, default=str)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    ap.add_argument("--only", default="", help="only the launcher calls whose 'module: label' contains this")
    args = ap.parse_args(argv)
    selected = [c for c in cases() if args.only in f"{c.module}: {c.label}"]
    report = compile_all(selected)
    print(to_json(report) if args.json else format_report(report))
    return 1 if report.errors or (uncovered(report) and not args.only) else 0


if __name__ == "__main__":
    sys.exit(main())
