"""Build script for villa_fast.

Decides, and prints, whether the compiled extension ``villa_fast._C`` is built:
  - C++ CPU kernels always (unless VILLA_FAST_NO_EXT=1: pure-Python install);
  - CUDA kernels when torch was built with CUDA and a CUDA toolkit is found,
    or when FORCE_CUDA=1 (an error if that is impossible).
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch's BuildExtension.
Nothing here touches the network. Install torch first, then
``pip install --no-build-isolation .``.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


# IEEE division and square roots (the kernels call __expf / __logf where they want the fast forms); the
# compile tests in tests/test_cuda_compile.py read these flags
NVCC_FLAGS = ["-O3", "-lineinfo"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _log(msg: str) -> None:
    print(f"[villa_fast setup] {msg}", file=sys.stderr)


def _packages() -> tuple[list[str], dict[str, str]]:
    pkgs = ["villa_fast"] + [f"villa_fast.{p}" for p in find_packages(os.path.join(ROOT, "villa_fast"))]
    pkgs.append("villa_fast.kernels")
    # Triton kernels live in the top-level kernels/ folder but install as villa_fast.kernels,
    # so no top-level package named `kernels` (a PyPI name) is ever created.
    return pkgs, {"villa_fast": "villa_fast", "villa_fast.kernels": "kernels"}


def _ext_modules():
    if _flag("VILLA_FAST_NO_EXT"):
        _log("VILLA_FAST_NO_EXT=1: pure-Python install (Triton and reference backends only)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "villa_fast: torch is not importable in the build environment.\n"
            "Install torch first (e.g. `pip install torch`), then build without isolation:\n"
            "    pip install --no-build-isolation .\n"
            "or set VILLA_FAST_NO_EXT=1 for a pure-Python install."
        )
    force_cuda = _flag("FORCE_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    if cuda_home is None and os.environ.get("CUDA_HOME"):
        cuda_home = os.environ["CUDA_HOME"]
    torch_has_cuda = torch.version.cuda is not None
    with_cuda = torch_has_cuda and cuda_home is not None
    if force_cuda and not with_cuda:
        missing = []
        if not torch_has_cuda:
            missing.append(f"the installed torch {torch.__version__} was built without CUDA")
        if cuda_home is None:
            missing.append("no CUDA toolkit found (set CUDA_HOME)")
        sys.exit("villa_fast: FORCE_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(missing))

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    # no -std flag: torch's BuildExtension passes the standard its headers need (C++17 or C++20)
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp", "-ldl"]  # -ldl: dlsym (in libc itself from glibc 2.34)
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default)")
        _log(
            f"building villa_fast._C with C++ CPU and CUDA kernels (CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={arch}, MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')})"
        )
        ext = cpp_extension.CUDAExtension(
            "villa_fast._C",
            cpp_sources + cu_sources,
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={
                "cxx": cxx_flags + ["-DWITH_CUDA"],
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=link_flags,
        )
    else:
        why = "torch has no CUDA" if not torch_has_cuda else "no CUDA toolkit found"
        _log(
            f"building villa_fast._C with C++ CPU kernels only ({why}; FORCE_CUDA=1 to insist), "
            f"MAX_JOBS={os.environ.get('MAX_JOBS', '(default)')}"
        )
        ext = cpp_extension.CppExtension(
            "villa_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=_ninja_available())
    return [ext], {"build_ext": build_ext}


def _ninja_available() -> bool:
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return is_ninja_available()
    except Exception:
        return False


packages, package_dir = _packages()
ext_modules, cmdclass = _ext_modules()

setup(
    name="villa_fast",
    version="0.1.0",
    description="Fast large-scale adversarial training (VILLA) for vision-and-language models",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(ROOT, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"villa_fast": ["configs/*.json", "data/demo_vocab.txt"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "packaging",
        "lmdb",
        "msgpack",
        "msgpack-numpy",
        "lz4",
        "tokenizers",
        "safetensors",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["tensorboard", "matplotlib", "tqdm"],
        "test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis", "ruff"],
    },
    entry_points={"console_scripts": ["villa-fast=villa_fast.cli:main"]},
    zip_safe=False,
)
