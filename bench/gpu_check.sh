#!/usr/bin/env bash
# The one script for a lent GPU (H100/H200): build the CUDA extension, smoke-test the kernels and the graphed
# step, then the whole-step benchmark, its profile, the op benchmark and every GPU test with the time left;
# the tables are printed last (the whole-step table at the end). bench/bench_model.py (the model alone
# against the anchor's) is not part of it: run it by hand when there is time.
# Logs and CSVs go to $OUT (default bench/out; a given $OUT holding more than 8 files at the end is packed into
# $OUT/gpu_check.tar.gz, the profiler traces beside it). Runs offline. The whole run stays under BUDGET seconds
# (default 470): each phase gets at most what is left after the phases behind it have their share.
#
# The image lacks a few packages the data pipeline and the tests import: fetch their wheels first with
# `bash bench/device_wheels.sh` (into .whl/) and name .whl in the call's `carry`; they are installed offline
# into /tmp/site.
#
#   bash bench/gpu_check.sh            # everything
#   QUICK=1 bash bench/gpu_check.sh    # build, smoke tests and the UNITER whole-step benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_GIVEN="${OUT:+1}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT" bench/out
OUT="$(cd "$OUT" && pwd)"
if [ -z "${CUDA_HOME:-}" ]; then
  # the toolkit of the nvcc on PATH, else the usual place
  if [ ! -x /usr/local/cuda/bin/nvcc ] && command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-16}"
export FORCE_CUDA="${FORCE_CUDA:-1}"
export PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-python3}"
BUDGET="${BUDGET:-470}"
# benchmark arguments (override for a quick dry run on a CPU)
# B = 128 first: the main target's row is written before B = 32 starts
# (torch.compile's variant compiles cold at each batch size: it runs in a phase of its own after the op benchmark)
STEP_ARGS="${STEP_ARGS:---batches 128,32 --rounds 10 --warmup 3 --extra fused-ln,recompute}"
COMPILE_ARGS="${COMPILE_ARGS:---batches 128,32 --rounds 10 --warmup 3 --extra compile --only graphed+compile}"
PROFILE_ARGS="${PROFILE_ARGS:---batches 128 --extra= --trace}"
OPS_ARGS="${OPS_ARGS:-}"
start=$SECONDS
stamp() { echo "== [$((SECONDS - start)) s] $*"; }
# seconds a phase may take: at most $1, leaving $2 for the phases after it (0 = no time left)
allow() {
  local left=$((BUDGET - (SECONDS - start) - $2))
  if ((left < 20)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}
# run a phase under its allowance: run_phase MAX RESERVE MIN LOG CMD... (skipped when less than MIN seconds,
# what it needs to write anything, are left; a process that ignores the stop is killed 10 s later)
run_phase() {
  local t
  t=$(allow "$1" "$2")
  local need=$3 log=$4
  shift 4
  if ((t < need)); then
    echo "skipped: ${t} s left of the ${BUDGET} s budget, ${need} s needed" | tee "$log"
    return 124
  fi
  timeout -k 10 "$t" "$@" >"$log" 2>&1
  local rc=$?
  ((rc == 124)) && echo "stopped after its ${t} s allowance" | tee -a "$log"
  return $rc
}

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import lmdb, lz4, msgpack_numpy" 2>/dev/null \
  || echo "WARNING: lmdb / lz4 / msgpack_numpy missing (bash bench/device_wheels.sh here, carry .whl): the data pipeline's GPU tests cannot run"

stamp "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version 2>&1 | tail -n 1
} | tee "$OUT/env.txt"

stamp "build (FORCE_CUDA=$FORCE_CUDA, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
run_phase 200 300 60 "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
rc=$?
if ((rc != 0)); then
  # a compile error would fail the same way again; anything else (old setuptools, pip) gets an in-place build
  if ((rc != 124)) && ! grep -qE '^FAILED: |\): error|: error:' "$OUT/build.log"; then
    echo "pip install failed (exit $rc); trying an in-place build" | tee -a "$OUT/build.log"
    run_phase 200 300 60 "$OUT/build_inplace.log" "$PY" setup.py build_ext --inplace
    tail -n 5 "$OUT/build_inplace.log"
  else
    echo "build failed (exit $rc):"
    grep -E '^FAILED: |\): error|: error:' "$OUT/build.log" | head -n 20
  fi
fi
grep -h "villa_fast setup" "$OUT"/build*.log 2>/dev/null | tail -n 2
if ! "$PY" -c "import villa_fast.kernels" 2>/dev/null; then
  # no editable install: serve the Triton kernels from the source tree
  ln -sfn ../kernels villa_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# torch first: the extension links against torch's shared libraries
"$PY" -c "import torch, villa_fast._C as c; assert c.with_cuda; print('villa_fast._C with CUDA kernels')" 2>&1 \
  || echo "WARNING: no CUDA build of villa_fast._C: the CUDA backend is skipped, Triton serves the GPU"

