#!/usr/bin/env bash
# The one script for a lent GPU (H100/H200): build the CUDA extension, smoke-test the kernels and the graphed
# step, then the whole-step benchmark, its profile, the op benchmark and every GPU test with the time left;
# a status block (revision, build, the ops' backends, smoke tests, each phase's outcome) and the tables are
# printed last (the whole-step table at the end). bench/bench_model.py (the model alone against the anchor's)
# is not part of it: run it by hand when there is time.
# Logs and CSVs go to $OUT (default bench/out; a given $OUT holding more than 8 files at the end is packed into
# $OUT/gpu_check.tar.gz, the profiler traces beside it). Runs offline. The whole run stays under BUDGET seconds
# (default 470), except that the build is never skipped (it gets at least 60 s: every benchmark stands on it):
# while a phase runs, each phase still to come in this mode (QUICK or not) keeps its share of BUDGET in reserve.
#
# Before the call, here: `bash bench/device_wheels.sh` fetches into .whl/ the wheels of a few packages the
# image lacks (the data pipeline and the tests import them; installed offline into /tmp/site) and records the
# revision (.whl/REVISION: commit, uncommitted changes, a hash of the files); name .whl in the call's `carry`.
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
QUICK="${QUICK:-}"
# benchmark arguments (override for a quick dry run on a CPU)
# B = 128 first: the main target's row is written before B = 32 starts
# (torch.compile's variant compiles cold at each batch size: it runs in a phase of its own after the op benchmark)
STEP_ARGS="${STEP_ARGS:---batches 128,32 --rounds 10 --warmup 3 --extra fused-ln,recompute}"
COMPILE_ARGS="${COMPILE_ARGS:---batches 128,32 --rounds 10 --warmup 3 --extra compile --only graphed+compile}"
PROFILE_ARGS="${PROFILE_ARGS:---batches 128 --extra= --trace}"
OPS_ARGS="${OPS_ARGS:-}"
start=$SECONDS
stamp() { echo "== [$((SECONDS - start)) s] $*"; }

# the phases after the build, in order, and the share of BUDGET (percent) each keeps in reserve while the
# phases before it run; QUICK runs the first two
if [ -z "$QUICK" ]; then
  PLAN=(smoke step profile ops compile tests)
else
  PLAN=(smoke step)
fi
declare -A SHARE=([smoke]=6 [step]=20 [profile]=8 [ops]=10 [compile]=10 [tests]=6)
# seconds to keep for the phases of PLAN after $1 ("build": all of them)
reserve() {
  local after=$1 seen= pct=0 p
  [ "$after" = build ] && seen=1
  for p in "${PLAN[@]}"; do
    [ -n "$seen" ] && pct=$((pct + SHARE[$p]))
    [ "$p" = "$after" ] && seen=1
  done
  echo $((BUDGET * pct / 100))
}
# seconds a phase may take: at most $1, leaving $2 for the phases after it (0 = no time left)
allow() {
  local left=$((BUDGET - (SECONDS - start) - $2))
  if ((left < 20)); then echo 0; elif ((left < $1)); then echo "$left"; else echo "$1"; fi
}
# each phase's outcome, for the status block
STATUS_NAMES=()
STATUS_TEXT=()
LAST="" # the last phase's outcome: ok, failed, timed-out, killed or skipped
record() {
  STATUS_NAMES+=("$1")
  STATUS_TEXT+=("$2")
}
# run a phase under its allowance: run_phase KEY LABEL MAX MIN LOG CMD... (KEY: its name in PLAN, or build;
# skipped when less than MIN seconds, what it needs to write anything, are left, except the build, which always
# runs with at least MIN; a process that ignores the stop is killed 10 s later). Sets LAST, records the outcome.
run_phase() {
  local key=$1 label=$2 max=$3 need=$4 log=$5 t t0 rc el
  shift 5
  t=$(allow "$max" "$(reserve "$key")")
  if ((t < need)); then
    if [ "$key" != build ]; then
      echo "skipped: ${t} s left of the ${BUDGET} s budget after the reserves of the phases to come, ${need} s needed" \
        | tee "$log"
      LAST=skipped
      record "$label" "skipped (${t} s left, ${need} s needed)"
      return 0
    fi
    t=$need
    echo "the budget leaves the build under ${need} s; it is never skipped: it gets ${need} s"
  fi
  echo "(allowance ${t} s; ${log##*/})"
  t0=$SECONDS
  timeout -k 10 "$t" "$@" >"$log" 2>&1
  rc=$?
  el=$((SECONDS - t0))
  if ((rc == 0)); then
    LAST=ok
    record "$label" "ok (${el} s)"
  elif ((rc == 124 || rc == 137)) && ((el >= t)); then
    # 124: stopped by SIGTERM at the allowance; 137: killed 10 s later, having ignored it
    LAST=timed-out
    echo "stopped after its ${t} s allowance (exit $rc)" | tee -a "$log"
    record "$label" "TIMED OUT after its ${t} s allowance (exit $rc)"
  elif ((rc == 137)); then
    LAST=killed
    echo "killed (SIGKILL, exit 137) after ${el} s of its ${t} s: out of memory?" | tee -a "$log"
    record "$label" "KILLED (exit 137 after ${el} s of ${t} s: out of memory?)"
  else
    LAST=failed
    record "$label" "FAILED (exit $rc after ${el} s)"
  fi
  return $rc
}
# the end of a phase's log when it did not finish cleanly
tail_if_bad() { case "$LAST" in ok | skipped) ;; *) tail -n 20 "$1" ;; esac }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import lmdb, lz4, msgpack_numpy" 2>/dev/null \
  || echo "WARNING: lmdb / lz4 / msgpack_numpy missing (bash bench/device_wheels.sh here, carry .whl): the data pipeline's GPU tests cannot run"

