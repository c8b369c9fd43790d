"""QuantizedLinear with row / block scales: output and gradients equal the analytic formulas
(each GEMM quantizing along its own K), blockwise_matmul against float64, operand SQNR bounds,
and block scaling against tensor scaling on an outlier."""

import math

import pytest
import torch

from altgrad.blockwise import emax_elem, quantize_blockwise
from altgrad.config import QuantizationConfig
from altgrad.formats import get_format
from altgrad.linear import QuantizedLinear
from altgrad.linear_blockwise import Operand, blockwise_matmul


def layer(in_f, out_f, bias=True, **cfg):
    base = dict(default_format="E2M5", grad_output_format="E5M2", scaling="current")
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    m = QuantizedLinear(lin, QuantizationConfig(**(base | cfg)).layer_config("fc"), backend="torch")
    m.stats_level = "full"
    return m, lin


def fq(t, rc, axis, block_2d=False):
    """Fake-quantized t (float64) for a role config, scaled along `axis`."""
    if rc.granularity == "tensor":
        from altgrad.quantize import quantize

        amax = t.abs().max()
        return quantize(t, rc.format, rc.format.max / amax, backend="torch").double()
    bs = rc.block_size if rc.granularity == "block" else None
    return quantize_blockwise(t, rc.format, bs, axis=axis, scale_format=rc.scale_format,
                              scale_rounding=rc.scale_rounding, block_2d=block_2d, backend="torch").double()


