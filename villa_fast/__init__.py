"""villa_fast: fast large-scale adversarial training (VILLA) for vision-and-language models.

Importing the package never initialises CUDA and never needs a GPU, a compiler
or the compiled extension; everything heavy is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AdversarialConfig": "villa_fast.adversarial",
    "VillaStep": "villa_fast.adversarial",
    "GraphedVillaStep": "villa_fast.adversarial",
    "StepResult": "villa_fast.adversarial",
    "ops": "villa_fast.ops",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'villa_fast' has no attribute {name!r}")
    module = importlib.import_module(mod)
    value = module if name == "ops" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
