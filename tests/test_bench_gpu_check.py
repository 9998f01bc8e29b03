"""bench/gpu_check.sh on the CPU, with a stand-in Python: the build runs whatever the budget, skipped, failed,
killed and timed-out phases are told apart, a status block and the smoke-test banner come before the tables, and
the revision recorded by bench/device_wheels.sh is checked against the files."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all(shutil.which(t) for t in ("bash", "timeout", "sha256sum")), reason="needs bash"),
]

FAKE_PY = r"""#!/bin/bash
# pip, setup.py, pytest and the benchmarks are stand-ins; `python -c` is the real interpreter
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then
  echo "pip $*" >>"$FAKE_LOG"
  case " $* " in *" -e "*) sleep "${FAKE_BUILD_S:-0}"; exit "${FAKE_PIP_RC:-0}" ;; esac
  exit 0
fi
if [ "$1" = "setup.py" ]; then echo "setup.py" >>"$FAKE_LOG"; exit 1; fi
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then
  echo "pytest" >>"$FAKE_LOG"
  if [ -n "${FAKE_SMOKE_FAIL:-}" ]; then
    echo "FAILED tests/test_x.py::test_cuda - boom"
    echo "1 failed, 3 passed in 0.10s"
    exit 1
  fi
  echo "4 passed in 0.10s"; exit 0
fi
if [ "$1" = "-m" ] && [[ "$2" == bench.* ]]; then
  echo "$2" >>"$FAKE_LOG"
  [ "$2" = bench.bench_step ] && [ -n "${FAKE_KILL_STEP:-}" ] && kill -9 $$
  out=""; prev=""; for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
  name=${2#bench.}; tag=""; case " $* " in *" --tag _compile "*) tag=_compile ;; esac
  [ "$name" = bench_step ] && name="bench_step_uniter$tag"
  echo "| fake $name table |" >"$out/$name.md"
  exit 0
fi
exec "$REAL_PY" "$@"
"""


@pytest.fixture
def repo(tmp_path):
    """A copy of what gpu_check.sh needs from the repository (it runs from its parent folder)."""
    r = tmp_path / "repo"
    (r / "bench").mkdir(parents=True)
    for f in ("gpu_check.sh", "__init__.py", "_common.py"):
        shutil.copy(ROOT / "bench" / f, r / "bench" / f)
    py = tmp_path / "py"
    py.write_text(FAKE_PY)
    py.chmod(0o755)
    return r


def _run(repo: Path, **env) -> tuple[str, str]:
    log = repo.parent / "calls.log"
    log.write_text("")
    full = {
        **os.environ,
        "PYTHON": str(repo.parent / "py"),
        "REAL_PY": sys.executable,
        "FAKE_LOG": str(log),
        "OUT": str(repo.parent / "out"),
        "FORCE_CUDA": "0",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(repo / "bench" / "gpu_check.sh")], env=full, capture_output=True, text=True, timeout=300
    )
    return proc.stdout + proc.stderr, log.read_text()


def _record_revision(repo: Path, files: list[str]) -> None:
    """What bench/device_wheels.sh writes: the commit line, the tree hash of the listed files, and the list."""
    (repo / ".whl").mkdir(exist_ok=True)
    (repo / ".whl" / "REVISION.files").write_text("".join(f + "\n" for f in files))
    lines = "".join(f"{hashlib.sha256((repo / f).read_bytes()).hexdigest()}  {f}\n" for f in files)
    tree = hashlib.sha256(lines.encode()).hexdigest()[:16]
    (repo / ".whl" / "REVISION").write_text(f"0123abcd + 1 uncommitted change(s) (2026-11-28)\ntree {tree} (1 files)\n")


def _status(out: str) -> str:
    return out[out.index("] status") : out.index("] tables")]


def test_a_low_budget_still_builds_and_reports_the_skipped_phases(repo):
    out, calls = _run(repo, BUDGET="30", FAKE_BUILD_S="1")
    assert "install -v --no-build-isolation --no-deps --no-index -e ." in calls  # built, not skipped
    assert "never skipped" in out
    status = _status(out)
    assert "revision: revision unknown" in status
    assert "build: ok (pip install -e .)" in status
    assert "ops: perturb_update " in status
    for phase in ("smoke tests", "bench_step (UniterForVqa)", "profile_step", "bench_ops", "GPU tests"):
        line = next(x for x in status.splitlines() if x.startswith("  " + phase))
        assert "skipped (" in line, line
    assert "SMOKE TESTS NOT RUN" in status
    assert "pytest" not in calls and "bench." not in calls


def test_failed_smoke_tests_get_a_banner_before_the_tables(repo):
    _record_revision(repo, ["bench/_common.py"])
    out, calls = _run(repo, BUDGET="1000", QUICK="1", FAKE_SMOKE_FAIL="1")
    status = _status(out)
    assert "revision: 0123abcd + 1 uncommitted change(s) (2026-11-28); these files match its tree hash" in status
    assert "smoke tests: 1 failed, 3 passed in 0.10s (exit 1)" in status
    assert "SMOKE TESTS FAILED (exit 1)" in status
    assert "smoke tests                    FAILED (exit 1" in status
    assert "bench_step (UniterForVqa)      ok" in status and "profile_step                   not run (QUICK)" in status
    assert out.index("] status") < out.index("| fake bench_step_uniter table |")
    env = (repo.parent / "out").glob("env.txt")
    assert "0123abcd" in next(env).read_text()


def test_a_killed_phase_and_a_changed_tree_are_named(repo):
    _record_revision(repo, ["bench/_common.py"])
    with open(repo / "bench" / "_common.py", "a") as f:
        f.write("# changed after the record\n")
    out, _ = _run(repo, BUDGET="1000", QUICK="1", FAKE_KILL_STEP="1", FAKE_PIP_RC="2")
    status = _status(out)
    assert "FILES DIFFER from its tree hash" in status
    assert "bench_step (UniterForVqa)      KILLED (exit 137" in status
    # pip failed without a compile error: the in-place build was tried (and failed: a stand-in)
    assert "build: pip failed (exit 2); in-place build FAILED (exit 1)" in status
    assert "build (in place)" in status and "SMOKE TESTS" not in status
