"""bench/profile_step.py: kernel names land in the right category, and a profile of the tiny model runs."""

from __future__ import annotations

import pytest

from bench import profile_step as ps

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "matmul"),
        ("nvjet_tst_128x192_64x4_2x1_v_bz_coopA_TNT", "matmul"),
        ("aten::addmm", "matmul"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
        ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "layernorm"),
        (
            "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
            "optimizer",
        ),
        ("_perturb_update_kernel", "villa ops"),
        ("void villa_fast::sym_kl_warp_kernel<float>", "villa ops"),
        (
            "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float>",
            "dropout and random numbers",
        ),
        ("Memcpy DtoD (Device -> Device)", "copies and casts"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>",
            "element-wise and reductions",
        ),
        ("triton_poi_fused_add_gelu_0", "element-wise and reductions"),
        ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "softmax and losses"),
        ("void at::native::indexSelectLargeIndex<float, long>", "embedding and indexing"),
        ("some_new_kernel", "other"),
    ],
)
def test_category(name, want):
    assert ps.category(name) == want


def test_profile_of_the_tiny_model(tmp_path):
    md = ps.main(["--tiny", "--batches", "3", "--steps", "1", "--warmup", "1", "--out", str(tmp_path), "--trace"])
    assert (tmp_path / "profile_step.md").read_text() == md
    for variant in ("graphed (eager on CPU), B = 3", "standard, B = 3"):
        assert f"### {variant}" in md
    assert md.count("| category | ms per step | share of busy |") == 2
    assert "| matmul |" in md
    assert (tmp_path / "trace_graphed_b3.json.gz").stat().st_size > 1000
    with pytest.raises(SystemExit, match="no variant"):
        ps.main(["--tiny", "--batches", "3", "--variants", "nonesuch", "--out", str(tmp_path)])


def test_a_failing_variant_is_named_and_the_others_profiled(monkeypatch, tmp_path):
    from bench import bench_step as bs

    real = bs.build_variants

    def with_a_failure(*args, **kwargs):
        variants = real(*args, **kwargs)
        model = variants["standard"].model

        def boom():
            raise RuntimeError("capture failed")

        variants["graphed (eager on CPU)"] = bs.Variant(model, boom, boom)
        return variants

    monkeypatch.setattr(bs, "build_variants", with_a_failure)
    md = ps.main(["--tiny", "--batches", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert "### graphed (eager on CPU), B = 2: failed (RuntimeError: capture failed)" in md
    assert "### standard, B = 2" in md


def test_a_run_stopped_part_way_keeps_its_finished_sections(monkeypatch, tmp_path):
    real = ps.profile_variant
    calls = []

    def stopped_on_the_second(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a phase's timeout leaves of the process: nothing after this point
        return real(*args, **kwargs)

    monkeypatch.setattr(ps, "profile_variant", stopped_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        ps.main(["--tiny", "--batches", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    md = (tmp_path / "profile_step.md").read_text()
    assert f"### {calls[0]}, B = 2" in md and f"### {calls[1]}" not in md
    assert "stopped part-way" in md


def test_the_header_names_the_ops_backends(tmp_path):
    md = ps.main(["--tiny", "--batches", "2", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    head = md.splitlines()[0]
    assert "ops: perturb_update " in head and " sym_kl " in head and "villa_fast._C" in head
