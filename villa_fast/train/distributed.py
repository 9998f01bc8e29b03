"""torch.distributed helpers: setup from the ``torchrun`` environment, one gradient all-reduce per step.

Gradients are all-reduced explicitly once per optimizer step (after all accumulation micro-batches
and all backward passes of the adversarial step), in flat buckets, instead of through DDP's
autograd hooks: a VILLA step runs several backward passes per micro-batch, and hooks would
all-reduce on each unless every one of them sat under ``no_sync``. The trainer averages them over the
processes, as the authors' scripts do (UNITER's ``all_reduce_and_rescale_tensors`` calls horovod's
``allreduce_``, which averages by default, then divides by 1).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_gather_objects",
    "all_reduce_grads",
    "all_reduce_sum",
    "all_reduce_tensor_",
    "broadcast_object",
    "broadcast_params",
    "init_distributed",
]

_BUCKET_BYTES = 32 * 1024 * 1024


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> DistInfo:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1); NCCL on
    GPUs, gloo on CPUs. A single process returns rank 0 of 1 without touching torch.distributed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        if device_kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    out, cur, size = [], [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if cur and (size + nbytes > _BUCKET_BYTES or t.dtype != cur[0].dtype):
            out.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += nbytes
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter], world_size: int, average: bool = True) -> None:
    """Average (the authors' horovod all-reduce) or, with ``average=False``, sum ``p.grad`` over the process group.

    A parameter without a gradient on some ranks counts as zero there; one without a gradient on every rank
    keeps ``grad = None``, so the optimizer leaves it alone as in a single process (the authors reduce only
    the gradients that exist; a zero-filled one would take weight decay and stale momentum). The all-reduce
    of the presence flags is unconditional, so every rank runs the same collectives; only a rank that lacks a
    gradient reads the flags back, on a GPU as an asynchronous copy issued before the gradients' all-reduce: the
    host waits for that copy only, while the device goes on with the gradients (no extra collective)."""
    if world_size <= 1:
        return
    grads, missing = [], []
    for i, p in enumerate(params):
        if p.grad is None:
            p.grad = torch.zeros_like(p)
            missing.append(i)
        grads.append(p.grad)
    if not grads:
        return
    device = grads[0].device
    present = torch.ones(len(params), dtype=torch.float32, device=device)
    if missing:
        present[missing] = 0.0
    dist.all_reduce(present)
    anywhere, ready = present, None
    if missing and present.is_cuda:
        anywhere = torch.empty(present.shape, dtype=present.dtype, pin_memory=True)
        anywhere.copy_(present, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    for bucket in _buckets(grads):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        if average:
            flat.div_(world_size)
        offset = 0
        for g in bucket:
            n = g.numel()
            g.copy_(flat[offset : offset + n].view_as(g))
            offset += n
    if missing:
        if ready is not None:
            ready.synchronize()
        for i in missing:
            if anywhere[i] == 0:
                params[i].grad = None


@torch.no_grad()
def broadcast_params(module: torch.nn.Module, src: int = 0) -> None:
    """Every rank starts from rank ``src``'s weights and buffers."""
    if not dist.is_initialized():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few Python numbers over the group (evaluation counters)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def all_reduce_tensor_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the group in place, on its device (no host sync); returns ``t``."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (only JSON-like data is exchanged)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_objects(obj):
    """Every rank's ``obj`` as a list (rank order); only JSON-like data is exchanged."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
