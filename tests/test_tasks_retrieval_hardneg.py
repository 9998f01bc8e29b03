"""Retrieval with hard negatives accumulates as UNITER's train_itm_hard_negatives.py: ``train_batch_size``
image-side and as many text-side items per optimizer step, alternating, each loss divided by ``train_batch_size``
(the VILLA step's whole objective alike); resume stays exact; processes sum their gradients. The sampled-negatives
path keeps ``gradient_accumulation_steps`` and no scaling."""

from __future__ import annotations

import copy
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.test_tasks_retrieval import _double, _released_loop
from tests.test_train_fixtures import task_config
from villa_fast.data.sampler import ExampleBatchSampler
from villa_fast.tasks import DataContext, build_task
from villa_fast.tasks.base import Accumulation
from villa_fast.tasks.retrieval import AlternatingSidesSampler, group_scores, rank_hinge_loss
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
HN_CONFIG = ROOT / "configs" / "train-itm-flickr-base-16gpu-hn.json"
N_TXT = 48  # training texts of the fixture: 48 text-side and 48 image-side items
REL = 1e-12  # float64, dropout 0: relative to the whole gradient's norm


def _cfg(tmp_path, *, val: bool = False, **changes) -> dict:
    cfg = task_config(tmp_path, "retrieval", **changes)
    if not val:
        cfg.pop("val_txt_db")
        cfg.pop("val_img_db")
    return resolve_config(None, cfg)


def _trainer(tmp_path, **changes) -> Trainer:
    return Trainer(_cfg(tmp_path, **changes), quiet=True)


def _side(batch: dict) -> str:
    """Which side an item is: "t", a text against several images; "i", an image against several texts."""
    ids, feat = batch["input_ids"], batch["img_feat"]
    same_text = all(torch.equal(ids[0], r) for r in ids[1:])
    same_image = all(torch.equal(feat[0], r) for r in feat[1:])
    assert same_text != same_image
    return "t" if same_text else "i"


# -- the rule ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 8])
def test_accumulation_is_the_authors_rule(n):
    task = build_task(resolve_config(None, {"task": "retrieval", "hard_neg_size": 2, "negative_size": 4,
                                            "train_batch_size": n}))  # fmt: skip
    assert task.accumulation() == Accumulation(2 * n, 1.0 / n)


def test_shipped_hard_negative_config_steps_on_8_pairs():
    cfg = resolve_config(HN_CONFIG)
    assert (cfg["hard_neg_size"], cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (31, 8, 1)
    assert build_task(cfg).accumulation() == Accumulation(16, 0.125)


def test_unset_batch_size_takes_each_scripts_default():
    """train_itm_hard_negatives.py steps on 32 positive pairs unless told; train_itm.py batches 128 texts."""
    hard = resolve_config(None, {"task": "retrieval", "hard_neg_size": 2, "negative_size": 4})
    assert hard["train_batch_size"] == 32 and build_task(hard).accumulation() == Accumulation(64, 1.0 / 32)
    assert resolve_config(None, {"task": "retrieval", "negative_size": 4})["train_batch_size"] == 128
    given = resolve_config(None, {"task": "retrieval", "hard_neg_size": 2, "negative_size": 4, "train_batch_size": 128})
    assert given["train_batch_size"] == 128


@pytest.mark.parametrize("accum", [1, 3])
def test_sampled_negatives_keep_gradient_accumulation_steps(accum):
    cfg = resolve_config(None, {"task": "retrieval", "negative_size": 1, "gradient_accumulation_steps": accum})
    assert build_task(cfg).accumulation() == Accumulation(accum, 1.0)


def test_hard_negatives_refuse_gradient_accumulation_steps():
    with pytest.raises(ConfigError, match=r"hard_neg_size=31.*gradient_accumulation_steps must be 1, got 2"):
        build_task(resolve_config(HN_CONFIG, overrides={"gradient_accumulation_steps": 2}))


# -- the order of the micro-batches -----------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_alternates_sides_and_shards_them(world):
    n = 7
    keep = n // world * world
    per_rank = []
    for rank in range(world):
        s = AlternatingSidesSampler(n, seed=5, rank=rank, world_size=world)
        batches = s.epoch_batches()
        assert len(s) == len(batches) == 2 * (n // world) and all(len(b) == 1 for b in batches)
        idx = [b[0] for b in batches]
        assert all(i >= n for i in idx[0::2]) and all(i < n for i in idx[1::2])  # image side, then text side
        per_rank.append(idx)
    for side in (0, 1):
        got = [i for idx in per_rank for i in idx[side::2]]
        assert len(set(got)) == len(got) == keep  # disjoint shards, as many items on every rank
    # each side has its own permutation, and each epoch its own
    s = AlternatingSidesSampler(n, seed=5)
    e0, e1 = s.epoch_batches(0), s.epoch_batches(1)
    assert [b[0] - n for b in e0[0::2]] != [b[0] for b in e0[1::2]]
    assert e0 != e1 and sorted(e0) == sorted(e1)
    # a resumed position continues the epoch
    s.load_state_dict({"epoch": 1, "batch_index": 5, "seed": 5})
    assert list(s) == e1[5:] and s.start_batch == 0
    with pytest.raises(ValueError, match="2 texts cannot give each of 3 processes"):
        AlternatingSidesSampler(2, world_size=3)


def test_loader_alternates_image_side_and_text_side_items(tmp_path):
    task = build_task(_cfg(tmp_path))
    loader = task.train_loader(DataContext(seed=7))
    sides = [_side(b) for b in loader]
    assert sides == ["i", "t"] * N_TXT and loader.epoch == 1


def test_training_steps_on_2n_micro_batches_half_of_each_side(tmp_path):
    trainer = _trainer(tmp_path, train_batch_size=3, num_train_steps=3, valid_steps=100)
    seen: list[str] = []
    per_step: list[list[str]] = []
    micro, step = trainer.micro_step, trainer.optimizer_step

    def counting_micro(batch):
        seen.append(_side(batch))
        return micro(batch)

    def counting_step():
        per_step.append(seen[:])
        seen.clear()
        return step()

    trainer.micro_step, trainer.optimizer_step = counting_micro, counting_step
    history = trainer.train()
    assert per_step == [["i", "t"] * 3] * 3
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]  # the schedule counts optimizer steps
    assert trainer.schedule.step_count == 3


# -- the scaling, against a transcription of the authors' loop ----------------------------------------------------


def _captured_step(trainer, batches) -> dict[str, torch.Tensor]:
    """Micro-step ``batches`` then take one optimizer step; the gradients the optimizer is handed."""
    got = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}

    def capture(*a, **kw):
        for group in trainer.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    got[names[id(p)]] = p.grad.detach().clone()

    trainer.optimizer.step = capture
    for b in batches:
        trainer.micro_step(b)
    trainer.optimizer_step()
    return got


