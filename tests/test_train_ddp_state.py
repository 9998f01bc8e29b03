"""Two gloo processes keep their training state in step: the predictions file holds every rank's examples,
a left-out adversarial step backs every rank's loss scale off alike, and a resumed run loads the same
checkpoint on every rank. One spawn runs all three; the tests read what each rank recorded."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_train_fixtures import task_config

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, base: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    # a short timeout: ranks that disagree fail instead of waiting for each other for half an hour
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    import villa_fast.train.trainer as trainer_mod
    from villa_fast.train.config import resolve_config
    from villa_fast.train.trainer import Trainer

    rec: dict = {}
    out_dir = Path(out)

    # the predictions file of a validation
    trainer = Trainer(resolve_config(None, {**base, "output_dir": None}), quiet=True)
    metrics = trainer.evaluate("val", predictions_prefix=str(out_dir / "pred"))
    rec["val_n"] = metrics["n"]

    # fp16 loss scaling (a CPU GradScaler stands in for the CUDA one); rank 0's adversarial steps overflow
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.adv_step.scaler = trainer.scaler
    stream = trainer.source().batches()
    loss_fn = trainer.adv_step.loss_fn
    if rank == 0:
        trainer.adv_step.loss_fn = lambda z, b: loss_fn(z, b) * float("inf")
    trainer.micro_step(trainer._to_device(next(stream)))
    trainer.optimizer_step()
    rec["scale_after_skip"] = trainer.scaler.get_scale()
    rec["skipped_logged"] = int(trainer._skipped_since_log)
    trainer.adv_step.loss_fn = loss_fn
    trainer.micro_step(trainer._to_device(next(stream)))
    trainer.optimizer_step()
    rec["scale_after_clean"] = trainer.scaler.get_scale()
    rec["params"] = [p.detach().clone() for p in trainer.params]

    # resume: rank 1's view of the checkpoint directory lags behind (it sees only the older checkpoint)
    run = {**base, "output_dir": str(out_dir / "run"), "save_steps": 2, "keep_checkpoints": 0}
    for key in ("val_txt_db", "val_img_db"):
        run.pop(key)
    Trainer(resolve_config(None, run), quiet=True).train()
    if rank == 1:
        trainer_mod.latest_checkpoint = lambda ckpt_dir: Path(ckpt_dir) / "step_2"
    resumed = Trainer(resolve_config(None, run), resume=True, quiet=True)
    loaded: list[str] = []
    real_restore = resumed._restore  # what loads the checkpoint's weights and state, once it is checked
    resumed._restore = lambda path, state: (loaded.append(Path(path).name), real_restore(path, state))[1]
    resumed.train()
    rec["resumed_from"] = loaded
    torch.save(rec, out_dir / f"rank{rank}.pt")
    resumed.close()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("ddp_state")
    base = task_config(root, "vqa", adv_training=True, dropout=0.0, train_batch_size=200)
    out = root / "records"
    out.mkdir()
    mp.spawn(_worker, args=(WORLD, _free_port(), base, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)], out


@pytest.mark.slow
def test_the_predictions_file_holds_every_rank_s_examples(ranks):
    recs, out = ranks
    preds = json.loads((out / "pred.json").read_text())
    assert recs[0]["val_n"] == 24
    assert len(preds) == 24 and len({p["question_id"] for p in preds}) == 24


@pytest.mark.slow
def test_a_step_left_out_on_one_rank_backs_every_rank_s_scale_off(ranks):
    recs, _ = ranks
    steps = 2  # adv_steps of the tiny config, all left out on rank 0
    assert [r["scale_after_skip"] for r in recs] == [512.0, 512.0]
    assert [r["skipped_logged"] for r in recs] == [steps, steps]  # counted over the ranks
    assert [r["scale_after_clean"] for r in recs] == [512.0, 512.0]
    for a, b in zip(recs[0]["params"], recs[1]["params"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_every_rank_resumes_from_rank_0_s_checkpoint(ranks):
    recs, _ = ranks
    assert [r["resumed_from"] for r in recs] == [["step_4"], ["step_4"]]
