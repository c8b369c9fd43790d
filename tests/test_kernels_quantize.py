"""kernels/quantize.py against the torch reference (altgrad.quantize), bit for bit, plus stats and
stochastic rounding. Runs on the CPU under TRITON_INTERPRET=1 (set in conftest.py), on CUDA when present."""

import math

import pytest
import torch
import triton
import triton.language as tl

from altgrad.formats import FORMAT_REGISTRY, get_format
from altgrad.kernels import quantize as kq
from altgrad.quantize import philox_bits, quantize_with_stats, round_to_format
from oracles import all_bf16_values, distinct_layouts, log_spread_values, midpoint_values

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


LAYOUTS = distinct_layouts()


def _kq(x, fmt, scale=None, **kw):
    f = get_format(fmt)
    return kq.cast(x, scale, **f.kernel_fields, **kw)


def _assert_bits_equal(got, want, what=""):
    """Bit-identical (so -0 != +0), except that any NaN equals any NaN."""
    got, want = got.float().cpu(), want.float().cpu()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), f"{what}: {int((~same).sum())} differ, e.g. got {got[~same][:4].tolist()} " \
                             f"want {want[~same][:4].tolist()}"


def _assert_stats_equal(res, ref_stats):
    _assert_bits_equal(res.amax, ref_stats.amax, "amax")
    want = torch.stack([ref_stats.overflow, ref_stats.underflow, ref_stats.nonzero, ref_stats.nan]).cpu()
    assert res.counts.cpu().tolist() == want.tolist(), f"counts {kq.COUNT_NAMES}"


# -- nearest rounding: bit-identical to the reference ------------------------------------------
@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_nearest_bit_identical_on_oracle_values(name, saturate, seeded):
    """Every bf16 pattern, every value, midpoints +-1 ulp, past max, 1e5 log-spread values."""
    f = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    x = torch.cat([all_bf16_values(), midpoint_values(f), log_spread_values(f, 100_000, g)]).to(DEVICE)
    res = _kq(x, f, saturate=saturate)
    y, stats = quantize_with_stats(x, f, saturate=saturate, backend="torch")  # scale 1: y is round_fmt(x)
    _assert_bits_equal(res.q, y, "q")
    _assert_bits_equal(res.dq, y, "dq")
    _assert_stats_equal(res, stats)


@pytest.mark.parametrize("dtype,saturate", [(torch.float32, True), (torch.bfloat16, False),
                                            (torch.float16, True), (torch.float16, False)])
@pytest.mark.parametrize("name", LAYOUTS)
def test_scaled_inputs_every_dtype(name, dtype, saturate, seeded):
    """A non-power-of-two scale (so dq = q * inv_scale rounds) on fp32 / bf16 / fp16 inputs."""
    f = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    mag = torch.exp2(torch.empty(6000).uniform_(-20, 12, generator=g))
    x = torch.cat([mag * torch.randn(6000, generator=g).sign(),
                   torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-30, -6e4])]).to(dtype)
    finite = x.float().abs()[torch.isfinite(x.float())]
    scale = torch.tensor(f.max / finite.max().item() * 0.8137, dtype=torch.float32)
    x, scale = x.to(DEVICE), scale.to(DEVICE)
    res = _kq(x, f, scale, saturate=saturate)
    y, stats = quantize_with_stats(x, f, scale, saturate=saturate, backend="torch")
    _assert_bits_equal(res.q, round_to_format(x.float() * scale, f, saturate=saturate), "q")
    assert res.q.dtype == torch.bfloat16 and res.dq.dtype == dtype
    _assert_bits_equal(res.dq, y, "dq")
    _assert_stats_equal(res, stats)


# -- special values, named (expected results from the format's definition, not the reference) --
def _expect(f, v, saturate=True):
    if math.isnan(v):
        return math.nan
    if abs(v) > f.max:
        if saturate:
            return math.copysign(f.max, v)
        return math.copysign(math.inf, v) if f.has_inf else math.nan
    if v == 0:
        return -0.0 if (math.copysign(1, v) < 0 and f.has_neg_zero) else 0.0
    return v


