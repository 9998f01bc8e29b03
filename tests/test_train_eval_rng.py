"""Validation draws nothing from the training random stream: how often a run validates does not change it."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_train_fixtures import task_config
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer


def _train(root, task, valid_steps, **changes):
    cfg = resolve_config(
        None,
        task_config(root, task, num_train_steps=4, valid_steps=valid_steps, dropout=0.1, **changes),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer = Trainer(cfg, quiet=True)
        trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


@pytest.mark.parametrize("task, changes", [("pretrain", {}), ("vqa", {"adv_training": True})])
def test_validation_cadence_leaves_training_unchanged(tmp_path, task, changes):
    """Pre-training's validation makes a loader iterator per dataset and task (each draws a seed from the global
    generator); VQA's robust-free validation one: neither may shift the training run's random numbers."""
    often = _train(tmp_path / "often", task, 1, **changes)
    rarely = _train(tmp_path / "rarely", task, 100, **changes)
    assert often.keys() == rarely.keys()
    for k in often:
        assert torch.equal(often[k], rarely[k]), k


def test_evaluate_leaves_the_global_generator_alone(tmp_path):
    cfg = resolve_config(None, task_config(tmp_path, "pretrain"))
    trainer = Trainer(cfg, quiet=True)
    before = torch.get_rng_state()
    trainer.evaluate("val")
    assert torch.equal(torch.get_rng_state(), before)
