"""quantize_operand: the fast cast (altgrad.fast_cast) and the Triton kernel against the torch
reference, bit for bit, on the oracle value sets, every format, both saturate and rounding modes."""

import math

import pytest
import torch

from altgrad import fast_cast
from altgrad.formats import FORMAT_REGISTRY, FormatSpec, get_format
from altgrad.quantize import QuantStats, quantize, quantize_operand
from oracles import all_bf16_values, distinct_layouts, log_spread_values, midpoint_values

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                        "ignore:invalid value encountered:RuntimeWarning")


LAYOUTS = distinct_layouts()


def assert_same_cast(got, want, inputs, what=""):
    """q bit for bit (NaN included: every backend writes 0x7FC0) and every stats field."""
    (q, st), (q_ref, st_ref) = got, want
    assert q.dtype == torch.bfloat16 and q.shape == q_ref.shape
    a, b = q.contiguous().view(torch.int16).cpu(), q_ref.contiguous().view(torch.int16).cpu()
    bad = (a != b).flatten().nonzero().flatten()[:5]
    assert bad.numel() == 0, f"{what}: {int((a != b).sum())} differ, e.g. x={inputs.flatten()[bad].tolist()} " \
                             f"got={q.flatten()[bad].tolist()} want={q_ref.flatten()[bad].tolist()}"
    if st_ref is None:
        assert st is None
        return
    assert torch.equal(st.amax.view(torch.int32).cpu(), st_ref.amax.view(torch.int32).cpu()), f"{what}: amax"
    for field in ("overflow", "underflow", "nonzero", "nan"):
        assert getattr(st, field).item() == getattr(st_ref, field).item(), f"{what}: {field}"
        assert getattr(st, field).dtype == torch.int64


def oracle_values(fmt, seed, n_random=100_000):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([all_bf16_values(), midpoint_values(fmt), log_spread_values(fmt, n_random, g)])