SPECIAL_CASES = [
    ("+0", 0.0), ("-0", -0.0), ("+inf", math.inf), ("-inf", -math.inf), ("nan", math.nan),
    ("far past max", 3e38), ("-far past max", -3e38),
]


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0", "E0M7", "E5M2_FNUZ"])
def test_special_values(name, saturate):
    f = get_format(name)
    x = torch.tensor([v for _, v in SPECIAL_CASES], device=DEVICE)
    q = _kq(x, f, saturate=saturate).q.float().cpu()
    for (label, v), got in zip(SPECIAL_CASES, q.tolist()):
        want = _expect(f, v, saturate)
        same = (math.isnan(want) and math.isnan(got)) or \
               (got == want and math.copysign(1, got) == math.copysign(1, want))
        assert same, f"{name} {label}: got {got}, want {want}"


@pytest.mark.parametrize("name,value,want", [
    ("E4M3", 464.0, 448.0),  # the overflow tie rounds to the even code (max), docs/design.md §3
    ("E4M3", 465.0, None),  # past the threshold: overflow
    ("E4M3", 2.0**-10, 0.0),  # half the smallest subnormal ties to the even code 0
    ("E4M3", 1.5 * 2.0**-10, 2.0**-9),
    ("E4M3", 1.0625, 1.0), ("E4M3", 1.1875, 1.25),  # mantissa ties to even
    ("E7M0", 1.5, 1.0), ("E7M0", 3.0, 4.0),  # E7M0 ties to the even biased exponent (gfloat)
    ("E7M0", 2.0**-64, 0.0), ("E7M0", 0.75 * 2.0**-63, 2.0**-63),
    ("E0M7", 0.5 + 2.0**-8, 0.5), ("E0M7", 2.0**-8, 0.0), ("E0M7", 127.5 / 128, None),
    ("E5M2", 61440.0, None), ("E5M2", 61439.0, 57344.0),  # ieee: the overflow tie goes to inf's even code
])
def test_named_rounding_points(name, value, want):
    f = get_format(name)
    x = torch.tensor([value, -value], device=DEVICE)
    res = _kq(x, f, saturate=False)
    got = res.q.float().cpu().tolist()
    if want is None:
        assert res.counts[0].item() == 2 and all(math.isinf(g) or math.isnan(g) for g in got)
    else:
        assert got[0] == want and got[1] == -want
        assert res.counts[0].item() == 0


# -- shapes, strides, empty -----------------------------------------------------------------------
def _views(g):
    base = torch.randn(6, 40, 33, generator=g) * 30
    return {
        "(1, 1023)": torch.randn(1, 1023, generator=g) * 100,
        "(3, 5, 7)": torch.randn(3, 5, 7, generator=g) * 100,
        "transposed": base[0].t(),
        "step slice": base[:, ::3, 1::2],
        "offset slice": base[2:, 5:37, 3:30],
        "expanded (stride 0)": torch.randn(7, 1, generator=g).expand(7, 50),
        "5-d permuted (copied)": torch.randn(2, 3, 4, 5, 6, generator=g).permute(4, 2, 0, 3, 1),
        "scalar": torch.tensor(3.3),
        "empty": torch.randn(0, 5, generator=g),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes_and_views(dtype, seeded):
    g = torch.Generator().manual_seed(seeded)
    f = get_format("E3M4")
    scale = torch.tensor(0.37, device=DEVICE)
    for label, x in _views(g).items():
        x = x.to(DEVICE, dtype)
        res = _kq(x, f, scale)
        y, stats = quantize_with_stats(x, f, scale, backend="torch")
        assert res.q.shape == x.shape and res.dq.shape == x.shape, label
        _assert_bits_equal(res.q.flatten(), round_to_format(x.float() * scale, f).flatten(), label)
        _assert_bits_equal(res.dq.flatten(), y.flatten(), label)
        _assert_stats_equal(res, stats)


def test_optional_outputs():
    x = torch.randn(100, device=DEVICE)
    res = _kq(x, "E4M3", out_q=False, stats=False)
    assert res.q is None and res.amax is None and res.counts is None and res.dq is not None
    res = _kq(x, "E4M3", out_dq=False)
    assert res.dq is None and res.q is not None and res.counts[2].item() == 100


# -- stats ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("label,values,scale,want_amax,want_counts", [
    # E4M3 counts [overflow, underflow, nonzero, nan]
    ("mixed", [0.0, -0.0, 1e-6, 500.0, -1.0, math.inf, math.nan], 1.0, math.inf, [2, 1, 4, 1]),
    ("amax is of the unscaled x", [2.0, -3.0, 1e-4, 5.0], 100.0, 5.0, [1, 0, 4, 0]),  # 500 overflows
    ("nan only", [math.nan, math.nan], 1.0, 0.0, [0, 0, 0, 2]),
    ("underflow incl. the tie at half the smallest subnormal", [9e-4, -9e-4, 2.0**-10], 1.0, 2.0**-10, [0, 3, 3, 0]),
    ("the scale pushes a value past max", [0.0, 1.0], 1e30, 1.0, [1, 0, 1, 0]),
    ("empty", [], 1.0, 0.0, [0, 0, 0, 0]),
])
def test_stats_named_cases(label, values, scale, want_amax, want_counts):
    x = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    res = _kq(x, "E4M3", torch.tensor(scale, device=DEVICE))
    assert res.amax.item() == torch.tensor(want_amax, dtype=torch.float32).item(), label
    assert res.counts.cpu().tolist() == want_counts, label


