"""Training checkpoints: weights in safetensors, the rest in a file ``torch.load(weights_only=True)`` reads.

A checkpoint is a directory ``ckpt/step_{N}`` holding ``model.safetensors`` and ``train_state.pt``
(optimizer, schedule, loss scaler, RNG states, data position, step) and ``checksums.json`` (the CRC-32 of
each), each written to a temporary file, flushed to disk (fsync) and renamed into place; the directory itself
is renamed into place last (and its parent fsynced), so neither a crash nor a power loss leaves a half-written
checkpoint that ``--resume`` would pick. Temporary directories a killed run left behind
(``.step_N.*``) are removed when the next run saves or resumes; a checkpoint set aside while the same step was
saved again (``.stale_step_N.*``) is put back as ``step_N`` when the new one never took its place, else
removed. A write that fails on a full disk raises ``OSError(ENOSPC)`` naming what it was writing, its partial
files removed and the checkpoints already written left as they were. A newest checkpoint
whose files are truncated or changed (a disk that lied about the fsync, a copy cut short, a flipped bit) is
set aside with a warning and the run resumes from the newest intact one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from villa_fast.models.checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    load_torch_file,
    weights_mismatch,
    zip_damage,
)

__all__ = [
    "CheckpointReadError",
    "atomic_save",
    "atomic_write_text",
    "checkpoint_model_config",
    "latest_checkpoint",
    "load_checkpoint",
    "load_weights",
    "read_train_state",
    "remove_leftovers",
    "rng_state",
    "run_files",
    "save_checkpoint",
    "set_rng_state",
    "step_checkpoints",
]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
#: the CRC-32 of each file of a checkpoint (checkpoints written before it existed are checked without it)
_CHECKSUMS = "checksums.json"
#: this library's temporary names in a checkpoint directory (save_checkpoint's directory being written, the
#: previous checkpoint of the same step set aside, atomic_save_weights' final weights being written); a killed
#: run leaves them behind, each as large as a checkpoint
_LEFTOVER = re.compile(r"^\.(step_\d+\.|stale_step_\d+\.|model_final\.safetensors\.).+$")
_STALE = re.compile(r"^\.stale_(step_\d+)\..+$")
#: free space under which a failed write is taken for a full disk: torch.save reports one as a RuntimeError of
#: its zip writer ("unexpected pos ..."), without an errno; the partial file has taken what space there was
_FULL_BELOW = 1 << 20


class CheckpointReadError(CheckpointFormatError):
    """A training checkpoint's file is truncated, empty or not in its format (the message names it and the step)."""


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to disk (directories: where the platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):  # a platform that cannot open directories (Windows): nothing to flush
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _full_disk_errno(directory: Path, exc: BaseException) -> int | None:
    """ENOSPC or EDQUOT when ``exc``, raised while writing into ``directory``, comes from a full disk or quota
    (None: another failure). An error without an errno (torch's zip writer, safetensors) is put down to a full
    disk when next to no space is left."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno if exc.errno in (errno.ENOSPC, errno.EDQUOT) else None
    if not isinstance(exc, RuntimeError | OSError):
        return None  # a pickling or format error is not the disk's, however full it is
    try:
        return errno.ENOSPC if shutil.disk_usage(directory).free < _FULL_BELOW else None
    except OSError:
        return None


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s directory, fsync it, ``os.replace`` it to ``path``, fsync
    the directory. The temporary file is removed whatever happens; a full disk raises ``OSError(ENOSPC)`` (or
    EDQUOT) naming ``path``, whatever error the writer raised for it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file readable by its owner only: give it the mode a plain write would (the umask's)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        try:
            write(tmp)
            _fsync(tmp)
        except Exception as exc:
            # judged while the partial file still holds the space it took
            code = _full_disk_errno(path.parent, exc)
            if code is None:
                raise
            raise OSError(
                code,
                f"{os.strerror(code)}: {path.name} was not written (a file it would replace is left as it was)",
                str(path),
            ) from exc
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically: a reader sees the old file or the new one, never a part."""
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then ``os.replace``."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    from villa_fast.models import save_safetensors

    _atomic_write(path, lambda tmp: save_safetensors(model, tmp))