def test_every_registered_format_takes_the_magic_path():
    assert all(fast_cast.magic_supported(f) for f in FORMAT_REGISTRY.values())


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("saturate", [True, False], ids=["sat", "nosat"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_fast_equals_reference_on_oracle_values(name, saturate, rounding, seeded):
    """Every bf16 pattern, every midpoint and value +-1 ulp, 10**5 log-spread values (2*10**4 for
    stochastic rounding, whose reference draws are slow); scale 1 and a non-power-of-two scale
    (midpoints move off the ties, products round once in fp32)."""
    fmt = get_format(name)
    v = oracle_values(fmt, seeded, 100_000 if rounding == "nearest" else 20_000)
    for scale in (1.0, 3.0):
        s = torch.tensor(scale)
        kw = dict(rounding=rounding, saturate=saturate, seed=seeded)
        assert_same_cast(quantize_operand(v, fmt, s, backend="fast", **kw),
                         quantize_operand(v, fmt, s, backend="torch", **kw), v, f"{name} scale {scale}")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E7M0", "E0M7", "E6M1", "E2M5"])
def test_triton_equals_reference(name, rounding):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(5)
    v = torch.cat([all_bf16_values(), midpoint_values(fmt), log_spread_values(fmt, 20_000, g)])
    s = torch.tensor(0.75)
    for saturate in (True, False):
        kw = dict(rounding=rounding, saturate=saturate, seed=2**35 + 9)
        assert_same_cast(quantize_operand(v, fmt, s, backend="triton", **kw),
                         quantize_operand(v, fmt, s, backend="torch", **kw), v, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_input_dtypes_odd_shapes_and_views(dtype, seeded):
    g = torch.Generator().manual_seed(seeded)
    base = torch.randn(6, 40, 33, generator=g) * 30
    cases = [base.to(dtype), base.to(dtype)[:, ::3, 1:], base.to(dtype).transpose(0, 2),
             (torch.randn(1, 1, generator=g) * 100).to(dtype), torch.randn(7, 1, generator=g).to(dtype).expand(7, 50),
             (torch.randn(1023, generator=g) * 1e-3).to(dtype)]
    s = torch.tensor(5.0)
    for x in cases:
        for rounding in ("nearest", "stochastic"):
            for backend in ("fast", "triton"):
                kw = dict(rounding=rounding, seed=seeded)
                assert_same_cast(quantize_operand(x, "E4M3", s, backend=backend, **kw),
                                 quantize_operand(x, "E4M3", s, backend="torch", **kw), x,
                                 f"{backend} {rounding} {tuple(x.shape)}")


@pytest.mark.parametrize("backend", ["torch", "fast", "triton"])
def test_empty_input(backend):
    for shape in [(0,), (0, 8), (3, 0, 2)]:
        q, st = quantize_operand(torch.empty(shape), "E5M2", torch.tensor(1.0), backend=backend)
        assert q.shape == shape and q.dtype == torch.bfloat16
        assert st.amax.item() == 0.0 and st.amax.dtype == torch.float32
        assert [st.overflow.item(), st.underflow.item(), st.nonzero.item(), st.nan.item()] == [0, 0, 0, 0]
        q, st = quantize_operand(torch.empty(shape), "E5M2", torch.tensor(1.0), backend=backend, stats=False)
        assert q.shape == shape and st is None


@pytest.mark.parametrize("backend", ["fast", "triton"])
def test_same_seed_same_bits_other_seed_other_bits(backend):
    x = torch.randn(4000, generator=torch.Generator().manual_seed(1))
    s = torch.tensor(1.0)
    run = lambda seed: quantize_operand(x, "E3M4", s, rounding="stochastic", seed=seed, backend=backend)[0]  # noqa: E731
    a = run(2**63 + 5)
    assert torch.equal(a.view(torch.int16), run(2**63 + 5).view(torch.int16))
    assert not torch.equal(a, run(2**63 + 6))
    assert torch.equal(a.view(torch.int16), quantize_operand(x, "E3M4", s, rounding="stochastic", seed=2**63 + 5,
                                                             backend="torch")[0].view(torch.int16))


def test_matches_quantize_after_dequantization():
    """q * inv_scale is what quantize() returns (fp32, no output clamp reached)."""
    x = torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 7
    s = torch.tensor(12.5)
    q, _ = quantize_operand(x, "E5M2", s)
    assert torch.equal(q.float() * torch.reciprocal(s), quantize(x, "E5M2", s, backend="torch"))


def test_eager_fallback_gives_the_same_bits(monkeypatch):
    monkeypatch.setattr(fast_cast, "COMPILE", False)
    fmt = get_format("E7M0")
    v = oracle_values(fmt, 3)
    for rounding in ("nearest", "stochastic"):
        assert_same_cast(quantize_operand(v, fmt, torch.tensor(1.0), rounding=rounding, seed=4, backend="fast"),
                         quantize_operand(v, fmt, torch.tensor(1.0), rounding=rounding, seed=4, backend="torch"),
                         v, rounding)


def test_every_cpu_variant_is_called_without_dynamo(monkeypatch):
    """On the CPU each compiled variant (nearest / stochastic, with and without stats, the block
    rounding with and without masks, the fused operand casts of QuantizedLinear) is inductor's code
    from a make_fx trace, called directly: none fell back to torch.compile or to eager code."""
    from torch import nn

    from altgrad.blockwise import quantize_blockwise, quantize_blockwise_cast
    from altgrad.config import LayerQuantConfig, RoleConfig
    from altgrad.linear import QuantizedLinear

    monkeypatch.setattr(fast_cast, "_COMPILED", {})
    x = torch.randn(5, 77) * 10
    for rounding in ("nearest", "stochastic"):
        for stats in (True, False):
            quantize_operand(x, "E7M0" if stats else "E3M4", torch.tensor(0.5), rounding=rounding, seed=3,
                             stats=stats, backend="fast")
        for scaling in ("delayed", "current", "none"):
            rc = RoleConfig("E4M3", scaling=scaling, rounding=rounding, history_len=3)
            ql = QuantizedLinear(nn.Linear(77, 9), LayerQuantConfig(rc, rc, rc), backend="fast")
            for _ in range(2):
                ql(x.requires_grad_()).sum().backward()
    quantize_blockwise(x, "E2M5", None, backend="fast")
    quantize_blockwise_cast(x, "E2M5", 32, backend="fast", masks=False)
    variants = sorted(key[0].__name__ for key in fast_cast._COMPILED)
    assert len(set(variants)) == 4 + 2 + 2 * 4, variants  # cast, round_blocks, fused (own, own_push, history, none)
    assert all(isinstance(c, fast_cast._Direct) for c in fast_cast._COMPILED.values()), fast_cast._COMPILED


def test_block_cast_is_compiled_once_for_every_length(monkeypatch):
    """The block rounding's per-element scale shares the blocks' symbolic length: one compiled
    entry serves every operand length (a static scale length would leave a guard on the length,
    so each new length would pay a wasted compile and fall back to torch.compile)."""
    from altgrad.blockwise import quantize_blockwise_cast

    monkeypatch.setattr(fast_cast, "_COMPILED", {})
    for rows in (3, 4, 6):
        x = torch.randn(rows, 40)
        ref = quantize_blockwise_cast(x, "E4M3", 16, backend="torch")
        got = quantize_blockwise_cast(x, "E4M3", 16, backend="fast")
        assert torch.equal(got.q.view(torch.int32), ref.q.view(torch.int32))
    entries = [c for key, c in fast_cast._COMPILED.items() if key[0] is fast_cast._round_blocks_masks]
    assert len(entries) == 1 and isinstance(entries[0], fast_cast._Direct)


def test_format_outside_the_magic_range_falls_back_exactly():
    """A custom bias whose top binade is 2**127: the magic constant would overflow fp32."""
    fmt = FormatSpec("E4M3_B-112", 4, 3, -112, "fn")
    assert not fast_cast.magic_supported(fmt)
    v = torch.cat([all_bf16_values(), midpoint_values(fmt)])
    assert_same_cast(quantize_operand(v, fmt, torch.tensor(1.0), backend="fast"),
                     quantize_operand(v, fmt, torch.tensor(1.0), backend="torch"), v)


def test_returns_quant_stats():
    q, st = quantize_operand(torch.tensor([1.0, -500.0, 1e-9, math.nan, 0.0]), "E4M3", torch.tensor(1.0))
    assert isinstance(st, QuantStats)
    assert (st.amax.item(), st.overflow.item(), st.underflow.item(), st.nonzero.item(), st.nan.item()) == \
        (500.0, 1, 1, 3, 1)
    assert q.view(torch.int16)[3].item() == 0x7FC0


@pytest.mark.parametrize("kwargs,err,msg", [
    (dict(scale=2.0), TypeError, "scale must be a 1-element float32 tensor"),
    (dict(scale=torch.tensor(2.0, dtype=torch.float64)), TypeError, "scale must be a 1-element float32 tensor"),
    (dict(scale=torch.ones(2)), TypeError, "scale must be a 1-element float32 tensor"),
    (dict(scale=torch.tensor(1e-39)), ValueError, r"scale must be finite and > 2\*\*-128"),
    (dict(scale=torch.tensor(math.inf)), ValueError, r"scale must be finite and > 2\*\*-128"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(rounding="up"), ValueError, "rounding must be one of"),
    (dict(seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(seed=None), ValueError, r"seed must be an int in \[0, 2\*\*64\)"),
    (dict(x=torch.ones(3, dtype=torch.float64)), TypeError, "x must be float32, bfloat16 or float16"),
    (dict(fmt="E9M9"), ValueError, "unknown format"),
])
def test_bad_arguments(kwargs, err, msg):
    args = dict(x=torch.ones(3), fmt="E4M3", scale=torch.tensor(1.0)) | kwargs
    with pytest.raises(err, match=msg):
        quantize_operand(args.pop("x"), args.pop("fmt"), args.pop("scale"), **args)
