"""The op benchmark's eager baselines compute what the fused ops compute: a baseline that skipped work would
inflate every reported speed-up (bench/bench_ops.py)."""

from __future__ import annotations

import math
import os

import torch

from bench.bench_ops import eager_add_layer_norm, eager_init, eager_sym_kl, eager_update
from villa_fast import ops


def test_eager_update_is_the_normalised_step_with_projection():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(6, 5, 7, generator=g) * 0.05
    grad = torch.randn(6, 5, 7, generator=g)
    for max_norm in (0.0, 0.2):
        want = delta.clone()
        ops.perturb_update_(want, grad, lr=0.3, norm_type="l2", max_norm=max_norm)
        got = eager_update(delta, grad, 0.3, max_norm)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the projection does act here: some rows leave the 0.2 ball before it
    assert (eager_update(delta, grad, 0.3, 0.0).flatten(1).norm(dim=1) > 0.2).any()


def test_eager_sym_kl_is_the_mean_reduction_with_its_gradients():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(8, 50, generator=g) * 2).requires_grad_()
    b = (torch.randn(8, 50, generator=g) * 2).requires_grad_()
    want = ops.sym_kl(a, b, "mean")
    wa, wb = torch.autograd.grad(want, (a, b))
    got = eager_sym_kl(a, b)
    ga, gb = torch.autograd.grad(got, (a, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ga, wa, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gb, wb, rtol=1e-4, atol=1e-8)


def test_eager_add_layer_norm_is_the_fused_op():
    g = torch.Generator().manual_seed(2)
    x, r = torch.randn(4, 9, 16, generator=g), torch.randn(4, 9, 16, generator=g)
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    torch.testing.assert_close(eager_add_layer_norm(x, r, w, b), ops.add_layer_norm(x, r, w, b, eps=1e-12))


def test_eager_init_has_the_fused_ops_mask_and_scale():
    like = torch.empty(3, 40, 64)
    mask = torch.ones(3, 40)
    mask[1, 10:] = 0
    torch.manual_seed(3)
    got = eager_init(like, mask, 0.5)
    want = ops.perturb_init(like, mask, init_mag=0.5, norm_type="l2")
    assert (got[1, 10:] == 0).all() and (want[1, 10:] == 0).all()
    # same distribution: uniform(-1, 1) * init_mag / sqrt(valid positions x width), so equal expected norms
    for d in (got, want):
        norms = d.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((3,), 0.5 / 3**0.5), rtol=0.05, atol=0)


def test_projection_inputs_stay_on_the_sphere_and_project_every_call():
    """bench_ops' projection row: the deltas start on the sphere, every in-place update leaves the ball and every
    row is projected back, call after call: the timed work does not drift."""
    from bench.bench_ops import update_inputs

    (dt, gt), (di, gi) = update_inputs(3, "cpu", radius=1.0)
    for d in (dt, di):
        torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(3))
    for _ in range(30):
        for d, g, lr in ((dt, gt, 1e-3), (di, gi, 1e-2)):
            # every row would leave the ball: the projection acts on every row of every call
            assert (eager_update(d, g, lr, 0.0).flatten(1).norm(dim=1) > 1.0).all()
            want = eager_update(d, g, lr, 1.0)  # the eager baseline computes what the fused op does
            ops.perturb_update_(d, g, lr=lr, norm_type="l2", max_norm=1.0)
            torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.ones(3), rtol=1e-5, atol=0)


def test_update_inputs_without_projection_and_with_bf16_gradients():
    from bench.bench_ops import update_inputs

    (dt, gt), (di, gi) = update_inputs(2, "cpu", torch.bfloat16)
    assert dt.dtype == di.dtype == torch.float32 and gt.dtype == gi.dtype == torch.bfloat16
    assert dt.shape == (2, 24, 768) and di.shape == (2, 36, 2048)
    want = eager_update(di, gi, 1e-2, 0.0)
    ops.perturb_update_(di, gi, lr=1e-2, norm_type="l2", max_norm=0.0)
    torch.testing.assert_close(di, want, rtol=1e-5, atol=1e-6)  # the step is ~4e-5 per element; bf16 rounding


def _bytes(row: dict) -> float:
    return row["GB/s"] * row["ms"] * 1e6


