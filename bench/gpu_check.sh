#!/usr/bin/env bash
# The one script for a lent GPU (H100/H200): build the CUDA extension, run the GPU tests,
# then the op, model and whole-step benchmarks; the tables are printed last.
# Logs and CSVs go to $OUT (default bench/out). Budget: under 8 minutes in all.
#
#   bash bench/gpu_check.sh            # everything
#   QUICK=1 bash bench/gpu_check.sh    # tests and the op benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"
mkdir -p "$OUT" bench/out
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
start=$SECONDS
stamp() { echo "== [$((SECONDS - start)) s] $*"; }

stamp "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 1
} | tee "$OUT/env.txt"

stamp "build (FORCE_CUDA=1, arch $TORCH_CUDA_ARCH_LIST)"
if ! FORCE_CUDA=1 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
  echo "pip install failed; trying an in-place build" | tee -a "$OUT/build.log"
  FORCE_CUDA=1 "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1 || { tail -n 60 "$OUT/build.log"; exit 1; }
  ln -sfn ../kernels villa_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
grep -E "villa_fast setup" "$OUT/build.log" | tail -n 2
"$PY" -c "import villa_fast._C as c; assert c.with_cuda, 'villa_fast._C has no CUDA kernels'; print('villa_fast._C with CUDA')" \
  || { tail -n 60 "$OUT/build.log"; exit 1; }

stamp "GPU tests (CUDA and Triton backends vs reference, graphed vs eager, fp16 scaler, no host sync)"
TESTS=(tests/test_perturb_update.py tests/test_sym_kl.py tests/test_perturb_init.py tests/test_opcheck.py
       tests/test_backend.py tests/test_ext_kernels.py)
for f in tests/test_adversarial*.py tests/test_graphed*.py; do [ -f "$f" ] && TESTS+=("$f"); done
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs "${TESTS[@]}" >"$OUT/tests.log" 2>&1
echo "pytest exit code $?"
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20

stamp "op benchmark"
timeout 150 "$PY" -m bench.bench_ops >"$OUT/bench_ops.md" 2>"$OUT/bench_ops.err" || tail -n 20 "$OUT/bench_ops.err"

if [ -z "${QUICK:-}" ]; then
  stamp "whole-step benchmark"
  timeout 210 "$PY" -m bench.bench_step >"$OUT/bench_step.md" 2>"$OUT/bench_step.err" || tail -n 20 "$OUT/bench_step.err"
fi
cp bench/out/*.csv "$OUT"/ 2>/dev/null || true

stamp "tables"
cat "$OUT/bench_ops.md"
[ -f "$OUT/bench_step.md" ] && cat "$OUT/bench_step.md"
stamp "done"
