#!/usr/bin/env bash
# The lent GPU machine's software, rehearsed on a CPU machine: torch 2.11.0+cu130 (the CUDA wheel from PyPI,
# about 3.7 GB with its CUDA libraries; it imports and links without a GPU), triton 3.6.0 and Python 3.12 where
# pyenv has it. Builds villa_fast._C with its CUDA kernels against that torch (FORCE_CUDA=1, sm_90) in a copy of
# the working tree, loads it, compiles every Triton kernel for sm_90 with that Triton, and runs the test suite.
# Nothing runs on a GPU: this catches what would otherwise cost device time (a build or an API that the GPU
# machine's versions lack) before bench/gpu_check.sh is run there.
#
#   bash bench/device_env_check.sh                 # about 6 minutes on 2 cores once the wheels are cached
#   TORCH=torch==2.11.0 TRITON=triton==3.6.0 ENV_DIR=/tmp/villa-device-env bash bench/device_env_check.sh
#
# Triton 3.6's interpreter cannot run kernels whose loops have tensor bounds (3.7 can), so the Triton backend's
# CPU tests (run by the interpreter) are left out here; the GPU machine compiles those kernels instead, which the
# sm_90 compile check covers.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC="$PWD"
TORCH="${TORCH:-torch==2.11.0}"
TRITON="${TRITON:-triton==3.6.0}"
ENV_DIR="${ENV_DIR:-/tmp/villa-device-env}"
WORK="${WORK:-/tmp/villa-device-tree}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" FORCE_CUDA=1
export PYTHONDONTWRITEBYTECODE=1

if [ -z "${PYTHON:-}" ]; then
  v=""
  command -v pyenv >/dev/null 2>&1 && v="$(pyenv versions --bare 2>/dev/null | grep -m1 '^3\.12' || true)"
  if [ -n "$v" ]; then
    PYTHON="$(pyenv root)/versions/$v/bin/python3"
  elif python3.12 --version >/dev/null 2>&1; then
    PYTHON=python3.12
  else
    PYTHON=python3
  fi
fi
stamp() { echo "== [$SECONDS s] $*"; }

stamp "environment $ENV_DIR ($("$PYTHON" --version 2>&1), $TORCH, $TRITON)"
[ -x "$ENV_DIR/bin/python" ] || "$PYTHON" -m venv "$ENV_DIR"
"$ENV_DIR/bin/python" -m pip install -q "$TORCH" "$TRITON" 2>&1 | grep -v "is ignored" || true
"$ENV_DIR/bin/python" -c "import torch, triton, sys; assert torch.version.cuda, 'not a CUDA build of torch'; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"

stamp "copy of the working tree in $WORK"
mkdir -p "$WORK"
tar -C "$SRC" --exclude=./.venv --exclude=./build --exclude=./bench/out --exclude='*.so' --exclude=./.git -cf - . \
  | tar -C "$WORK" -xf -
cd "$WORK"
rm -rf build villa_fast/_C*.so

stamp "build (make install, CUDA kernels for arch $TORCH_CUDA_ARCH_LIST)"
# the Makefile keeps an installed CUDA build of torch and adds the other dependencies
PATH="$ENV_DIR/bin:$PATH" VIRTUAL_ENV="$ENV_DIR" make -s install 2>&1 | grep -v "is ignored" || true
"$ENV_DIR/bin/python" -c "import torch, villa_fast._C as c; assert c.with_cuda, 'built without CUDA kernels'; \
print('villa_fast._C loads, with CUDA kernels:', sorted(n for n in dir(c) if not n.startswith('_')))"

stamp "Triton kernels compiled for sm_90, CUDA kernels checked for spills"
"$ENV_DIR/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton_aot.py tests/test_cuda_compile.py

stamp "test suite (the Triton interpreter's CPU tests left out)"
"$ENV_DIR/bin/python" -m pytest -q -p no:cacheprovider -k "not triton" ${PYTEST_ARGS:-}
stamp "done"
