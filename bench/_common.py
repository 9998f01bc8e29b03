"""Shared helpers of the benchmarks: timing, environment facts, CSV and markdown output."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    v = {"torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = "-"
    return v


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds per call: CUDA events (via triton's do_bench when present) or perf_counter."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except ImportError:
            pass
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def write_csv(name: str, rows: list[dict], meta: dict[str, str], out: str = OUT_DIR) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    keys = list(meta) + [k for k in rows[0] if k not in meta] if rows else list(meta)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})
    return path


def meta(device: torch.device) -> dict[str, str]:
    return {"date": _dt.date.today().isoformat(), "device": device_name(device), **versions()}


def extension_status(device: torch.device | str = "cpu") -> str:
    """Whether the compiled extension is there, and on a CUDA device whether it has its CUDA kernels."""
    from villa_fast import ops

    device = torch.device(device)
    built = "cpp" in ops.available_backends("cpu")
    if device.type != "cuda":
        return "villa_fast._C built" if built else "villa_fast._C NOT BUILT (no cpp backend)"
    if "cuda" in ops.available_backends(device):
        return "villa_fast._C with CUDA kernels"
    if built:
        return "villa_fast._C has NO CUDA KERNELS (no cuda backend)"
    return "villa_fast._C NOT BUILT (no cuda backend)"


def ops_backends(device: torch.device | str = "cpu", classes: int = 3129) -> str:
    """The backend each VILLA op takes in the whole-step benchmark's step (``villa_fast.ops.backend_for``, which
    honours VILLA_FAST_BACKEND*): fp32 deltas and gradients, fp32 logits of ``classes`` answers, fp32 parameter
    gradients, the fused LayerNorm's input in the step's autocast dtype (bf16 on a GPU); plus whether the compiled
    extension has CUDA kernels."""
    from villa_fast import ops

    device = torch.device(device)
    f32 = torch.empty(0, device=device)
    probes = [
        ("perturb_update", f32),
        ("sym_kl", torch.empty(1, classes, device=device)),
        ("add_if", f32),
        ("add_layer_norm", torch.empty(0, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)),
        ("adamw_step", f32),
    ]
    parts = []
    for op, t in probes:
        try:
            parts.append(f"{op} {ops.backend_for(t, op)}")
        except Exception as exc:  # an explicit VILLA_FAST_BACKEND that cannot run here
            parts.append(f"{op} unavailable ({type(exc).__name__})")
    return "ops: " + ", ".join(parts) + f"; {extension_status(device)}"


def markdown(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