def _rel_errors(got: dict, want: dict) -> dict[str, float]:
    """Per parameter, the error relative to the norm of the whole gradient (a small gradient such as the rank
    bias's, a sum of nearly cancelling terms, keeps rounding errors far above its own norm's epsilon)."""
    assert got.keys() == {n for n, w in want.items() if w is not None}
    total = torch.linalg.vector_norm(torch.stack([w.norm() for w in want.values() if w is not None])).item()
    return {n: ((got[n] - w).norm() / total).item() for n, w in want.items() if w is not None}


@pytest.mark.parametrize("adv", [False, True], ids=["standard", "villa"])
def test_one_step_is_the_sum_of_2n_losses_divided_by_n(tmp_path, adv):
    n = 3
    changes = dict(train_batch_size=n, dropout=0.0, grad_norm=-1, adv_training=adv, adv_steps=2,
                   adv_modality=["text", "image"], adv_kl_weight=1.5)  # fmt: skip
    trainer = _trainer(tmp_path, **changes)
    model = trainer.model.double()
    ref = copy.deepcopy(model)
    stream = trainer.source().batches()
    batches = [_double(next(stream)) for _ in range(trainer.accumulation.micro_batches)]
    assert len(batches) == 2 * n and [_side(b) for b in batches] == ["i", "t"] * n
    got = _captured_step(trainer, batches)

    # the authors' loop: each item's loss divided by train_batch_size, backward, gradients summed over the items
    c = trainer.cfg
    kl_part = {}
    for alpha in (1.5, 0.0) if adv else (None,):
        ref.zero_grad(set_to_none=True)
        for b in batches:
            hb = ref.hard_negative_batch(b, c["hard_neg_size"])
            if alpha is None:
                (rank_hinge_loss(group_scores(ref(hb), hb), ref.margin) / n).backward()
            else:  # VILLA: the step's whole objective, hinge and KL, divided by train_batch_size
                _released_loop(ref, hb, steps=2, lr_txt=c["adv_lr_txt"], lr_img=c["adv_lr_img"], alpha=alpha,
                               margin=c["margin"])  # fmt: skip
        if alpha is not None and alpha > 0:
            for p in ref.parameters():
                if p.grad is not None:
                    p.grad.div_(n)
        kl_part[alpha] = {k: None if p.grad is None else p.grad.clone() for k, p in ref.named_parameters()}
    want = kl_part[1.5 if adv else None]
    errs = _rel_errors(got, want)
    assert max(errs.values()) <= REL, {k: v for k, v in errs.items() if v > REL}
    # not 2n items unscaled: the scale is 1/n
    unscaled = {k: None if w is None else w * n for k, w in want.items()}
    assert sum(_rel_errors(got, unscaled).values()) > 1.0
    if adv:
        # scaling the task loss alone (the KL term left at full weight) gives other gradients
        hinge_only = {
            k: None if w is None else kl_part[0.0][k] / n + (w - kl_part[0.0][k] / n) * n for k, w in want.items()
        }
        w = "uniter.embeddings.word_embeddings.weight"
        assert _rel_errors(got, hinge_only)[w] > 1e-3


