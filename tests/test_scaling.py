"""Scaling (docs/design.md §4): compute_scale, AmaxHistory semantics, TensorScaler modes, edge rules, state."""

import math

import pytest
import torch

from altgrad.formats import FORMAT_REGISTRY, get_format
from altgrad.quantize import quantize
from altgrad.scaling import AmaxHistory, TensorScaler, compute_scale

E4M3 = get_format("E4M3")


def t(v):
    return torch.tensor(v, dtype=torch.float32)


def test_compute_scale_formula_margin_pow2():
    assert compute_scale(t(3.5), E4M3).item() == (t(448.0) / t(3.5)).item()  # fp32 arithmetic
    assert compute_scale(t(2.0), E4M3, margin=2).item() == 448 / 2 / 4
    s = compute_scale(t(3.0), E4M3, pow2=True).item()  # 149.33 -> 128
    assert s == 128.0
    for amax in torch.rand(100, generator=torch.Generator().manual_seed(0)) * 1000 + 1e-3:
        s = compute_scale(amax, E4M3, pow2=True).item()
        assert math.log2(s).is_integer() and s <= 448 / amax.item() < 2 * s


@pytest.mark.parametrize("amax", [0.0, math.inf, math.nan, 1e-45])  # last: 448/amax overflows fp32
def test_edge_rules_keep_previous_scale(amax):
    assert compute_scale(t(amax), E4M3, prev_scale=t(7.0)).item() == 7.0
    assert compute_scale(t(amax), E4M3).item() == 1.0


def test_compute_scale_bad_margin():
    with pytest.raises(ValueError, match="margin must be an int >= 0"):
        compute_scale(t(1.0), E4M3, margin=-1)


def test_history_max_and_most_recent():
    h, r = AmaxHistory(3, "max"), AmaxHistory(3, "most_recent")
    assert h.empty
    for v in [5.0, 1.0, 2.0, 3.0]:
        h.push(t(v)), r.push(t(v))
    assert not h.empty
    assert h.get().item() == 3.0  # 5.0 fell out of the length-3 window
    assert r.get().item() == 3.0
    h.push(t(0.5))
    assert h.get().item() == 3.0 and h.history.tolist() == [0.5, 3.0, 2.0]


def test_history_bad_args():
    with pytest.raises(ValueError, match="amax algo must be one of"):
        AmaxHistory(4, "mean")
    with pytest.raises(ValueError, match="history length must be an int >= 1"):
        AmaxHistory(0)


def test_delayed_uses_current_amax_first_then_history():
    s = TensorScaler(E4M3, "delayed", history_len=4)
    x1 = torch.full((8,), 2.0)
    scale, inv = s.scale_for(x1)  # empty history: the tensor's own amax
    assert scale.item() == 224.0 and inv.item() == torch.reciprocal(t(224.0)).item()
    s.observe(t(2.0))
    scale, _ = s.scale_for(torch.full((8,), 100.0))  # delayed: still from the history (2.0)
    assert scale.item() == 224.0
    s.observe(t(4.0))
    assert s.scale_for(x1)[0].item() == 112.0


def test_current_and_none_modes():
    cur, none = TensorScaler(E4M3, "current"), TensorScaler(E4M3, "none")
    x = torch.tensor([-8.0, 1.0])
    assert cur.scale_for(x)[0].item() == 56.0 and none.scale_for(x)[0].item() == 1.0
    assert cur.scale_for(torch.zeros(3))[0].item() == 56.0  # amax 0 keeps the previous scale
    assert cur.scale_for(torch.tensor([math.nan, 1.0]))[0].item() == 56.0


def test_returned_scale_is_not_aliased():
    s = TensorScaler(E4M3, "current")
    a, _ = s.scale_for(torch.tensor([1.0]))
    s.scale_for(torch.tensor([2.0]))
    assert a.item() == 448.0


def test_state_round_trip():
    a = TensorScaler(E4M3, "delayed", history_len=5, margin=1)
    for v in [3.0, 9.0, 4.0]:
        a.scale_for(torch.tensor([v]))
        a.observe(t(v))
    b = TensorScaler(E4M3, "delayed", history_len=5, margin=1)
    b.load_state_dict(a.state_dict())
    assert not b.amax_history.empty
    assert torch.equal(a.state_dict()["amax_history.history"], b.amax_history.history)
    x = torch.tensor([1.0])
    assert a.scale_for(x)[0].item() == b.scale_for(x)[0].item() == (t(448.0) / t(9.0) / 2).item()


