"""Casting 16M fp32 elements on the CPU: torch's native float8 round trip (the baseline), the fast
exact cast (`quantize_operand(backend="fast")`, with and without stats) and the torch reference.

    pytest benchmarks/test_bench_quantize.py --benchmark-only --benchmark-group-by=param:fmt

Each group holds every method for one format, so ratios are measured in one run. The native cast is
not exact for altgrad's semantics (it canonicalises NaN, and E5M2 overflows to inf); it is the speed
to beat. The fast cast's first call compiles (a warmup round).
"""

import pytest
import torch

from altgrad.quantize import quantize, quantize_operand

N = 16 * 2**20
NATIVE = {"E5M2": torch.float8_e5m2, "E4M3": torch.float8_e4m3fn}
ONE = torch.tensor(1.0)


@pytest.fixture(scope="module")
def x():
    return torch.randn(N, generator=torch.Generator().manual_seed(0)) * 10


@pytest.mark.parametrize("fmt", list(NATIVE))
def test_native_float8_round_trip(benchmark, x, fmt):
    dtype = NATIVE[fmt]
    benchmark.group = f"quantize 16M fp32 {fmt} (cpu)"
    y = benchmark.pedantic(lambda: x.to(dtype).float(), rounds=5, warmup_rounds=1)
    assert y.shape == x.shape


@pytest.mark.parametrize("stats", [False, True], ids=["q", "q+stats"])
@pytest.mark.parametrize("fmt", list(NATIVE))
def test_fast_cast(benchmark, x, fmt, stats):
    benchmark.group = f"quantize 16M fp32 {fmt} (cpu)"
    q, _ = benchmark.pedantic(lambda: quantize_operand(x, fmt, ONE, stats=stats, backend="fast"),
                              rounds=5, warmup_rounds=1)
    # the native cast agrees wherever both are defined (finite, within range)
    ok = x.abs() <= {"E4M3": 448.0, "E5M2": 57344.0}[fmt]
    assert torch.equal(q.float()[ok], x[ok].to(NATIVE[fmt]).float())


@pytest.mark.parametrize("fmt", list(NATIVE))
def test_reference_quantize(benchmark, x, fmt):
    benchmark.group = f"quantize 16M fp32 {fmt} (cpu)"
    y = benchmark.pedantic(lambda: quantize(x, fmt, backend="torch"), rounds=2, warmup_rounds=0)
    # the native cast is the oracle here too (E4M3's cast saturates like saturate=True)
    assert torch.equal(y, x.to(NATIVE[fmt]).float())
