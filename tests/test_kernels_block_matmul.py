"""kernels/block_scaled_matmul.py against a float64 product of the same quantized operands and against
the torch `blockwise_matmul`: the three Linear layouts (dgrad / wgrad operands as strided views), odd
M, N, K (K not a multiple of the block), equal and different block sizes, row-wise and per-tensor
scales, fp32 and E8M0 scales, bias, bf16 output, and bad input. In the interpreter (no GPU) operands
are fp32: its bf16 dot is broken."""

import pytest
import torch

from altgrad.blockwise import expand_scales, quantize_blockwise_cast
from altgrad.formats import get_format
from altgrad.kernels import block_scaled_matmul as kbm
from altgrad.linear_blockwise import Operand, blockwise_matmul
from altgrad.quantize import round_to_format

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_EPS = 2.0**-24


def _data(rows, k, g):
    """Values spread over many binades along K (so block scales differ within a row)."""
    t = torch.randn(rows, k, generator=g) * torch.exp2(torch.randint(-12, 13, (rows, k), generator=g).float())
    return t.to(DEVICE)


def _cast(t, kind, fmt="E4M3"):
    """(q, inv_scale, block) of t (rows, K) cast along K. kind: "e8m0/<bs>", "fp32/<bs>" (bs a block
    size or "row"), or "tensor" (one fp32 scale)."""
    f = get_format(fmt)
    if kind == "tensor":
        scale = torch.tensor(f.max * 0.9, device=t.device) / t.abs().max()
        return round_to_format(t * scale, f), torch.reciprocal(scale), None
    scale_format, bs = kind.split("/")
    bs = None if bs == "row" else int(bs)
    c = quantize_blockwise_cast(t, f, bs, scale_format=scale_format, backend="torch")
    return c.q, c.inv_scale, bs


def _dequant64(q, inv, bs):
    q = q.double()
    if inv.dim() == 0:
        return q * inv.double()
    return q * expand_scales(inv, q.shape, -1, bs).double()


def _check(got, qa, ia, ba, qb, ib, bb, bias=None):
    """Within the fp32 accumulation bound of a float64 product of the dequantized operands:
    each step's dot (<= K terms), two scale products and the sum over steps: (K + 3) eps |A||B|."""
    a64, b64 = _dequant64(qa, ia, ba), _dequant64(qb, ib, bb)
    ref = a64 @ b64.T
    bound = (a64.abs() @ b64.abs().T) * (a64.shape[1] + 3) * FP32_EPS
    if bias is not None:
        ref, bound = ref + bias.double(), bound + bias.double().abs() * FP32_EPS
    err = (got.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound.clamp(min=1e-300)).max().item():.2f}"
    assert (got.double() - ref).norm() <= 1e-6 * ref.norm()


def _layout(layout, M, N, K, g):
    """A (M, K), B (N, K) as the GEMM sees them: forward x, W; dgrad dy, W^T (a view); wgrad dy^T, x^T
    (views). The cast is along K of each, as the layer casts each GEMM's operands."""
    a, b = _data(M, K, g), _data(N, K, g)
    if layout == "dgrad":
        b = b.t().contiguous().t()
    elif layout == "wgrad":
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    return a, b


SCALES = [("e8m0/32", "e8m0/32"), ("fp32/16", "fp32/16"), ("e8m0/16", "fp32/128"), ("fp32/64", "e8m0/32"),
          ("fp32/row", "fp32/32"), ("e8m0/row", "fp32/row"), ("tensor", "e8m0/16"), ("fp32/128", "tensor")]


@pytest.mark.parametrize("scales", SCALES, ids=["x".join(s) for s in SCALES])
@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
def test_three_layouts_against_float64_and_the_torch_product(layout, scales, seeded):
    g = torch.Generator().manual_seed(seeded)
    M, N, K = 37, 29, 150  # K = 150: a short last block for every block size
    a, b = _layout(layout, M, N, K, g)
    (qa, ia, ba), (qb, ib, bb) = _cast(a, scales[0]), _cast(b, scales[1])
    qa, qb = _as_layout(qa, a), _as_layout(qb, b)
    got = kbm.block_scaled_matmul(qa, qb, ia, ib, block_a=ba, block_b=bb)
    assert got.shape == (M, N) and got.dtype == torch.float32
    _check(got, qa, ia, ba, qb, ib, bb)
    # the torch product of the same operands agrees within the same bound (it is the reference)
    ref = blockwise_matmul(Operand(qa, ia, ba or K), Operand(qb, ib, bb or K), scales[0].startswith("e8m0"),
                           scales[1].startswith("e8m0"), backend="torch")
    _check(ref, qa, ia, ba, qb, ib, bb)