# the revision measured: .git does not travel to the device; bench/device_wheels.sh records it in .whl/REVISION
# with the list of files it hashed, and the hash of the same files here says whether the tree is still that one
if [ -f .whl/REVISION ]; then
  REVISION="$(head -n 1 .whl/REVISION)"
  if [ -f .whl/REVISION.files ]; then
    tree="$(while IFS= read -r f; do [ -f "$f" ] && sha256sum "$f"; done <.whl/REVISION.files | sha256sum | cut -c1-16)"
    if grep -q "^tree $tree" .whl/REVISION; then
      REVISION+="; these files match its tree hash"
    else
      REVISION+="; FILES DIFFER from its tree hash (changed after bench/device_wheels.sh ran)"
    fi
  fi
else
  REVISION="revision unknown (no .whl/REVISION: run bash bench/device_wheels.sh before the call and carry .whl)"
fi

stamp "environment"
{
  echo "revision: $REVISION"
  [ -f .whl/REVISION ] && sed -n '2,$p' .whl/REVISION | head -n 40
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>&1
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version 2>&1 | tail -n 1
  echo "budget ${BUDGET} s${QUICK:+, QUICK}; phases after the build: ${PLAN[*]}"
} | tee "$OUT/env.txt"

stamp "build (FORCE_CUDA=$FORCE_CUDA, arch $TORCH_CUDA_ARCH_LIST, $MAX_JOBS jobs)"
run_phase build "build (pip)" 200 60 "$OUT/build.log" "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e .
rc=$?
case "$LAST" in
  ok) BUILD="ok (pip install -e .)" ;;
  timed-out) BUILD="TIMED OUT (see build.log)" ;;
  *) BUILD="FAILED (exit $rc)" ;;
esac
if ((rc != 0)); then
  # a compile error would fail the same way again; anything else (old setuptools, pip) gets an in-place build
  if [ "$LAST" = failed ] && ! grep -qE '^FAILED: |\): error|: error:' "$OUT/build.log"; then
    echo "pip install failed (exit $rc); trying an in-place build" | tee -a "$OUT/build.log"
    run_phase build "build (in place)" 200 60 "$OUT/build_inplace.log" "$PY" setup.py build_ext --inplace
    rc2=$?
    tail -n 5 "$OUT/build_inplace.log"
    case "$LAST" in
      ok) BUILD="pip failed (exit $rc); in-place build ok" ;;
      timed-out) BUILD="pip failed (exit $rc); in-place build TIMED OUT" ;;
      *) BUILD="pip failed (exit $rc); in-place build FAILED (exit $rc2)" ;;
    esac
  elif [ "$LAST" = failed ]; then
    BUILD="FAILED: compile error (exit $rc)"
    echo "build failed (exit $rc):"
    grep -E '^FAILED: |\): error|: error:' "$OUT/build.log" | head -n 20
  else
    echo "build $BUILD"
  fi
