"""Training checkpoints: weights in safetensors, the rest in a file ``torch.load(weights_only=True)`` reads.

A checkpoint is a directory ``ckpt/step_{N}`` holding ``model.safetensors`` and ``train_state.pt``
(optimizer, schedule, loss scaler, RNG states, data position, step), each written to a
temporary file and renamed into place; the directory itself is renamed into place last, so a
crash never leaves a half-written checkpoint that ``--resume`` would pick.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "atomic_save",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "run_files",
    "save_checkpoint",
    "set_rng_state",
]

_STEP_DIR = re.compile(r"^step_(\d+)$")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    from villa_fast.models import save_safetensors

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_safetensors(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain containers."""
    py = random.getstate()
    np_state = np.random.get_state()
    out: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned; its tensors may sit on any device that copies to the CPU
    (the generators take CPU byte tensors)."""
    py = state["python"]
    random.setstate((int(py[0]), tuple(int(x) for x in py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def save_checkpoint(
    ckpt_dir: str | os.PathLike, step: int, model: nn.Module, train_state: dict[str, Any], keep: int = 0
) -> Path:
    """Write ``ckpt_dir/step_{step}`` atomically; keep the newest ``keep`` checkpoints (0: all)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=ckpt_dir))
    try:
        atomic_save_weights(model, tmp / "model.safetensors")
        atomic_save(train_state, tmp / "train_state.pt")
        if final.exists():
            # set the old one aside rather than deleting it first: an interruption never loses both
            stale = ckpt_dir / f".stale_step_{step}.{os.getpid()}"
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep > 0:
        for old in _step_dirs(ckpt_dir)[:-keep]:
            shutil.rmtree(old[1], ignore_errors=True)
    return final


def _step_dirs(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "train_state.pt").is_file() and (p / "model.safetensors").is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def run_files(output_dir: str | os.PathLike) -> list[str]:
    """What a training run left in ``output_dir``: its checkpoints (complete or not), final weights and
    history (paths relative to ``output_dir``); empty for a directory no run has trained in."""
    output_dir = Path(output_dir)
    ckpt = output_dir / "ckpt"
    found = []
    if ckpt.is_dir():
        steps = [(int(m.group(1)), p.name) for p in ckpt.iterdir() if (m := _STEP_DIR.match(p.name))]
        found += [f"ckpt/{name}" for _, name in sorted(steps)]
        if (ckpt / "model_final.safetensors").exists():
            found.append("ckpt/model_final.safetensors")
    history = output_dir / "log" / "history.jsonl"
    if history.is_file() and history.stat().st_size > 0:
        found.append("log/history.jsonl")
    return found


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    dirs = _step_dirs(Path(ckpt_dir))
    return dirs[-1][1] if dirs else None


def load_checkpoint(path: str | os.PathLike, model: nn.Module, map_location: str | torch.device = "cpu") -> dict:
    """Load the weights into ``model`` (exactly: every key must match) and return the training state."""
    from safetensors.torch import load_file

    path = Path(path)
    sd = load_file(str(path / "model.safetensors"), device=str(map_location))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied weights are stored once: the keys safetensors left out alias a stored tensor
    missing = [k for k in missing if not _is_tied_alias(model, k, sd)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing}, unexpected {unexpected})")
    return torch.load(path / "train_state.pt", map_location=map_location, weights_only=True)


def _is_tied_alias(model: nn.Module, key: str, sd: dict) -> bool:
    own = model.state_dict(keep_vars=True)
    t = own.get(key)
    if t is None:
        return False
    ptr = t.data_ptr()
    return any(own[k].data_ptr() == ptr for k in sd if k in own and k != key)
