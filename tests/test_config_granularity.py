"""Row / block scaling keys in the quantization config: per-role values, validation, describe()
and the YAML round trip."""

import pytest

from altgrad.config import QuantizationConfig, RoleConfig


def block_config(**kw):
    base = dict(default_format="E2M5", grad_output_format="E5M2", scaling="current",
                granularity={"input": "block", "weight": "block", "grad_output": "row"})
    return QuantizationConfig(**(base | kw))


def test_per_role_granularity_reaches_each_role_and_describe():
    lc = block_config(block_2d={"weight": True}, scale_rounding={"input": "ceil"}).layer_config("h.0.mlp.c_fc")
    assert (lc.input.granularity, lc.weight.granularity, lc.grad_output.granularity) == ("block", "block", "row")
    assert lc.weight.block_2d and not lc.input.block_2d
    assert lc.describe() == "i:E2M5/b32-e8m0-ceil w:E2M5/b32x32-e8m0 go:E5M2/row-e8m0"


def test_tensor_granularity_keeps_the_old_describe():
    assert QuantizationConfig("E4M3", grad_output_format="E5M2").layer_config("x").describe() == "i:E4M3 w:E4M3 go:E5M2"


def test_one_value_applies_to_every_role():
    lc = QuantizationConfig("E4M3", scaling="current", granularity="block", block_size=128,
                            scale_format="fp32").layer_config("x")
    assert all(rc.granularity == "block" and rc.block_size == 128 and rc.scale_format == "fp32"
               for rc in (lc.input, lc.weight, lc.grad_output))


def test_dict_round_trip():
    cfg = block_config(block_size={"grad_output": 16}, scale_format="fp32")
    again = QuantizationConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.layer_config("x") == cfg.layer_config("x")


@pytest.mark.parametrize("kw, match", [
    (dict(scaling="delayed"), r"block scales are current .*set quant.scaling: current for input"),
    (dict(granularity="rows"), r"granularity must be one of 'tensor', 'row', 'block' \(got 'rows'\)"),
    (dict(block_size=24), r"block_size must be one of 16, 32, 64, 128 \(got 24\)"),
    (dict(block_size={"weights": 32}), r"unknown key 'weights'; allowed keys: input, weight"),
    (dict(scale_format="e4m3"), r"scale_format must be one of 'fp32', 'e8m0'"),
    (dict(scale_rounding="up"), r"scale_rounding must be one of 'floor', 'ceil'"),
    (dict(block_2d={"input": True}), r"2-D tiles are for granularity block on the weight role"),
    (dict(block_2d="yes"), r"block_2d must be true or false"),
])
def test_bad_values_raise_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        block_config(**kw)


def test_yaml_errors_name_the_quant_key():
    with pytest.raises(ValueError, match=r"^quant\.block_size must be one of"):
        QuantizationConfig.from_dict({"default_format": "E4M3", "block_size": 7})


def test_role_config_checks_its_own_keys():
    with pytest.raises(ValueError, match="row scales are current"):
        RoleConfig("E4M3", granularity="row")
    assert RoleConfig("E4M3", scaling="current", granularity="row").granularity == "row"
