"""Kernel benchmarks (pytest-benchmark; CUDA only): `pytest benchmarks/test_bench_kernels.py --benchmark-only`.

quantize: Triton kernel vs the torch reference vs a native float8 round trip, 64M elements.
scaled_matmul: pre-quantized, cast-then-matmul, in-loop quantization and real FP8 vs torch's bf16
matmul (cuBLAS) at GPT-small shapes (M = 12 * 256 tokens) and 4096^3. Every timed function ends with
torch.cuda.synchronize(); each result's extra_info carries its ratio to the bf16 matmul (or, for
quantize, its effective bandwidth) measured in the same run.
"""

import pytest
import torch
import triton.testing

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

from altgrad.formats import get_format  # noqa: E402
from altgrad.kernels import quantize as kq  # noqa: E402
from altgrad.kernels import scaled_matmul as ksm  # noqa: E402
from altgrad.quantize import quantize_with_stats  # noqa: E402

N_QUANT = 64 * 2**20
MATMUL_SHAPES = {  # name: (M, N, K), C (M, N) = A (M, K) @ B (N, K)^T
    "gpt-small fc 384->1536": (3072, 1536, 384),
    "gpt-small proj 1536->384": (3072, 384, 1536),
    "gpt-small qkv 384->1152": (3072, 1152, 384),
    "4096^3": (4096, 4096, 4096),
}


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def _bench(benchmark, fn, rounds=30):
    """Warm up (autotune, compile) outside the timing, then time `rounds` synchronized calls."""
    fn()
    torch.cuda.synchronize()
    benchmark.pedantic(_synced(fn), rounds=rounds, warmup_rounds=3, iterations=1)
    return benchmark.stats.stats.median  # seconds


def _fields(name):
    f = get_format(name)
    return dict(exp_bits=f.exp_bits, man_bits=f.man_bits, bias=f.bias, specials=f.specials)


def _fmt_tuple(name):
    f = get_format(name)
    return (f.exp_bits, f.man_bits, f.bias, f.specials)


# -- quantize ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_input():
    x = torch.randn(N_QUANT, device="cuda", dtype=torch.bfloat16)
    return x, torch.tensor(100.0, device="cuda")


@pytest.mark.parametrize("fmt,rounding", [("E4M3", "nearest"), ("E5M2", "nearest"), ("E2M5", "nearest"),
                                          ("E7M0", "nearest"), ("E4M3", "stochastic")])
def test_quantize_triton(benchmark, quant_input, fmt, rounding):
    x, scale = quant_input
    benchmark.group = "quantize 64M bf16"
    fn = lambda: kq.quantize(x, scale, **_fields(fmt), rounding=rounding, out_dq=False)  # noqa: E731
    t = _bench(benchmark, fn)
    benchmark.extra_info["GB/s"] = round(x.numel() * 4 / t / 1e9)  # read bf16 x, write bf16 q


def test_quantize_torch_reference(benchmark, quant_input):
    x, scale = quant_input
    benchmark.group = "quantize 64M bf16"
    t = _bench(benchmark, lambda: quantize_with_stats(x, "E4M3", scale, backend="torch"), rounds=5)
    benchmark.extra_info["GB/s"] = round(x.numel() * 4 / t / 1e9)


def test_quantize_native_float8_round_trip(benchmark, quant_input):
    x, scale = quant_input
    benchmark.group = "quantize 64M bf16"
    inv = torch.reciprocal(scale)
    fn = lambda: ((x * scale).to(torch.float8_e4m3fn).to(torch.bfloat16) * inv)  # noqa: E731
    t = _bench(benchmark, fn)
    benchmark.extra_info["GB/s"] = round(x.numel() * 4 / t / 1e9)


# -- scaled_matmul ----------------------------------------------------------------------------------
_BF16_BASE = {}  # shape name -> median seconds of torch bf16 matmul in this run


def _operands(shape_name):
    M, N, K = MATMUL_SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    return x, w


def _bf16_base(shape_name):
    if shape_name not in _BF16_BASE:
        x, w = _operands(shape_name)
        _BF16_BASE[shape_name] = triton.testing.do_bench(lambda: x @ w.T, return_mode="median") / 1e3  # s
    return _BF16_BASE[shape_name]


def _record(benchmark, shape_name, t):
    M, N, K = MATMUL_SHAPES[shape_name]
    benchmark.extra_info["TFLOP/s"] = round(2 * M * N * K / t / 1e12, 1)
    benchmark.extra_info["ratio_vs_bf16"] = round(t / _bf16_base(shape_name), 3)


