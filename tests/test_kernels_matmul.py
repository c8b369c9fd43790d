"""kernels/scaled_matmul.py against a float64 reference on the same quantized operands: the three
Linear layouts (fwd, dgrad, wgrad as strided views), odd shapes, bias, in-loop quantization of A, B or
both, bf16 output, and the real-FP8 option (CUDA sm_89+ only)."""

import pytest
import torch

from altgrad.formats import get_format
from altgrad.kernels import scaled_matmul as ksm
from altgrad.quantize import round_to_format

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_EPS = 2.0**-24


def _fields(name):
    f = get_format(name)
    return tuple(f.kernel_fields.values())


def _scale_for(t, name):
    """A non-power-of-two per-tensor scale mapping amax to 0.9 * max (as delayed scaling would)."""
    return torch.tensor(get_format(name).max * 0.9 / t.abs().max().item(), device=t.device)


def _q(t, name, scale):
    """Format-domain values round_fmt(t * scale) as bf16, from the library reference."""
    return round_to_format(t.float() * scale, get_format(name)).to(torch.bfloat16)


def _check(got, a_q, b_q, inv_a, inv_b, bias):
    """float64 reference on the same quantized operands: normwise rel err <= 1e-6, and elementwise
    within the fp32 accumulation bound (K + 3) * eps * (|A_q| @ |B_q|^T) * inv_a * inv_b."""
    a64, b64 = a_q.double(), b_q.double()
    s = inv_a.double() * inv_b.double()
    ref = (a64 @ b64.T) * s
    bound = (a64.abs() @ b64.abs().T) * s * (a64.shape[1] + 3) * FP32_EPS
    if bias is not None:
        ref = ref + bias.double()
        bound = bound + bias.double().abs() * FP32_EPS
    got = got.double()
    rel = ((got - ref).norm() / ref.norm()).item() if ref.norm() > 0 else (got - ref).norm().item()
    assert rel <= 1e-6, f"normwise relative error {rel:.2e}"
    assert bool(((got - ref).abs() <= bound + 1e-30).all()), "elementwise error above the fp32 bound"


def _problem(M, N, K, g):
    """x (M, K), w (N, K), dy (M, N) with a spread of magnitudes, on DEVICE."""
    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-4, 5, shape, generator=g).float()))
    return rnd(M, K).to(DEVICE), rnd(N, K).to(DEVICE), rnd(M, N).to(DEVICE)