def test_sampled_negatives_step_is_the_plain_sum(tmp_path):
    trainer = _trainer(tmp_path, hard_neg_size=0, negative_size=1, train_batch_size=4, gradient_accumulation_steps=2,
                       dropout=0.0, grad_norm=-1)  # fmt: skip
    assert trainer.accumulation == Accumulation(2, 1.0)
    assert isinstance(trainer.source().loader.sampler, ExampleBatchSampler)
    stream = trainer.source().batches()
    batches = [next(stream) for _ in range(2)]
    for b in batches:
        trainer.micro_step(b)
    summed = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    got = _captured_step(trainer, batches)
    assert got.keys() == summed.keys()
    for k in got:
        assert torch.equal(got[k], summed[k]), k


# -- resume --------------------------------------------------------------------------------------------------------


def test_resume_mid_epoch_is_bitwise_equal(tmp_path):
    # 10 micro-batches per step, 96 per epoch: step 10 (micro-batches 90-99) runs across the end of epoch 0, and the
    # checkpoint of step 9 sits mid-epoch, right before it
    changes = dict(train_batch_size=5, num_train_steps=12, warmup_steps=2, save_steps=3, keep_checkpoints=0,
                   valid_steps=100, adv_training=True, adv_modality=["text", "image"])  # fmt: skip
    ref = _trainer(tmp_path / "ref", **changes)
    ref.train()
    state = torch.load(tmp_path / "ref" / "out" / "ckpt" / "step_9" / "train_state.pt", weights_only=True)
    assert (state["data"]["epoch"], state["data"]["batch_index"]) == (0, 90)

    cfg = _cfg(tmp_path / "run", **changes)
    ckpt = Path(cfg["output_dir"]) / "ckpt"
    ckpt.mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "out" / "ckpt" / "step_9", ckpt / "step_9")
    run = Trainer(cfg, resume=True, quiet=True)
    run.train()
    assert run.global_step == 12
    a = load_file(str(tmp_path / "ref" / "out" / "ckpt" / "model_final.safetensors"))
    b = load_file(str(ckpt / "model_final.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [e["loss"] for e in run.history] == [e["loss"] for e in ref.history]
    assert run.source().state_dict() == ref.source().state_dict()  # epoch 1, 24 micro-batches in


# -- several processes ----------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    trainer = Trainer(cfg, quiet=True)
    stream = trainer.source().batches()
    got = _captured_step(trainer, [next(stream) for _ in range(trainer.accumulation.micro_batches)])
    if rank == 0:
        torch.save(got, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_average_their_pairs(tmp_path):
    n = 2
    cfg = _cfg(tmp_path, train_batch_size=n, dropout=0.0, grad_norm=-1, output_dir=None)
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), cfg, out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)

    # one process: both ranks' micro-batches (n pairs each, their own shards), summed, divided by n once, and
    # averaged over the two processes (the authors' horovod all-reduce averages)
    trainer = Trainer(cfg, quiet=True)
    for rank in range(2):
        loader = trainer.task.train_loader(DataContext(seed=cfg["seed"], rank=rank, world_size=2))
        batches = []
        for b in loader:
            batches.append(b)
            if len(batches) == 2 * n:
                break
        for b in batches:
            trainer.micro_step(b)
    want = {k: p.grad * (1.0 / n) / 2 for k, p in trainer.model.named_parameters() if p.grad is not None}
    assert ddp.keys() == want.keys()
    for k, g in want.items():
        torch.testing.assert_close(ddp[k], g, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("adv", [False, True])
def test_hard_negative_mining_runs_in_the_runs_precision(tmp_path, adv):
    """The mining forward (the largest of a micro-batch: every sampled negative) runs under the run's autocast,
    as the authors' under apex, in eval mode and without gradient; the training forwards after it too."""
    trainer = _trainer(
        tmp_path,
        negative_size=7,
        hard_neg_size=3,
        train_batch_size=1,
        bf16=True,
        num_train_steps=1,
        valid_steps=100,
        adv_training=adv,
    )
    seen = []
    trainer.model.rank_output.register_forward_hook(
        lambda m, i, o: seen.append((i[0].shape[0], o.dtype, m.training, torch.is_grad_enabled()))
    )
    trainer.train()
    mining = [s for s in seen if not s[2]]
    training = [s for s in seen if s[2]]
    assert mining and training
    assert all(rows == 8 and dtype == torch.bfloat16 and not grad for rows, dtype, _, grad in mining)
    assert all(rows == 4 and dtype == torch.bfloat16 and grad for rows, dtype, _, grad in training)
