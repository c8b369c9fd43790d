"""The torch reference quantizer against outside oracles (gfloat, ml_dtypes, torch float8 casts)
with zero tolerance, plus its special cases, stochastic rounding, scaling, dtypes and errors."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from altgrad.formats import FORMAT_REGISTRY, get_format
from altgrad.quantize import philox_bits, quantize, quantize_ste, quantize_with_stats, round_to_format
from oracles import all_bf16_values, gfloat_round, log_spread_values, midpoint_values


def assert_bits_equal(got: torch.Tensor, ref: torch.Tensor, inputs: torch.Tensor):
    """Bit-for-bit equality (so -0 != +0), any NaN equal to any NaN; the message shows failures."""
    got, ref = got.float().contiguous(), ref.float().contiguous()
    same = (got.view(torch.int32) == ref.view(torch.int32)) | (torch.isnan(got) & torch.isnan(ref))
    bad = (~same).nonzero().flatten()[:5]
    assert bool(same.all()), f"{int((~same).sum())} mismatches, e.g. x={inputs.flatten()[bad].tolist()} " \
                             f"got={got.flatten()[bad].tolist()} ref={ref.flatten()[bad].tolist()}"


def value_sets(fmt, seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "bf16": all_bf16_values(),
        "midpoints": midpoint_values(fmt),
        "random": log_spread_values(fmt, 100_000, g),
    }


@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_round_equals_gfloat(name, saturate):
    fmt = get_format(name)
    for label, v in value_sets(fmt, seed=hash(name) % 2**31).items():
        if not saturate and fmt.specials == "none":
            v = v[v.abs() < fmt.max + fmt.ulp(fmt.max) / 2]  # gfloat refuses overflow/NaN here; see below
        ref = torch.from_numpy(gfloat_round(fmt, v.numpy(), saturate))
        assert_bits_equal(round_to_format(v, fmt, saturate=saturate), ref, v)


@pytest.mark.parametrize("name", [n for n, f in FORMAT_REGISTRY.items() if f.specials == "none"])
def test_none_formats_overflow_to_nan_without_saturation(name):
    """gfloat raises for these (no inf/NaN codes); docs/design.md §3 says the simulation gives NaN."""
    fmt = get_format(name)
    thr = fmt.max + fmt.ulp(fmt.max) / 2
    v = torch.tensor([thr * 1.01, -thr * 4, math.inf, -math.inf, fmt.max, -fmt.max])
    out = round_to_format(v, fmt, saturate=False)
    assert torch.isnan(out[:4]).all() and out[4:].tolist() == [fmt.max, -fmt.max]


# ml_dtypes' casts do not saturate (docs/design.md §3), except its MX sub-byte types, which do
ML_DTYPES = [
    ("E3M4", ml_dtypes.float8_e3m4, False),
    ("E4M3_IEEE", ml_dtypes.float8_e4m3, False),
    ("E5M2", ml_dtypes.float8_e5m2, False),
    ("E4M3", ml_dtypes.float8_e4m3fn, False),
    ("E4M3_FNUZ", ml_dtypes.float8_e4m3fnuz, False),
    ("E5M2_FNUZ", ml_dtypes.float8_e5m2fnuz, False),
    ("E4M3_FNUZ_B11", ml_dtypes.float8_e4m3b11fnuz, False),
    ("E2M1", ml_dtypes.float4_e2m1fn, True),
    ("E2M3", ml_dtypes.float6_e2m3fn, True),
    ("E3M2", ml_dtypes.float6_e3m2fn, True),
]


@pytest.mark.parametrize("name,dtype,saturate", ML_DTYPES, ids=[m[0] for m in ML_DTYPES])
def test_round_equals_ml_dtypes(name, dtype, saturate):
    fmt = get_format(name)
    for v in value_sets(fmt, seed=7).values():
        if saturate:  # the MX types turn NaN into max too; compare finite and inf inputs only
            v = v[~torch.isnan(v)]
        with np.errstate(invalid="ignore"):  # the overflow -> NaN casts are the point
            ref = torch.from_numpy(v.numpy().astype(dtype).astype(np.float32))
        assert_bits_equal(round_to_format(v, fmt, saturate=saturate), ref, v)


def test_round_equals_torch_float8_casts():
    """torch's own float8 casts. Past E4M3's overflow threshold (464) torch >= 2.13 saturates to
    +-448 while torch 2.11 returns NaN (E4M3 has no inf): each is one of round_to_format's two
    conventions, so the overflowing elements must all match one of them; the rest match both."""
    for name, dtype in [("E5M2", torch.float8_e5m2), ("E4M3", torch.float8_e4m3fn)]:
        fmt = get_format(name)
        n_over = 0
        for v in value_sets(fmt, seed=11).values():
            ref = v.to(dtype).float()
            sat, non = round_to_format(v, fmt, saturate=True), round_to_format(v, fmt, saturate=False)
            over = ~((sat == non) | (torch.isnan(sat) & torch.isnan(non)))  # elements that overflow
            assert_bits_equal(non[~over], ref[~over], v[~over])
            if name == "E5M2":  # IEEE-style: overflow is inf, as round_to_format(saturate=False)
                assert_bits_equal(non[over], ref[over], v[over])
            elif bool(torch.isnan(ref[over]).all()):  # torch 2.11
                assert_bits_equal(non[over], ref[over], v[over])
            else:  # torch >= 2.13
                assert_bits_equal(sat[over], ref[over], v[over])
            n_over += int(over.sum())
        assert n_over > 0, name  # the value sets do reach past max


# -- special cases, table-driven per convention ---------------------------------------------------
def special_cases(fmt):
    ms, mx = fmt.min_subnormal, fmt.max
    largest_sub = fmt.code_value((1 << fmt.man_bits) - 1) if fmt.man_bits else None
    thr = mx + fmt.ulp(mx) / 2  # RNE overflow threshold (ties go to the even code)
    neg0 = -0.0 if fmt.has_neg_zero else 0.0
    over = math.inf if fmt.has_inf else math.nan
    tie_up = (fmt.max_code + 1) % 2 == 0  # the tie at thr rounds to the even of (max, next)
    rows = [
        ("+0", 0.0, 0.0, 0.0),
        ("-0", -0.0, neg0, neg0),
        ("smallest subnormal", ms, ms, ms),
        ("half smallest subnormal (tie to 0)", ms / 2, 0.0, 0.0),
        ("just above half smallest subnormal", ms / 2 * (1 + 2**-20), ms, ms),
        ("negative underflow", -ms / 4, neg0, neg0),
        ("max", mx, mx, mx),
        ("-max", -mx, -mx, -mx),
        ("overflow threshold", thr, mx, over if tie_up else mx),
        ("just past threshold", thr * (1 + 2**-20), mx, over),
        ("+inf", math.inf, mx, over),
        ("-inf", -math.inf, -mx, -over),
        ("nan", math.nan, math.nan, math.nan),
    ]
    if largest_sub is not None:
        rows.append(("largest subnormal", largest_sub, largest_sub, largest_sub))
    return rows


@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0", "E0M7", "E4M3_FNUZ"])
def test_special_values(name):
    fmt = get_format(name)
    for label, x, want_sat, want_nosat in special_cases(fmt):
        for saturate, want in [(True, want_sat), (False, want_nosat)]:
            got = round_to_format(torch.tensor([x]), fmt, saturate=saturate).item()
            ok = (math.isnan(got) and math.isnan(want)) or (got == want and math.copysign(1, got) == math.copysign(1, want))
            assert ok, f"{name} {label} saturate={saturate}: {x} -> {got}, want {want}"


def test_e4m3_overflow_threshold_and_e7m0_ties():
    e4m3, e7m0 = get_format("E4M3"), get_format("E7M0")
    out = round_to_format(torch.tensor([464.0, 465.0]), e4m3, saturate=False)
    assert out[0].item() == 448.0 and math.isnan(out[1].item())
    # E7M0 ties at the arithmetic midpoint go to the even code: 1.5 = mid(1, 2); 1 is 2**0 = code 64
    assert round_to_format(torch.tensor([1.5, 3.0, 6.0]), e7m0).tolist() == [1.0, 4.0, 4.0]


# -- quantize(): scale, dtypes, shapes, stats -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_scales_and_keeps_dtype(dtype):
    fmt = get_format("E4M3")
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 5, 7, generator=g) * 40).to(dtype)
    scale = torch.tensor(2.0**-3 * 1.37)
    y = quantize(x, fmt, scale)
    assert y.dtype == dtype and y.shape == x.shape
    v = x.float() * scale
    want = (round_to_format(v, fmt) * torch.reciprocal(scale)).to(dtype)
    assert_bits_equal(y, want, x)
    assert_bits_equal(quantize(x, fmt, float(scale)), want, x)


def test_quantize_is_idempotent_on_format_values():
    for name in FORMAT_REGISTRY:
        fmt = get_format(name)
        vals = fmt.values()
        assert_bits_equal(quantize(vals, fmt), vals, vals)


def test_non_contiguous_input():
    x = torch.randn(64, 48).t()[::2]
    assert_bits_equal(quantize(x, "E5M2"), quantize(x.contiguous(), "E5M2"), x)


def test_stats_count_known_events():
    fmt = get_format("E4M3")  # max 448, min subnormal 2**-9
    x = torch.tensor([0.0, -0.0, 1.0, 500.0, -1e4, math.inf, math.nan, 2.0**-12, -(2.0**-11), 3.0])
    y, st = quantize_with_stats(x, fmt)
    assert st.amax.item() == math.inf  # inf is data; NaN is excluded from amax
    assert (st.overflow.item(), st.underflow.item(), st.nonzero.item(), st.nan.item()) == (3, 2, 7, 1)
    y2, st2 = quantize_with_stats(x[:5], fmt, scale=0.25)  # overflow is judged after scaling
    assert st2.amax.item() == 1e4 and st2.overflow.item() == 1 and st2.underflow.item() == 0


def test_stats_on_empty_and_all_nan():
    _, st = quantize_with_stats(torch.tensor([math.nan, math.nan]), "E5M2")
    assert (st.amax.item(), st.nan.item(), st.nonzero.item()) == (0.0, 2, 0)


# -- stochastic rounding -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E2M5", "E7M0", "E0M7"])
def test_stochastic_picks_a_neighbour_and_is_unbiased(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(123)
    x = log_spread_values(fmt, 64, g).clamp(-fmt.max, fmt.max)
    n = 4000
    xs = x.repeat(n, 1)
    out = round_to_format(xs, fmt, rounding="stochastic", generator=g)
    vals = fmt.values()
    idx = torch.searchsorted(vals, x.contiguous(), right=True).clamp(1, len(vals) - 1)
    lo, hi = vals[idx - 1], vals[idx]
    lo = torch.where(vals[idx - 1] == x, x, lo)
    assert bool(((out == lo) | (out == hi)).all()), "stochastic rounding left the two neighbours"
    # mean is x within 5 binomial standard deviations: p(1-p)(hi-lo)^2/n
    p = ((x - lo) / (hi - lo)).double()
    sd = ((p * (1 - p)).sqrt() * (hi - lo).double() / math.sqrt(n)).clamp(min=1e-30)
    assert bool(((out.double().mean(0) - x.double()).abs() <= 5 * sd + 1e-12 * x.abs().double()).all())


def test_stochastic_exact_values_and_seeds():
    fmt = get_format("E4M3")
    vals = fmt.values().repeat(10)
    g = torch.Generator().manual_seed(0)
    assert_bits_equal(round_to_format(vals, fmt, rounding="stochastic", generator=g), vals, vals)
    x = torch.randn(10_000, generator=g)
    a = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(5))
    b = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(5))
    c = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


# Exact probability of rounding up, and a rigorous deviation bound for a count of round-ups
SR_FALSE_ALARM = 1e-9  # per checked value: the chance that a correct rounder fails the bound


def sr_up_probability(x: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lo, hi, p) for |x| <= max: the format neighbours around x and the probability that stochastic
    rounding picks hi. The rule is P(up) = (|x| - lo) / (hi - lo) truncated to 32 bits (the draw has
    32 random bits), so E[SR(x)] - x lies in [-2**-32 * (hi - lo), 0]. Exact in float64: hi - lo is
    a power of two and |x| - lo has at most 24 significant bits."""
    vals = fmt.values().double()
    a = x.double().abs()
    idx = torch.searchsorted(vals, a.contiguous(), right=True).clamp(1, len(vals) - 1)
    lo, hi = vals[idx - 1], vals[idx]
    p = torch.floor((a - lo) / (hi - lo) * 2.0**32) / 2.0**32
    return lo, hi, p


