"""Reference quantizer vs torch's native float8 round-trip, 16M fp32 elements on the CPU (issue 2).

    pytest benchmarks/test_bench_quantize.py --benchmark-only --benchmark-group-by=param:fmt

Each group holds the baseline (`native`, x.to(float8).to(float32)) and the reference `quantize` for
the same format, so the ratio is measured in one run. The reference is an oracle written for
exactness (integer arithmetic in int64), not speed; the Triton kernel is the fast path.
"""

import pytest
import torch

from altgrad.quantize import quantize

N = 16 * 2**20
NATIVE = {"E5M2": torch.float8_e5m2, "E4M3": torch.float8_e4m3fn}


@pytest.fixture(scope="module")
def x():
    return torch.randn(N, generator=torch.Generator().manual_seed(0)) * 10


@pytest.mark.parametrize("fmt", list(NATIVE))
def test_native_float8_round_trip(benchmark, x, fmt):
    dtype = NATIVE[fmt]
    benchmark.group = f"quantize 16M fp32 {fmt} (cpu)"
    y = benchmark.pedantic(lambda: x.to(dtype).float(), rounds=3, warmup_rounds=1)
    assert y.shape == x.shape


@pytest.mark.parametrize("fmt", list(NATIVE))
def test_reference_quantize(benchmark, x, fmt):
    benchmark.group = f"quantize 16M fp32 {fmt} (cpu)"
    y = benchmark.pedantic(lambda: quantize(x, fmt, backend="torch"), rounds=3, warmup_rounds=1)
    # the native cast is the oracle here too (E4M3's cast saturates like saturate=True)
    assert torch.equal(y, x.to(NATIVE[fmt]).float())