def _scales(x, w, fmt):
    f = get_format(fmt)
    return (torch.tensor(f.max / 4, device="cuda") / x.abs().amax().float(),
            torch.tensor(f.max / 4, device="cuda") / w.abs().amax().float())


@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_torch_bf16(benchmark, shape_name):
    x, w = _operands(shape_name)
    benchmark.group = f"matmul {shape_name}"
    _record(benchmark, shape_name, _bench(benchmark, lambda: x @ w.T))


@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_prequantized(benchmark, shape_name):
    """The matmul alone, on operands already cast (weights cached per step, inputs cast upstream)."""
    x, w = _operands(shape_name)
    sx, sw = _scales(x, w, "E4M3")
    xq = kq.quantize(x, sx, **_fields("E4M3"), out_dq=False, stats=False).q
    wq = kq.quantize(w, sw, **_fields("E4M3"), out_dq=False, stats=False).q
    ix, iw = torch.reciprocal(sx), torch.reciprocal(sw)
    benchmark.group = f"matmul {shape_name}"
    _record(benchmark, shape_name, _bench(benchmark, lambda: ksm.scaled_matmul(xq, wq, ix, iw,
                                                                               out_dtype=torch.bfloat16)))


@pytest.mark.parametrize("fmt", ["E4M3", "E2M5"])
@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_cast_then_matmul(benchmark, shape_name, fmt):
    """Both operands cast with the quantize kernel (stats included), then the matmul."""
    x, w = _operands(shape_name)
    sx, sw = _scales(x, w, fmt)

    def fn():
        xq = kq.quantize(x, sx, **_fields(fmt), out_dq=False)
        wq = kq.quantize(w, sw, **_fields(fmt), out_dq=False)
        return ksm.scaled_matmul(xq.q, wq.q, torch.reciprocal(sx), torch.reciprocal(sw), out_dtype=torch.bfloat16)

    benchmark.group = f"matmul {shape_name}"
    _record(benchmark, shape_name, _bench(benchmark, fn))


@pytest.mark.parametrize("operands", ["A", "A and B"])
@pytest.mark.parametrize("fmt", ["E4M3", "E2M5"])
@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_in_loop(benchmark, shape_name, fmt, operands):
    """Fused quantize-scale-matmul: A (and B) rounded in registers inside the kernel."""
    x, w = _operands(shape_name)
    sx, sw = _scales(x, w, fmt)
    f = _fmt_tuple(fmt)
    if operands == "A":
        wq = kq.quantize(w, sw, **_fields(fmt), out_dq=False, stats=False).q
        iw = torch.reciprocal(sw)
        fn = lambda: ksm.scaled_matmul(x, wq, None, iw, fmt_a=f, scale_a=sx, out_dtype=torch.bfloat16)  # noqa
    else:
        fn = lambda: ksm.scaled_matmul(x, w, fmt_a=f, scale_a=sx, fmt_b=f, scale_b=sw,  # noqa: E731
                                       out_dtype=torch.bfloat16)
    benchmark.group = f"matmul {shape_name}"
    _record(benchmark, shape_name, _bench(benchmark, fn))


_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _fp8_operands(shape_name):
    """E4M3 operands as real float8 tensors (x·scale cast by torch) and their inverse scales."""
    x, w = _operands(shape_name)
    sx, sw = _scales(x, w, "E4M3")
    x8, w8 = (x.float() * sx).to(torch.float8_e4m3fn), (w.float() * sw).to(torch.float8_e4m3fn)
    return x8, w8, torch.reciprocal(sx), torch.reciprocal(sw)


@pytest.mark.skipif(not _FP8, reason="FP8 tensor cores need sm_89+")
@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_fp8_triton(benchmark, shape_name):
    x8, w8, ix, iw = _fp8_operands(shape_name)
    benchmark.group = f"matmul {shape_name}"
    _record(benchmark, shape_name, _bench(benchmark, lambda: ksm.scaled_matmul(x8, w8, ix, iw, fp8=True,
                                                                               out_dtype=torch.bfloat16)))


@pytest.mark.skipif(not _FP8, reason="FP8 tensor cores need sm_89+")
@pytest.mark.parametrize("shape_name", MATMUL_SHAPES)
def test_matmul_fp8_torch_scaled_mm(benchmark, shape_name):
    """cuBLAS FP8 (torch._scaled_mm) for comparison: the real-hardware ceiling."""
    x8, w8, ix, iw = _fp8_operands(shape_name)
    benchmark.group = f"matmul {shape_name}"
    fn = lambda: torch._scaled_mm(x8, w8.t(), scale_a=ix, scale_b=iw, out_dtype=torch.bfloat16)  # noqa: E731
    _record(benchmark, shape_name, _bench(benchmark, fn))
