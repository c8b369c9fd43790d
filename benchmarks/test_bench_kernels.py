"""Kernel benchmarks (CUDA only): `pytest benchmarks/test_bench_kernels.py --benchmark-only`.

quantize: the cast kernel (64M bf16 elements, stats on, as QuantizedLinear runs it) against a plain
device copy of the same bytes (the bandwidth ceiling) and torch's native float8 round trip.
matmul: for each GEMM of a Linear layer (forward, dgrad, wgrad layouts, as QuantizedLinear passes
them) at GPT-small shapes and 4096^3, the Triton kernel (its fixed tile, and autotuned over the same
list) against cuBLAS bf16 (`torch.mm`, fp32 output) on the same format-domain operands — both are
exact products with fp32 accumulation, so the faster one can serve the shape; plus in-loop
quantization, real FP8 (Triton, and cuBLAS `torch._scaled_mm`) and block scaling (E8M0 per 32
elements of K, `block_scaled_matmul.py`) for the forward GEMM.

Same clock everywhere: `triton.testing.do_bench` (CUDA events, L2 flushed, median). extra_info (also
printed as a RESULT line as soon as it is measured) holds the device time and its ratio to the cuBLAS
bf16 side of the same GEMM (or the GB/s), measured in the same run; pytest-benchmark's columns are
wall-clock per synchronized call (launch overhead included).
"""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

from timing import device_ms, wall  # noqa: E402  (benchmarks/timing.py)

from altgrad.formats import get_format  # noqa: E402
from altgrad.kernels import quantize as kq  # noqa: E402
from altgrad.kernels import scaled_matmul as ksm  # noqa: E402

N_QUANT = 64 * 2**20
LINEARS = {  # name: (tokens M, in_features K, out_features N)
    "gpt-small c_fc 384->1536": (3072, 384, 1536),
    "gpt-small c_proj 1536->384": (3072, 1536, 384),
    "gpt-small c_attn 384->1152": (3072, 384, 1152),
    "4096^3": (4096, 4096, 4096),
}
GEMMS = ("fwd", "dgrad", "wgrad")


def _fields(name):
    f = get_format(name)
    return f.kernel_fields


# -- quantize ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quant_input():
    x = torch.randn(N_QUANT, device="cuda", dtype=torch.bfloat16)
    return x, torch.tensor(100.0, device="cuda")


def _gbs(benchmark, n_bytes, fn):
    ms = device_ms(fn)
    benchmark.extra_info["device_ms"] = round(ms, 4)
    benchmark.extra_info["GB/s"] = round(n_bytes / ms / 1e6)
    _print(benchmark)
    wall(benchmark, fn)


def _print(benchmark):
    """The result line, as soon as it is measured (`pytest -s` keeps it if the run is cut off)."""
    print(f"\nRESULT {benchmark.name} {benchmark.extra_info}", flush=True)


@pytest.mark.parametrize("fmt,rounding,stats", [
    ("E4M3", "nearest", True), ("E4M3", "nearest", False), ("E5M2", "nearest", True), ("E2M5", "nearest", True),
    ("E7M0", "nearest", True), ("E4M3", "stochastic", True)])
def test_quantize_triton(benchmark, quant_input, fmt, rounding, stats):
    """Effective bandwidth: read bf16 x, write bf16 q (4 bytes per element)."""
    x, scale = quant_input
    benchmark.group = "quantize 64M bf16"
    _gbs(benchmark, x.numel() * 4, lambda: kq.cast(x, scale, **_fields(fmt), rounding=rounding, seed=7,
                                                       out_dq=False, stats=stats))


def test_quantize_device_copy_ceiling(benchmark, quant_input):
    x, _ = quant_input
    y = torch.empty_like(x)
    benchmark.group = "quantize 64M bf16"
    _gbs(benchmark, x.numel() * 4, lambda: y.copy_(x))


def test_quantize_native_float8_round_trip(benchmark, quant_input):
    x, scale = quant_input
    benchmark.group = "quantize 64M bf16"
    _gbs(benchmark, x.numel() * 4, lambda: (x * scale).to(torch.float8_e4m3fn).to(torch.bfloat16))


# -- matmul per GEMM --------------------------------------------------------------------------------
_CUBLAS_MS = {}  # (linear, gemm) -> device ms of cuBLAS bf16 on the format-domain operands, this run


def _operands(linear, gemm):
    """(A, B, inv_a, inv_b) of one GEMM of the layer, format-domain bf16 views as QuantizedLinear passes
    them: fwd x_q @ w_q^T, dgrad g_q @ w_q, wgrad g_q^T @ x_q."""
    M, K, N = LINEARS[linear]
    g = torch.Generator(device="cuda").manual_seed(0)
    e4m3, e5m2 = _fields("E4M3"), _fields("E5M2")
    x = torch.randn(M, K, device="cuda", generator=g)
    w = torch.randn(N, K, device="cuda", generator=g) * 0.02
    dy = torch.randn(M, N, device="cuda", generator=g) * 1e-3
    s = {n: torch.tensor(v, device="cuda") for n, v in (("x", 100.0), ("w", 1e4), ("g", 1e6))}
    xq = kq.cast(x, s["x"], **e4m3, out_dq=False, stats=False).q
    wq = kq.cast(w, s["w"], **e4m3, out_dq=False, stats=False).q
    gq = kq.cast(dy, s["g"], **e5m2, out_dq=False, stats=False).q
    inv = {n: torch.reciprocal(v) for n, v in s.items()}
    return {"fwd": (xq, wq, inv["x"], inv["w"]), "dgrad": (gq, wq.t(), inv["g"], inv["w"]),
            "wgrad": (gq.t(), xq.t(), inv["g"], inv["x"])}[gemm]


