"""FormatSpec and the registry against the format table of docs/design.md, gfloat's decode and a vendored
gfloat/ml_dtypes table of extremal values (tests/fixtures/fp8-format-reference.json)."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from altgrad.formats import FORMAT_REGISTRY, get_format
from oracles import gfloat_decode

FIXTURES = pathlib.Path(__file__).parent / "fixtures"

# docs/design.md's table of default names: (specials, bias, max, min normal, min subnormal)
DEFAULTS = {
    "E5M2": ("ieee", 15, 57344.0, 2**-14, 2**-16),
    "E4M3": ("fn", 7, 448.0, 2**-6, 2**-9),
    "E3M4": ("ieee", 3, 15.5, 2**-2, 2**-6),
    "E2M5": ("p3109", 2, 3.875, 2**-1, 2**-6),
    "E1M6": ("p3109", 1, 1.96875, 1.0, 2**-6),
    "E6M1": ("p3109", 32, 2.0**31, 2**-31, 2**-32),
    "E7M0": ("p3109", 64, 2.0**62, 2**-63, 2**-63),
    "E0M7": ("none", 1, 127 / 128, None, 2**-7),
}


@pytest.mark.parametrize("name", DEFAULTS)
def test_default_names_match_design_table(name):
    f = get_format(name)
    specials, bias, mx, mn, ms = DEFAULTS[name]
    assert (f.specials, f.bias, f.max, f.min_normal, f.min_subnormal) == (specials, bias, mx, mn, ms)
    assert f.exp_bits + f.man_bits == 7 and f.bits == 8


@pytest.mark.parametrize("name,mx", [("E4M3_IEEE", 240.0), ("E3M4_NONE_B1", 124.0), ("P3109_P4", 224.0),
                                     ("E5M2_FNUZ", 57344.0), ("e4m3_fnuz", 240.0), ("E1M6_NONE", 3.96875)])
def test_qualified_names(name, mx):
    assert get_format(name).max == mx


def test_names_are_case_insensitive_and_canonical():
    assert get_format("e4m3") is get_format("E4M3") is get_format("E4M3_FN") is get_format("e4m3_fn_b7")
    assert get_format(get_format("E5M2")) is get_format("E5M2")


@pytest.mark.parametrize("bad", ["E9M9", "E4M4", "E4M3_XYZ", "fp8", "", "P3109_P9", "E3M4_IEEE_B200"])
def test_bad_names_list_registered(bad):
    with pytest.raises(ValueError, match="registered: E5M2, E4M3"):
        get_format(bad)


def test_non_string_name_is_type_error():
    with pytest.raises(TypeError, match="format must be a name"):
        get_format(8)


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_decode_all_codes_equals_gfloat(name):
    f = get_format(name)
    ours, ref = f.decode_all().numpy(), gfloat_decode(f)
    same = (ours.view(np.int32) == ref.view(np.int32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all(), np.where(~same)


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_special_flags_follow_codes(name):
    f = get_format(name)
    vals = f.decode_all()
    assert f.has_inf == bool(torch.isinf(vals).any())
    assert f.has_nan == bool(torch.isnan(vals).any())
    assert f.has_neg_zero == bool(((vals == 0) & torch.signbit(vals)).any())
    finite = vals[torch.isfinite(vals)]
    assert finite.max().item() == f.max
    assert torch.equal(f.values(), torch.unique(finite))  # sorted, zero once


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
def test_encode_decode_round_trip(name):
    f = get_format(name)
    for code in range(2**f.bits):
        v = f.decode(code)
        if math.isnan(v) or math.isinf(v):
            continue
        back = f.encode(v, saturate=False)
        assert f.decode(back) == v and math.copysign(1, f.decode(back)) == math.copysign(1, v), (code, v, back)


def _encode_probe_values(f) -> torch.Tensor:
    """Every finite value, every midpoint between neighbours and one fp32 ulp either side, values
    past max, fresh log-spread random values, and the specials; both signs."""
    pos = f.values()[f.values() >= 0].double()
    grid = torch.cat([pos, torch.tensor([f.code_value(f.max_code + 1)], dtype=torch.float64)])
    mids = ((grid[1:] + grid[:-1]) / 2).float()
    around = torch.cat([mids, torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(math.inf))])
    rand = torch.exp2(torch.empty(2000).uniform_(math.log2(f.min_subnormal) - 4, math.log2(f.max) + 2))
    specials = torch.tensor([0.0, math.inf, math.nan, f.max * 4, 1e-45])
    v = torch.cat([pos.float(), around, rand, specials])
    return torch.cat([v, -v])


@pytest.mark.parametrize("name", list(FORMAT_REGISTRY))
@pytest.mark.parametrize("saturate", [True, False])
def test_scalar_encode_equals_vectorised_quantizer(name, saturate):
    """FormatSpec.encode (scalar, formats.py) and quantize.round_to_codes (vectorised) are written
    independently; they must give the same code for every probe value."""
    from altgrad.quantize import round_to_codes

    f = get_format(name)
    v = _encode_probe_values(f)
    if not f.has_nan:  # NaN, and overflow without saturation, have no code here: checked elsewhere
        keep = ~torch.isnan(v) & (saturate | (v.abs() <= f.max))
        v = v[keep]
    want = round_to_codes(v, f, saturate=saturate).tolist()
    got = [f.encode(x, saturate=saturate) for x in v.tolist()]
    bad = [(x, g, w) for x, g, w in zip(v.tolist(), got, want) if g != w]
    assert not bad, bad[:5]


def test_encode_specials():
    e5m2, e4m3 = get_format("E5M2"), get_format("E4M3")
    assert e5m2.encode(1e9, saturate=False) == 0x7C and e5m2.encode(-1e9, saturate=False) == 0xFC
    assert e5m2.encode(1e9) == 0x7B  # saturates to max
    assert e4m3.encode(465.0, saturate=False) == 0x7F and e4m3.encode(-465.0, saturate=False) == 0xFF
    assert e4m3.encode(464.0) == 0x7E  # the tie below the overflow threshold goes to the even max code
    assert get_format("E4M3_FNUZ").encode(float("nan")) == 0x80
    assert get_format("E2M5").encode(-1e9, saturate=False) == 0xFF  # p3109 -inf
    assert get_format("E4M3_FNUZ").encode(-1e9, saturate=False) == 0x80  # no inf: the single NaN
    assert get_format("E4M3_FNUZ").encode(-1e-9) == 0x00  # no -0: negative underflow is +0
    with pytest.raises(ValueError, match="E0M7 has no NaN code"):
        get_format("E0M7").encode(float("nan"))


@pytest.mark.parametrize("name", ["E5M2", "E4M3", "E7M0", "E0M7", "E2M5"])
def test_ulp_is_gap_to_next_value(name):
    f = get_format(name)
    pos = f.values()
    pos = pos[pos > 0]
    gaps = pos[1:] - pos[:-1]
    assert torch.equal(f.ulp(pos[:-1]), gaps)  # tensor form
    assert [f.ulp(float(v)) for v in pos[:-1]] == gaps.tolist()  # scalar form
    assert f.ulp(0.0) == f.min_subnormal if f.man_bits else True


# (table key in the fixture, altgrad's specials name) for every convention altgrad implements
REFERENCE_CONVENTIONS = [("ieee", "ieee"), ("fn", "fn"), ("fnuz", "fnuz"), ("p3109_extended", "p3109"),
                         ("allfinite", "none")]


@pytest.mark.parametrize("table_key,specials", REFERENCE_CONVENTIONS)
def test_reference_json_agrees(table_key, specials):
    """Extremal values of every E1M6..E7M0 layout under each convention, as tabulated by gfloat 0.5.2
    and cross-checked with ml_dtypes 0.6 (tests/fixtures/fp8-format-reference.json)."""
    table = json.loads((FIXTURES / "fp8-format-reference.json").read_text())["conventions"][table_key]
    assert len(table["formats"]) == 7
    for layout, row in table["formats"].items():
        f = get_format(f"{layout}_{specials}_B{row['bias']}")
        assert f.max == row["max_finite"], (table_key, layout)
        assert f.min_subnormal == (row["min_subnormal"] or f.min_normal), (table_key, layout)
        assert f.min_normal == row["min_normal"], (table_key, layout)
        assert f.has_neg_zero == row["has_negative_zero"], (table_key, layout)


def test_main_prints_table():
    out = subprocess.run([sys.executable, "-m", "altgrad.formats"], capture_output=True, text=True, check=True).stdout
    assert "E4M3" in out and "448" in out and "57344" in out