def bernstein_bound(n: int, p: torch.Tensor) -> torch.Tensor:
    """t with P(|k - n p| >= t) <= SR_FALSE_ALARM for k ~ Binomial(n, p) (Bernstein's inequality:
    P <= 2 exp(-t^2 / (2 (n p (1 - p) + t / 3)))); 0 where p is 0 or 1 (then k must equal n p)."""
    L = math.log(2 / SR_FALSE_ALARM)
    var = n * p * (1 - p)
    t = L / 3 + torch.sqrt(L * L / 9 + 2 * L * var)
    return torch.where((p == 0) | (p == 1), torch.zeros_like(t), t)


def magnitude_ladder(fmt, g: torch.Generator) -> torch.Tensor:
    """One random fp32 value in every binade from the smallest fp32 subnormal (2**-149) to the
    format's max, the smallest subnormal itself, and the format's max."""
    out = [2.0**-149]
    for e in range(-149, math.floor(math.log2(fmt.max)) + 1):
        if e < -126:  # fp32 subnormal binade [2**e, 2**(e+1)): multiples of 2**-149
            k = int(torch.randint(2 ** (e + 149), 2 ** (e + 150), (1,), generator=g))
            out.append(math.ldexp(k, -149))
        else:
            out.append(math.ldexp(1 + int(torch.randint(0, 2**23, (1,), generator=g)) / 2**23, e))
    x = torch.tensor(out, dtype=torch.float32)
    return torch.cat([x[x <= fmt.max], torch.tensor([fmt.max])])


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_stochastic_rounding_is_unbiased_from_fp32_subnormals_to_max(name):
    """E[SR(x)] = x up to the stated 32-bit truncation, at every magnitude: the count of round-ups of
    n copies of x is Binomial(n, P(up)) within a Bernstein bound (false alarm 1e-9 per value).
    Values whose fraction is below 2**-32 of a quantum must never round up."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(zlib_seed(name))
    x = magnitude_ladder(fmt, g)
    x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    n = 2048
    out = round_to_format(x.repeat(n, 1), fmt, rounding="stochastic", seed=zlib_seed(name + "sr"))
    lo, hi, p = sr_up_probability(x, fmt)
    mag = out.double().abs()
    assert bool(((mag == lo) | (mag == hi)).all()), "stochastic rounding left the two neighbours"
    assert bool((torch.signbit(out) == torch.signbit(x)).all() | (not fmt.has_neg_zero))
    k = (mag == hi).sum(0).double()
    dev = (k - n * p).abs()
    bad = (dev > bernstein_bound(n, p)).nonzero().flatten()
    assert bad.numel() == 0, f"round-up counts off: x={x[bad][:4].tolist()} k={k[bad][:4].tolist()} " \
                             f"expected n*p={(n * p)[bad][:4].tolist()}"


def zlib_seed(label: str) -> int:
    import zlib

    return zlib.crc32(label.encode())


def test_stochastic_rounding_of_a_tiny_value_in_e4m3():
    """2**-29 in E4M3 lies 2**-20 of the way from 0 to the smallest subnormal 2**-9: about one in a
    million rounds up, and the mean stays 2**-29 (a capped shift once made it 0.8 %)."""
    x = torch.full((10**6,), 2.0**-29)
    out = quantize(x, "E4M3", rounding="stochastic", seed=12345, backend="torch")
    k = int((out == 2.0**-9).sum())
    assert int((out == 0).sum()) + k == x.numel()
    p = torch.tensor(2.0**-20, dtype=torch.float64)
    assert abs(k - 10**6 * p.item()) <= bernstein_bound(10**6, p).item()


def test_philox_bits_are_counter_based():
    """The draw for element i depends only on (seed, i): slices, shapes and calls agree; seeds differ."""
    idx = torch.arange(10_000, dtype=torch.int64)
    a = philox_bits(7, idx)
    assert torch.equal(philox_bits(7, idx[5000:]), a[5000:])
    assert bool(((a >= 0) & (a < 2**32)).all())
    assert not torch.equal(philox_bits(8, idx), a)
    assert not torch.equal(philox_bits(7 + 2**32, idx), a)  # the seed's high word is part of the key
    # uniform: each of the 32 bits is set about half the time (Bernstein bound, as above)
    ones = torch.stack([((a >> b) & 1).sum() for b in range(32)]).double()
    assert bool(((ones - 5000).abs() <= bernstein_bound(10_000, torch.tensor(0.5))).all())
    x = torch.randn(40, 50, generator=torch.Generator().manual_seed(1))
    q = quantize(x, "E5M2", rounding="stochastic", seed=99)
    assert torch.equal(quantize(x.flatten(), "E5M2", rounding="stochastic", seed=99), q.flatten())
    assert not torch.equal(quantize(x, "E5M2", rounding="stochastic", seed=100), q)


def test_stochastic_seed_none_draws_from_the_generator():
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    run = lambda s: quantize(x, "E4M3", rounding="stochastic", generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    torch.manual_seed(3)
    a = quantize(x, "E4M3", rounding="stochastic")
    torch.manual_seed(3)
    assert torch.equal(quantize(x, "E4M3", rounding="stochastic"), a)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "3"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        quantize(torch.ones(3), "E4M3", rounding="stochastic", seed=seed)


# -- dequantized values beyond the output dtype ------------------------------------------------------
def overflowing_inputs(fmt, dtype):
    """(x, scale): x holds dtype's max, -max, inf and a normal value; the power-of-two scale puts
    dtype's max inside fmt's range, where rounding up lands past dtype's max for every format."""
    big = torch.finfo(dtype).max
    scale = 2.0 ** max(math.floor(math.log2(fmt.max / big)), -126)  # 1/scale finite
    x = torch.tensor([big, -big, math.inf, 1.0], dtype=torch.float32).to(dtype)
    return x, scale


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_dequantized_values_saturate_to_the_output_dtype(name, dtype, backend):
    """saturate=True promises finite output: a dequantized value past dtype's max becomes +-max of
    the dtype; saturate=False gives inf there (the honest cast). Also E6M1/E7M0 at scale 1."""
    fmt = get_format(name)
    big = torch.finfo(dtype).max
    for x, scale in [overflowing_inputs(fmt, dtype), (torch.tensor([big, -big], dtype=dtype), 1.0)]:
        q = round_to_format(x.float() * scale, fmt)
        want = (q.double() / scale).clamp(-big, big).to(dtype)
        for fn in (quantize, quantize_ste):
            y = fn(x, fmt, scale, backend=backend)
            assert y.dtype == dtype and bool(torch.isfinite(y).all()), f"{fn.__name__}: {y.tolist()}"
            assert_bits_equal(y, want, x)
        raw = quantize(x, fmt, scale, saturate=False, backend=backend)
        want_raw = (round_to_format(x.float() * scale, fmt, saturate=False).double() / scale).to(dtype)
        assert_bits_equal(raw, want_raw, x)
    # the reported instance: E6M1 rounds fp16's max 65504 up to 65536
    if name == "E6M1" and dtype == torch.float16:
        assert quantize(torch.tensor([65504.0], dtype=dtype), fmt, backend=backend).item() == 65504.0


