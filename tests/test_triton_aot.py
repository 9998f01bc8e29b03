"""Every Triton kernel compiles for sm_90 (H100/H200) at the configurations its launcher picks, without spills.

The launchers of kernels/*.py run with CPU tensors of the project's shapes in a subprocess without
TRITON_INTERPRET (this suite sets it), each launch compiling for sm_90 instead of running
(bench/triton_aot.py). No GPU is needed: Triton's own compiler and its bundled ptxas do the work.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNELS_DIR = ROOT / "kernels"
MAX_SMEM_PER_BLOCK = 227 * 1024  # sm_90: the most shared memory one block may use

# Spills each kernel may have at a configuration its launcher picks: "module:function" ->
# (largest spill stores + loads in bytes, why that is acceptable). Nothing spills today; an entry
# here must name the kernel and say why the spill is the better trade, not just raise the limit.
SPILL_ALLOWANCE: dict[str, tuple[int, str]] = {}


def _why_not() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable: {exc}"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as exc:  # no NVIDIA backend in this Triton, or its ptxas is missing
        return f"Triton's ptxas is unavailable: {exc}"
    if not os.access(ptxas, os.X_OK):
        return f"Triton's ptxas at {ptxas} is not executable"
    return None


# about 15 s on a 2-core machine
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    why = _why_not()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.triton_aot", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"bench.triton_aot gave no report (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return out


def _jit_functions() -> dict[str, set[str]]:
    """module:function of every @triton.jit function in kernels/*.py -> the jit functions of its module it calls."""

    def is_jit(dec: ast.expr) -> bool:
        dec = dec.func if isinstance(dec, ast.Call) else dec
        return (isinstance(dec, ast.Attribute) and dec.attr == "jit") or (isinstance(dec, ast.Name) and dec.id == "jit")

    found = {}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        fns = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and any(map(is_jit, n.decorator_list))]
        names = {f.name for f in fns}
        for f in fns:
            calls = {n.func.id for n in ast.walk(f) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
            found[f"{path.stem}:{f.name}"] = calls & names
    return found


def _label(c: dict) -> str:
    return f"{c['kernel']} {c['constexprs']} num_warps={c['num_warps']} ({'; '.join(c['cases'])})"


def test_every_launch_compiled_for_sm90(report):
    assert not report["errors"], "launcher calls that did not compile for sm_90:\n" + "\n".join(
        f"{case}: {err}" for case, err in report["errors"].items()
    )
    assert report["launches"] and all(report["launches"].values()), [c for c, k in report["launches"].items() if not k]
    assert Path(report["kernels_dir"]) == KERNELS_DIR
    for c in report["compiled"]:
        assert c["arch"] == 90 and c["ptx_target"].startswith("sm_90"), _label(c)
        assert c["cubin_bytes"] > 0, f"no sm_90 cubin for {_label(c)}"


def test_every_jit_function_is_covered(report):
    """Each @triton.jit function is compiled as a kernel or inlined from one: a new kernel needs a case."""
    jit = _jit_functions()
    assert jit, f"no @triton.jit functions found in {KERNELS_DIR}"
    compiled = {c["kernel"] for c in report["compiled"]}
    assert compiled <= set(jit), f"compiled kernels outside kernels/: {sorted(compiled - set(jit))}"
    reached, todo = set(compiled), list(compiled)
    while todo:
        name = todo.pop()
        for callee in jit[name]:
            full = f"{name.split(':')[0]}:{callee}"
            if full not in reached:
                reached.add(full)
                todo.append(full)
    missing = sorted(set(jit) - reached)
    assert not missing, f"jit functions no launcher call in bench/triton_aot.py compiles: {missing}"


def test_no_spills(report):
    over = []
    for c in report["compiled"]:
        spilled = c["usage"]["spill_stores"] + c["usage"]["spill_loads"]
        allowed = SPILL_ALLOWANCE.get(c["kernel"], (0, ""))[0]
        if spilled > allowed:
            over.append(f"{_label(c)}: {c['usage']['spill_stores']}/{c['usage']['spill_loads']} bytes stored/loaded")
    assert not over, "register spills on sm_90:\n" + "\n".join(over)
    assert set(SPILL_ALLOWANCE) <= {c["kernel"] for c in report["compiled"]}, "allowance for a kernel not compiled"


def test_shared_memory_fits(report):
    over = [
        f"{_label(c)}: {c['usage']['shared']} bytes"
        for c in report["compiled"]
        if c["usage"]["shared"] > MAX_SMEM_PER_BLOCK
    ]
    assert not over, f"more shared memory than an sm_90 block may use ({MAX_SMEM_PER_BLOCK} bytes):\n" + "\n".join(over)


def test_adamw_step_takes_its_step_size_scalars_as_float64(report):
    # Triton passes a Python float as float32 unless the parameter is declared otherwise: lr, log beta and
    # weight_decay enter the step size computed in float64, and would be rounded before it
    adamw = [c for c in report["compiled"] if c["kernel"] == "adamw_step:_adamw_step_kernel"]
    assert adamw
    for c in adamw:
        assert {k: c["scalars"].get(k) for k in ("lr", "log_beta1", "log_beta2", "weight_decay")} == dict.fromkeys(
            ("lr", "log_beta1", "log_beta2", "weight_decay"), "fp64"
        ), c["scalars"]
