"""The trainer skips the optimizer step and backs the loss scale off when an adversarial step was left out as
non-finite, as the released loop's overflow (which reached its accumulated gradients) made apex skip the step.

A left-out step never reaches .grad, so GradScaler's own inf check cannot see it; without the flag an fp16 run
whose adversarial steps overflow would apply partial gradients and keep its scale (and keep skipping them).
Checked on the CPU with a CPU GradScaler standing in for the CUDA one."""

from __future__ import annotations

import torch

from tests.test_train_fixtures import task_config
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer


def _trainer(tmp_path):
    cfg = resolve_config(None, task_config(tmp_path, "vqa", adv_training=True, dropout=0.0))
    trainer = Trainer(cfg, quiet=True)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1000)
    trainer.adv_step.scaler = trainer.scaler
    return trainer


def test_a_left_out_adversarial_step_backs_the_scale_off(tmp_path):
    trainer = _trainer(tmp_path)
    stream = trainer.source().batches()
    loss_fn = trainer.adv_step.loss_fn

    def overflowing(logits, batch):
        return loss_fn(logits, batch) * float("inf")

    trainer.adv_step.loss_fn = overflowing
    trainer.micro_step(trainer._to_device(next(stream)))
    steps = trainer.adv_step.config.steps
    assert int(trainer._adv_skipped) == steps
    before = [p.detach().clone() for p in trainer.params]
    state_before = {
        k: v.clone() for st in trainer.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)
    }
    trainer.optimizer_step()
    assert trainer.scaler.get_scale() == 512.0  # backed off once
    assert int(trainer._skipped_since_log) == steps and trainer._adv_skipped is None
    # the optimizer step is skipped: weights and optimizer state as they were (the released loop's skip)
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, before, strict=True))
    state_after = {k: v for st in trainer.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v)}
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())

    trainer.adv_step.loss_fn = loss_fn
    trainer.micro_step(trainer._to_device(next(stream)))
    assert int(trainer._adv_skipped) == 0
    trainer.optimizer_step()
    assert trainer.scaler.get_scale() == 512.0  # a clean step keeps the scale (no growth before 1000 steps)
    assert any(not torch.equal(p, q) for p, q in zip(trainer.params, before, strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_the_log_reports_left_out_steps(tmp_path):
    trainer = _trainer(tmp_path)
    history = trainer.train()
    logged = [e for e in history if "loss" in e]
    assert logged and all(e["adv_skipped"] == 0 for e in logged)


def test_one_left_out_step_of_several_skips_the_optimizer_step(tmp_path):
    """Only the second of the K adversarial steps overflows: the optimizer step is still skipped (the released
    loop's inf reached the accumulated gradients whichever step produced it)."""
    trainer = _trainer(tmp_path)
    stream = trainer.source().batches()
    loss_fn = trainer.adv_step.loss_fn
    calls = []

    def second_overflows(logits, batch):
        calls.append(1)
        loss = loss_fn(logits, batch)
        return loss * float("inf") if len(calls) == 2 else loss

    trainer.adv_step.loss_fn = second_overflows
    trainer.micro_step(trainer._to_device(next(stream)))
    assert int(trainer._adv_skipped) == 1
    before = [p.detach().clone() for p in trainer.params]
    trainer.optimizer_step()
    assert trainer.scaler.get_scale() == 512.0
    assert all(torch.equal(p, q) for p, q in zip(trainer.params, before, strict=True))
