"""QuantizedLinear (DESIGN §5): analytic gradients, SQNR bounds from mantissa bits, passthrough roles,
weight cache, stats, state, errors; torch and Triton (interpreter) paths agree."""

import math

import pytest
import torch
from torch import nn

from altgrad.config import LayerQuantConfig, RoleConfig
from altgrad.formats import get_format
from altgrad.linear import QuantizedLinear, round_master_weights
from altgrad.quantize import round_to_format


def layer_cfg(i="E4M3", w="E4M3", g="E5M2", scaling="current", **kw):
    mk = lambda f: None if f is None else RoleConfig(f, scaling=scaling)  # noqa: E731
    return LayerQuantConfig(mk(i), mk(w), mk(g), **kw)


def make(in_f=37, out_f=29, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    return lin, QuantizedLinear(lin, layer_cfg(**kw), name="fc", backend=kw.pop("backend", "torch"))


def fq(x, fmt):
    """Fake-quantize with current scaling, the reference way: (format-domain q, inv_scale)."""
    fmt = get_format(fmt)
    scale = (torch.tensor(fmt.max) / x.abs().amax().float()).float()
    return round_to_format(x.float() * scale, fmt), torch.reciprocal(scale)


def test_forward_and_grads_equal_design_formulas():
    lin, ql = make()
    x = torch.randn(3, 5, 37, requires_grad=True)
    y = ql(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    qi, ii = fq(x.detach().reshape(-1, 37), "E4M3")
    qw, iw = fq(lin.weight.detach(), "E4M3")
    qg, ig = fq(dy.reshape(-1, 29), "E5M2")
    y_ref = (qi @ qw.t()) * ii * iw + lin.bias.detach()
    torch.testing.assert_close(y.detach().reshape(-1, 29), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.reshape(-1, 37), (qg @ qw) * ig * iw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.weight.grad, (qg.t() @ qi) * ig * ii, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lin.bias.grad, dy.reshape(-1, 29).sum(0), rtol=1e-6, atol=1e-6)


def sqnr_db(ref, got):
    ref, got = ref.detach().double(), got.detach().double()
    return 10 * math.log10(ref.pow(2).sum() / (got - ref).pow(2).sum())


def operand_noise(fmt, x):
    """Relative noise power of rounding x (current scaling) to fmt: each element's error is uniform
    on +-ulp/2 at its scaled value, so noise = E[ulp(v)**2 / 12] / E[v**2] with v = x·scale. In a
    binade this is the familiar 4**-M / 12 (SQNR 10.8 + 6.02·M dB); the format's ulp() also covers
    subnormals and fixed point (E0M7), where the quantum is absolute."""
    fmt = get_format(fmt)
    v = x.double() * (fmt.max / x.abs().max().item())
    return (fmt.ulp(v.float()).double().pow(2) / 12).mean().item() / v.pow(2).mean().item()


def expected_sqnr_db(fmt, a, b):
    """A product of two quantized operands carries both noises (their relative powers add)."""
    return -10 * math.log10(operand_noise(fmt, a) + operand_noise(fmt, b))


@pytest.mark.parametrize("fmt", ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0", "E0M7"])
def test_output_and_grad_sqnr_above_mantissa_bound(fmt):
    torch.manual_seed(1)
    lin = nn.Linear(256, 128)
    ql = QuantizedLinear(lin, layer_cfg(fmt, fmt, fmt), backend="torch")
    x = torch.randn(64, 256, requires_grad=True)
    y = ql(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ lin.weight.detach().t() + lin.bias.detach()
    y_ref.backward(dy)
    # 3 dB margin: the bound is an expectation over elements, and errors are not exactly uniform
    w = lin.weight.detach()
    assert sqnr_db(y_ref - lin.bias.detach(), y.detach() - lin.bias.detach()) > expected_sqnr_db(fmt, x, w) - 3
    assert sqnr_db(x_ref.grad, x.grad) > expected_sqnr_db(fmt, dy, w) - 3


def test_none_roles_are_exact_passthrough():
    torch.manual_seed(2)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    ql = QuantizedLinear(lin, layer_cfg(None, None, None))
    y = ql(x)
    assert torch.equal(y, lin(x))
    # only the weight quantized: input and grad_output stay exact
    ql = QuantizedLinear(lin, layer_cfg(None, "E4M3", None), backend="torch")
    qw, iw = fq(lin.weight.detach(), "E4M3")
    y = ql(x)
    torch.testing.assert_close(y, (x.detach() @ qw.t()) * iw + lin.bias.detach(), rtol=1e-6, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.testing.assert_close(lin.weight.grad, dy.t() @ x.detach(), rtol=1e-6, atol=1e-6)


def test_weight_cache_invalidates_after_optimizer_step():
    lin, ql = make(scaling="delayed")
    opt = torch.optim.SGD(ql.parameters(), lr=0.1)
    x = torch.randn(8, 37)
    ql(x).sum().backward()
    q1 = ql._weight_cache[1]
    ql(x).sum().backward()  # a second micro-batch: same weights, cached
    assert ql._weight_cache[1] is q1
    assert ql.scalers["weight"].amax_history.count.item() == 1
    opt.step()
    ql(x)
    assert ql._weight_cache[1] is not q1 and ql.scalers["weight"].amax_history.count.item() == 2


def test_eval_calls_do_not_touch_delayed_history():
    _, ql = make(scaling="delayed")
    x = torch.randn(8, 37)
    ql(x)
    ql.eval()
    with torch.no_grad():
        ql(x * 100)
    assert ql.scalers["input"].amax_history.count.item() == 1


def test_stats_count_events_on_device():
    lin = nn.Linear(4, 3)
    ql = QuantizedLinear(lin, LayerQuantConfig(RoleConfig("E4M3", scaling="none"), None, None), backend="torch")
    x = torch.tensor([[1.0, 1000.0, 2.0**-12, 0.0], [math.nan, 3.0, -1e-9, 5.0]])
    ql(x)
    st = ql.stats["input"]
    assert [int(st[k]) for k in ("overflow", "underflow", "nan", "nonzero", "numel")] == [1, 2, 1, 6, 8]
    assert st["amax"].item() == 1000.0 and st["scale"].item() == 1.0
    assert set(ql.stats) == {"input"}


def test_rel_err_matches_definition():
    _, ql = make()
    x = torch.randn(10, 37)
    ql(x)
    qi, ii = fq(x, "E4M3")
    want = torch.linalg.vector_norm(qi * ii - x) / torch.linalg.vector_norm(x)
    torch.testing.assert_close(ql.stats["input"]["rel_err"], want)


def test_weight_grad_quantized_before_optimizer():
    lin, ql = make(weight_grad=RoleConfig("E5M2", scaling="current"))
    x = torch.randn(6, 37)
    y = ql(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    qi, ii = fq(x, "E4M3")
    qg, ig = fq(dy, "E5M2")
    dw = (qg.t() @ qi) * ig * ii
    qdw, idw = fq(dw, "E5M2")
    torch.testing.assert_close(lin.weight.grad, qdw * idw, rtol=1e-6, atol=0)


def test_master_weights_lie_on_the_format_grid():
    lin, ql = make(master_weights="E3M4")
    before = lin.weight.detach().clone()
    round_master_weights(ql)
    w = lin.weight.detach()
    scale = ql.master_scaler.scale  # fmt.max / amax(w), rounded down to a power of two
    assert not torch.equal(before, w) and math.log2(scale.item()).is_integer()
    assert torch.equal(round_to_format(w * scale, "E3M4") * torch.reciprocal(scale), w)


def test_parameters_state_dict_and_repr():
    lin, ql = make(bias=False)
    assert ql.weight is lin.weight and ql.linear is lin and ql.bias is None
    assert [n for n, _ in ql.named_parameters()] == ["weight"]
    keys = set(ql.state_dict())
    assert "weight" in keys and "scalers.input.scale" in keys
    assert repr(ql).startswith("QuantizedLinear(\n  in=37, out=29, i:E4M3 w:E4M3 go:E5M2\n")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_keeps_dtype(dtype):
    _, ql = make()
    x = torch.randn(4, 37).to(dtype).requires_grad_()
    y = ql(x)
    y.sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype


def test_bad_input_errors():
    _, ql = make()
    with pytest.raises(ValueError, match="input has 36 features, expected in_features=37"):
        ql(torch.randn(2, 36))
    with pytest.raises(ValueError, match="input must be a float tensor"):
        ql(torch.ones(2, 37, dtype=torch.int64))
    with pytest.raises(TypeError, match="wraps an nn.Linear"):
        QuantizedLinear(nn.Conv1d(2, 2, 1), layer_cfg())
    with pytest.raises(ValueError, match="backend must be one of"):
        QuantizedLinear(nn.Linear(2, 2), layer_cfg(), backend="cuda")
    ql = QuantizedLinear(nn.Linear(4, 4), layer_cfg(None, "E4M3", "E5M2"), backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs a format for every operand role"):
        ql(torch.randn(2, 4))


# -- the Triton path (interpreter on CPU; the same tests run on a GPU when one is present) ------
# with a GPU, tests/conftest.py leaves TRITON_INTERPRET unset and the kernels take CUDA tensors only
INTERPRETER_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only (CUDA present)")
DEVICES = [pytest.param("cpu", id="interpreter", marks=INTERPRETER_ONLY),
           pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def twin(device, fmt_i="E4M3", fmt_w="E4M3", fmt_g="E5M2", in_f=45, out_f=19, **kw):
    torch.manual_seed(4)
    base = nn.Linear(in_f, out_f).to(device)
    lins = [nn.Linear(in_f, out_f).to(device) for _ in range(2)]
    for lin in lins:
        lin.load_state_dict(base.state_dict())
    cfg = layer_cfg(fmt_i, fmt_w, fmt_g, scaling="delayed", **kw)
    return lins, [QuantizedLinear(lins[0], cfg, backend="torch"), QuantizedLinear(lins[1], cfg, backend="triton")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmts", [("E4M3", "E4M3", "E5M2"), ("E2M5", "E7M0", "E3M4"), ("E0M7", "E6M1", "E1M6")])
def test_triton_path_matches_torch_path(device, fmts):
    lins, (ref, tri) = twin(device, *fmts)
    opts = [torch.optim.SGD(lin.parameters(), lr=0.05) for lin in lins]
    for step in range(3):  # several steps: delayed scaling histories must evolve identically
        x = (torch.randn(3, 7, 45, device=device) * (step + 1)).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_ref, y_tri = ref(x), tri(x2)
        dy = torch.randn_like(y_ref)
        y_ref.backward(dy), y_tri.backward(dy)
        for role in ("input", "weight", "grad_output"):
            for k in ("amax", "scale", "overflow", "underflow", "nan", "nonzero"):
                assert torch.equal(ref.stats[role][k], tri.stats[role][k]), (step, role, k)
        # quantized operands are bit-equal, so outputs differ only by fp32 accumulation order
        assert torch.equal(ref._weight_cache[1], tri._weight_cache[1])
        torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lins[1].weight.grad, lins[0].weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lins[1].bias.grad, lins[0].bias.grad, rtol=1e-5, atol=1e-5)
        for opt in opts:
            opt.step(), opt.zero_grad()


@pytest.mark.parametrize("device", DEVICES)
def test_eval_in_loop_quantization_matches_cast_path(device):
    _, (ref, tri) = twin(device)
    x = torch.randn(5, 45, device=device)
    ref(x), tri(x)  # one training call fills the delayed histories identically
    ref.eval(), tri.eval()
    with torch.no_grad():
        y_ref, y_tri = ref(x * 1.5), tri(x * 1.5)
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", [("torch", "cpu"), pytest.param("triton", "cpu", marks=INTERPRETER_ONLY),
                                            pytest.param("triton", "cuda", marks=pytest.mark.cuda)])
def test_e7m0_full_range_does_not_overflow_fp32_accumulation(backend, device):
    """E7M0 scales operands up to 2**62; 384 same-sign products near 2**123 overflow an fp32 sum
    (positive activations such as GELU outputs do this). The exact power-of-two carry keeps the
    result finite and equal to the float64 product."""
    torch.manual_seed(5)
    lin = nn.Linear(384, 24, bias=False).to(device)
    with torch.no_grad():
        lin.weight.uniform_(0.5, 1.0)
    ql = QuantizedLinear(lin, layer_cfg("E7M0", "E7M0", "E7M0"), backend=backend)
    x = (torch.rand(16, 384, device=device) + 0.5).requires_grad_()
    y = ql(x)
    y.backward(torch.randn_like(y))
    qi, ii = fq(x.detach(), "E7M0")
    qw, iw = fq(lin.weight.detach(), "E7M0")
    assert qi.abs().max().item() == 2.0**62  # the data really reaches the top of the format
    want = (qi.double() @ qw.double().t()) * ii.double() * iw.double()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(lin.weight.grad).all()
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6)
    assert ql.stats["input"]["scale"].item() == (torch.tensor(2.0**62) / x.abs().max()).item()


@pytest.mark.parametrize("scaling", ["delayed", "current"])
def test_evaluation_calls_leave_no_trace_in_training(scaling):
    """Same training with and without eval forwards in between: bit-identical weights, scaling
    state and per-call scales (the weight cache and scale buffers must not carry eval-mode results
    into training)."""
    runs = []
    for with_eval in (False, True):
        lin, ql = make(scaling=scaling, seed=9)
        opt = torch.optim.SGD(ql.parameters(), lr=0.1)
        g = torch.Generator().manual_seed(1)
        used = []
        for step in range(3):
            if with_eval:
                ql.eval()
                with torch.no_grad():
                    ql(torch.randn(4, 37, generator=g) * 50)
                ql.train()
            # an all-zero batch right after the eval hits the keep-the-previous-scale rule
            for x in (torch.zeros(2, 37), torch.randn(8, 37, generator=torch.Generator().manual_seed(step))):
                ql(x).sum().backward()
                used.append(ql.stats["input"]["scale"].item())
            opt.step(), opt.zero_grad()
        runs.append((lin.weight.detach().clone(), ql.state_dict(), used))
    (w0, s0, u0), (w1, s1, u1) = runs
    assert u0 == u1
    assert torch.equal(w0, w1)
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)


def test_autocast_does_not_reach_the_simulated_products():
    """Under autocast the output has the autocast dtype, but the products stay exact fp32 work."""
    lin, ql = make(in_f=64, out_f=48)
    x = torch.randn(32, 64)
    want = ql(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ql(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, want.to(torch.bfloat16))