def test_fp32_output_saturates_too():
    """A format value times a large inv_scale can overflow fp32 itself."""
    big = torch.finfo(torch.float32).max
    x = torch.tensor([big, -big])  # * 2**-120 = 255.99..., which E4M3 rounds to 256: 256 * 2**120 = 2**128
    for backend in ("torch", "triton"):
        assert quantize(x, "E4M3", 2.0**-120, backend=backend).tolist() == [big, -big]
        assert torch.isinf(quantize(x, "E4M3", 2.0**-120, saturate=False, backend=backend)).all()


@pytest.mark.parametrize("scale", [1e-39, 2.0**-128, torch.tensor(2.0**-130), torch.tensor([1e-45])])
def test_scale_with_non_finite_reciprocal_is_rejected(scale):
    with pytest.raises(ValueError, match=r"scale must be finite and > 2\*\*-128"):
        quantize(torch.tensor([1.0]), "E4M3", scale=scale)
    with pytest.raises(ValueError, match=r"scale must be finite and > 2\*\*-128"):
        quantize_ste(torch.tensor([1.0]), "E4M3", scale=scale)


def test_smallest_accepted_scale():
    s = torch.nextafter(torch.tensor(2.0**-128), torch.tensor(1.0))
    y = quantize(torch.tensor([0.0, 1e38]), "E4M3", scale=s)
    assert bool(torch.isfinite(y).all()) and y[0].item() == 0.0


