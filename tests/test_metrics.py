"""altgrad.metrics: every metric against a hand-computed case."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from altgrad import metrics
from altgrad.model import GPT, GPTConfig

CFG = GPTConfig(block_size=16, vocab_size=29, n_layer=2, n_head=2, n_embd=24, dropout=0.0)
HIDDEN = 4 * CFG.n_embd


def tokens(batch=4, t=13):
    return torch.randint(0, CFG.vocab_size, (batch, t))


# ---- dead neurons ----------------------------------------------------------------------------------


def kill(mlp, units, bias=-50.0):
    """Make hidden units `units` output GELU(-50) = 0 for every input: zero weights, very negative bias."""
    with torch.no_grad():
        mlp.c_fc.weight[units] = 0.0
        mlp.c_fc.bias[units] = bias


def test_dead_units_known_per_layer(seeded):
    model = GPT(CFG)
    kill(model.transformer.h[0].mlp, [0, 5, 17])
    kill(model.transformer.h[1].mlp, [3])
    tracker = metrics.DeadNeuronTracker(model, threshold=1e-8, window=3)
    for _ in range(2):
        model(tokens(), tokens())
        tracker.step()
    out = tracker.metrics()
    assert out["mlp/transformer.h.0.mlp/dead_frac"] == 3 / HIDDEN
    assert out["mlp/transformer.h.1.mlp/dead_frac"] == 1 / HIDDEN
    assert out["mlp/dead_frac"] == 4 / (2 * HIDDEN)


def test_dead_units_follow_the_window_and_ignore_eval(seeded):
    model = GPT(CFG)
    mlp = model.transformer.h[0].mlp
    tracker = metrics.DeadNeuronTracker(model, threshold=1e-8, window=2)
    assert tracker.metrics() == {}  # nothing recorded yet
    with torch.no_grad():
        mlp.c_fc.bias[7] = 5.0  # step 0: unit 7 clearly alive
    model(tokens(), tokens())
    tracker.step()
    kill(mlp, [7])  # from step 1 on: dead
    for step in (1, 2):
        model(tokens(), tokens())
        model(tokens(), tokens())  # two micro-batches per step (grad accumulation)
        tracker.step()
        expected = 0 if step == 1 else 1  # step 0 leaves the 2-step window after step 2
        assert tracker.metrics()["mlp/transformer.h.0.mlp/dead_frac"] == expected / HIDDEN
    # an eval forward (where unit 7 would be alive again) is not training activity
    with torch.no_grad():
        mlp.c_fc.bias[7] = 5.0
    model.eval()
    model(tokens(), tokens())
    assert tracker.metrics()["mlp/transformer.h.0.mlp/dead_frac"] == 1 / HIDDEN
    # the same forward in train mode counts, even before step() closes the step
    model.train()
    model(tokens(), tokens())
    assert tracker.metrics()["mlp/transformer.h.0.mlp/dead_frac"] == 0
    tracker.remove()
    model(tokens(), tokens())
    tracker.step()


class ReluMLP(nn.Module):
    """A nanoGPT-fork MLP with a functional activation: no `gelu` module to hook."""

    def __init__(self, n):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(n, 3 * n), nn.Linear(3 * n, n)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)))


def test_fallback_hooks_the_input_of_c_proj(seeded):
    model = nn.Sequential()
    model.add_module("mlp", ReluMLP(8))
    with torch.no_grad():
        model.mlp.c_fc.bias[[1, 2, 20]] = -1e3  # ReLU gives exact zeros: dead
        model.mlp.c_fc.weight[[1, 2, 20]] = 0.0
        model.mlp.c_fc.bias[4] = 1e-9  # output 1e-9 < threshold 1e-8: dead as well
        model.mlp.c_fc.weight[4] = 0.0
    tracker = metrics.DeadNeuronTracker(model, threshold=1e-8, window=5)
    model(torch.randn(6, 5, 8))
    tracker.step()
    assert tracker.metrics() == {"mlp/mlp/dead_frac": 4 / 24, "mlp/dead_frac": 4 / 24}


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 1e-8, "window": 0}, "dead_neuron_window must be an int >= 1"),
    ({"threshold": -1.0, "window": 10}, "dead_neuron_threshold must be >= 0"),
])
def test_dead_neuron_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        metrics.DeadNeuronTracker(GPT(CFG), **kwargs)


# ---- gradient norms --------------------------------------------------------------------------------


def test_grad_norms_per_layer(seeded):
    model = GPT(CFG)
    model(tokens(), tokens())[1].backward()
    layer = model.transformer.h[1].mlp.c_proj
    with torch.no_grad():
        layer.weight.grad.copy_(torch.randn_like(layer.weight))
        layer.bias.grad.copy_(torch.randn_like(layer.bias))
        layer.bias.grad[3] = -7.5  # the L-inf entry, negative on purpose
    out = metrics.grad_norms(model)
    g = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad.reshape(-1)]).double()
    assert out["grad/transformer.h.1.mlp.c_proj/l2"] == pytest.approx(math.sqrt((g * g).sum().item()), rel=1e-6)
    assert out["grad/transformer.h.1.mlp.c_proj/linf"] == 7.5
    # the tied embedding / lm_head weight is one layer, reported once under the matmul layer
    assert "grad/lm_head/l2" in out and not any(k.startswith("grad/transformer.wte") for k in out)
    # huge gradients (a diverging run): the l2 norm fits fp32 although the squares do not
    with torch.no_grad():
        layer.weight.grad.mul_(1e25)
    g = torch.cat([layer.weight.grad.reshape(-1), layer.bias.grad.reshape(-1)]).double()
    out = metrics.grad_norms(model)
    assert out["grad/transformer.h.1.mlp.c_proj/l2"] == pytest.approx(math.sqrt((g * g).sum().item()), rel=1e-6)
    model.zero_grad(set_to_none=True)
    assert metrics.grad_norms(model) == {}


def test_layer_names_survive_surgery(seeded):
    from altgrad.surgery import quantize_model

    model = GPT(CFG)
    before = [(name, [id(p) for p in params]) for name, params in metrics.layer_parameters(model)]
    quantize_model(model, "E4M3")
    after = [(name, [id(p) for p in params]) for name, params in metrics.layer_parameters(model)]
    assert after == before
    names = [name for name, _ in before]
    assert names[:3] == ["transformer.wpe", "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn"]
    assert names[-2:] == ["transformer.ln_f", "lm_head"]
    assert sum(len(ids) for _, ids in before) == len(list(model.parameters()))  # each parameter once


# ---- alerts ----------------------------------------------------------------------------------------


def test_alerts_name_the_role_and_the_worst_layer():
    m = {
        "quant/input/overflow": 0.02, "quant/a.b/input/overflow": 0.01, "quant/c.d/input/overflow": 0.05,
        "quant/weight/overflow": 0.001, "quant/grad_output/nan": 0.25, "quant/x/grad_output/nan": 0.25,
        "update/bit_stall": 0.6,
    }
    out = metrics.alerts(m, overflow_threshold=0.01, bit_stall_threshold=0.5)
    assert out == [
        "nan: 25.00% of grad_output elements are NaN; worst layer x: 25.00%",
        "overflow: 2.00% of input elements exceed the format's max (threshold 1.00%); worst layer c.d: 5.00%",
        "bit-stall: 60.0% of weight updates left the quantized weight unchanged (threshold 50.0%)",
    ]
    assert metrics.alerts(m, overflow_threshold=None, bit_stall_threshold=None) == [out[0]]
    assert metrics.alerts({"quant/input/overflow": 0.01, "update/bit_stall": 0.5, "update/zero_frac": 0.5},
                          0.01, 0.5) == []
    assert metrics.alerts({"update/zero_frac": 0.9}, 0.01, 0.5) == [
        "zero update: 90.0% of quantized weights did not change at all this step "
        "(threshold 50.0%; master_weights rounding or zero gradients)"]
    assert metrics.alerts({}, 0.01, 0.5) == []


# ---- quantization stats ----------------------------------------------------------------------------


def quantized(linear, input=None, weight=None, grad_output=None):
    from altgrad.config import LayerQuantConfig, RoleConfig
    from altgrad.linear import QuantizedLinear

    def rc(spec):
        return None if spec is None else RoleConfig(spec[0], scaling=spec[1])

    layer = QuantizedLinear(linear, LayerQuantConfig(rc(input), rc(weight), rc(grad_output)))
    layer.stats_level = "full"  # rel_err too (off by default)
    return layer


def e4m3_oracle(v: torch.Tensor) -> torch.Tensor:
    """ml_dtypes' float8_e4m3fn cast (round to nearest even), back to fp32."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return torch.from_numpy(v.numpy().astype(ml_dtypes.float8_e4m3fn).astype("float32"))


