"""The whole-step benchmark compares like with like: its variants run, and the released-loop transcription and
VillaStep give the same parameter gradients on both of its models."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from bench import bench_step as bs

TINY = bs.ModelCfg(hidden=32, layers=2, heads=4, ffn=64, vocab=100, img_dim=16, n_ans=20)
CPU = torch.device("cpu")
_TORCH = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])


pytestmark = pytest.mark.usefixtures("one_thread")


def _variants(kind: str, dtype: torch.dtype, dropout: float, b: int = 3) -> dict[str, bs.Variant]:
    c = bs.ModelCfg(**{**TINY.__dict__, "dropout": dropout})
    torch.manual_seed(0)
    setup = bs.build_setup(kind, c, CPU, dtype)
    return bs.build_variants(setup, bs.make_batch(c, b, CPU, dtype), CPU)


@pytest.mark.parametrize("kind", bs.MODELS)
def test_variants_run(kind):
    variants = _variants(kind, torch.float32, 0.1)
    assert set(variants) == {"released", "villa-once", "villa-per", "graphed (eager on CPU)", "standard"}
    start = [p.detach().clone() for p in variants["released"].model.parameters()]
    assert len({id(v.model) for v in variants.values()}) == len(variants)
    for v in variants.values():  # one model, one set of initial weights, separate copies
        assert all(torch.equal(p, q) for p, q in zip(v.model.parameters(), start, strict=True))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraphedVillaStep runs eagerly", RuntimeWarning)
        res = bs.time_variants(variants, rounds=2, warmup=1, device=CPU)
    for name, r in res.items():
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, name
    for v in variants.values():  # each variant stepped its own copy: weights moved, stayed finite
        assert all(p.grad is None for p in v.model.parameters())
        assert all(torch.isfinite(p).all() for p in v.model.parameters())
        assert any(not torch.equal(p, q) for p, q in zip(v.model.parameters(), start, strict=True))


def _grads(v: bs.Variant) -> list[torch.Tensor | None]:
    v.model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GraphedVillaStep runs eagerly", RuntimeWarning)
        v.grads()
    return [None if p.grad is None else p.grad.detach().clone() for p in v.model.parameters()]


@pytest.mark.parametrize("kind", bs.MODELS)
def test_released_and_villa_step_same_gradients(kind):
    """float64, dropout 0: one step of each variant from the same weights gives the same parameter gradients."""
    variants = _variants(kind, torch.float64, 0.0)
    want = _grads(variants["released"])
    assert sum(g is not None for g in want) > 10
    names = [n for n in variants if n.startswith(("villa-", "graphed"))]
    assert len(names) == 3
    for name in names:
        got = _grads(variants[name])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            if w is None or g is None:  # a parameter no loss reaches: no gradient, or an all-zero one
                assert (g is None or not g.any()) and (w is None or not w.any()), (name, i)
                continue
            scale = w.abs().max().clamp(min=1e-30)
            err = (g - w).abs().max() / scale
            assert err <= 1e-8, (name, i, tuple(w.shape), float(err))
    # the adversarial gradients differ from a plain step's: the comparison above is not vacuous
    std = _grads(variants["standard"])
    diff = max(float((s - w).abs().max()) for s, w in zip(std, want, strict=True) if s is not None and w is not None)
    assert diff > 1e-6


def test_extra_variants_same_gradients_as_released():
    """``--extra``: compiled layers, the fused add + LayerNorm and the recomputed clean pass change no gradient
    (float64, dropout 0)."""
    c = bs.ModelCfg(**{**TINY.__dict__, "dropout": 0.0})
    torch.manual_seed(0)
    setup = bs.build_setup("uniter", c, CPU, torch.float64)
    variants = bs.build_variants(setup, bs.make_batch(c, 3, CPU, torch.float64), CPU, extra=bs.EXTRAS)
    names = [f"graphed+{x} (eager on CPU)" for x in ("compile", "fused-ln", "recompute")] + ["villa-recompute"]
    assert set(names) <= set(variants)
    assert variants[names[0]].model.uniter.encoder.compile_options == {"dynamic": False}
    assert variants[names[1]].model.uniter.config.layer_norm_impl == "fused"
    want = _grads(variants["released"])
    if _TORCH < (2, 12):
        # torch 2.11's Inductor: the CPU flash-attention backward of a compiled float64 SDPA with a mask raises
        # "expected scalar type Double but found Float" (a four-line SDPA under torch.compile does too)
        names.remove("graphed+compile (eager on CPU)")
    for name in names:
        got = _grads(variants[name])
        checked = 0
        for g, w in zip(got, want, strict=True):
            if w is None or g is None:
                continue
            err = (g - w).abs().max() / w.abs().max().clamp(min=1e-30)
            assert err <= 1e-8, (name, float(err))
            checked += 1
        assert checked > 10, name
    with pytest.raises(ValueError, match="unknown extra"):
        bs.build_variants(setup, bs.make_batch(c, 3, CPU), CPU, extra=("fast",))


def test_a_failing_variant_is_reported_and_the_others_still_timed(capsys):
    """One variant that raises (a compile or capture error, out of memory on a GPU) costs its own row only."""
    model = torch.nn.Linear(2, 2)
    calls = {"ok": 0, "late": 0}

    def ok():
        calls["ok"] += 1

    def boom():
        raise RuntimeError("Inductor could not compile\nsecond line")

    def late():
        calls["late"] += 1
        if calls["late"] > 2:  # fails in the timed rounds, after its warm-up
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    variants = {
        "released": bs.Variant(model, ok, ok),
        "graphed+compile": bs.Variant(model, boom, boom),
        "late": bs.Variant(model, late, late),
        "standard": bs.Variant(model, ok, ok),
    }
    failed: dict[str, str] = {}
    res = bs.time_variants(variants, rounds=3, warmup=1, device=CPU, failed=failed)
    assert set(res) == {"released", "standard"} and all(len(r) == 5 for r in res.values())
    assert failed == {
        "graphed+compile": "failed: RuntimeError: Inductor could not compile",
        "late": "failed: OutOfMemoryError: CUDA out of memory",
    }
    assert calls["ok"] == 2 * (1 + 3)  # warm-up and three rounds each, for the two that run
    assert "variant graphed+compile failed: RuntimeError" in capsys.readouterr().err


def test_the_table_names_a_failed_variant(monkeypatch, capsys, tmp_path):
    real = bs.build_variants

    def with_a_failure(*args, **kwargs):
        variants = real(*args, **kwargs)

        def boom():
            raise RuntimeError("capture failed")

        variants["broken"] = bs.Variant(variants["standard"].model, boom, boom)
        return variants

    monkeypatch.setattr(bs, "build_variants", with_a_failure)
    bs.main(["--tiny", "--batches", "2", "--rounds", "2", "--warmup", "1", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 2 | broken (failed: RuntimeError: capture failed) | nan |" in out
    assert "| 2 | standard | " in out and "| 2 | released | " in out
    # the table goes where --out says (a benchmark run's own table elsewhere is left alone)
    written = (tmp_path / "bench_step_uniter.md").read_text()
    assert "broken (failed" in written and written.splitlines()[2].endswith("| variant / standard (graphed) |")


def test_bench_ops_reports_a_failing_variant_and_times_the_rest(capsys):
    from bench import bench_ops

    def boom():
        raise RuntimeError("no kernel image is available\ndetails")

    rows: list[dict] = []
    bench_ops._run("case", [("eager", lambda: None), ("cuda", boom), ("cpp", lambda: None)], CPU, 2, 8, rows)
    assert [r["variant"] for r in rows] == ["eager", "cuda (failed: RuntimeError: no kernel image is available)", "cpp"]
    assert math.isnan(rows[1]["ms"]) and rows[2]["speedup"] > 0


def test_bench_ops_writes_its_table_after_every_case(monkeypatch, tmp_path):
    from bench import bench_ops

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # a phase's timeout: the process ends here

    monkeypatch.setattr(bench_ops, "bench_add_layer_norm", stopped)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter is not timed (as outside the tests)
    with pytest.raises(KeyboardInterrupt):
        bench_ops.main(["--quick", "--reps", "1", "--no-compile", "--out", str(tmp_path)])
    md = (tmp_path / "bench_ops.md").read_text()
    assert "stopped part-way" in md
    assert "| perturb_update" in md and "| sym_kl" in md and "add_layer_norm" not in md
    csv_rows = (tmp_path / "bench_ops.csv").read_text().splitlines()
    assert len(csv_rows) - 1 == md.count("\n| ") - 1  # the CSV holds the same rows as the table


def test_a_lost_cuda_context_keeps_the_rounds_done_and_names_the_rest(monkeypatch):
    """After a sticky CUDA error every CUDA call raises it again: the timing stops, the variants timed so far keep
    their rounds, the others are named as not timed."""
    model = torch.nn.Linear(2, 2)
    state = {"calls": 0, "lost": False}

    def ok():
        pass

    def sticky():
        state["calls"] += 1
        if state["calls"] > 2:  # its warm-up and first round pass; the second round fails
            state["lost"] = True
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(bs, "_device_usable", lambda cuda: not state["lost"])
    variants = {
        "released": bs.Variant(model, ok, ok),
        "sticky": bs.Variant(model, sticky, sticky),
        "standard": bs.Variant(model, ok, ok),
    }
    failed: dict[str, str] = {}
    with pytest.raises(bs.CudaContextLost, match="lost after sticky's error") as info:
        bs.time_variants(variants, rounds=4, warmup=1, device=CPU, failed=failed)
    res, notes = info.value.results, info.value.notes
    assert set(res) == {"released", "standard"} and failed["sticky"].startswith("failed: RuntimeError: CUDA error")
    assert notes["released"].startswith("2 of 4 rounds") and notes["standard"].startswith("1 of 4 rounds")
    # a sticky error in the warm-up: nothing is timed
    state.update(calls=10, lost=False)
    failed = {}
    with pytest.raises(bs.CudaContextLost) as info:
        bs.time_variants(variants, rounds=2, warmup=1, device=CPU, failed=failed)
    assert info.value.results == {}
    assert failed["standard"] == "not timed: the CUDA context was lost after sticky's error"


def test_main_writes_the_rows_and_stops_cleanly_when_the_context_is_lost(monkeypatch, capsys, tmp_path):
    real = bs.build_variants
    state = {"calls": 0, "lost": False}

    def with_a_sticky_error(*args, **kwargs):
        variants = real(*args, **kwargs)

        def sticky():
            state["calls"] += 1
            if state["calls"] > 2:
                state["lost"] = True
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

        variants["sticky"] = bs.Variant(variants["standard"].model, sticky, sticky)
        return variants

    monkeypatch.setattr(bs, "build_variants", with_a_sticky_error)
    monkeypatch.setattr(bs, "_device_usable", lambda cuda: not state["lost"])
    argv = ["--tiny", "--batches", "2,3", "--rounds", "3", "--warmup", "1", "--threads", "1", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as info:
        bs.main(argv)
    assert info.value.code == 3
    written = (tmp_path / "bench_step_uniter.md").read_text()
    assert "| 2 | released (2 of 3 rounds: the CUDA context was lost after sticky's error) |" in written
    assert "| 2 | sticky (failed: RuntimeError: CUDA error" in written and "| 3 |" not in written
    assert (
        "stopped at B = 2: the CUDA context was lost after sticky's error (round 2 of 3); batch sizes not timed: 3"
        in written
    )
    err = capsys.readouterr().err
    # a flushed line per stage: a run stopped by its timeout shows where it was
    assert "B=2: building the variants" in err and "warming released" in err and "timing round 2 of 3" in err


def test_the_header_names_the_ops_backends_and_the_cpu_ratio_clock(capsys, tmp_path):
    bs.main(["--tiny", "--batches", "2", "--rounds", "1", "--warmup", "0", "--threads", "1", "--out", str(tmp_path)])
    head = (tmp_path / "bench_step_uniter.md").read_text().splitlines()[0]
    for op in ("perturb_update", "sym_kl", "add_if", "add_layer_norm", "adamw_step"):
        assert f" {op} " in head, op
    assert "villa_fast._C" in head and "not adamw_step_" in head
    assert "the ratio columns divide process CPU time" in head and "summed over all 1 threads" in head
