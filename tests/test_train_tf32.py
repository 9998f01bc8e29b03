"""The trainer's ``tf32`` key: TF32 float32 matmuls on CUDA under fp16/bf16 autocast, never touched on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("lmdb", reason="the data pipeline needs lmdb (on a GPU machine: bench/device_wheels.sh)")

from tests.test_train_fixtures import task_config
from villa_fast.train.config import ConfigError, resolve_config
from villa_fast.train.trainer import Trainer, tf32_wanted


@pytest.mark.parametrize(
    ("setting", "amp", "want"),
    [
        ("auto", torch.bfloat16, True),
        ("auto", torch.float16, True),
        ("auto", None, None),  # plain float32 training: torch's flag is left as the user set it
        ("on", None, True),
        ("off", torch.bfloat16, False),
    ],
)
def test_the_choice(setting, amp, want):
    assert tf32_wanted(setting, amp) is want


def test_unknown_setting_is_named(tmp_path):
    with pytest.raises(ValueError, match="tf32"):
        tf32_wanted("sometimes", None)
    with pytest.raises(ConfigError, match="tf32"):
        resolve_config(None, task_config(tmp_path, "vqa", tf32="sometimes"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path")
def test_cpu_training_leaves_the_flag_alone(tmp_path):
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not before
        Trainer(resolve_config(None, task_config(tmp_path, "vqa", tf32="on", bf16=True)), quiet=True)
        assert torch.backends.cuda.matmul.allow_tf32 is (not before)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("changes", "want"), [({"bf16": True}, True), ({"bf16": True, "tf32": "off"}, False)])
def test_cuda_training_sets_the_flag(tmp_path, changes, want):
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not want
        Trainer(resolve_config(None, task_config(tmp_path, "vqa", device="cuda", **changes)), quiet=True)
        assert torch.backends.cuda.matmul.allow_tf32 is want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