def _as_layout(q, like):
    """q with like's strides (the cast returns contiguous values; the GEMMs read views)."""
    if like.stride(0) == 1 and like.shape[1] > 1:
        return q.t().contiguous().t()
    return q


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 70, 17), (64, 33, 100), (3, 4, 257)])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 128), (128, 16), (64, 64)])
def test_odd_shapes_and_block_sizes(M, N, K, blocks, seeded):
    g = torch.Generator().manual_seed(seeded)
    a, b = _data(M, K, g), _data(N, K, g)
    (qa, ia, _), (qb, ib, _) = _cast(a, f"fp32/{blocks[0]}"), _cast(b, f"fp32/{blocks[1]}")
    got = kbm.block_scaled_matmul(qa, qb, ia, ib, block_a=blocks[0], block_b=blocks[1])
    _check(got, qa, ia, blocks[0], qb, ib, blocks[1])


def test_e8m0_scales_on_exact_sums_are_exact(seeded):
    """Integer operands and power-of-two scales: every product and partial sum is an fp32 number,
    so the kernel must equal float64 bit for bit (a per-block scale applied to the wrong block, or
    to the wrong operand, shows up as a difference)."""
    g = torch.Generator().manual_seed(seeded)
    M, N, K = 19, 23, 200
    # |q| <= 8, scales 2**-2 .. 2**2: terms are multiples of 2**-4 below 2**10, sums below 2**18,
    # so every partial sum needs at most 22 significant bits
    qa = torch.randint(-8, 9, (M, K), generator=g).float().to(DEVICE)
    qb = torch.randint(-8, 9, (N, K), generator=g).float().to(DEVICE)
    ia = torch.exp2(torch.randint(-2, 3, (M, -(-K // 16)), generator=g).float()).to(DEVICE)
    ib = torch.exp2(torch.randint(-2, 3, (N, -(-K // 64)), generator=g).float()).to(DEVICE)
    got = kbm.block_scaled_matmul(qa, qb.t().contiguous().t(), ia, ib, block_a=16, block_b=64)
    ref = _dequant64(qa, ia, 16) @ _dequant64(qb, ib, 64).T
    assert torch.equal(got.double(), ref)
    # the same through blockwise_matmul's kernel path, which must not fold or reorder the scales
    op = blockwise_matmul(Operand(qa, ia, 16), Operand(qb, ib, 64), True, True, backend="triton")
    assert torch.equal(op.double(), ref)


@pytest.mark.parametrize("scales", [("fp32/32", "e8m0/16"), ("fp32/row", "tensor")])
def test_bias_and_bf16_output(scales, seeded):
    g = torch.Generator().manual_seed(seeded)
    M, N, K = 21, 45, 96
    a, b = _data(M, K, g), _data(N, K, g)
    (qa, ia, ba), (qb, ib, bb) = _cast(a, scales[0]), _cast(b, scales[1])
    bias = (torch.randn(N, generator=g) * 1e3).to(DEVICE)
    got = kbm.block_scaled_matmul(qa, qb, ia, ib, bias, block_a=ba, block_b=bb)
    _check(got, qa, ia, ba, qb, ib, bb, bias)
    # bf16 output: the same fp32 result rounded to nearest even
    got16 = kbm.block_scaled_matmul(qa, qb, ia, ib, bias, block_a=ba, block_b=bb, out_dtype=torch.bfloat16)
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, got.to(torch.bfloat16))


def test_bf16_operands_give_the_fp32_operands_result(seeded):
    """Format values are exact in bf16, and the kernel feeds both dtypes to the same dot: bf16
    operands (as QuantizedLinear's per-tensor casts give them) must change nothing, bit for bit."""
    g = torch.Generator().manual_seed(seeded)
    a, b = _layout("wgrad", 33, 18, 90, g)
    (qa, ia, ba), (qb, ib, bb) = _cast(a, "fp32/16"), _cast(b, "e8m0/64")
    got = kbm.block_scaled_matmul(qa, qb, ia, ib, block_a=ba, block_b=bb)
    got16 = kbm.block_scaled_matmul(qa.to(torch.bfloat16), qb.to(torch.bfloat16).t().contiguous().t(), ia, ib,
                                    block_a=ba, block_b=bb)
    assert torch.equal(got16, got)


def test_unscaled_operand_and_empty_shapes(seeded):
    g = torch.Generator().manual_seed(seeded)
    qa, ia, _ = _cast(_data(9, 40, g), "e8m0/16")
    qb = round_to_format(_data(7, 40, g), get_format("E4M3"))  # no scale (inverse scale 1)
    got = kbm.block_scaled_matmul(qa, qb, ia, None, block_a=16)
    _check(got, qa, ia, 16, qb, torch.ones((), device=DEVICE), None)
    bias = torch.randn(7, generator=g).to(DEVICE)
    empty_k = kbm.block_scaled_matmul(qa[:, :0], qb[:, :0], ia[:, :0], None, bias, block_a=16)
    assert torch.equal(empty_k, bias.expand(9, 7))
    assert kbm.block_scaled_matmul(qa[:0], qb, ia[:0], None, block_a=16).shape == (0, 7)


def test_pick_config_is_a_function_of_the_shape_and_alignment():
    for step in kbm.BLOCK_SCALED_CONFIGS:
        big, small = kbm.pick_config(step, 4096, 4096), kbm.pick_config(step, 64, 64)
        assert big == kbm.BLOCK_SCALED_CONFIGS[step][0] and small == kbm.BLOCK_SCALED_CONFIGS[step][-1]
        assert kbm.pick_config(step, 4096, 4096, aligned=False) == small  # unaligned: the smallest tile only
    assert kbm.k_step(128, 16) == 16 and kbm.k_step(128, None) == 32 and kbm.k_step(None, None) == 32


def _bad_cases():
    a, b = torch.zeros(4, 64), torch.zeros(5, 64)
    ia, ib = torch.ones(4, 2), torch.ones(5, 2)
    ok = dict(a=a, b=b, inv_scale_a=ia, inv_scale_b=ib, block_a=32, block_b=32)
    return {
        "a must be a 2-D tensor": ok | dict(a=torch.zeros(64)),
        "with the same K": ok | dict(b=torch.zeros(5, 63)),
        "a must be float32 or bfloat16": ok | dict(a=a.half()),
        r"block_a must be one of \(16, 32, 64, 128\)": ok | dict(block_a=24, inv_scale_a=torch.ones(4, 3)),
        "block_b must be None or a positive int": ok | dict(block_b=0),
        r"inv_scale_a must be \(4, 2\)": ok | dict(inv_scale_a=torch.ones(4, 3)),
        r"inv_scale_b must be \(5, 4\)": ok | dict(block_b=16),
        "inv_scale_b must be a float32 tensor": ok | dict(inv_scale_b=ib.double()),
        "inv_scale_a must be one value per tensor": ok | dict(inv_scale_a=torch.ones(4), block_a=None),
        "block_a must be None with a per-tensor": ok | dict(inv_scale_a=torch.ones(())),
        "block_a = 32 needs inv_scale_a": ok | dict(inv_scale_a=None),
        "bias must be a float32 / bfloat16 tensor of shape": ok | dict(bias=torch.zeros(4)),
        "out_dtype must be": ok | dict(out_dtype=torch.float16),
        "config must be one of": ok | dict(config=kbm.MatmulConfig(7, 7, 7, 1, 1)),
    }


@pytest.mark.parametrize("match", list(_bad_cases()))
def test_bad_input_is_refused_with_one_line(match):
    kw = _bad_cases()[match]
    kw = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=match) as err:
        kbm.block_scaled_matmul(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors are valid under the interpreter only")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr("altgrad.kernels.quantize._INTERPRET", False)
    with pytest.raises(ValueError, match="the Triton kernels need a CUDA tensor"):
        kbm.block_scaled_matmul(torch.zeros(2, 16), torch.zeros(3, 16))


# -- blockwise_matmul's choice of product --------------------------------------------------------
def test_blockwise_matmul_backends(seeded):
    g = torch.Generator().manual_seed(seeded)
    qa, ia, _ = _cast(_data(11, 70, g), "fp32/32")
    qb, ib, _ = _cast(_data(13, 70, g), "e8m0/16")
    a, b = Operand(qa, ia, 32), Operand(qb, ib, 16)
    kernel = blockwise_matmul(a, b, False, True, backend="triton")
    assert torch.equal(kernel, kbm.block_scaled_matmul(qa, qb, ia, ib, block_a=32, block_b=16))
    _check(kernel, qa, ia, 32, qb, ib, 16)
    auto = blockwise_matmul(a, b, False, True)  # "auto": the kernel on CUDA, torch elsewhere
    assert torch.equal(auto, kernel if DEVICE == "cuda" else blockwise_matmul(a, b, False, True, backend="torch"))
    with pytest.raises(ValueError, match="backend must be one of"):
        blockwise_matmul(a, b, backend="cuda")
    # a high-precision operand (no inverse scale) is not format-domain values: the kernel refuses it
    with pytest.raises(ValueError, match="backend='triton' multiplies format-domain operands"):
        blockwise_matmul(Operand(qa, None, 70), b, False, True, backend="triton")
    hp = blockwise_matmul(Operand(qa, None, 70), b, False, True)  # auto: torch
    _check(hp, qa, torch.ones((), device=DEVICE), None, qb, ib, 16)


@pytest.mark.parametrize("fmt,scale_format,backend,want", [
    ("E4M3", "e8m0", "auto", "auto"), ("E4M3", "fp32", "triton", "auto"), ("E7M0", "fp32", "auto", "auto"),
    ("E7M0", "e8m0", "auto", "torch"), ("E7M0_NONE", "e8m0", "triton", "torch"), ("E4M3", "e8m0", "fast", "torch"),
    ("E4M3", "e8m0", "torch", "torch")])
def test_layer_product_choice(fmt, scale_format, backend, want):
    """The layer sends a GEMM to the kernel only where its backend allows; e8m0 operands of E7M0-range
    formats keep the torch product: the kernel sums unscaled values, and their products overflow fp32
    (shown below) where the torch product, which dequantizes e8m0 operands first, stays finite."""
    from altgrad.config import QuantizationConfig
    from altgrad.linear import QuantizedLinear
    from altgrad.linear_blockwise import _mm_backend

    cfg = QuantizationConfig(default_format=fmt, grad_output_format="E5M2", scaling="current", granularity="block",
                             block_size=32, scale_format=scale_format).layer_config("fc")
    m = QuantizedLinear(torch.nn.Linear(64, 8), cfg, backend=backend)
    assert _mm_backend(m, "input", "weight") == want
    assert _mm_backend(m, "grad_output", "input") == want


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy says so
def test_e7m0_e8m0_operands_overflow_the_kernel_but_not_the_torch_product():
    """Why the layer keeps E7M0 e8m0 GEMMs in torch: values at the top of E7M0 (2**62), products 2**124,
    32 of them sum past fp32's 2**128."""
    q = torch.full((2, 64), 2.0**62, device=DEVICE)
    inv = torch.full((2, 2), 2.0**-62, device=DEVICE)
    got = kbm.block_scaled_matmul(q, q, inv, inv, block_a=32, block_b=32)
    assert torch.isinf(got).all()
    ref = blockwise_matmul(Operand(q, inv, 32), Operand(q, inv, 32), True, True, backend="torch")
    assert torch.equal(ref, torch.full((2, 2), 64.0, device=DEVICE))


@pytest.mark.cuda
def test_layer_on_cuda_runs_the_kernel_and_matches_the_torch_product(seeded):
    """QuantizedLinear with block-scaled roles on the GPU (the kernel) against the same layer on
    backend "torch" (the torch product): outputs and gradients within fp32 accumulation error."""
    from altgrad.config import QuantizationConfig
    from altgrad.linear import QuantizedLinear

    cfg = QuantizationConfig(default_format="E4M3", grad_output_format="E5M2", scaling="current",
                             granularity="block", block_size=32, scale_format="fp32").layer_config("fc")
    lin = torch.nn.Linear(96, 80).cuda()
    x0 = torch.randn(64, 96, device="cuda") * torch.exp2(torch.randint(-6, 7, (64, 96), device="cuda").float())
    out = {}
    for backend in ("torch", "auto"):
        m = QuantizedLinear(lin, cfg, backend=backend)
        x = x0.clone().requires_grad_()
        y = m(x)
        y.backward(torch.ones_like(y))
        out[backend] = (y.detach(), x.grad, m.weight.grad.clone())
        lin.weight.grad = None
    for t, r in zip(out["auto"], out["torch"]):
        assert (t - r).norm() <= 1e-5 * r.norm()