fi
grep -h "villa_fast setup" "$OUT"/build*.log 2>/dev/null | tail -n 2
if ! "$PY" -c "import villa_fast.kernels" 2>/dev/null; then
  # no editable install: serve the Triton kernels from the source tree
  ln -sfn ../kernels villa_fast/kernels
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
# torch first: the extension links against torch's shared libraries
if "$PY" -c "import torch, villa_fast._C as c; assert c.with_cuda" 2>/dev/null; then
  BUILD+="; villa_fast._C with CUDA kernels"
else
  BUILD+="; villa_fast._C WITHOUT CUDA KERNELS (or not importable): the cuda backend is absent"
  echo "WARNING: no CUDA build of villa_fast._C: the CUDA backend is skipped, Triton serves the GPU"
fi
# which backend each op of the VILLA step takes here (the benchmark tables' headers say it too)
BACKENDS="$("$PY" -c "import torch; from bench._common import ops_backends; print(ops_backends('cuda' if torch.cuda.is_available() else 'cpu'))" 2>&1 | tail -n 1)"
echo "$BACKENDS" | tee -a "$OUT/env.txt"

# the phases, most valuable first: a smoke test of what the benchmarks stand on, the whole-step benchmark,
# its profile, the op benchmark, then every GPU test with the time left
stamp "GPU smoke tests (CUDA kernels vs reference, graphed vs eager)"
SMOKE=(tests/test_perturb_update.py tests/test_sym_kl.py tests/test_perturb_init.py tests/test_add_if.py tests/test_adamw_step.py
  tests/test_train_optim.py tests/test_graphed.py)
run_phase smoke "smoke tests" 90 30 "$OUT/tests_smoke.log" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs -x \
  -k "cuda or gpu or graph" "${SMOKE[@]}"
smoke_rc=$?
SMOKE_STATE=$LAST
SMOKE_LINE="$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/tests_smoke.log" | tail -n 1)"
echo "pytest exit code $smoke_rc"
[ -n "$SMOKE_LINE" ] && echo "$SMOKE_LINE"
grep -E "^(FAILED|ERROR)" "$OUT/tests_smoke.log" | head -n 10

stamp "whole-step benchmark, UniterForVqa (UNITER-base, B=128 then 32)"
run_phase step "bench_step (UniterForVqa)" 180 60 "$OUT/bench_step_uniter.log" \
  "$PY" -m bench.bench_step --model uniter $STEP_ARGS --out "$OUT"
tail_if_bad "$OUT/bench_step_uniter.log"

if [ -z "$QUICK" ]; then
  stamp "profile of the step (B=128)"
  run_phase profile "profile_step" 60 40 "$OUT/profile_step.log" "$PY" -m bench.profile_step $PROFILE_ARGS --out "$OUT"
  tail_if_bad "$OUT/profile_step.log"
  stamp "op benchmark"
  run_phase ops "bench_ops" 80 30 "$OUT/bench_ops.log" "$PY" -m bench.bench_ops $OPS_ARGS --out "$OUT"
  tail_if_bad "$OUT/bench_ops.log"
  stamp "whole-step benchmark, the torch.compile variant (compiles at each batch size)"
  run_phase compile "bench_step (graphed+compile)" 120 60 "$OUT/bench_step_compile.log" \
    "$PY" -m bench.bench_step --model uniter $COMPILE_ARGS --tag _compile --out "$OUT"
  tail_if_bad "$OUT/bench_step_compile.log"
  stamp "all GPU tests, with the time left"
  # the GPU cases only (a marker name matches -k too), cheapest and most telling first: the kernels against the
  # reference, opcheck and the fused LayerNorm, then the smoke files' Triton cases (their CUDA and graph cases ran
  # in the smoke phase), then the trainer on the GPU (captures and compiles: the slowest)
  KERNELS=(tests/test_ext_kernels.py tests/test_opcheck.py tests/test_add_layer_norm.py tests/test_backend.py)
  PIPELINE=(tests/test_train_tf32.py tests/test_gpu_pipeline.py)
  export PYTEST_QUIET="-q -p no:cacheprovider -o addopts= -rs --durations=10"
  run_phase tests "GPU tests" 400 30 "$OUT/tests.log" bash -c "rc=0; $PY -m pytest \$PYTEST_QUIET -k '(gpu or cuda or triton) and not fullgraph' \
    ${KERNELS[*]} || rc=1; $PY -m pytest \$PYTEST_QUIET -k triton ${SMOKE[*]} || rc=1; \
    $PY -m pytest \$PYTEST_QUIET ${PIPELINE[*]} || rc=1; exit \$rc"
  echo "pytest exit code $?"
  grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/tests.log" | tail -n 3
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 20
  TESTS_LINES="$(grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)" "$OUT/tests.log" | tail -n 3 \
    | awk 'NR > 1 { printf "; " } { printf "%s", $0 }')"
