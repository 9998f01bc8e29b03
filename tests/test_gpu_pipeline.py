"""The pipeline on a GPU: the trainer with the graphed VILLA step under bf16 and fp16, compiled layers, robust
evaluation; the UNITER encoder under bf16 autocast against float32; the prefetching loader."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("lmdb", reason="the data pipeline needs lmdb (on a GPU machine: bench/device_wheels.sh)")

from tests.test_models import make_batch, run_encoder, tiny_config
from tests.test_train_fixtures import task_config
from villa_fast.adversarial import GraphedVillaStep
from villa_fast.data import PrefetchLoader
from villa_fast.models import UniterModel
from villa_fast.train.config import resolve_config
from villa_fast.train.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(
    ("precision", "compiled", "layer_norm", "clean"),
    [("bf16", True, "torch", "once"), ("fp16", False, "fused", "once"), ("bf16", False, "torch", "recompute")],
    ids=["bf16-compiled", "fp16-fused-ln", "bf16-recompute"],
)
def test_trainer_villa_graphed_on_cuda(tmp_path, monkeypatch, precision, compiled, layer_norm, clean):
    monkeypatch.setenv("VILLA_FAST_LAYERNORM", layer_norm)
    changes = {"device": "cuda", "adv_training": True, "adv_graphed": True, "compile_layers": compiled}
    changes["adv_clean_backward"] = clean
    changes[precision] = True
    cfg = resolve_config(None, task_config(tmp_path, "vqa", **changes))
    trainer = Trainer(cfg, quiet=True)
    history = trainer.train()
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    step = trainer.adv_step
    assert isinstance(step, GraphedVillaStep)
    assert step.graphed, "no batch shape was captured in a CUDA graph"
    assert all(p.is_cuda for p in trainer.model.parameters())
    metrics = trainer.evaluate("val", robust=True)
    main = trainer.task.main_metric
    assert 0.0 <= metrics[main] <= 1.0 and 0.0 <= metrics[f"robust_{main}"] <= 1.0


@pytest.mark.parametrize(
    ("task", "changes"),
    [
        ("nlvr2", {"model": "paired-attn", "train_batch_size": 1600}),
        ("nlvr2", {"model": "triplet", "train_batch_size": 800}),
        ("vcr", {"train_batch_size": 1600}),
        ("re", {}),
        ("retrieval", {}),  # hard negatives
        ("retrieval", {"hard_neg_size": 0, "negative_size": 2, "train_batch_size": 2}),
        ("pretrain", {"num_train_steps": 8}),  # MLM and ITM adversarial, MRFR and MRC-kl standard steps
    ],
    ids=["nlvr2-paired-attn", "nlvr2-triplet", "vcr", "re", "retrieval-hard", "retrieval-sampled", "pretrain"],
)
def test_every_padded_task_trains_graphed_on_cuda(tmp_path, task, changes):
    """The tasks whose training batches are padded to fixed shapes under adv_graphed capture every shape they
    meet (none falls back to eager) and train to finite losses."""
    extra = {"device": "cuda", "adv_training": True, "adv_graphed": True, "bf16": True, "valid_steps": 100}
    trainer = Trainer(resolve_config(None, task_config(tmp_path, task, **extra, **changes)), quiet=True)
    history = trainer.train()
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses and all(math.isfinite(x) for x in losses)
    step = trainer.adv_step
    assert step.graphed and not step._eager_keys, step._eager_keys


def test_uniter_bf16_autocast_on_cuda_matches_float32():
    torch.manual_seed(0)
    model = UniterModel(tiny_config(hidden_size=64, intermediate_size=128)).eval()
    batch = make_batch(model.config, [7, 4, 9], [5, 8, 3])
    with torch.no_grad():
        want = run_encoder(model, batch)
        model.cuda()
        gpu = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = run_encoder(model, gpu)
    valid = batch["attn_masks"].bool()
    torch.testing.assert_close(got.float().cpu()[valid], want[valid], atol=5e-2, rtol=5e-2)


def test_prefetch_loader_delivers_the_same_batches_on_the_device():
    g = torch.Generator().manual_seed(0)
    batches = [{"x": torch.randn(3, 5, generator=g), "ids": torch.arange(i, i + 4), "n": i} for i in range(5)]
    got = list(PrefetchLoader(batches, torch.device("cuda")))
    assert len(got) == len(batches)
    for b, c in zip(got, batches, strict=True):
        assert b["x"].is_cuda and b["ids"].is_cuda and b["n"] == c["n"]
        assert torch.equal(b["x"].cpu(), c["x"]) and torch.equal(b["ids"].cpu(), c["ids"])


def test_gradient_all_reduce_on_cuda_reads_the_presence_flags_asynchronously():
    """The NCCL path of the gradient all-reduce: the flags copied to pinned memory before the gradients are
    reduced; a parameter no rank has a gradient for keeps none, the others are averaged."""
    import socket

    import torch.distributed as dist

    from villa_fast.train.distributed import all_reduce_grads

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        used, unused = (torch.nn.Parameter(torch.ones(5, device="cuda")) for _ in range(2))
        used.grad = torch.full((5,), 4.0, device="cuda")
        # world_size=2 over a group of one: the all-reduce sums one rank, the average halves it
        all_reduce_grads([used, unused], world_size=2, average=True)
        assert unused.grad is None
        assert torch.equal(used.grad, torch.full((5,), 2.0, device="cuda"))
    finally:
        dist.destroy_process_group()