def remove_leftovers(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and directories killed runs left in ``ckpt_dir`` (only this library's own
    dot-prefixed names: ``.step_N.*``, ``.stale_step_N.*``, ``.model_final.safetensors.*``); returns them.
    A ``.stale_step_N.*`` is the previous ``step_N``, set aside while the step was saved again: when no
    ``step_N`` took its place (the save was killed between its two renames) it is renamed back to ``step_N``
    (with a warning; not returned) instead of removed. Call it from one process (rank 0), not while another
    process saves into the same directory."""
    ckpt_dir = Path(ckpt_dir)
    removed = []
    if ckpt_dir.is_dir():
        # the newest first: when a step was set aside more than once, the latest copy is the one put back
        stale = sorted(
            (p for p in ckpt_dir.iterdir() if _STALE.match(p.name) and p.is_dir() and not p.is_symlink()),
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        for p in stale:
            final = ckpt_dir / _STALE.match(p.name).group(1)
            # only a whole copy is put back (a set-aside step half deleted is a leftover like any other)
            if not final.exists() and _unreadable(p) is None:
                os.replace(p, final)
                _fsync(ckpt_dir)
                logger.warning(
                    "restored %s from %s: an interrupted save of the same step had set it aside", final, p.name
                )
        for p in ckpt_dir.iterdir():
            if not _LEFTOVER.match(p.name):
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    if removed:
        logger.info("removed %d temporary checkpoint files left by an interrupted run in %s", len(removed), ckpt_dir)
    return removed


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
    remove_leftovers(ckpt_dir)
    final = ckpt_dir / f"step_{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".step_{step}.", dir=ckpt_dir))
    try:
        try:
            atomic_save_weights(model, tmp / "model.safetensors")
            atomic_save(train_state, tmp / "train_state.pt")
            sums = {name: _crc32(tmp / name) for name in ("model.safetensors", "train_state.pt")}
            _atomic_write(tmp / _CHECKSUMS, lambda f: Path(f).write_text(json.dumps(sums)))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = [p.name for p in step_checkpoints(ckpt_dir)]
            earlier = (
                f"the checkpoints already written ({', '.join(kept)}) are intact"
                if kept
                else "no earlier checkpoint was written"
            )
            raise OSError(
                exc.errno,
                f"{os.strerror(exc.errno)}: the step {step} checkpoint was not written (its partial files are "
                f"removed); {earlier}. Free space on the disk, then continue the run with --resume",
                str(final),
            ) from exc
        if final.exists():
            # set the old one aside rather than deleting it first: an interruption never loses both (one between
            # the renames puts it back here; a killed process leaves it for remove_leftovers to put back)
            stale = ckpt_dir / f".stale_step_{step}.{os.getpid()}"
            try:
                os.replace(final, stale)
                os.replace(tmp, final)
            except BaseException:
                if stale.exists() and not final.exists():
                    os.replace(stale, final)
                raise
            _fsync(ckpt_dir)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync(ckpt_dir)
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


def step_checkpoints(ckpt_dir: str | os.PathLike) -> list[Path]:
    """The ``step_N`` directories of ``ckpt_dir`` that hold both files, oldest first (read only: nothing is
    checked, renamed or removed; :func:`latest_checkpoint` chooses among them)."""
    return [p for _, p in _step_dirs(Path(ckpt_dir))]


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


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checksum_mismatch(step_dir: Path, names: tuple[str, ...] = ("model.safetensors", "train_state.pt")) -> str | None:
    """Which of the files ``names`` of ``step_dir`` no longer has the CRC-32 recorded when it was saved (None: all
    match, or a checkpoint written without checksums)."""
    sums_file = step_dir / _CHECKSUMS
    if not sums_file.exists():
        return None
    try:
        sums = json.loads(sums_file.read_text())
        expected = {name: int(sums[name]) for name in names}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"{_CHECKSUMS}: unreadable ({exc})"
    for name, crc in expected.items():
        got = _crc32(step_dir / name)
        if got != crc:
            return f"{name}: contents changed since it was saved (CRC-32 {got:08x}, saved {crc:08x})"
    return None


def _unreadable(step_dir: Path) -> str | None:
    """Why ``step_dir``'s files cannot be a complete, intact checkpoint (None: they are). Checks the safetensors
    header, the zip directory of train_state.pt (which a truncated or empty file lacks) and every file's CRC-32
    (a changed byte: recorded in ``checksums.json``, and the zip's own CRCs of train_state.pt)."""
    from safetensors import safe_open

    weights, state = step_dir / "model.safetensors", step_dir / "train_state.pt"
    try:
        with safe_open(str(weights), framework="pt") as fh:
            fh.keys()
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        return f"{weights.name}: {exc}"
    try:
        with zipfile.ZipFile(state) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return f"{state.name}: not a torch checkpoint (no data.pkl)"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{state.name}: {exc}"
    why = _checksum_mismatch(step_dir)
    if why is None:
        damage = zip_damage(state)
        why = None if damage is None else f"{state.name}: {damage}"
    return why


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``step_N`` in ``ckpt_dir`` (None: none there).

    Removes temporary leftovers of killed runs first (:func:`remove_leftovers`). A newer checkpoint whose files
    are truncated, empty or changed since they were saved (:func:`_unreadable`; this reads every file once) is
    renamed to ``step_N.unreadable`` (kept for inspection, never picked or pruned) with
    a warning, and the newest complete one is returned: resuming from an older step is correct, only slower.
    When no checkpoint is complete, the newest is returned as it is, for :func:`load_checkpoint` to report.
    Call it from one process (rank 0)."""
    ckpt_dir = Path(ckpt_dir)
    remove_leftovers(ckpt_dir)
    dirs = _step_dirs(ckpt_dir)
    bad = []
    for step, p in reversed(dirs):
        why = _unreadable(p)
        if why is None:
            for bad_step, bad_path, bad_why in bad:
                aside = bad_path.with_name(f"{bad_path.name}.unreadable")
                n = 1
                while aside.exists():
                    n += 1
                    aside = bad_path.with_name(f"{bad_path.name}.unreadable{n}")
                os.replace(bad_path, aside)
                logger.warning(
                    "checkpoint %s (step %d) is incomplete or corrupt (%s): moved to %s; resuming from the "
                    "older checkpoint %s (step %d)",
                    bad_path,
                    bad_step,
                    bad_why,
                    aside.name,
                    p,
                    step,
                )
            if bad:
                _fsync(ckpt_dir)
            return p
        bad.append((step, p, why))
    return dirs[-1][1] if dirs else None


def _step_of(path: Path) -> str:
    m = _STEP_DIR.match(path.name)
    return f" (step {m.group(1)})" if m else ""


def _checkpoint_dir(path: str | os.PathLike) -> tuple[Path, str]:
    """``path`` and how messages name it; FileNotFoundError unless it holds a checkpoint's two files."""
    path = Path(path)
    where = f"checkpoint {path}{_step_of(path)}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{where} is not a checkpoint directory (step_N holding model.safetensors and train_state.pt)"
        )
    for name in ("model.safetensors", "train_state.pt"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{where} has no {name}: not a complete training checkpoint")
    return path, where


def read_train_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """The training state of the checkpoint directory ``path`` (its weights are not read).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory (or lacks one of its two files).
        CheckpointReadError: ``train_state.pt`` is truncated, empty, not in its format or changed since it was
            saved (the message names it and the step).
    """
    path, where = _checkpoint_dir(path)
    changed = _checksum_mismatch(path, ("train_state.pt",))
    if changed is not None:
        raise CheckpointReadError(f"{where}: {changed}")
    try:
        return load_torch_file(path / "train_state.pt", map_location=map_location)
    except CheckpointFormatError as exc:
        raise CheckpointReadError(f"{where}: {exc}") from None


def checkpoint_model_config(path: str | os.PathLike) -> dict | None:
    """The UNITER config recorded with the checkpoint's weights (None: none recorded); reads the header only.

    Raises:
        FileNotFoundError, CheckpointReadError: as :func:`read_train_state`, for ``model.safetensors``.
    """
    from safetensors import safe_open

    path, where = _checkpoint_dir(path)
    weights = path / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as fh:
            raw = (fh.metadata() or {}).get("uniter_config")
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointReadError(f"{where}: {weights} cannot be read, it is truncated or corrupt ({exc})") from None
    return json.loads(raw) if raw else None


def load_weights(path: str | os.PathLike, model: nn.Module, map_location: str | torch.device = "cpu") -> None:
    """Load the checkpoint's weights into ``model``, exactly: every key must match, in name and shape.

    Raises:
        FileNotFoundError, CheckpointReadError: as :func:`read_train_state`, for ``model.safetensors``.
        CheckpointMismatchError: the weights are another model's (another task or model configuration); the
            message counts the missing, unexpected and differently shaped tensors and names the first few.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path, where = _checkpoint_dir(path)
    weights = path / "model.safetensors"
    try:
        sd = load_file(str(weights), device=str(map_location))
    except SafetensorError as exc:
        raise CheckpointReadError(f"{where}: {weights} cannot be read, it is truncated or corrupt ({exc})") from exc
    changed = _checksum_mismatch(path, ("model.safetensors",))
    if changed is not None:
        raise CheckpointReadError(f"{where}: {changed}")
    why = weights_mismatch(model, sd)
    if why is not None:
        raise CheckpointMismatchError(
            f"{where} does not fit the {type(model).__name__} the current config builds: {why}. Use the task and "
            "model_config it was trained with (its run's log/hps.json and log/model.json)"
        )
    model.load_state_dict(sd, strict=False)  # strict=False: tied weights are stored once


def load_checkpoint(path: str | os.PathLike, model: nn.Module, map_location: str | torch.device = "cpu") -> dict:
    """Load the weights into ``model`` (exactly: every key must match, in name and shape) and return the training
    state (:func:`load_weights`, :func:`read_train_state`).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory (or lacks one of its two files).
        CheckpointReadError: a file is truncated, empty, not in its format or changed since it was saved (its
            CRC-32 differs from the one recorded in ``checksums.json``; the message names it and the step).
        CheckpointMismatchError: the weights do not fit the model.
    """
    state = read_train_state(path, map_location)
    load_weights(path, model, map_location)
    return state