def test_bad_mode():
    with pytest.raises(ValueError, match=r"scaling mode must be one of \('delayed', 'current', 'none'\)"):
        TensorScaler(E4M3, "dynamic")


def test_scale_for_without_update_leaves_state():
    s = TensorScaler(E4M3, "current")
    s.scale_for(torch.tensor([2.0]))
    scale, inv = s.scale_for(torch.tensor([8.0]), update=False)
    assert scale.item() == 56.0 and inv.item() == torch.reciprocal(t(56.0)).item()
    assert s.scale.item() == 224.0 and s.inv_scale.item() == torch.reciprocal(t(224.0)).item()


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
@pytest.mark.parametrize("amax", [torch.finfo(torch.float32).max, 1e38, 2.0**-149, 1e-30])
def test_computed_scale_and_its_reciprocal_are_finite(name, amax):
    """Every computed scale has a finite reciprocal, so quantizing up to amax gives finite values,
    also where fmt.max / amax is below fp32's normal range (E0M7 at amax = FLT_MAX)."""
    fmt = get_format(name)
    for pow2 in (False, True):
        scale = compute_scale(torch.tensor(amax), fmt, pow2=pow2)
        assert bool(torch.isfinite(scale) & torch.isfinite(torch.reciprocal(scale)) & (scale > 0))
        y = quantize(torch.tensor([0.0, amax, -amax]), fmt, scale)
        assert bool(torch.isfinite(y).all()) and y[0].item() == 0.0
    sc = TensorScaler(fmt, mode="current")
    s, inv = sc.scale_for(torch.tensor([amax]))
    assert bool(torch.isfinite(s) & torch.isfinite(inv)) and torch.equal(inv, torch.reciprocal(s))


@pytest.mark.parametrize("name", ["E4M3", "E5M2", "E2M5", "E0M7", "E7M0"])
def test_compute_scale_is_the_correctly_rounded_quotient(name):
    """scale = fmt.max / amax rounded once to fp32 (float64 division then one rounding to fp32 is
    correctly rounded for fp32 operands), for fresh amaxes over the whole normal range."""
    fmt = get_format(name)
    amax = torch.exp2(torch.empty(20000).uniform_(-60, 60)) * torch.empty(20000).uniform_(1, 2)
    got = torch.stack([compute_scale(a, fmt) for a in amax[:2000]])
    want = (torch.tensor(fmt.max, dtype=torch.float64) / amax[:2000].double()).float()
    want = torch.where(want < 2.0**-126, torch.tensor(2.0**-126), want)
    assert torch.equal(got, want)


@pytest.mark.parametrize("magnitude", [1e-35, 1e-25, 1.0, 1e25, 1e35])
def test_l2_norm_holds_where_fp32_squares_do_not(magnitude):
    from altgrad.scaling import l2_norm

    t = torch.randn(3000, generator=torch.Generator().manual_seed(7)) * magnitude
    want = torch.linalg.vector_norm(t.double()).item()
    assert l2_norm(t).item() == pytest.approx(want, rel=1e-5)
    assert l2_norm(t, t.abs().amax() * 1.7).item() == pytest.approx(want, rel=1e-5)  # any amax near max|t|
    assert l2_norm(t.reshape(30, 100)).item() == pytest.approx(want, rel=1e-5)


def test_l2_norm_special_values():
    from altgrad.scaling import l2_norm

    assert l2_norm(torch.zeros(4)).item() == 0.0 and l2_norm(torch.zeros(0)).item() == 0.0
    assert l2_norm(torch.tensor([3.0, -4.0])).item() == 5.0
    assert math.isnan(l2_norm(torch.tensor([1.0, math.nan])).item())
    assert l2_norm(torch.tensor([1.0, -math.inf])).item() == math.inf
    assert l2_norm(torch.tensor([3e38, 3e38])).item() == math.inf  # the norm itself exceeds fp32