def _cublas(a, b):
    try:  # fp32 output, as the Triton kernel (torch >= 2.8 on CUDA)
        return torch.mm(a, b.t(), out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return torch.mm(a, b.t())


def _ratio(benchmark, key, ms):
    benchmark.extra_info["device_ms"] = round(ms, 4)
    if key not in _CUBLAS_MS:
        a, b, _, _ = _operands(*key)
        _CUBLAS_MS[key] = device_ms(lambda: _cublas(a, b))
    benchmark.extra_info["ratio_vs_cublas_bf16"] = round(ms / _CUBLAS_MS[key], 3)
    M, N, K = key_mnk(key)
    benchmark.extra_info["TFLOP/s"] = round(2 * M * N * K / ms / 1e9, 1)
    _print(benchmark)


def key_mnk(key):
    M, K, N = LINEARS[key[0]]
    return {"fwd": (M, N, K), "dgrad": (M, K, N), "wgrad": (N, K, M)}[key[1]]


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_cublas_bf16(benchmark, linear, gemm):
    a, b, _, _ = _operands(linear, gemm)
    benchmark.group = f"matmul {linear} {gemm}"
    fn = lambda: _cublas(a, b)  # noqa: E731
    _CUBLAS_MS[(linear, gemm)] = device_ms(fn)
    _ratio(benchmark, (linear, gemm), _CUBLAS_MS[(linear, gemm)])
    benchmark.extra_info["fp32_output"] = _cublas(a, b).dtype == torch.float32
    wall(benchmark, fn)


@pytest.mark.parametrize("autotune", [False, True], ids=["fixed-tile", "autotuned"])
@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_triton(benchmark, linear, gemm, autotune):
    a, b, ia, ib = _operands(linear, gemm)
    benchmark.group = f"matmul {linear} {gemm}"
    fn = lambda: ksm.scaled_matmul(a, b, ia, ib, autotune=autotune)  # noqa: E731
    _ratio(benchmark, (linear, gemm), device_ms(fn))
    M, N, _ = key_mnk((linear, gemm))
    benchmark.extra_info["fixed_tile"] = list(ksm.pick_config("bf16", M, N))
    wall(benchmark, fn)


@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_in_loop_input(benchmark, linear):
    """The evaluation forward: x (fp32) rounded to E4M3 inside the matmul, cached w_q."""
    M, K, N = LINEARS[linear]
    _, wq, _, iw = _operands(linear, "fwd")
    x = torch.randn(M, K, device="cuda")
    sx = torch.tensor(100.0, device="cuda")
    f = get_format("E4M3")
    benchmark.group = f"matmul {linear} fwd"
    fn = lambda: ksm.scaled_matmul(x, wq, None, iw, fmt_a=tuple(f.kernel_fields.values()),  # noqa
                                   scale_a=sx)
    _ratio(benchmark, (linear, "fwd"), device_ms(fn))
    wall(benchmark, fn)


_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _fp8_operands(linear):
    a, b, ia, ib = _operands(linear, "fwd")
    return a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), ia, ib  # exact: E4M3 values


@pytest.mark.skipif(not _FP8, reason="FP8 tensor cores need sm_89+")
@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_fp8_triton(benchmark, linear):
    a8, b8, ia, ib = _fp8_operands(linear)
    benchmark.group = f"matmul {linear} fwd"
    fn = lambda: ksm.scaled_matmul(a8, b8, ia, ib, fp8=True)  # noqa: E731
    _ratio(benchmark, (linear, "fwd"), device_ms(fn))
    wall(benchmark, fn)


@pytest.mark.skipif(not _FP8, reason="FP8 tensor cores need sm_89+")
@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_fp8_cublas_scaled_mm(benchmark, linear):
    """cuBLAS FP8 (torch._scaled_mm, fp32 output): the real-hardware ceiling."""
    a8, b8, ia, ib = _fp8_operands(linear)
    benchmark.group = f"matmul {linear} fwd"
    fn = lambda: torch._scaled_mm(a8, b8.t(), scale_a=ia, scale_b=ib, out_dtype=torch.float32)  # noqa: E731
    _ratio(benchmark, (linear, "fwd"), device_ms(fn))
    wall(benchmark, fn)


@pytest.mark.parametrize("linear", LINEARS)
def test_matmul_block_scaled_triton(benchmark, linear):
    """The forward GEMM with one E8M0 inverse scale per 32 elements of K on both operands
    (kernels/block_scaled_matmul.py, MX-style), against cuBLAS bf16 without scales: the price of
    scaling every K step's partial product."""
    from altgrad.kernels import block_scaled_matmul as kbm

    a, b, _, _ = _operands(linear, "fwd")
    M, K, N = LINEARS[linear]
    g = torch.Generator(device="cuda").manual_seed(1)
    ia, ib = (torch.exp2(torch.randint(-4, 5, (rows, -(-K // 32)), device="cuda", generator=g).float())
              for rows in (M, N))
    benchmark.group = f"matmul {linear} fwd"
    fn = lambda: kbm.block_scaled_matmul(a, b, ia, ib, block_a=32, block_b=32)  # noqa: E731
    _ratio(benchmark, (linear, "fwd"), device_ms(fn))
    benchmark.extra_info["fixed_tile"] = list(kbm.pick_config(32, M, N))
    wall(benchmark, fn)