# the phases, most valuable first: a smoke test of what the benchmarks stand on, the whole-step benchmark,
# its profile, the op benchmark, then every GPU test with the time left
stamp "GPU smoke tests (CUDA kernels vs reference, graphed vs eager)"
SMOKE=(tests/test_perturb_update.py tests/test_sym_kl.py tests/test_perturb_init.py tests/test_add_if.py tests/test_adamw_step.py
  tests/test_train_optim.py tests/test_graphed.py)
run_phase 90 300 30 "$OUT/tests_smoke.log" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs -x \
  -k "cuda or gpu or graph" "${SMOKE[@]}"
echo "pytest exit code $?"
grep -E "(passed|failed|error)" "$OUT/tests_smoke.log" | tail -n 1
grep -E "^(FAILED|ERROR)" "$OUT/tests_smoke.log" | head -n 10

stamp "whole-step benchmark, UniterForVqa (UNITER-base, B=128 then 32)"
run_phase 180 $([ -z "${QUICK:-}" ] && echo 140 || echo 0) 60 "$OUT/bench_step_uniter.log" \
  "$PY" -m bench.bench_step --model uniter $STEP_ARGS --out "$OUT" || tail -n 20 "$OUT/bench_step_uniter.log"

if [ -z "${QUICK:-}" ]; then
  stamp "profile of the step (B=128)"
  run_phase 60 80 40 "$OUT/profile_step.log" "$PY" -m bench.profile_step $PROFILE_ARGS --out "$OUT" \
    || tail -n 20 "$OUT/profile_step.log"
  stamp "op benchmark"
  run_phase 80 50 30 "$OUT/bench_ops.log" "$PY" -m bench.bench_ops $OPS_ARGS --out "$OUT" || tail -n 20 "$OUT/bench_ops.log"
  stamp "whole-step benchmark, the torch.compile variant (compiles at each batch size)"
  run_phase 120 30 60 "$OUT/bench_step_compile.log" \
    "$PY" -m bench.bench_step --model uniter $COMPILE_ARGS --tag _compile --out "$OUT" \
    || tail -n 20 "$OUT/bench_step_compile.log"
  stamp "all GPU tests, with the time left"
  # the GPU cases only (a marker name matches -k too), cheapest and most telling first: the kernels against the
  # reference, opcheck and the fused LayerNorm, then the smoke files' Triton cases (their CUDA and graph cases ran
  # in the smoke phase), then the trainer on the GPU (captures and compiles: the slowest)
  KERNELS=(tests/test_ext_kernels.py tests/test_opcheck.py tests/test_add_layer_norm.py tests/test_backend.py)
  PIPELINE=(tests/test_train_tf32.py tests/test_gpu_pipeline.py)
  export PYTEST_QUIET="-q -p no:cacheprovider -o addopts= -rs --durations=10"
  run_phase 400 0 30 "$OUT/tests.log" bash -c "rc=0; $PY -m pytest \$PYTEST_QUIET -k '(gpu or cuda or triton) and not fullgraph' \
    ${KERNELS[*]} || rc=1; $PY -m pytest \$PYTEST_QUIET -k triton ${SMOKE[*]} || rc=1; \
    $PY -m pytest \$PYTEST_QUIET ${PIPELINE[*]} || rc=1; exit \$rc"
  echo "pytest exit code $?"
  grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/tests.log" | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
fi
# the other benchmarks' tables, without replacing what a phase wrote to $OUT itself
cp -n bench/out/*.csv bench/out/*.md "$OUT"/ 2>/dev/null || true

stamp "tables"
[ -f "$OUT/bench_ops.md" ] && cat "$OUT/bench_ops.md"
[ -f "$OUT/profile_step.md" ] && echo && grep -vE '^\| `' "$OUT/profile_step.md"
[ -f "$OUT/bench_step_uniter_compile.md" ] && [ "$OUT/bench_step_uniter_compile.md" -nt "$OUT/env.txt" ] && echo \
  && cat "$OUT/bench_step_uniter_compile.md"
[ -f "$OUT/bench_step_uniter.md" ] && [ "$OUT/bench_step_uniter.md" -nt "$OUT/env.txt" ] && echo \
  && cat "$OUT/bench_step_uniter.md"
# a device machine returns at most 8 files from $OUT: past that, everything but the traces goes into one archive
if [ -n "$OUT_GIVEN" ] && (($(find "$OUT" -maxdepth 1 -type f | wc -l) > 8)); then
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.json.gz' ! -name '*.tar.gz' ! -name packed.txt -printf '%f\n' \
    | sort >packed.txt && tar czf gpu_check.tar.gz -T packed.txt packed.txt && xargs rm -f <packed.txt && rm -f packed.txt)
  echo "logs and tables packed into $OUT/gpu_check.tar.gz; $OUT now holds: $(cd "$OUT" && ls | tr '\n' ' ')"
fi
stamp "done"
