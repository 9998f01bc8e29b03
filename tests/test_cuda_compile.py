"""Every CUDA kernel source in csrc/ compiles with nvcc on its own (no torch headers, no GPU needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
KERNELS = sorted(CSRC.glob("*_kernel.cu"))


def _find_nvcc() -> str | None:
    candidates = []
    if os.environ.get("CUDA_HOME"):
        candidates.append(Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc")
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which("nvcc")


NVCC = _find_nvcc()

# about 3-5 s per file on a 2-core machine
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc on PATH)"),
]


def test_kernel_sources_exist():
    assert {p.name for p in KERNELS} >= {"perturb_update_kernel.cu", "perturb_init_kernel.cu", "sym_kl_kernel.cu"}


@pytest.mark.parametrize("source", KERNELS, ids=[p.stem for p in KERNELS])
def test_kernel_compiles(source: Path, tmp_path: Path):
    cmd = [NVCC, "-c", "-std=c++17", "-arch=sm_90", "-O2", str(source), "-o", str(tmp_path / "x.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    assert (tmp_path / "x.o").stat().st_size > 0