else
  for p in "profile_step" "bench_ops" "bench_step (graphed+compile)" "GPU tests"; do record "$p" "not run (QUICK)"; done
fi
# the other benchmarks' tables, without replacing what a phase wrote to $OUT itself; -p keeps their times, so
# that a table older than this run is not printed below as if it were new
cp -n -p bench/out/*.csv bench/out/*.md "$OUT"/ 2>/dev/null || true

stamp "status"
{
  echo "revision: $REVISION"
  echo "build: $BUILD"
  echo "$BACKENDS"
  case "$SMOKE_STATE" in
    skipped) echo "smoke tests: SKIPPED (no time left)" ;;
    timed-out | killed) echo "smoke tests: ${SMOKE_STATE^^} (exit $smoke_rc): ${SMOKE_LINE:-no summary}" ;;
    *) echo "smoke tests: ${SMOKE_LINE:-no summary line} (exit $smoke_rc)" ;;
  esac
  [ -n "${TESTS_LINES:-}" ] && echo "GPU tests: $TESTS_LINES"
  echo "phases (budget ${BUDGET} s, $((SECONDS - start)) s used):"
  for i in "${!STATUS_NAMES[@]}"; do printf '  %-30s %s\n' "${STATUS_NAMES[$i]}" "${STATUS_TEXT[$i]}"; done
  if [ "$SMOKE_STATE" != ok ] && [ "$SMOKE_STATE" != skipped ]; then
    echo "!!!!! SMOKE TESTS ${SMOKE_STATE^^} (exit $smoke_rc): the kernels or the graphed step timed below may be" \
      "wrong on this device; read tests_smoke.log before trusting any figure !!!!!"
  elif [ "$SMOKE_STATE" = skipped ]; then
    echo "!!!!! SMOKE TESTS NOT RUN: nothing below was checked on this device !!!!!"
  fi
} | tee "$OUT/status.txt"

stamp "tables"
# only tables written by this run (newer than its env.txt)
fresh() { [ -f "$1" ] && [ "$1" -nt "$OUT/env.txt" ]; }
fresh "$OUT/bench_ops.md" && cat "$OUT/bench_ops.md"
fresh "$OUT/profile_step.md" && echo && grep -vE '^\| `' "$OUT/profile_step.md"
fresh "$OUT/bench_step_uniter_compile.md" && echo && cat "$OUT/bench_step_uniter_compile.md"
fresh "$OUT/bench_step_uniter.md" && echo && cat "$OUT/bench_step_uniter.md"
# a device machine returns at most 8 files from $OUT: past that, everything but the traces goes into one archive
if [ -n "$OUT_GIVEN" ] && (($(find "$OUT" -maxdepth 1 -type f | wc -l) > 8)); then
  (cd "$OUT" && find . -maxdepth 1 -type f ! -name '*.json.gz' ! -name '*.tar.gz' ! -name packed.txt -printf '%f\n' \
    | sort >packed.txt && tar czf gpu_check.tar.gz -T packed.txt packed.txt && xargs rm -f <packed.txt && rm -f packed.txt)
  echo "logs and tables packed into $OUT/gpu_check.tar.gz; $OUT now holds: $(cd "$OUT" && ls | tr '\n' ' ')"
fi
stamp "done"
