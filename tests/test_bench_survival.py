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


def test_tf32_rounding_is_to_nearest_ties_away_on_10_mantissa_bits():
    x = torch.tensor([1 + 2**-11, 1 + 2**-12, 1 + 3 * 2**-11, -(1 + 2**-11), 3.0, 1 + 2**-10, 2**-20 * (1 + 2**-11)])
    want = [1 + 2**-10, 1.0, 1 + 2**-9, -(1 + 2**-10), 3.0, 1 + 2**-10, 2**-20 * (1 + 2**-10)]
    assert ps.to_tf32(x).tolist() == want
    w, original = torch.randn(5, 7), torch.nn.functional.linear
    with ps.tf32_products():
        y = torch.nn.functional.linear(torch.ones(2, 7), w)
    torch.testing.assert_close(y, original(torch.ones(2, 7), ps.to_tf32(w)), rtol=0, atol=0)
    assert not torch.equal(ps.to_tf32(w), w)
    assert torch.nn.functional.linear is original


def test_the_split_projection_keeps_the_image_perturbation_through_tf32():
    """TF32 products round the region features to 10 mantissa bits: a delta added to them is mostly lost (its
    change keeps little of its direction), while W delta added to the projection's output keeps it."""
    torch.manual_seed(0)
    c = bs.model_cfg("tiny")
    model = bs.build_setup("uniter", c, torch.device("cpu")).model.eval()
    batch = bs.make_batch(c, 2, torch.device("cpu"))

    def image_small(split):
        rows = ps.survival_rows(model, batch, [1e-4], split=split)
        return next(r for r in rows if r["modality"] == "image")

    split, added = image_small(True), image_small(False)
    assert split["cos float32"] > 0.999 and added["cos float32"] > 0.999
    assert split["cos tf32"] > 0.95 > 0.2 > added["cos tf32"]
    # the text path has no matrix product before the encoder: TF32 changes nothing there
    text = next(r for r in ps.survival_rows(model, batch, [1e-4]) if r["modality"] == "text")
    assert text["cos tf32"] == text["cos float32"] and text["tf32+bfloat16"] == text["bfloat16"]


def test_main_writes_a_table(capsys):
    rows = ps.main(["--tiny", "--batch", "2", "--lrs", "1e-2"])
    assert len(rows) == 2
    assert "bfloat16" in capsys.readouterr().out