def test_stats_accumulate_across_blocks():
    """More elements than one block: the per-block partials must all reach the totals."""
    n = 65536 * 2 + 4097
    x = torch.linspace(-900, 900, n, device=DEVICE)
    x[::1000] = 0.0
    res = _kq(x, "E4M3")
    assert res.counts[0].item() == int((x.abs() > 464).sum())
    assert res.counts[2].item() == int((x != 0).sum())
    assert res.amax.item() == 900.0


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_programs_loop_over_tiles_and_reduce_once(rounding, seeded):
    """Five tiles over two programs (the interpreter's cap): each program's stats, kept per lane across
    its tiles, equal the reference's; the largest |x| and the NaNs sit in the last, partial tile."""
    g = torch.Generator().manual_seed(seeded)
    n = 65536 * 4 + 999
    x = torch.randn(n, generator=g) * 100
    x[-5:] = torch.tensor([math.nan, -math.nan, 5e4, 1e-12, 0.0])
    for saturate in (True, False):
        res = _kq(x.to(DEVICE), "E4M3", 0.5, rounding=rounding, saturate=saturate, seed=seeded)
        ref, st = quantize_with_stats(x, "E4M3", 0.5, rounding=rounding, saturate=saturate, seed=seeded,
                                      backend="torch")
        _assert_bits_equal(res.dq, ref, "dq")
        _assert_stats_equal(res, st)
        assert res.amax.item() == 5e4


# -- stochastic rounding ------------------------------------------------------------------------
def _neighbours(f, v):
    """(lo, hi): the format values with lo <= |v| <= hi (hi = max past the range), as float64."""
    vals = f.values().double()
    pos = vals[vals >= 0]
    a = v.double().abs().clamp(max=f.max)
    hi_i = torch.searchsorted(pos, a)
    hi = pos[hi_i]
    lo = torch.where(pos[hi_i] == a, hi, pos[(hi_i - 1).clamp(min=0)])
    return lo, hi


@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E2M5", "E7M0", "E0M7", "E6M1", "E5M2_FNUZ"])
def test_stochastic_gives_only_the_two_neighbours(name, seeded):
    f = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    v = torch.cat([log_spread_values(f, 50_000, g), f.values()]).to(DEVICE)
    q = _kq(v, f, rounding="stochastic", seed=seeded).q.double().cpu()
    lo, hi = _neighbours(f, v.cpu())
    sign = torch.where(v.cpu() < 0, -1.0, 1.0).double()
    assert bool(((q == sign * lo) | (q == sign * hi)).all())
    exact = (lo == hi) & (v.cpu().abs() <= f.max)  # past max, lo == hi == max but v is not exact
    assert bool((q[exact] == v.cpu()[exact].double()).all()), "exact values must stay exact"
    up = (q.abs() == hi)[~exact].double().mean().item()
    assert 0.3 < up < 0.7, f"fraction rounded up {up}: not stochastic"


# (format, value): cases on the normal path, the subnormal path, the > 32-bit-shift path, E7M0, negative
SR_CASES = [("E4M3", 1.0 + 0.3 / 8), ("E5M2", -3.3), ("E4M3", 2.0**-20), ("E7M0", 1024 * 1.25),
            ("E0M7", 0.3), ("E2M5", 0.01), ("E6M1", 2.0**-31 * 1.7), ("E4M3", 447.0)]


