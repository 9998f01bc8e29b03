"""setup.py decisions, and that regular and editable installs both find villa_fast.kernels."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup(*args, env=None, pre=""):
    code = (
        f"import sys; {pre}sys.argv = ['setup.py', *{list(args)!r}]; "
        "__file__ = 'setup.py'; exec(open('setup.py').read())"
    )
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=full, timeout=120)


def test_without_torch_says_to_install_it_first():
    out = _setup("--name", pre="sys.modules['torch'] = None; ")
    assert out.returncode != 0
    assert "Install torch first" in out.stderr and "--no-build-isolation" in out.stderr


def test_force_cuda_without_cuda_is_a_clear_error():
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA here: FORCE_CUDA=1 can be honoured")
    out = _setup("--name", env={"FORCE_CUDA": "1", "CUDA_HOME": ""})
    assert out.returncode != 0
    assert "FORCE_CUDA=1" in out.stderr and "without CUDA" in out.stderr


def test_setup_prints_its_decision():
    out = _setup("--name")
    assert out.returncode == 0, out.stderr
    assert "[villa_fast setup] building villa_fast._C with C++ CPU" in out.stderr
    out = _setup("--name", env={"VILLA_FAST_NO_EXT": "1"})
    assert "pure-Python install" in out.stderr


def test_editable_install_finds_kernels():
    out = subprocess.run(
        [sys.executable, "-c", "import villa_fast.kernels as k; print(k.__file__)"],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(os.path.join("kernels", "__init__.py"))


@pytest.mark.slow
def test_regular_install_finds_kernels(tmp_path):
    target = tmp_path / "site"
    env = dict(os.environ, VILLA_FAST_NO_EXT="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            ROOT,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert (target / "villa_fast" / "kernels" / "perturb_update.py").is_file()
    assert not (target / "kernels").exists(), "no top-level package named `kernels` may be installed"
    check = subprocess.run(
        [sys.executable, "-c", "import villa_fast.kernels, villa_fast.ops; print(villa_fast.kernels.__file__)"],
        capture_output=True,
        text=True,
        cwd=str(tmp_path),
        env=dict(os.environ, PYTHONPATH=str(target)),
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(target))
