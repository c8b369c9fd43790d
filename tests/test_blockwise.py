"""The blockwise (row / block / 2-D tile) reference quantizer against gfloat's block quantizer with
zero tolerance, plus the ceil scale rule, fp32 block scales, layouts, dtypes and errors."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from gfloat import BlockFormatInfo, RoundMode, compute_scale_amax, quantize_block
from gfloat.formats import format_info_ocp_e8m0

from altgrad.blockwise import block_scales, emax_elem, quantize_blockwise, quantize_blockwise_cast
from altgrad.formats import FORMAT_REGISTRY, get_format
from altgrad.quantize import round_to_format
from altgrad.scaling import compute_scale
from oracles import gfloat_info, gfloat_round


def assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, inputs: torch.Tensor, nan_bits: bool = False):
    """Bit-for-bit equality (so -0 != +0), any NaN equal to any NaN unless nan_bits (altgrad's
    backends against each other: the same NaN bits too; an outside oracle may encode NaN otherwise);
    the message shows failures."""
    got, ref = got.float().contiguous(), ref.float().contiguous()
    same = got.view(torch.int32) == ref.view(torch.int32)
    if not nan_bits:
        same |= torch.isnan(got) & torch.isnan(ref)
    bad = (~same).nonzero()[:5]
    assert bool(same.all()), f"{int((~same).sum())} mismatches at {bad.tolist()}: " \
                             f"x={[inputs[tuple(i)].item() for i in bad]} " \
                             f"got={[got[tuple(i)].item() for i in bad]} ref={[ref[tuple(i)].item() for i in bad]}"


def gfloat_blockwise(x: torch.Tensor, fmt, block_size: int | None) -> torch.Tensor:
    """gfloat's MX block quantizer (element format fmt, OCP E8M0 scale, compute_scale_amax) applied
    to each run of block_size elements of each row of 2-D fp32 x; a short last block is quantized
    on its own. Result as fp32 (the reference's output dtype)."""
    rows, k = x.shape
    bs = k if block_size is None else block_size
    bfi = BlockFormatInfo(f"mx_{fmt.name}", gfloat_info(fmt), bs, format_info_ocp_e8m0)
    out = np.empty((rows, k), dtype=np.float64)
    xd = x.double().numpy()
    with np.errstate(invalid="ignore", over="ignore"):
        for r in range(rows):
            for s in range(0, k, bs):
                blk = xd[r, s:s + bs]
                if np.isnan(blk).any() and not fmt.has_nan:
                    # gfloat cannot encode the NaN element; the block's E8M0 scale is NaN and
                    # decodes every element to NaN either way
                    out[r, s:s + bs] = np.nan
                    continue
                out[r, s:s + bs] = quantize_block(bfi, blk, compute_scale_amax, RoundMode.TiesToEven)
        return torch.from_numpy(out.astype(np.float32))


def adversarial_rows(fmt, k: int, g: torch.Generator) -> torch.Tensor:
    """Rows of length k: random magnitudes at many scales plus the hard cases of a block."""
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    spread = randn(6, k) * torch.exp2(torch.randint(-60, 60, (6, 1), generator=g).float())
    wide = randn(2, k) * torch.exp2(torch.randint(-30, 30, (2, k), generator=g).float())  # mixed binades
    zeros = torch.zeros(2, k)
    zeros[1, ::3] = -0.0
    huge = randn(2, k)
    huge[0, 5] = 1e30
    huge[1, -1] = -3e38
    sub = torch.tensor([1e-40, -3e-42, 1.4e-45]).repeat(k)[:k]  # fp32 subnormals only
    fmt_sub = randn(k).sign() * fmt.min_subnormal * torch.randint(0, 3, (k,), generator=g).float()
    special = randn(4, k)
    special[0, 3] = math.nan
    special[1, 7 % k] = math.inf
    special[2, k // 2] = -math.inf
    special[3, 0], special[3, 1] = math.nan, math.inf
    # a block maximum whose mantissa exceeds the format's largest (floor saturates there)
    top = randn(1, k).clamp(-1, 1) * fmt.max
    top[0, :: max(1, k // 4)] = 1.99 * 2.0 ** emax_elem(fmt)
    ties = (fmt.values()[torch.randint(0, len(fmt.values()), (k,), generator=g)] * 1.0)  # exact grid
    rows = [spread, wide, zeros, huge, sub[None], fmt_sub[None], special, top, ties[None]]
    return torch.cat(rows).float()


# -- against gfloat --------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 32, 128, None], ids=["b16", "b32", "b128", "row"])
@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_e8m0_floor_equals_gfloat_quantize_block(name, block_size, seeded):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    bs = block_size or 48
    k = 3 * bs + 5  # the last block is short
    x = adversarial_rows(fmt, k, g)
    got = quantize_blockwise(x, fmt, block_size, scale_format="e8m0", scale_rounding="floor", backend="torch")
    assert_bits_equal(got, gfloat_blockwise(x, fmt, block_size), x)


@pytest.mark.parametrize("name", ["E4M3", "E2M5", "E0M7", "E7M0"])
def test_block_2d_equals_gfloat_on_each_tile(name, seeded):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    bs, rows, k = 16, 37, 50
    x = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-8, 8, (rows, 1), generator=g).float())
    x[3, 4] = 1e6
    got = quantize_blockwise(x, fmt, bs, block_2d=True, backend="torch")
    ref = torch.empty_like(x)
    for r in range(0, rows, bs):
        for c in range(0, k, bs):
            tile = x[r:r + bs, c:c + bs]
            ref[r:r + bs, c:c + bs] = gfloat_blockwise(tile.reshape(1, -1), fmt, None).reshape(tile.shape)
    assert_bits_equal(got, ref, x)


# -- the ceil rule ---------------------------------------------------------------------------------
def ceil_exponent(amax: float, fmt) -> int:
    """Smallest X with amax <= fmt.max * 2**X (exact rational arithmetic), clipped to E8M0."""
    ratio = Fraction(amax) / Fraction(fmt.max)
    x = math.floor(math.log2(ratio)) - 1
    while Fraction(2) ** x < ratio:
        x += 1
    return min(max(x, -127), 127)


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_e8m0_ceil_is_the_smallest_scale_exponent_that_never_saturates(name, seeded):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    amax = torch.randn(300, generator=g).abs() * torch.exp2(torch.randint(-100, 100, (300,), generator=g).float())
    grid = fmt.values()[fmt.values() > 0]
    amax = torch.cat([amax, grid, grid * 2.0**-20, torch.nextafter(grid, torch.tensor(9e9))])
    scale, inv = block_scales(amax, fmt, "e8m0", "ceil")
    want = torch.tensor([float(2.0 ** ceil_exponent(a, fmt)) for a in amax.tolist()])
    assert torch.equal(inv, want.float())
    assert torch.equal(scale, torch.reciprocal(inv))
    floor_inv = block_scales(amax, fmt, "e8m0", "floor")[1]
    assert bool(((inv == floor_inv) | (inv == 2 * floor_inv)).all())


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E2M5", "E0M7", "E2M1"])
def test_e8m0_ceil_never_saturates_where_floor_does(name, seeded):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    x = (torch.rand(8, 64, generator=g) - 0.5) * fmt.max  # all below column 0's magnitude
    x[:, 0] = (2 - 2**-12) * 2.0 ** emax_elem(fmt)  # rounds to 2**(emax+1) > max: floor saturates
    floor = quantize_blockwise_cast(x, fmt, 32, scale_rounding="floor", backend="torch")
    ceil = quantize_blockwise_cast(x, fmt, 32, scale_rounding="ceil", backend="torch")
    assert not bool(ceil.overflow.any())
    assert bool(floor.overflow[:, 0].all())


# -- fp32 block scales -----------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [16, 32, None], ids=["b16", "b32", "row"])
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E3M4", "E2M5", "E1M6", "E0M7", "E7M0", "E6M1"])
def test_fp32_scales_equal_gfloat_rounding_per_block(name, block_size, seeded):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    bs = block_size or 40
    x = adversarial_rows(fmt, 2 * bs + 3, g)
    got = quantize_blockwise(x, fmt, block_size, scale_format="fp32", backend="torch")
    ref = torch.empty_like(x)
    bs = block_size or x.shape[1]
    for r in range(x.shape[0]):
        for s in range(0, x.shape[1], bs):
            blk = x[r, s:s + bs]
            scale = compute_scale(blk.abs().max(), fmt)  # the per-tensor rule, on one block
            q = torch.from_numpy(gfloat_round(fmt, (blk * scale).numpy(), True))
            ref[r, s:s + bs] = q * torch.reciprocal(scale)
    assert_bits_equal(got, ref, x)


# -- edge rules and layouts ------------------------------------------------------------------------
def test_all_zero_and_nan_blocks(seeded):
    x = torch.randn(2, 64)
    x[0, :32] = 0.0
    x[1, 40] = math.nan
    c = quantize_blockwise_cast(x, "E4M3", 32, backend="torch")
    assert c.inv_scale[0, 0] == 2.0**-127 and bool((c.q[0, :32] == 0).all())
    assert math.isnan(c.inv_scale[1, 1]) and bool(c.q[1, 32:].isnan().all()) and not bool(c.q[1, :32].isnan().any())
    f = quantize_blockwise_cast(x, "E4M3", 32, scale_format="fp32", backend="torch")
    assert f.scale[0, 0] == 1.0 and f.scale[1, 1] == 1.0 and int(f.q[1, 32:].isnan().sum()) == 1


@pytest.mark.parametrize("block_2d", [False, True])
def test_axis_0_is_the_transpose_of_axis_minus_1(block_2d, seeded):
    x = torch.randn(70, 45) * torch.exp2(torch.randint(-10, 10, (70, 45)).float())
    a = quantize_blockwise(x, "E3M4", 32, axis=0, block_2d=block_2d, backend="torch")
    b = quantize_blockwise(x.t().contiguous(), "E3M4", 32, axis=-1, block_2d=block_2d, backend="torch")
    assert torch.equal(a, b.t())
    ca = quantize_blockwise_cast(x, "E3M4", 32, axis=0, backend="torch")
    assert ca.inv_scale.shape == (3, 45)


def test_leading_dims_are_independent_rows(seeded):
    x = torch.randn(3, 5, 40) * torch.exp2(torch.randint(-10, 10, (3, 5, 1)).float())
    got = quantize_blockwise(x, "E2M5", 16, backend="torch")
    assert torch.equal(got, quantize_blockwise(x.reshape(15, 40), "E2M5", 16, backend="torch").reshape(3, 5, 40))
    assert quantize_blockwise_cast(x, "E2M5", 16, backend="torch").scale.shape == (3, 5, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_round_the_fp32_result(dtype, seeded):
    x = (torch.randn(4, 64) * 3).to(dtype)
    got = quantize_blockwise(x, "E2M5", 32, backend="torch")
    assert got.dtype == dtype and torch.equal(got, quantize_blockwise(x.float(), "E2M5", 32, backend="torch").to(dtype))


def sqnr_db(y: torch.Tensor, x: torch.Tensor) -> float:
    x = x.double()
    return 10 * math.log10(x.pow(2).sum() / (y.double() - x).pow(2).sum())


@pytest.mark.parametrize("name, gain_db", [("E2M5", 10), ("E1M6", 10), ("E0M7", 10), ("E4M3", -1), ("E5M2", -1)])
def test_block_scaling_beats_tensor_scaling_with_an_outlier(name, gain_db, seeded):
    """One outlier 300x the rest: tensor scaling pushes everything else down the format's range
    (narrow formats lose it to underflow); 32-element blocks confine the damage to one block.
    Wide-range formats lose little either way, and block scaling must not be worse there."""
    from altgrad.quantize import quantize

    fmt = get_format(name)
    x = torch.randn(64, 256)
    x[7, 3] = 300.0
    rest = torch.ones_like(x, dtype=torch.bool)
    rest[7, 3] = False
    tensor = quantize(x, fmt, fmt.max / x.abs().max(), backend="torch")
    block = quantize_blockwise(x, fmt, 32, backend="torch")
    assert sqnr_db(block[rest], x[rest]) > sqnr_db(tensor[rest], x[rest]) + gain_db


def test_stochastic_rounding_is_unbiased_per_block(seeded):
    x = torch.rand(1, 32).repeat(4000, 1) * 0.7 + 0.1
    y = quantize_blockwise(x, "E2M1", 32, rounding="stochastic", backend="torch")
    assert (y.mean(0) - x[0]).abs().max() < 0.05
    assert not torch.equal(y[0], y[1]) or not torch.equal(y[1], y[2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size must be a positive int"),
    (dict(block_size=True), "block_size must be a positive int"),
    (dict(scale_format="e4m3"), "scale_format must be one of"),
    (dict(scale_rounding="up"), "scale_rounding must be one of"),
    (dict(rounding="down"), "rounding must be one of"),
    (dict(axis=2), "axis 2 is out of range"),
    (dict(block_size=None, block_2d=True), "block_2d needs a block_size"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_arguments_raise_one_line_errors(kwargs, match):
    args = dict(block_size=32) | kwargs
    with pytest.raises(ValueError, match=match):
        quantize_blockwise(torch.ones(2, 3), "E4M3", args.pop("block_size"), **args)


def test_block_2d_needs_a_matrix():
    with pytest.raises(ValueError, match="block_2d tiles a matrix"):
        quantize_blockwise(torch.ones(2, 3, 4), "E4M3", 16, block_2d=True)
    with pytest.raises(TypeError, match="x must be float32"):
        quantize_blockwise(torch.ones(2, 3, dtype=torch.int32), "E4M3", 16)


def test_round_to_format_agrees_on_unit_scales():
    """With every block's e8m0 scale 1 (amax in the format's top binade), blockwise == elementwise."""
    fmt = get_format("E4M3")
    x = torch.rand(4, 32) * 256
    x[:, 0] = 300.0
    assert torch.equal(quantize_blockwise(x, fmt, 32, backend="torch"), round_to_format(x, fmt))


# -- the fast backend equals the reference -----------------------------------------------------------
@pytest.mark.parametrize("fmt_name", sorted(FORMAT_REGISTRY))
@pytest.mark.parametrize("scale_format, scale_rounding", [("e8m0", "floor"), ("e8m0", "ceil"), ("fp32", "floor")])
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
def test_fast_backend_equals_reference_bit_for_bit(fmt_name, scale_format, scale_rounding, saturate):
    """Every output of the fast cast (values, scales, masks) equals the reference's bits, and its
    one-pass stats equal the stats counted from the reference's masks, for adversarial rows of odd
    length (a short last block), row-wise, 2-D tiles and a 3-D tensor scaled along axis 0."""
    fmt = get_format(fmt_name)
    g = torch.Generator().manual_seed(hash((fmt_name, scale_format, saturate)) % 2**31)
    x = adversarial_rows(fmt, 77, g)
    cases = [(x, 32, -1, False), (x[:, :64], 16, -1, False), (x, None, -1, False), (x[:, :64], 16, -1, True),
             (x, 32, -1, True), (x.t(), 16, 0, True),
             (torch.randn(40, 3, 5, generator=g) * 1e3, 16, 0, False)]
    for inp, bs, axis, two_d in cases:
        kw = dict(axis=axis, scale_format=scale_format, scale_rounding=scale_rounding, saturate=saturate,
                  block_2d=two_d)
        ref = quantize_blockwise_cast(inp, fmt, bs, backend="torch", **kw)
        got = quantize_blockwise_cast(inp, fmt, bs, backend="fast", **kw)
        for name in ("q", "scale", "inv_scale"):
            assert_bits_equal(getattr(got, name), getattr(ref, name), inp if name == "q" else getattr(ref, name),
                              nan_bits=True)
        assert torch.equal(got.overflow, ref.overflow) and torch.equal(got.nan, ref.nan)
        assert ref.stats is None
        amax, counts = got.stats
        nonzero = (inp != 0) & ~ref.nan
        want = [int(ref.overflow.sum()), int((nonzero & (ref.q == 0)).sum()), int(ref.nan.sum()), int(nonzero.sum())]
        assert counts.tolist() == want
        assert amax.item() == torch.where(ref.nan, 0.0, inp.abs()).max().item()
        assert_bits_equal(quantize_blockwise(inp, fmt, bs, backend="fast", **kw),
                          quantize_blockwise(inp, fmt, bs, backend="torch", **kw), inp, nan_bits=True)
        lean = quantize_blockwise_cast(inp, fmt, bs, backend="fast", masks=False, **kw)
        assert lean.overflow is None and lean.nan is None and torch.equal(lean.stats[1], counts)
        assert_bits_equal(lean.q, ref.q, inp, nan_bits=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_format", ["e8m0", "fp32"])
def test_nan_results_are_the_canonical_nan_on_every_backend(dtype, scale_format):
    """A NaN element makes its e8m0 block all NaN (its fp32 block keeps scale 1); overflow without
    saturation in a format without inf is NaN too. Every such q is 0x7FC00000, whatever sign or
    payload the NaN came with, on the reference and the fast backend alike (so q * inv_scale has
    the same bits on both)."""
    x = torch.tensor([[math.nan, 1.0, 2.0, 3.0, -5.0, 0.5, 7.0, 1e-3],
                      [-math.nan, -1.0, 4.0, 1e4, -1e4, 0.0, 3.0, 2.0],
                      [1.0, -600.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]]).to(dtype)
    x[1, 0] = -x[1, 0].abs()  # a negative NaN
    for fmt in ("E4M3", "E2M5", "E7M0"):  # E4M3: NaN on overflow (no inf); E7M0: no mantissa
        for saturate in (True, False):
            kw = dict(scale_format=scale_format, saturate=saturate)
            ref = quantize_blockwise_cast(x, fmt, 4, backend="torch", **kw)
            assert ref.q.isnan().any()
            assert (ref.q[ref.q.isnan()].view(torch.int32) == 0x7FC00000).all()
            assert_bits_equal(quantize_blockwise_cast(x, fmt, 4, backend="fast", **kw).q, ref.q, x, nan_bits=True)
            assert_bits_equal(quantize_blockwise(x, fmt, 4, backend="fast", **kw),
                              quantize_blockwise(x, fmt, 4, backend="torch", **kw), x, nan_bits=True)
