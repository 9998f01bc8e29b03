import math

import pytest
import torch

from tests.conftest import backend_device
from villa_fast import ops, reference


def _mask(b, p):
    m = (torch.rand(b, p) > 0.3).long()
    m[1] = 0  # an example without valid positions
    return m


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_with_same_generator(backend, norm_type, with_mask, dtype):
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the cuda backend initialises float32 perturbations")
    dev = backend_device(backend)
    like = torch.zeros(5, 7, 11, dtype=dtype, device=dev)
    mask = _mask(5, 7).to(dev) if with_mask else None
    g1 = torch.Generator(device=dev).manual_seed(3)
    g2 = torch.Generator(device=dev).manual_seed(3)
    got = ops.perturb_init(like, mask, init_mag=0.7, norm_type=norm_type, generator=g1)
    want = reference.perturb_init(like, mask, init_mag=0.7, norm_type=norm_type, generator=g2)
    assert got.dtype == dtype and got.shape == like.shape
    torch.testing.assert_close(got, want, atol=1e-7 if dtype == torch.float32 else 1e-15, rtol=1e-6)
    assert torch.isfinite(got).all()
    if with_mask:
        assert (got[mask == 0] == 0).all()
        assert (got[1] == 0).all()


def test_l2_scale_and_linf_bound():
    like = torch.zeros(4, 24, 768)
    mask = torch.ones(4, 24)
    mask[2, 12:] = 0
    d = ops.perturb_init(like, mask, init_mag=1.0, norm_type="l2")
    # uniform(-1, 1) has variance 1/3: the expected l2 norm is init_mag / sqrt(3)
    norms = d.reshape(4, -1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full((4,), 1 / math.sqrt(3)), atol=0.02, rtol=0)
    d = ops.perturb_init(like, mask, init_mag=0.01, norm_type="linf")
    assert d.abs().max() <= 0.01 and d.abs().max() > 0.009


def test_zero_mag_gives_zeros_and_bf16_like_gives_fp32():
    like = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    d = ops.perturb_init(like, init_mag=0.0, norm_type="l2")
    assert d.dtype == torch.float32 and torch.equal(d, torch.zeros(2, 3, 4))
    assert ops.perturb_init(like, init_mag=0.5, norm_type="l2").dtype == torch.float32


def test_bool_mask_and_default_generator_reproducible():
    like = torch.zeros(3, 4, 5)
    mask = torch.tensor([[True, False, True, True]] * 3)
    torch.manual_seed(11)
    a = ops.perturb_init(like, mask, init_mag=1.0, norm_type="l2")
    torch.manual_seed(11)
    b = ops.perturb_init(like, mask.float(), init_mag=1.0, norm_type="l2")
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "like, mask, kw, exc, match",
    [
        (torch.zeros(3), None, {}, ValueError, "like must be at least 2-D"),
        (torch.zeros(2, 3, 4), torch.ones(2, 4), {}, ValueError, "mask must have shape"),
        (torch.zeros(2, 3, 4), None, {"init_mag": -1.0}, ValueError, "init_mag must be"),
        (torch.zeros(2, 3, 4), None, {"norm_type": "l3"}, ValueError, "norm_type must be"),
        (torch.zeros(2, 3, 4), None, {"generator": 5}, TypeError, "generator must be"),
    ],
)
def test_bad_arguments(like, mask, kw, exc, match):
    args = {"init_mag": 0.5, "norm_type": "l2"}
    args.update(kw)
    with pytest.raises(exc, match=match):
        ops.perturb_init(like, mask, **args)