@pytest.mark.parametrize("name,value", SR_CASES)
def test_stochastic_is_unbiased(name, value, seeded):
    """n copies of v: the number rounded up is Binomial(n, p), p = (|v| - lo) / (hi - lo). A 5-sigma
    bound fails a correct kernel with probability < 1e-6 per case."""
    f = get_format(name)
    n = 2**16
    v = torch.full((n,), value, dtype=torch.float32, device=DEVICE)
    q = _kq(v, f, rounding="stochastic", seed=seeded).q.double().cpu()
    lo, hi = (t[0].item() for t in _neighbours(f, v[:1].cpu()))
    p = (abs(float(torch.tensor(value, dtype=torch.float32))) - lo) / (hi - lo)
    ups = int((q.abs() == hi).sum())
    assert int((q.abs() == lo).sum()) + ups == n
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(ups - n * p) <= 5 * sigma + 1, f"{ups} rounded up, expected {n * p:.1f} +- {sigma:.1f}"


def test_stochastic_seed_reproducible():
    v = torch.randn(10_000, device=DEVICE) * 10
    a = _kq(v, "E4M3", rounding="stochastic", seed=123).q
    b = _kq(v, "E4M3", rounding="stochastic", seed=123).q
    c = _kq(v, "E4M3", rounding="stochastic", seed=124).q
    _assert_bits_equal(a, b, "same seed")
    assert not torch.equal(a, c), "a different seed must give different roundings"


def test_stochastic_overflow_without_saturation():
    f = get_format("E5M2")
    v = torch.full((4096,), 60000.0, device=DEVICE)  # between max 57344 and the next binade's 65536
    res = _kq(v, f, rounding="stochastic", saturate=False, seed=5)
    q = res.q.float()
    assert bool(((q == f.max) | torch.isinf(q)).all())
    assert 0 < res.counts[0].item() < 4096 and res.counts[0].item() == int(torch.isinf(q).sum())


@pytest.mark.parametrize("saturate", [True, False])
@pytest.mark.parametrize("name", LAYOUTS)
def test_stochastic_bit_identical_to_the_reference(name, saturate, seeded):
    """Same seed, same Philox draw per element, same bits as the torch reference: bf16 patterns,
    midpoints, log-spread values (fp32 subnormals included), scaled, every output dtype."""
    f = get_format(name)
    g = torch.Generator().manual_seed(seeded)
    v = torch.cat([all_bf16_values(), midpoint_values(f), log_spread_values(f, 20_000, g),
                   torch.randint(1, 2**23, (2000,), generator=g, dtype=torch.int32).view(torch.float32)])
    seed = (seeded * 2**33 + 11) % 2**64  # both key words in use
    for dtype, step in ((torch.float32, 1), (torch.bfloat16, 5), (torch.float16, 5)):
        x = v[::step].to(dtype).to(DEVICE)
        res = _kq(x, f, 3.0, rounding="stochastic", saturate=saturate, seed=seed)
        ref, st = quantize_with_stats(x, f, 3.0, rounding="stochastic", saturate=saturate, seed=seed,
                                      backend="torch")
        _assert_bits_equal(res.dq, ref, f"{name} {dtype} dq")
        _assert_stats_equal(res, st)


@triton.jit
def _randint_kernel(out_ptr, seed, seed_lo, seed_hi, base, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, kq.philox_u32(seed_lo, seed_hi, base + i).to(tl.int64) & 0xFFFFFFFF)
    tl.store(out_ptr + BLOCK * tl.num_programs(0) + i, tl.randint(seed, base + i).to(tl.int64) & 0xFFFFFFFF)


@pytest.mark.parametrize("seed", [0, 2**31 - 1, 2**40 + 3, 2**64 - 1])
@pytest.mark.parametrize("base", [0, 2**31 - 256, 2**33])
def test_philox_matches_triton_randint_and_the_torch_reference(seed, base):
    """The kernel's Philox, Triton's tl.randint and altgrad.quantize.philox_bits agree on 64-bit
    offsets (past 2**31 too) and 64-bit seeds."""
    out = torch.empty(2 * 1024, dtype=torch.int64, device=DEVICE)
    _randint_kernel[(4,)](out, seed, seed & 0xFFFFFFFF, seed >> 32, base, BLOCK=256)
    ref = philox_bits(seed, torch.arange(base, base + 1024, dtype=torch.int64))
    assert torch.equal(out[:1024].cpu(), ref), "kernel philox_u32 != reference"
    assert torch.equal(out[1024:].cpu(), ref), "tl.randint != reference"


