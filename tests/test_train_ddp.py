"""Two gloo processes match one process over the same global batch (within float tolerance)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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


def _cfg(tmp_path: Path, accum: int) -> dict:
    from villa_fast.train.config import resolve_config

    c = task_config(tmp_path, "vqa", adv_training=True, dropout=0.0, gradient_accumulation_steps=accum)
    c["output_dir"] = None
    return resolve_config(None, c)


def _batches(trainer, n: int) -> list[dict]:
    from villa_fast.tasks import DataContext

    loader = trainer.task.train_loader(DataContext(seed=trainer.cfg["seed"]))
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _worker(rank: int, world: int, port: int, tmp_path: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    from villa_fast.train.trainer import Trainer

    trainer = Trainer(_cfg(Path(tmp_path), 1), quiet=True)
    batches = _batches(trainer, 2 * world)
    for step in range(2):  # two optimizer steps; rank r takes micro-batch r of each global batch
        trainer.micro_step(batches[step * world + rank])
        trainer.optimizer_step()
    metrics = trainer.evaluate("val")
    if rank == 0:
        torch.save({"params": {k: v.detach() for k, v in trainer.model.state_dict().items()}, "val": metrics}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    from villa_fast.train.trainer import Trainer

    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    # one process, the same two micro-batches per optimizer step (gradients summed, as across ranks)
    trainer = Trainer(_cfg(tmp_path, 2), quiet=True)
    batches = _batches(trainer, 4)
    for step in range(2):
        for b in batches[2 * step : 2 * step + 2]:
            trainer.micro_step(b)
        trainer.optimizer_step()
    single = trainer.model.state_dict()
    for k, v in ddp["params"].items():
        torch.testing.assert_close(v, single[k], rtol=1e-5, atol=1e-6, msg=k)
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
