#!/usr/bin/env bash
# Run here, before a device call: records the revision to be measured and fetches the wheels the GPU machine's
# image lacks for the test suite and the data pipeline (lmdb, lz4, msgpack-numpy, expecttest; its Python is 3.12),
# both into .whl/ (git-ignored). .git does not travel to the device, so .whl/REVISION says what was measured:
# the commit, `git status --short` and a hash of the files the device copy carries (tracked and untracked, not
# ignored; their list in .whl/REVISION.files), which bench/gpu_check.sh checks against the copy it runs in. The
# device call names .whl in `carry`; bench/gpu_check.sh installs the wheels (offline) into /tmp/site and prints the
# revision in its header and its status block ("revision unknown" without the file). Run it again after any
# change: a stale record shows as "FILES DIFFER".
#
#   bash bench/device_wheels.sh          # then run(command="bash bench/gpu_check.sh", carry=[".whl"], ...)
#   REVISION_ONLY=1 bash bench/device_wheels.sh   # the record alone (the wheels are there already)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
# the files the device copy holds (what gpu_check.sh hashes again there), in a fixed order
git ls-files -co --exclude-standard | while IFS= read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done >.whl/REVISION.files
tree="$(while IFS= read -r f; do sha256sum "$f"; done <.whl/REVISION.files | sha256sum | cut -c1-16)"
changes="$(git status --short --untracked-files=all | grep -c . || true)"
{
  echo "$(git rev-parse HEAD)$( ((changes > 0)) && echo " + $changes uncommitted change(s)") ($(git log -1 --format=%cs 2>/dev/null))"
  echo "tree $tree ($(wc -l <.whl/REVISION.files) files), recorded $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "commit: $(git log -1 --format='%h %s' | cut -c1-120)"
  if ((changes > 0)); then
    echo "git status --short:"
    git status --short --untracked-files=all
  fi
} >.whl/REVISION
cat .whl/REVISION
[ -n "${REVISION_ONLY:-}" ] && exit 0
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  lmdb==3.0.0 lz4==4.4.5 msgpack-numpy==0.4.8 expecttest==0.3.0
ls -l .whl
