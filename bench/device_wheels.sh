#!/usr/bin/env bash
# Fetch, on a machine with a package index, the wheels the GPU machine's image lacks for the test suite and the
# data pipeline (lmdb, lz4, msgpack-numpy, expecttest; its Python is 3.12), into .whl/ (git-ignored). The
# device call then names .whl in `carry`; bench/gpu_check.sh installs them (offline) into /tmp/site.
#
#   bash bench/device_wheels.sh          # then run(command="bash bench/gpu_check.sh", carry=[".whl"], ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  lmdb==3.0.0 lz4==4.4.5 msgpack-numpy==0.4.8 expecttest==0.3.0
ls -l .whl