SHAPES = [(37, 53, 29), (1, 1, 1), (5, 70, 100), (64, 32, 33)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_three_layouts_on_prequantized_operands(M, N, K, with_bias, seeded):
    """fwd x_q @ w_q^T, dgrad dy_q @ w_q, wgrad dy_q^T @ x_q: one kernel, operands as strided views."""
    g = torch.Generator().manual_seed(seeded)
    x, w, dy = _problem(M, N, K, g)
    sx, sw, sg = _scale_for(x, "E4M3"), _scale_for(w, "E4M3"), _scale_for(dy, "E5M2")
    xq, wq, gq = _q(x, "E4M3", sx), _q(w, "E4M3", sw), _q(dy, "E5M2", sg)
    ix, iw, ig = (torch.reciprocal(s) for s in (sx, sw, sg))
    layouts = {  # name: (A, B, inv_a, inv_b, bias length)
        "fwd": (xq, wq, ix, iw, N),
        "dgrad": (gq, wq.t(), ig, iw, K),
        "wgrad": (gq.t(), xq.t(), ig, ix, K),
    }
    for name, (a, b, ia, ib, nb) in layouts.items():
        bias = torch.randn(nb, generator=g).to(DEVICE) if with_bias else None
        got = ksm.scaled_matmul(a, b, ia, ib, bias)
        assert got.shape == (a.shape[0], b.shape[0]) and got.dtype == torch.float32, name
        _check(got, a, b, ia, ib, bias)


@pytest.mark.parametrize("quant", ["A", "B", "both"])
@pytest.mark.parametrize("fmt_a,fmt_b,dtype", [
    ("E4M3", "E4M3", torch.float32), ("E5M2", "E4M3", torch.bfloat16), ("E2M5", "E3M4", torch.float16),
    ("E0M7", "E7M0", torch.float32), ("E6M1", "E1M6", torch.bfloat16),
])
def test_in_loop_quantization(quant, fmt_a, fmt_b, dtype, seeded):
    """High-precision operands quantized inside the kernel equal quantizing first (reference rounding),
    then the same float64 check. Layout: wgrad-like strides for A, dgrad-like for B."""
    g = torch.Generator().manual_seed(seeded)
    M, N, K = 37, 53, 29
    a_hp = torch.randn(K, M, generator=g).to(DEVICE, dtype).t()  # (M, K), column-major
    b_hp = torch.randn(K, N, generator=g).to(DEVICE, dtype).t()  # (N, K), column-major
    sa, sb = _scale_for(a_hp.float(), fmt_a), _scale_for(b_hp.float(), fmt_b)
    a_q, b_q = _q(a_hp, fmt_a, sa), _q(b_hp, fmt_b, sb)
    ia, ib = torch.reciprocal(sa), torch.reciprocal(sb)
    bias = torch.randn(N, generator=g).to(DEVICE)
    kw = {}
    if quant in ("A", "both"):
        a_in, kw = a_hp, dict(kw, fmt_a=_fields(fmt_a), scale_a=sa)
    else:
        a_in, kw = a_q, dict(kw, inv_scale_a=ia)
    if quant in ("B", "both"):
        b_in, kw = b_hp, dict(kw, fmt_b=_fields(fmt_b), scale_b=sb)
    else:
        b_in, kw = b_q, dict(kw, inv_scale_b=ib)
    got = ksm.scaled_matmul(a_in, b_in, bias=bias, **kw)  # inv scales default to 1/scale when quantizing
    _check(got, a_q, b_q, ia, ib, bias)


@pytest.mark.parametrize("fmt", ["E4M3", "E5M2", "E2M5"])
def test_in_loop_quantization_saturates(fmt, seeded):
    """A scale that pushes part of each operand past max: the in-loop path saturates like the reference."""
    g = torch.Generator().manual_seed(seeded)
    x, w, _ = _problem(37, 53, 29, g)
    sx, sw = _scale_for(x, fmt) * 8, _scale_for(w, fmt) * 8
    xq, wq = _q(x, fmt, sx), _q(w, fmt, sw)
    assert bool((xq.float().abs() == get_format(fmt).max).any())
    got = ksm.scaled_matmul(x, w, fmt_a=_fields(fmt), scale_a=sx, fmt_b=_fields(fmt), scale_b=sw)
    _check(got, xq, wq, torch.reciprocal(sx), torch.reciprocal(sw), None)


def test_bf16_output_is_rne_of_fp32_output(seeded):
    """bf16 C equals the fp32 C rounded to nearest even (the interpreter's own cast would truncate)."""
    g = torch.Generator().manual_seed(seeded)
    x, w, _ = _problem(37, 53, 29, g)
    bias = torch.randn(53, generator=g).to(DEVICE)
    args = (_q(x, "E4M3", 1.0), _q(w, "E4M3", 1.0), torch.tensor(0.3, device=DEVICE), None, bias)
    c32 = ksm.scaled_matmul(*args)
    c16 = ksm.scaled_matmul(*args, out_dtype=torch.bfloat16)
    assert c16.dtype == torch.bfloat16
    assert torch.equal(c16, c32.to(torch.bfloat16))


def test_empty_and_k0():
    a, b = torch.zeros(0, 8, device=DEVICE), torch.zeros(3, 8, device=DEVICE)
    assert ksm.scaled_matmul(a, b).shape == (0, 3)
    bias = torch.arange(4.0, device=DEVICE)
    c = ksm.scaled_matmul(torch.zeros(2, 0, device=DEVICE), torch.zeros(4, 0, device=DEVICE), bias=bias)
    assert torch.equal(c, bias.expand(2, 4))


def test_reference_agrees_with_direct_float64(seeded):
    """scaled_matmul_ref (cast_ref + float64) equals the test's own float64 computation."""
    g = torch.Generator().manual_seed(seeded)
    x, w, _ = _problem(9, 7, 5, g)
    sx, sw = _scale_for(x, "E3M4"), _scale_for(w, "E4M3")
    ref = ksm.scaled_matmul_ref(x, w, fmt_a=_fields("E3M4"), scale_a=sx, fmt_b=_fields("E4M3"), scale_b=sw)
    want = (_q(x, "E3M4", sx).double() @ _q(w, "E4M3", sw).double().T) * \
        torch.reciprocal(sx).double() * torch.reciprocal(sw).double()
    assert torch.equal(ref, want.float())


@pytest.mark.parametrize("M,N,K", [(37, 53, 29), (64, 32, 33)])
def test_int64_index_path(M, N, K, seeded, monkeypatch):
    """The 64-bit index variant (chosen past 2**31 element offsets) computes the same products:
    forced here on small operands by lowering the threshold."""
    monkeypatch.setattr(ksm, "INT32_LIMIT", 0)
    g = torch.Generator().manual_seed(seeded)
    x, w, dy = _problem(M, N, K, g)
    sx, sw, sg = _scale_for(x, "E4M3"), _scale_for(w, "E4M3"), _scale_for(dy, "E5M2")
    xq, wq, gq = _q(x, "E4M3", sx), _q(w, "E4M3", sw), _q(dy, "E5M2", sg)
    ix, iw, ig = (torch.reciprocal(s) for s in (sx, sw, sg))
    for a, b, ia, ib in ((xq, wq, ix, iw), (gq, wq.t(), ig, iw), (gq.t(), xq.t(), ig, ix)):
        _check(ksm.scaled_matmul(a, b, ia, ib), a, b, ia, ib, None)
    got = ksm.scaled_matmul(x, w, fmt_a=_fields("E4M3"), scale_a=sx, fmt_b=_fields("E4M3"), scale_b=sw)
    _check(got, xq, wq, ix, iw, None)


def test_int64_index_chosen_past_2_31_offsets():
    """The host's offset bound: rows and columns rounded up by a tile, times the strides."""
    assert ksm._max_offset(torch.empty(2**20, 2**10, device="meta")) < 2**31
    big = torch.empty(2**21, 2**10, device="meta")  # 2**31 elements (meta: no storage)
    assert ksm._max_offset(big) >= 2**31
    assert ksm._max_offset(big.t()) >= 2**31


@pytest.mark.parametrize("path", list(ksm.MATMUL_CONFIGS))
def test_pick_config_is_a_function_of_the_shape(path):
    """Deterministic tiles: the largest tile of the path giving >= 128 output tiles, else the
    smallest; always one of the path's (compile-checked) configs."""
    configs = ksm.MATMUL_CONFIGS[path]
    for M, N in [(1, 1), (37, 53), (3072, 1536), (3072, 384), (1536, 384), (4096, 4096), (50304, 3072)]:
        cfg = ksm.pick_config(path, M, N)
        assert cfg in configs and cfg == ksm.pick_config(path, M, N)
        tiles = [-(-M // c.block_m) * -(-N // c.block_n) for c in configs]
        i = configs.index(cfg)
        assert all(t < 128 for t in tiles[:i])
        assert tiles[i] >= 128 or i == len(configs) - 1
    assert ksm.pick_config(path, 1, 1) == configs[-1]


def test_matmul_path_names():
    assert [ksm.matmul_path(q, f) for q in (False, True) for f in (False, True)] == \
        ["bf16", "fp8", "in_loop", "fp8_in_loop"]
    assert ksm.matmul_path(True, False, aligned=False) == "in_loop/unaligned"
    assert all(ksm.matmul_path(q, f, al) in ksm.MATMUL_CONFIGS for q in (0, 1) for f in (0, 1) for al in (0, 1)
               if al or not f)  # FP8 refuses unaligned operands


def test_alignment_decides_the_config_list():
    """Vector loads need 16-byte addresses and strides (and M, N, K) in multiples of 16 elements."""
    t = torch.zeros(64, 48)
    assert ksm.is_aligned(t, t.t())
    assert not ksm.is_aligned(torch.zeros(64, 50))  # row stride 50
    assert not ksm.is_aligned(t[:, 1:])  # address 4 bytes past an aligned one
    with pytest.raises(ValueError, match=r"MATMUL_CONFIGS\['bf16/unaligned'\]"):
        ksm.scaled_matmul(_t(37, 29), _t(53, 29), config=ksm.MATMUL_CONFIGS["bf16"][0])


# -- bad input ------------------------------------------------------------------------------------
def _t(*shape, dtype=torch.float32):
    return torch.ones(*shape, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("call,match", [
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 6)), "same K"),
    (lambda: ksm.scaled_matmul(_t(3, 4, 1), _t(5, 4)), "a must be a 2-D tensor"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), out_dtype=torch.float16), "out_dtype must be"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), bias=_t(4)), r"bias must be a float tensor of shape \(5,\)"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), fmt_a=(4, 3, 7)), "fmt_a must be"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), fmt_b=(4, 3, 7, "xx")), "specials must be one of"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), scale_a=2.0), "scale_a is only used with fmt_a"),
    (lambda: ksm.scaled_matmul(_t(3, 4, dtype=torch.int32), _t(5, 4)), "a must be float32"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), inv_scale_b=_t(2)), "inv_scale_b must be"),
    (lambda: ksm.scaled_matmul(_t(3, 4), _t(5, 4), config=ksm.MatmulConfig(16, 16, 16, 1, 1)),
     "config must be one of MATMUL_CONFIGS"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU / interpreter refusal")
def test_fp8_refused_without_fp8_gpu():
    with pytest.raises(ValueError, match="fp8=True needs"):
        ksm.scaled_matmul(_t(3, 4), _t(5, 4), fmt_a=_fields("E4M3"), fmt_b=_fields("E4M3"), fp8=True)


def test_fp8_rejects_other_formats():
    with pytest.raises(ValueError, match="fp8=True needs a as torch.float8_e4m3fn"):
        ksm.scaled_matmul(_t(3, 4), _t(5, 4), fmt_a=_fields("E3M4"), fmt_b=_fields("E4M3"), fp8=True)


# -- GPU only -------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("M,N,K", [(3072, 1536, 384), (1000, 1000, 1000)])
def test_cuda_large_tiles(M, N, K, seeded):
    """Shapes that pick the paths' large tiles (the small test shapes pick the smallest)."""
    g = torch.Generator().manual_seed(seeded)
    x, w, _ = _problem(M, N, K, g)
    sx, sw = _scale_for(x, "E4M3"), _scale_for(w, "E4M3")
    xq, wq = _q(x, "E4M3", sx), _q(w, "E4M3", sw)
    got = ksm.scaled_matmul(xq, wq, torch.reciprocal(sx), torch.reciprocal(sw))
    _check(got, xq, wq, torch.reciprocal(sx), torch.reciprocal(sw), None)
    fused = ksm.scaled_matmul(x, w, fmt_a=_fields("E4M3"), scale_a=sx, fmt_b=_fields("E4M3"), scale_b=sw)
    _check(fused, xq, wq, torch.reciprocal(sx), torch.reciprocal(sw), None)


@pytest.mark.cuda
def test_cuda_autotune_opt_in_and_deterministic_default(seeded):
    """Default: the fixed tile, so repeated calls are bit-identical; autotune=True times the path's
    configs and returns a result within the fp32 accumulation bound."""
    g = torch.Generator().manual_seed(seeded)
    x, w, _ = _problem(1000, 1000, 1000, g)
    xq, wq = _q(x, "E4M3", 1.0), _q(w, "E4M3", 1.0)
    one = torch.ones((), device=DEVICE)
    first = ksm.scaled_matmul(xq, wq)
    assert torch.equal(first, ksm.scaled_matmul(xq, wq))
    assert torch.equal(first, ksm.scaled_matmul(xq, wq, config=ksm.pick_config("bf16", 1000, 1000)))
    _check(ksm.scaled_matmul(xq, wq, autotune=True), xq, wq, one, one, None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores need sm_89+")
@pytest.mark.parametrize("layout", ["fwd", "dgrad"])
def test_cuda_fp8_tensor_cores(layout, seeded):
    """Real float8 operands: FP8 products are exact, accumulation is promoted to fp32 every 128 K; the
    tensor core's ~14-bit partial sums allow up to ~2**-13 relative error per 128-chunk."""
    g = torch.Generator().manual_seed(seeded)
    M, N, K = 512, 384, 1024
    x, w, dy = _problem(M, N, K, g)
    sx, sw, sg = _scale_for(x, "E4M3"), _scale_for(w, "E4M3"), _scale_for(dy, "E5M2")
    xq, wq, gq = _q(x, "E4M3", sx), _q(w, "E4M3", sw), _q(dy, "E5M2", sg)
    if layout == "fwd":
        a, b, ia, ib = xq, wq, torch.reciprocal(sx), torch.reciprocal(sw)
        got = ksm.scaled_matmul(a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), ia, ib, fp8=True)
        fused = ksm.scaled_matmul(x, w, fmt_a=_fields("E4M3"), scale_a=sx, fmt_b=_fields("E4M3"), scale_b=sw,
                                  fp8=True)  # in-loop quantization, then float8 operands
        assert ((fused.double() - got.double()).norm() / got.double().norm()).item() <= 1e-3
    else:
        a, b, ia, ib = gq, wq.t(), torch.reciprocal(sg), torch.reciprocal(sw)
        got = ksm.scaled_matmul(a.to(torch.float8_e5m2), b.to(torch.float8_e4m3fn), ia, ib, fp8=True)
    ref = (a.double() @ b.double().T) * ia.double() * ib.double()
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-3, f"fp8 normwise relative error {rel:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 tensor cores need sm_89+")
def test_cuda_fp8_refuses_unaligned_operands():
    a, b = _t(37, 64).to(torch.float8_e4m3fn), _t(64, 64).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="fp8=True needs M, N, K that are multiples of 16"):
        ksm.scaled_matmul(a, b, fp8=True)