# -- STE -----------------------------------------------------------------------------------------
def test_ste_identity_and_clipped():
    x = torch.tensor([1.0, 600.0, -3.0, -1e5], requires_grad=True)
    quantize_ste(x, "E4M3").sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0]
    x.grad = None
    quantize_ste(x, "E4M3", ste="clipped").sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(x=torch.arange(4)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(x=torch.zeros(4, dtype=torch.float64)), TypeError, "got torch.float64"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scale=0.0), ValueError, "scale must be finite and > 2"),
    (dict(scale=-2.0), ValueError, "scale must be finite and > 2"),
    (dict(scale=torch.tensor(math.nan)), ValueError, "scale must be finite and > 2"),
    (dict(scale=math.inf), ValueError, "scale must be finite and > 2"),
    (dict(scale="2"), TypeError, "scale must be None, a number or a tensor"),
    (dict(rounding="up"), ValueError, r"rounding must be one of \('nearest', 'stochastic'\)"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(fmt="E4M4"), ValueError, "unknown format 'E4M4'"),
])
def test_bad_input_errors(kwargs, err, msg):
    args = dict(x=torch.ones(4), fmt="E4M3") | kwargs
    with pytest.raises(err, match=msg):
        quantize(args.pop("x"), args.pop("fmt"), **args)