def test_quant_metrics_hand_counted(seeded):
    a = quantized(nn.Linear(5, 3), input=("E4M3", "none"), weight=("E4M3", "none"))
    b = quantized(nn.Linear(4, 6), input=("E5M2", "current"), weight=("E4M3", "none"), grad_output=("E5M2", "current"))
    model = nn.ModuleDict({"a": a, "b": b})
    # layer a's input (scale 1): magnitudes in [0.1, 10] are in E4M3's range, then planted specials
    xa = (torch.rand(40) * 9.9 + 0.1) * torch.where(torch.rand(40) < 0.5, -1.0, 1.0)
    planted = {
        0: 500.0, 1: -1e4, 2: 465.0,  # overflow: past 464, E4M3's rounding boundary above max 448
        3: 464.0,  # rounds to max: no overflow
        4: 1e-4, 5: -(2.0 ** -11), 6: 2.0 ** -10,  # underflow (2**-10 is the tie to 0: even code wins)
        7: 2.0 ** -10 * 1.0001,  # rounds up to 2**-9: no underflow
        8: float("nan"), 9: 0.0, 10: -0.0,
    }
    for i, v in planted.items():
        xa[i] = v
    a(xa.view(2, 4, 5))
    xb = torch.randn(3, 7, 4)
    b(xb).sum().backward()
    with torch.no_grad():
        wa, wb = a.weight.clone(), b.weight.clone()
    out = metrics.quant_metrics(model)

    assert out["quant/a/input/overflow"] == 3 / 40
    assert out["quant/a/input/underflow"] == 3 / 37  # 40 - NaN - two zeros are non-zero
    assert out["quant/a/input/nan"] == 1 / 40
    assert out["quant/a/input/amax"] == 1e4 and out["quant/a/input/scale"] == 1.0
    assert math.isnan(out["quant/a/input/rel_err"])  # the NaN input poisons the norm, honestly
    # weights (scale 1) against ml_dtypes: nn.Linear init puts some tiny weights under E4M3's range
    for name, w in (("a", wa), ("b", wb)):
        under = ((e4m3_oracle(w) == 0) & (w != 0)).sum().item()
        assert out[f"quant/{name}/weight/underflow"] == under / (w != 0).sum().item()
        assert out[f"quant/{name}/weight/overflow"] == 0
        rel = ((e4m3_oracle(w) - w).double().norm() / w.double().norm()).item()
        assert out[f"quant/{name}/weight/rel_err"] == pytest.approx(rel, rel=1e-5)
    # current scaling: scale = max / amax, so nothing over- or underflows in E5M2 here
    amax_b = xb.abs().max().item()
    assert out["quant/b/input/amax"] == pytest.approx(amax_b, rel=1e-7)
    assert out["quant/b/input/scale"] == pytest.approx(57344 / amax_b, rel=1e-6)
    assert out["quant/b/input/overflow"] == 0 and out["quant/b/grad_output/nan"] == 0
    assert "quant/a/grad_output/overflow" not in out  # a is high precision in backward

    # per-role aggregates: counts summed, amax max, rel_err element-weighted
    assert out["quant/input/overflow"] == 3 / (40 + 84)
    assert out["quant/input/underflow"] == 3 / (37 + 84)
    assert out["quant/input/nan"] == 1 / 124
    assert out["quant/input/amax"] == 1e4
    assert math.isnan(out["quant/input/rel_err"])
    assert out["quant/weight/rel_err"] == pytest.approx(
        (15 * out["quant/a/weight/rel_err"] + 24 * out["quant/b/weight/rel_err"]) / 39, rel=1e-12)
    assert out["quant/weight/scale"] == 1.0
    assert out["quant/grad_output/overflow"] == out["quant/b/grad_output/overflow"]


