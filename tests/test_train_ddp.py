"""Two gloo processes match one process over the same global batch (within float tolerance)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_train_fixtures import task_config

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(base: dict, accum: int) -> dict:
    from villa_fast.train.config import resolve_config

    return resolve_config(None, {**base, "gradient_accumulation_steps": accum, "output_dir": None})


def _batches(trainer, n: int) -> list[dict]:
    from villa_fast.tasks import DataContext
    from villa_fast.train.trainer import LoaderSource

    it = LoaderSource(trainer.task.train_loader(DataContext(seed=trainer.cfg["seed"]))).batches()
    return [next(it) for _ in range(n)]


def _worker(rank: int, world: int, port: int, base: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(_cfg(base, 1), quiet=True)
    batches = _batches(trainer, 2 * world)
    # rank r takes micro-batch r of the global batch; the all-reduced gradients, before the optimizer reads them
    trainer.micro_step(batches[rank])
    trainer.reduce_gradients()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = trainer.evaluate("val")
    if rank == 0:
        torch.save({"grads": grads, "val": metrics}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    from villa_fast.train.trainer import Trainer

    out = str(tmp_path / "ddp.pt")
    base = task_config(tmp_path, "vqa", adv_training=True, dropout=0.0, train_batch_size=200)
    mp.spawn(_worker, args=(2, _free_port(), base, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    # one process, the same two micro-batches per optimizer step (their gradients summed): the two processes'
    # gradients are averaged, as the authors' horovod all-reduce averages them
    trainer = Trainer(_cfg(base, 2), quiet=True)
    batches = _batches(trainer, 2)
    for b in batches[:2]:
        trainer.micro_step(b)
    single = {n: p.grad / 2 for n, p in trainer.model.named_parameters() if p.grad is not None}
    # a parameter without a gradient (the image mask embedding, unused in fine-tuning) keeps none: no step moves it
    assert ddp["grads"].keys() == single.keys()
    assert "uniter.img_embeddings.mask_embedding.weight" not in single
    for k, g in single.items():
        torch.testing.assert_close(ddp["grads"][k], g, rtol=1e-4, atol=1e-6, msg=k)
    # evaluation shards the validation set over ranks and gathers every example once
    assert ddp["val"]["n"] == trainer.evaluate("val")["n"] == 24
    assert ddp["val"]["acc"] == pytest.approx(trainer.evaluate("val")["acc"])


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    cfg = task_config(tmp_path, "nlvr2", adv_training=True)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        "-m",
        "villa_fast",
        "train",
        "--config",
        str(p),
    ]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("nlvr2 after 4 steps") == 1  # rank 0 alone reports
    state = torch.load(tmp_path / "out" / "ckpt" / "step_4" / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2


def _presence_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from villa_fast.train import distributed as vdist

    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    params[0].grad = torch.full((3,), float(rank + 1))  # on every rank
    if rank == 0:
        params[1].grad = torch.ones(3)  # on one rank only
    # params[2]: on none
    vdist.all_reduce_grads(params, world, average=False)
    if rank == 1:
        torch.save([None if p.grad is None else p.grad.clone() for p in params], out)
    torch.distributed.destroy_process_group()


def test_all_reduce_keeps_no_gradient_where_no_rank_has_one(tmp_path):
    """Summed over the ranks; a gradient one rank lacks counts as zero there; a parameter no rank has a gradient
    for keeps none (an optimizer then leaves it alone, as in one process)."""
    out = str(tmp_path / "grads.pt")
    mp.spawn(_presence_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    g = torch.load(out, weights_only=True)
    assert torch.equal(g[0], torch.full((3,), 3.0))
    assert torch.equal(g[1], torch.ones(3))
    assert g[2] is None


def _failing_save_worker(rank: int, world: int, port: int, base: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from villa_fast.train import trainer as trainer_mod
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(_cfg(base, 1) | {"output_dir": base["output_dir"]}, quiet=True)
    trainer._prepare_output()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    trainer_mod.save_checkpoint = full_disk  # only rank 0 writes, so only rank 0 meets the full disk
    try:
        trainer.save()
        outcome = "saved"
    except Exception as exc:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(exc).__name__}: {exc}"
    Path(f"{out}.{rank}").write_text(outcome)
    torch.distributed.destroy_process_group()


def test_a_failed_write_on_rank_0_stops_every_rank(tmp_path):
    """Rank 0 writes the checkpoint; when that fails, the other ranks raise too, instead of waiting in the next
    collective until the process group's timeout."""
    out = str(tmp_path / "outcome")
    base = task_config(tmp_path, "vqa", train_batch_size=200)
    ctx = mp.spawn(_failing_save_worker, args=(2, _free_port(), base, out), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):  # False until every process has exited
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks did not finish within 120 s")
    rank0, rank1 = (Path(f"{out}.{r}").read_text() for r in range(2))
    assert rank0.startswith("OSError") and "No space left" in rank0
    assert rank1.startswith("RuntimeError: rank 0 failed to write the step 0 checkpoint") and "No space" in rank1
