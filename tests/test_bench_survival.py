"""bench/perturbation_survival.py: the perturbation reaches the encoder input through the step's own hooks, and
low-precision casts keep less of it the fewer mantissa bits they have."""

from __future__ import annotations

import torch

from bench import bench_step as bs
from bench import perturbation_survival as ps


def test_survival_falls_with_precision_and_rises_with_size():
    torch.manual_seed(0)
    c = bs.model_cfg("tiny")
    model = bs.build_setup("uniter", c, torch.device("cpu")).model.eval()
    rows = ps.survival_rows(model, bs.make_batch(c, 2, torch.device("cpu")), [1e-4, 1e-1, 1e3])
    assert {r["modality"] for r in rows} == {"text", "image"}
    for r in rows:
        # float32 sees (almost) every change; each cast with fewer mantissa bits keeps no more of it
        assert r["float32"] >= r["float16"] >= r["bfloat16"]
        assert r["float32"] > 0.9
    for modality in ("text", "image"):
        mine = [r for r in rows if r["modality"] == modality]
        small, large = mine[0], mine[-1]
        assert small["bfloat16"] < 0.5 < large["bfloat16"]  # a huge perturbation survives any cast
        assert small["bfloat16"] <= mine[1]["bfloat16"] <= large["bfloat16"]
    # the hooks were removed: the model computes its clean encoder input again
    u = model.uniter
    assert not u.embeddings.word_embeddings._forward_hooks
    assert not u.img_embeddings.img_linear._forward_pre_hooks


def test_main_writes_a_table(capsys):
    rows = ps.main(["--tiny", "--batch", "2", "--lrs", "1e-2"])
    assert len(rows) == 2
    assert "bfloat16" in capsys.readouterr().out