def test_ste_bad_mode():
    with pytest.raises(ValueError, match="ste must be one of"):
        quantize_ste(torch.ones(2), "E5M2", ste="none")


def test_triton_backend_stochastic_is_seeded_by_the_generator():
    """backend="triton" draws its Philox seed from `generator`: same seed, same bits."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0))
    run = lambda s: quantize(x, "E4M3", rounding="stochastic", backend="triton",  # noqa: E731
                             generator=torch.Generator().manual_seed(s))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    near = quantize(x, "E4M3")
    assert bool(((a - near).abs() <= get_format("E4M3").ulp(x)).all())  # one of the two neighbours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,saturate", [("E4M3", True), ("E4M3", False), ("E5M2", False), ("E2M5", False),
                                           ("E0M7", True)])
def test_nan_results_have_the_same_bits_on_every_backend(dtype, name, saturate):
    """NaN inputs of either sign and any payload, and overflows that become NaN, come out as the
    dtype's canonical quiet NaN from the reference and from the kernel alike."""
    int_view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    nans = torch.tensor([0x7FC00000, 0xFFC00000 - 2**32, 0x7F800001, 0xFFFFFFFF - 2**32], dtype=torch.int32)
    x = torch.cat([nans.view(torch.float32), torch.tensor([1e30, -1e30, 1.0, -0.5])]).to(dtype)
    ys = [quantize(x, name, rounding="nearest", saturate=saturate, backend=b) for b in ("torch", "triton")]
    assert torch.isnan(ys[0][:4]).all()
    assert torch.equal(ys[0].view(int_view), ys[1].view(int_view)), (ys[0].view(int_view), ys[1].view(int_view))
    canonical = torch.tensor(math.nan, dtype=dtype).view(int_view)
    assert (ys[0].view(int_view)[torch.isnan(ys[0])] == canonical).all()