CASES = {
    "block-e8m0": dict(granularity="block"),
    "row-e8m0": dict(granularity="row"),
    "block16-fp32": dict(granularity="block", block_size=16, scale_format="fp32"),
    "row-fp32-ceil": dict(granularity="row", scale_format="fp32", scale_rounding="ceil"),
    "mixed": dict(granularity={"input": "block", "weight": "block", "grad_output": "row"},
                  block_size={"input": 16, "weight": 64}, block_2d={"weight": True}),
    "go-tensor": dict(granularity={"input": "block", "weight": "row", "grad_output": "tensor"},
                      scale_format={"weight": "fp32"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_output_and_grads_match_the_analytic_formulas(case, seeded):
    m, lin = layer(72, 40, **CASES[case])
    x = (torch.randn(3, 23, 72) * torch.exp2(torch.randint(-6, 6, (3, 23, 1)).float())).requires_grad_()
    dy = torch.randn(3, 23, 40) * torch.exp2(torch.randint(-6, 6, (1, 1, 40)).float())
    y = m(x)
    y.backward(dy)
    rc = m.role_configs
    x2, dy2, w = x.detach().reshape(-1, 72), dy.reshape(-1, 40), lin.weight.detach()
    w2d = rc["weight"].block_2d
    y_ref = fq(x2, rc["input"], 1) @ fq(w, rc["weight"], 1, w2d).T + lin.bias.double()
    dx_ref = fq(dy2, rc["grad_output"], 1) @ fq(w, rc["weight"], 0, w2d)
    dw_ref = fq(dy2, rc["grad_output"], 0).T @ fq(x2, rc["input"], 0)
    for got, ref in ((y.reshape(-1, 40), y_ref), (x.grad.reshape(-1, 72), dx_ref), (lin.weight.grad, dw_ref)):
        # fp32 accumulation of exact products (fp32 scales: per-block partial sums) vs float64
        tol = 1e-5 * (ref.abs().max() + 1e-30)
        assert (got.double() - ref).abs().max() <= tol, (case, float((got.double() - ref).abs().max()), float(tol))
    assert torch.allclose(lin.bias.grad, dy2.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_fast_backend_equals_the_reference_through_the_layer(case, seeded):
    """Two training steps of the same layer on backend "torch" and "fast": outputs, gradients, every
    stats buffer and every per-use stat agree bit for bit (odd token counts: short last blocks)."""
    layers = {}
    for backend in ("torch", "fast"):
        torch.manual_seed(3)
        m, lin = layer(72, 40, **CASES[case])
        m.backend = backend
        layers[backend] = m
    g = torch.Generator().manual_seed(4)
    for step in range(2):
        x = torch.randn(3, 23, 72, generator=g) * torch.exp2(torch.randint(-6, 6, (3, 23, 1), generator=g).float())
        x[0, step, 5] = 1e4  # an outlier
        dy = torch.randn(3, 23, 40, generator=g)
        out = {}
        for backend, m in layers.items():
            xb = x.clone().requires_grad_()
            y = m(xb)
            y.backward(dy)
            out[backend] = (y, xb.grad, m.weight.grad.clone(), m.bias.grad.clone())
            m.weight.grad = m.bias.grad = None
        for a, b in zip(out["torch"], out["fast"]):
            assert torch.equal(a, b)
        ref, fast = layers["torch"], layers["fast"]
        for r in ref.role_configs:
            assert torch.equal(getattr(ref, f"_stats_{r}").nan_to_num(-1.0), getattr(fast, f"_stats_{r}").nan_to_num(-1.0)), r
        assert ref.blockwise_stats.keys() == fast.blockwise_stats.keys()
        for use, fields in ref.blockwise_stats.items():
            for f, v in fields.items():
                assert torch.equal(v.nan_to_num(-1.0), fast.blockwise_stats[use][f].nan_to_num(-1.0)), (use, f)


@pytest.mark.parametrize("case", list(CASES))
def test_casting_x_along_the_wrong_axis_is_detected(case, seeded):
    """The analytic comparison above must be able to fail: quantizing x along the wrong axis
    (tokens instead of in_features) gives a visibly different forward on mixed-scale rows."""
    m, lin = layer(64, 8, **CASES[case])
    if m.role_configs["input"].granularity == "tensor":
        pytest.skip("per-tensor scales have no axis")
    x = torch.randn(64, 64) * torch.exp2(torch.randint(-12, 12, (64, 1)).float())
    rc = m.role_configs["input"]
    right = fq(x, rc, 1) @ fq(lin.weight.detach(), m.role_configs["weight"], 1, rc.block_2d).T
    wrong = fq(x, rc, 0) @ fq(lin.weight.detach(), m.role_configs["weight"], 1, rc.block_2d).T
    got = m(x).double() - lin.bias.double()
    assert (got - right).abs().max() < (got - wrong).abs().max() / 100


@pytest.mark.parametrize("layout", ["forward", "dgrad", "wgrad"])
@pytest.mark.parametrize("scales", [("e8m0", "e8m0"), ("fp32", "fp32"), ("fp32", "e8m0"), ("row", "fp32")])
def test_blockwise_matmul_equals_float64_on_the_same_operands(layout, scales, seeded):
    m_, n_, k_ = 37, 29, 150
    a = torch.randn(m_, k_) * torch.exp2(torch.randint(-20, 20, (m_, k_)).float())
    b = torch.randn(n_, k_) * torch.exp2(torch.randint(-20, 20, (n_, k_)).float())
    if layout == "dgrad":
        b = b.t().contiguous().t()  # a strided view, as W^T is
    elif layout == "wgrad":
        a, b = a.t().contiguous().t(), b.t().contiguous().t()

    def cast(t, kind, bs):
        from altgrad.blockwise import quantize_blockwise_cast

        fmt = get_format("E4M3")
        c = quantize_blockwise_cast(t, fmt, None if kind == "row" else bs,
                                    scale_format="fp32" if kind == "row" else kind, backend="torch")
        return Operand(c.q, c.inv_scale, bs if kind != "row" else k_), kind == "e8m0", c

    (oa, pa, ca), (ob, pb, cb) = cast(a, scales[0], 16), cast(b, scales[1], 32)
    got = blockwise_matmul(oa, ob, pa, pb)
    from altgrad.blockwise import expand_scales

    da = ca.q.double() * expand_scales(ca.inv_scale, a.shape, -1, None if scales[0] == "row" else 16).double()
    db = cb.q.double() * expand_scales(cb.inv_scale, b.shape, -1, 32).double()
    ref = da @ db.T
    bound = 2 * k_ * 2**-24 * (da.abs() @ db.abs().T)  # fp32 accumulation (and fp32 scale products)
    assert bool(((got.double() - ref).abs() <= bound).all())


@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E0M7", "E7M0"])
@pytest.mark.parametrize("granularity", ["row", "block"])
def test_operand_sqnr_above_the_format_bound(name, granularity, seeded):
    """With ceil e8m0 scales nothing saturates and every element's error is at most half its
    quantum <= amax_block * 2**-M, so the SQNR of every cast is at least
    10 log10(sum x^2 / sum_blocks n_b (amax_b 2**-M)^2), computed here per use from the data."""
    fmt = get_format(name)
    m, lin = layer(96, 48, default_format=name, grad_output_format=name, granularity=granularity,
                   scale_rounding="ceil")
    x = (torch.randn(40, 96) * torch.exp2(torch.randint(-8, 8, (40, 96)).float())).requires_grad_()
    m(x).backward(torch.randn(40, 48))
    for use, t, axis in (("input", x.detach(), 1), ("input:wgrad", x.detach(), 0), ("weight", lin.weight.detach(), 1),
                         ("weight:dgrad", lin.weight.detach(), 0)):
        bs = 32 if granularity == "block" else None
        tt = t.movedim(axis, -1)
        k = tt.shape[-1]
        blocks = torch.nn.functional.pad(tt, (0, (-k) % (bs or k))).reshape(tt.shape[0], -1, bs or k)
        err_bound = (blocks.abs().amax(-1) * 2.0**-fmt.man_bits).pow(2) * blocks.shape[-1]
        bound_db = 10 * math.log10(float(t.double().pow(2).sum() / err_bound.double().sum()))
        sqnr = -20 * math.log10(float(m.blockwise_stats[use]["rel_err"]))
        assert sqnr >= bound_db, (use, sqnr, bound_db)
        assert int(m.blockwise_stats[use]["overflow"]) == 0


@pytest.mark.parametrize("name, gain_db", [("E2M5", 10), ("E1M6", 10), ("E0M7", 10), ("E4M3", -1)])
def test_block_scaling_beats_tensor_scaling_on_an_outlier_channel(name, gain_db, seeded):
    """Outliers 40x the rest on a few tokens: per-tensor scaling pushes every other element down
    the format's range; 32-element blocks confine each outlier to its own block. (ceil: the OCP
    floor rule saturates blocks whose amax mantissa exceeds E4M3's 1.75, costing a few dB.)"""
    x = torch.randn(128, 256)
    x[::16, 5] = 40.0
    stats = {}
    for gran in ("tensor", "block"):
        m, _ = layer(256, 16, default_format=name, grad_output_format=name, granularity=gran,
                     scale_rounding="ceil")
        m(x)
        stats[gran] = -20 * math.log10(float(m.stats["input"]["rel_err"]))
    assert stats["block"] > stats["tensor"] + gain_db, stats


def test_delayed_scaling_with_block_granularity_is_refused():
    with pytest.raises(ValueError, match="block scales are current"):
        layer(8, 8, scaling="delayed", granularity="block")


def test_e8m0_floor_emax_used_for_the_scale():
    assert [emax_elem(n) for n in ("E4M3", "E5M2", "E0M7", "E7M0")] == [8, 15, -1, 62]


def test_weight_grad_block_scaling_quantizes_dw_along_in_features(seeded):
    m, lin = layer(64, 16, weight_grad_format="E4M3", granularity="block")
    x = torch.randn(40, 64)
    m(x).backward(torch.randn(40, 16))
    g = lin.weight.grad
    # dW is already on the E4M3 block grid: casting it again changes nothing
    assert torch.equal(quantize_blockwise(g, "E4M3", 32, backend="torch"), g)
    assert "weight_grad" in m.blockwise_stats and m.blockwise_stats["weight_grad"]["numel"] == g.numel()


def test_a_gpt_trains_one_step_with_block_scales_and_reports_metrics(seeded):
    from altgrad.metrics import quant_metrics
    from altgrad.model import GPT, GPTConfig
    from altgrad.surgery import describe_quantization, quantize_model

    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=32, bias=False))
    cfg = QuantizationConfig("E2M5", grad_output_format="E5M2", scaling="current",
                             granularity={"input": "block", "weight": "block", "grad_output": "row"},
                             block_size=16, block_2d={"weight": True})
    quantize_model(model, config=cfg)
    assert "w:E2M5/b16x16-e8m0" in describe_quantization(model)
    idx = torch.randint(0, 32, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    assert math.isfinite(loss.item()) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    metrics = quant_metrics(model)
    assert any("/input/underflow" in k for k in metrics) and any("/grad_output/underflow" in k for k in metrics)
    fc = model.transformer.h[0].mlp.c_fc
    assert set(fc.blockwise_stats) == {"input", "weight", "grad_output", "input:wgrad", "weight:dgrad",
                                       "grad_output:wgrad"}
    assert float(fc.stats["input"]["numel"]) == 2 * 16 * 32
    # the second uses are in the stats interface (the 2-D weight tile cast serves both of its uses: once)
    assert set(fc.stats) == {"input", "weight", "grad_output", "input:wgrad", "grad_output:wgrad"}
    assert any("/input:wgrad/underflow" in k for k in metrics) and "quant/grad_output:wgrad/underflow" in metrics
    assert float(fc.stats["input:wgrad"]["numel"]) == 2 * 16 * 32


@pytest.mark.parametrize("cfg", [dict(granularity="block", block_size=16), dict(granularity="row"),
                                 dict(granularity="block", block_size=16, block_2d={"weight": True})],
                         ids=["block16", "row", "tile16"])
def test_bit_stall_reads_the_weights_own_block_scales(cfg, seeded):
    """A block-scaled weight's codes live on its block scales: the update tracker must judge an
    update against those (a per-tensor scale of 1 would call every small weight's update a stall)."""
    from altgrad.blockwise import quantize_blockwise_cast
    from altgrad.metrics import UpdateTracker
    from altgrad.quantize import round_to_format

    m, lin = layer(48, 32, **cfg)
    with torch.no_grad():
        lin.weight.mul_(1e-3)
        lin.weight[0] *= 1e3  # one large row: per tensor, the rest would sit far below it
    fmt, scale = m.weight_format_and_scale()
    assert scale.shape == lin.weight.shape
    rc = m.role_configs["weight"]
    bs = 16 if rc.granularity == "block" else None
    c = quantize_blockwise_cast(lin.weight.detach(), rc.format, bs, block_2d=rc.block_2d, backend="torch")
    q = lin.weight.detach() * scale
    # the weight's codes are round(w * scale) at these scales: exactly what its cast gives
    assert torch.equal(round_to_format(q, fmt), c.q)
    tracker = UpdateTracker(torch.nn.Sequential(m))
    tracker.before_step()
    with torch.no_grad():  # move every weight 4 ulps of its own code towards 0: every code moves
        lin.weight.sub_(torch.sign(q) * 4 * fmt.ulp(q) / scale)
    out = tracker.after_step()
    assert out["update/bit_stall"] == 0.0 and out["update/flip"] == 1.0



@pytest.mark.parametrize("case", ["block-e8m0", "block16-fp32"])
def test_stats_level_scale_records_amax_and_scale_only(case):
    """At StatsLevel "scale" every use's stats hold amax, scale and numel (equal to a "full" twin's),
    the counts are NaN in the role's buffer, and training is unchanged."""
    torch.manual_seed(2)
    m_scale, _ = layer(40, 24, **CASES[case])
    m_full = QuantizedLinear(torch.nn.Linear(40, 24), m_scale.layer_config, backend="torch")
    m_full.load_state_dict(m_scale.state_dict())
    m_full.stats_level, m_scale.stats_level = "full", "scale"
    x = torch.randn(6, 40)
    x[0, 0] = 3e4  # an outlier: some elements of its block underflow
    for m in (m_scale, m_full):
        m(x.clone().requires_grad_()).backward(torch.randn(6, 24, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(m_scale.weight.grad, m_full.weight.grad)
    for use, st in m_scale.blockwise_stats.items():
        assert tuple(st) == ("amax", "scale", "numel"), use
        assert all(torch.equal(v, m_full.blockwise_stats[use][f]) for f, v in st.items()), use
    assert m_full.stats["input"]["underflow"] > 0
    assert m_scale._stats_input[2:6].isnan().all()
