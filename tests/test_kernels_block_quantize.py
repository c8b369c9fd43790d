"""The Triton blockwise cast (kernels/block_quantize.py) equals the torch reference bit for bit."""

import math

import pytest
import torch

from altgrad.blockwise import quantize_blockwise, quantize_blockwise_cast
from altgrad.formats import FORMAT_REGISTRY, get_format


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, NaNs included (every backend writes the positive quiet NaN 0x7FC00000)."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


def hard_rows(g, rows=24, k=75):
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-70, 70, (rows, 1), generator=g).float())
    x[0, 3], x[1, 0], x[2, -1], x[3, :] = math.nan, math.inf, -math.inf, 0.0
    x[4, :] = torch.tensor([1e-40, -1e-42, 0.0]).repeat(k)[:k]  # fp32 subnormals only
    x[5, 10] = 3e38
    return x


def check(x, fmt, bs, **kw):
    ref = quantize_blockwise_cast(x, fmt, bs, backend="torch", **kw)
    got = quantize_blockwise_cast(x, fmt, bs, backend="triton", **kw)
    assert ref.stats is None and got.stats is None  # only the fast backend counts stats in its pass
    for name, a, b in zip(ref._fields[:-1], got, ref):
        assert a.shape == b.shape and same_bits(a, b), name


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_kernel_equals_reference_every_format(name, seeded):
    check(hard_rows(torch.Generator().manual_seed(seeded)), get_format(name), 32)


@pytest.mark.parametrize("bs", [16, 128, None], ids=["b16", "b128", "row"])
@pytest.mark.parametrize("rnd", ["floor", "ceil"])
@pytest.mark.parametrize("name", ["E4M3", "E2M5", "E0M7", "E7M0"])
def test_kernel_equals_reference_block_sizes_and_scale_rounding(name, rnd, bs, seeded):
    check(hard_rows(torch.Generator().manual_seed(seeded)), get_format(name), bs, scale_rounding=rnd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_strided_and_low_precision_inputs(dtype, seeded):
    x = hard_rows(torch.Generator().manual_seed(seeded), 40, 64).to(dtype)
    check(x.t(), get_format("E3M4"), 16)  # a transposed view: strides (1, 64)
    check(x, get_format("E5M2"), 32, saturate=False)


def test_kernel_stochastic_rounding_is_unbiased(seeded):
    x = (torch.rand(1, 32) * 0.7 + 0.1).repeat(2000, 1)
    y = quantize_blockwise(x, "E2M1", 32, rounding="stochastic", backend="triton")
    assert (y.mean(0) - x[0]).abs().max() < 0.05


def test_triton_backend_refuses_layouts_it_does_not_cover():
    with pytest.raises(ValueError, match="backend='triton' casts 2-D tensors"):
        quantize_blockwise(torch.ones(2, 3, 4), "E4M3", 16, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' casts 2-D tensors"):
        quantize_blockwise(torch.ones(4, 4), "E4M3", 16, scale_format="fp32", backend="triton")