def test_quant_metrics_role_counts_only_over_layers_that_count_them(seeded):
    """A layer at stats level "scale" records no counts: the per-role fractions are over the layers
    that do (its elements are not counted as neither overflowing nor NaN)."""
    a = quantized(nn.Linear(4, 4), input=("E4M3", "none"))
    b = quantized(nn.Linear(4, 4), input=("E4M3", "none"))
    a.stats_level, b.stats_level = "counts", "scale"
    x = torch.randn(5, 4)
    x[0, :3] = torch.tensor([1e4, float("nan"), 1e-6])  # overflow, NaN, underflow at scale 1
    a(x)
    b(torch.randn(300, 4))
    out = metrics.quant_metrics(nn.ModuleDict({"a": a, "b": b}))
    assert "quant/b/input/overflow" not in out and out["quant/b/input/amax"] > 0
    nonzero = (x != 0).sum().item() - 1  # the NaN is not counted as non-zero
    assert out["quant/a/input/overflow"] == out["quant/input/overflow"] == 1 / 20
    assert out["quant/a/input/nan"] == out["quant/input/nan"] == 1 / 20
    assert out["quant/a/input/underflow"] == out["quant/input/underflow"] == 1 / nonzero


def test_quant_metrics_of_an_unquantized_model_is_empty():
    assert metrics.quant_metrics(GPT(CFG)) == {}