def test_the_byte_floors(monkeypatch):
    """GB/s counts each op's floor: perturb_update 12 B per element with fp32 gradients (10 with bf16),
    sym_kl both logits read and both gradients written, perturb_init its output written once and the mask read."""
    from bench import bench_ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter is not timed (as outside the tests)
    cpu = torch.device("cpu")
    rows: list[dict] = []
    bench_ops.bench_update(cpu, 2, 1, False, rows)
    bench_ops.bench_update(cpu, 2, 1, False, rows, gdt=torch.bfloat16)
    bench_ops.bench_update(cpu, 2, 1, False, rows, max_norm=1.0)
    n = 2 * 24 * 768 + 2 * 36 * 2048
    fp32, bf16, proj = (r for r in rows if r["variant"] == "eager")
    assert "float32 grad (l2, no projection)" in fp32["case"] and "bfloat16 grad" in bf16["case"]
    assert "projected onto the 1 sphere every call" in proj["case"]
    assert math.isclose(_bytes(fp32), 12 * n, rel_tol=1e-6) and math.isclose(_bytes(proj), 12 * n, rel_tol=1e-6)
    assert math.isclose(_bytes(bf16), 10 * n, rel_tol=1e-6)
    rows.clear()
    bench_ops.bench_init(cpu, 2, 1, False, rows)
    assert math.isclose(_bytes(rows[0]), 2 * 36 * 2048 * 4 + 2 * 36 * 4, rel_tol=1e-6)
    rows.clear()
    bench_ops.bench_sym_kl(cpu, 4, 50, 1, False, rows)
    assert rows[0]["case"] == "sym_kl fwd+bwd 4x50 float32"
    assert math.isclose(_bytes(rows[0]), 4 * 4 * 50 * 4, rel_tol=1e-6)


def test_a_backend_is_set_once_around_its_variant(monkeypatch):
    """The fused variants run under VILLA_FAST_BACKEND set by _run around the timing, not by each call."""
    from bench import bench_ops

    monkeypatch.delenv("VILLA_FAST_BACKEND", raising=False)
    seen: list[str | None] = []
    fn = bench_ops._with_backend("reference", lambda: seen.append(os.environ.get("VILLA_FAST_BACKEND")))
    fn()
    assert seen == [None]  # a call alone changes nothing
    seen.clear()
    rows: list[dict] = []
    bench_ops._run("case", [("eager", lambda: None), ("reference", fn)], torch.device("cpu"), 2, 8, rows)
    assert seen and set(seen) == {"reference"}
    assert "VILLA_FAST_BACKEND" not in os.environ
    monkeypatch.setenv("VILLA_FAST_BACKEND", "auto")
    bench_ops._run("case", [("reference", fn)], torch.device("cpu"), 2, 8, rows)
    assert os.environ["VILLA_FAST_BACKEND"] == "auto"


def test_bench_ops_order_labels_and_header(tmp_path, monkeypatch):
    """fp32 perturb_update (no projection) and sym_kl first, the projection row after them, bf16 rows last."""
    from bench import bench_ops

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter is not timed (as outside the tests)
    rows = bench_ops.main(["--quick", "--reps", "1", "--no-compile", "--out", str(tmp_path)])
    cases = list(dict.fromkeys(r["case"] for r in rows if "copy" not in r["case"]))
    assert "float32 grad (l2, no projection)" in cases[0]
    assert cases[1:3] == ["sym_kl fwd+bwd 128x3129 float32", "sym_kl fwd+bwd 128x28996 float32"]
    assert "projected onto the 1 sphere" in cases[3]
    assert "bfloat16 grad (l2, no projection)" in cases[-3]
    assert cases[-2:] == ["sym_kl fwd+bwd 128x3129 bfloat16", "sym_kl fwd+bwd 128x28996 bfloat16"]
    head = (tmp_path / "bench_ops.md").read_text().splitlines()[0]
    assert "fused backends timed:" in head and "villa_fast._C" in head and "stopped part-way" not in head


def test_extension_status_says_when_the_cuda_kernels_are_missing(monkeypatch):
    from bench._common import extension_status

    def without_cuda(device="cpu", **kw):
        return ["cpp", "reference"] if torch.device(device).type == "cpu" else ["triton", "reference"]

    monkeypatch.setattr(ops, "available_backends", without_cuda)
    assert "NO CUDA KERNELS" in extension_status(torch.device("cuda"))
    monkeypatch.setattr(ops, "available_backends", lambda device="cpu", **kw: ["reference"])
    assert "NOT BUILT" in extension_status(torch.device("cuda"))
    assert "NOT BUILT" in extension_status("cpu")