# -- the file's own reference -----------------------------------------------------------------------
@pytest.mark.parametrize("saturate", [True, False])
def test_quantize_ref_matches_library_reference(saturate):
    """kernels' cast_ref (table search) vs altgrad.quantize (bit arithmetic): two algorithms."""
    for name in LAYOUTS:
        f = get_format(name)
        x = midpoint_values(f)
        ref = kq.cast_ref(x, **f.kernel_fields,
                              saturate=saturate)
        _assert_bits_equal(ref.q, round_to_format(x, f, saturate=saturate), name)


# -- bad input: one-line errors naming the argument -----------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(specials="ieee754"), "specials must be one of"),
    (dict(exp_bits=5, man_bits=3), "exp_bits \\+ man_bits must be 1..7"),
    (dict(bias=200), "bias 200"),
    (dict(exp_bits=0, man_bits=7, specials="ieee"), "no positive finite value"),
    (dict(rounding="up"), "rounding must be one of"),
    (dict(saturate=1), "saturate must be a bool"),
    (dict(scale=torch.ones(2)), "scale must be None, a float or a 1-element"),
])
def test_bad_arguments(kwargs, match):
    args = dict(exp_bits=4, man_bits=3, bias=7, specials="fn", scale=None) | kwargs
    scale = args.pop("scale")
    with pytest.raises(ValueError, match=match):
        kq.cast(torch.ones(4, device=DEVICE), scale if scale is None else scale.to(DEVICE), **args)


def test_bad_input_dtype():
    with pytest.raises(ValueError, match="x must be a float32, bfloat16 or float16"):
        kq.cast(torch.ones(4, dtype=torch.int32, device=DEVICE), exp_bits=4, man_bits=3, bias=7, specials="fn")


# -- FormatSpec and the kernels agree on what a format is ---------------------------------------
def _accepts(check, *fields) -> bool:
    try:
        check(*fields)
    except ValueError:
        return False
    return True


def test_formatspec_and_the_kernels_format_check_accept_the_same_fields():
    """Every (E, M, bias, specials) around the valid region: FormatSpec's own checks and the kernels'
    `check_format` (which every launcher calls) accept exactly the same field sets."""
    from altgrad.formats import FormatSpec

    specials = (*kq.SPECIALS, "ocp", "")
    disagree, accepted = [], 0
    for e in range(0, 9):
        for m in range(0, 9):
            for bias in (-200, -2, -1, 0, 1, 2, 3, 7, 15, 16, 32, 64, 65, 126, 127, 128, 130):
                for sp in specials:
                    spec_ok = _accepts(lambda *a: FormatSpec("x", *a), e, m, bias, sp)
                    kernel_ok = _accepts(kq.check_format, e, m, bias, sp)
                    accepted += spec_ok
                    if spec_ok != kernel_ok:
                        disagree.append((e, m, bias, sp, spec_ok, kernel_ok))
    assert disagree == [], disagree[:10]
    assert accepted > 100  # the grid does reach into the valid region


@pytest.mark.parametrize("name", sorted(FORMAT_REGISTRY))
def test_every_registered_format_passes_the_kernels_check(name):
    f = FORMAT_REGISTRY[name]
    kq.check_format(**f.kernel_fields)
    assert tuple(f.kernel_fields) == ("exp_bits", "man_bits", "bias", "specials")  # scaled_matmul's fmt_a order


def test_each_launcher_rejects_a_format_the_kernels_check_rejects():
    from altgrad.kernels import block_quantize as kbq
    from altgrad.kernels import scaled_matmul as ksm

    bad = dict(exp_bits=4, man_bits=4, bias=7, specials="fn")  # 9 bits
    x = torch.ones(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="exp_bits \\+ man_bits must be 1..7"):
        kq.check_format(**bad)
    with pytest.raises(ValueError, match="exp_bits \\+ man_bits must be 1..7"):
        kq.cast(x, **bad)
    with pytest.raises(ValueError, match="exp_bits \\+ man_bits must be 1..7"):
        kbq.block_quantize(x, **bad, block_size=8, emax_elem=8, fmt_max=480.0)
    with pytest.raises(ValueError, match="exp_bits \\+ man_bits must be 1..7"):
        ksm.scaled_matmul(x, x, None, None, fmt_a=tuple(bad.values()), scale_a=1.0)