# ---- update: bit-stall, flips, ULP ratio ------------------------------------------------------------

# E4M3 weight with current scaling; amax 224 -> scale 2, so the format-domain value is v = 2 w.
# Each entry: (w, Δw, what happens in E4M3 at v).
UPDATE_CASES = [
    (224.0, 6.0, "stall"),  # v 448 -> 460 rounds back to 448 (ulp 32): ratio 12/32
    (1.0, 0.01, "stall"),  # v 2 -> 2.02 rounds to 2 (ulp 0.25): ratio 0.08
    (1.0, 0.1, "flip"),  # v 2 -> 2.2 rounds to 2.25: ratio 0.8
    (1.0, -0.0625, "flip"),  # v 2 -> 1.875, one step down into the binade below: ratio 0.5
    (1.0, 0.0, "zero"),
    (-3.0, 0.05, "stall"),  # v -6 -> -5.9 rounds to -6 (ulp 0.5): ratio 0.2
    (0.25, 0.001, "stall"),  # v 0.5 -> 0.502 (ulp 0.0625): ratio 0.032
    (5.0, 1.0, "flip"),  # v 10 -> 12 (ulp 1): ratio 2
]


def test_update_tracker_hand_counted(seeded):
    layer = quantized(nn.Linear(8, 1, bias=False), input=("E4M3", "none"), weight=("E4M3", "current"))
    hp = quantized(nn.Linear(8, 2), input=("E4M3", "none"))  # weight high precision: not tracked
    model = nn.Sequential(layer, nn.ReLU())
    model.add_module("hp", hp)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[w for w, _, _ in UPDATE_CASES]]))
    layer(torch.randn(2, 8))
    assert layer.scalers["weight"].scale.item() == 2.0
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer.weight.grad = -torch.tensor([[d for _, d, _ in UPDATE_CASES]])
    tracker = metrics.UpdateTracker(model)
    tracker.before_step()
    opt.step()
    layer(torch.randn(2, 8))  # a forward re-scales the weight (amax 230): the old scale must be kept
    assert layer.scalers["weight"].scale.item() != 2.0
    out = tracker.after_step()
    kinds = [k for _, _, k in UPDATE_CASES]
    changed = kinds.count("stall") + kinds.count("flip")
    assert out["update/bit_stall"] == kinds.count("stall") / changed
    assert out["update/flip"] == kinds.count("flip") / len(kinds)
    assert out["update/zero_frac"] == kinds.count("zero") / len(kinds)
    # lower median of [0.375, 0.08, 0.8, 0.5, 0.2, 0.032, 2]
    assert out["update/ulp_ratio"] == pytest.approx(0.375, rel=1e-6)
    assert out["update/0/bit_stall"] == out["update/bit_stall"]
    assert not any(k.startswith("update/hp") for k in out)
    assert tracker.after_step() == {}  # each before_step is used once


