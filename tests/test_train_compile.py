"""The trainer's ``compile_layers`` key: compiled encoder layers train to the same losses as eager ones."""

from __future__ import annotations

import pytest

from tests.test_train_fixtures import task_config
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer


def _losses(tmp_path, **changes):
    cfg = resolve_config(None, task_config(tmp_path, "vqa", adv_training=True, dropout=0.0, **changes))
    trainer = Trainer(cfg, quiet=True)
    history = trainer.train()
    return trainer, [e["loss"] for e in history if "loss" in e]


def test_compiled_layers_train_like_eager(tmp_path):
    eager, want = _losses(tmp_path / "eager")
    compiled, got = _losses(tmp_path / "compiled", compile_layers=True)
    assert eager.model.uniter.encoder.compile_options is None
    assert compiled.model.uniter.encoder.compile_options == {}
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    # the loss moved: the comparison is over four real optimizer steps
    assert want[0] != pytest.approx(want[-1], rel=1e-3)