def test_update_tracker_on_random_weights_matches_a_direct_count(seeded):
    layer = quantized(nn.Linear(33, 17), input=("E5M2", "delayed"), weight=("E5M2", "delayed"))
    layer(torch.randn(5, 33))
    opt = torch.optim.Adam(layer.parameters(), lr=3e-3)
    layer(torch.randn(5, 33)).square().mean().backward()
    tracker = metrics.UpdateTracker(layer)
    w0, scale = layer.weight.detach().clone(), layer.scalers["weight"].scale.clone()
    tracker.before_step()
    with torch.no_grad():
        layer.weight.grad[0] = 0.0  # Adam's first step is ±lr everywhere except zero gradients
    opt.step()
    out = tracker.after_step()
    w1 = layer.weight.detach()
    changed = w1 != w0
    # oracle: ml_dtypes' E5M2 cast of the scaled weights, before and after, same scale
    ml_dtypes = pytest.importorskip("ml_dtypes")
    q0, q1 = ((w * scale).numpy().astype(ml_dtypes.float8_e5m2).astype("float32") for w in (w0, w1))
    moved = torch.from_numpy(q0 != q1)
    assert out["update/zero_frac"] == 1 - changed.sum().item() / w0.numel() > 0
    assert out["update/bit_stall"] == (changed & ~moved).sum().item() / changed.sum().item()
    assert out["update/flip"] == moved.sum().item() / w0.numel()
    assert 0 < out["update/bit_stall"] < 1


def test_master_weights_lose_updates_as_zeros(seeded):
    # weights stored in E5M2 after each step: Adam's ~lr steps round away for most weights, so
    # the tracker sees them as unchanged (zero_frac), and the few that moved moved by whole codes
    from altgrad.config import LayerQuantConfig, RoleConfig
    from altgrad.linear import QuantizedLinear

    cfg = LayerQuantConfig(RoleConfig("E5M2"), RoleConfig("E5M2", scaling="current"), None, master_weights="E5M2")
    layer = QuantizedLinear(nn.Linear(40, 24), cfg)
    with torch.no_grad():
        layer.weight[0, 0] = 1.0  # the amax, kept fixed below: the master scale stays the same
    layer.round_master_weights()
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    layer(torch.randn(6, 40)).square().mean().backward()
    layer.weight.grad[0, 0] = 0.0
    layer(torch.randn(1, 40))  # sets the weight scale that the next step is measured at
    tracker = metrics.UpdateTracker(layer)
    tracker.before_step()
    opt.step()
    layer.round_master_weights()
    out = tracker.after_step()
    assert out["update/zero_frac"] > 0.5
    assert out["update/flip"] == pytest.approx(1 - out["update/zero_frac"])  # every change is a code change
    assert out["update/ulp_ratio"] >= 0.5
    assert out["update/model/bit_stall"] == 0.0  # a model that is one layer is named "model"


def test_update_tracker_without_quantized_weights_is_empty():
    tracker = metrics.UpdateTracker(GPT(CFG))
    tracker.before_step()
    assert tracker.after_step() == {}


@pytest.mark.parametrize("fmt", ["E4M3", "E5M2", "E7M0", "E0M7", "E3M4"])
def test_update_tracker_rounding_is_the_reference_rounding(fmt):
    """The tracker's nearest rounding of w·scale (the fused fast cast for a per-tensor scale) gives
    the reference round_to_format values, element for element, special values included."""
    from altgrad.formats import get_format
    from altgrad.metrics import _round_nearest
    from altgrad.quantize import round_to_format

    g = torch.Generator().manual_seed(7)
    w = torch.randn(37, 23, generator=g) * 10.0 ** torch.randint(-8, 8, (37, 1), generator=g)
    w[0, :4] = torch.tensor([0.0, -0.0, float("inf"), float("nan")])
    scale = torch.tensor(get_format(fmt).max / 3.7)
    got, want = _round_nearest(w, scale, get_format(fmt)).float(), round_to_format(w * scale, fmt)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
