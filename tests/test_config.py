"""QuantizationConfig, LayerPrecisionRule, RoleConfig: resolution rules, validation, dict round trip."""

import copy
import dataclasses
import pickle

import pytest
import yaml

from altgrad.config import (
    ROLE_OPTIONS,
    RoleOptions,
    ConfigError,
    INHERIT,
    LayerPrecisionRule,
    LayerQuantConfig,
    QuantizationConfig,
    RoleConfig,
    create_mixed_precision_config,
)
from altgrad.formats import get_format

E4M3, E5M2, E3M4 = get_format("E4M3"), get_format("E5M2"), get_format("E3M4")

# nanoGPT module names, as altgrad/model.py spells them
GPT_LINEARS = [f"transformer.h.{i}.{m}" for i in range(2)
               for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")] + ["lm_head"]


def names(layer: LayerQuantConfig | None) -> dict | None:
    """role -> format name (or None) of a resolved layer, None for an unquantized layer."""
    if layer is None:
        return None
    return {role: (f.name if f is not None else None) for role, f in layer.formats.items()}


# -- RoleConfig --------------------------------------------------------------------------------
def test_role_config_stores_format_spec_from_any_spelling():
    for spelling in ("E4M3", "e4m3", " E4m3 ", E4M3):
        rc = RoleConfig(spelling)
        assert rc.format is E4M3
    rc = RoleConfig.create("E3M4_NONE_B1", scaling="current", rounding="stochastic")
    assert (rc.format.name, rc.format.bias, rc.format.specials) == ("E3M4_NONE_B1", 1, "none")
    assert (rc.scaling, rc.rounding, rc.history_len, rc.amax_algo) == ("current", "stochastic", 16, "max")


@pytest.mark.parametrize("field, value, allowed", [
    ("scaling", "later", "'delayed', 'current', 'none'"),
    ("amax_algo", "mean", "'max', 'most_recent'"),
    ("rounding", "up", "'nearest', 'stochastic'"),
    ("history_len", 0, ">= 1"),
    ("history_len", True, ">= 1"),
    ("history_len", 2.0, ">= 1"),
    ("margin", -1, ">= 0"),
    ("pow2", "yes", "true or false"),
    ("saturate", 1, "true or false"),
])
def test_role_config_bad_option_names_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError, match=rf"RoleConfig\.{field} must be .*{allowed}"):
        RoleConfig("E5M2", **{field: value})


@pytest.mark.parametrize("fmt, match", [
    ("E9M9", r"RoleConfig\.format: unknown format 'E9M9'"),
    ("FP8", r"RoleConfig\.format: unknown format 'FP8'.*registered: E5M2"),
    (8, r"RoleConfig\.format: format must be a name"),
    (None, r"RoleConfig\.format must be a format name"),
    ("bf16", r"RoleConfig\.format: 'bf16' is not a format; write null \(None\) for high precision"),
])
def test_role_config_bad_format(fmt, match):
    with pytest.raises(ValueError, match=match):
        RoleConfig(fmt)


def test_role_config_dict_round_trip_and_unknown_key():
    rc = RoleConfig("E2M5", scaling="none", margin=2, pow2=True, saturate=False, amax_algo="most_recent")
    d = rc.to_dict()
    assert d["format"] == "E2M5" and d["margin"] == 2
    assert RoleConfig.from_dict(d) == rc
    with pytest.raises(ValueError, match=r"unknown key 'scale_mode'; allowed keys: format, scaling"):
        RoleConfig.from_dict({"format": "E5M2", "scale_mode": "delayed"})
    with pytest.raises(ValueError, match=r"missing key 'format'"):
        RoleConfig.from_dict({"scaling": "current"})


# -- LayerQuantConfig --------------------------------------------------------------------------
def test_layer_config_describe():
    hybrid = LayerQuantConfig(RoleConfig("E4M3"), RoleConfig("E4M3"), RoleConfig("E5M2"))
    assert hybrid.describe() == "i:E4M3 w:E4M3 go:E5M2"
    only_grads = LayerQuantConfig(None, None, RoleConfig("E5M2"))
    assert only_grads.describe() == "i:- w:- go:E5M2"
    full = LayerQuantConfig(RoleConfig("E3M4"), RoleConfig("E3M4"), RoleConfig("E5M2"),
                            weight_grad=RoleConfig("E5M2"), master_weights="e3m4", master_rounding="stochastic")
    assert full.master_weights is E3M4
    assert full.describe() == "i:E3M4 w:E3M4 go:E5M2 wg:E5M2 mw:E3M4(stochastic)"
    assert full.formats == {"input": E3M4, "weight": E3M4, "grad_output": E5M2, "weight_grad": E5M2}


def test_layer_config_bad_input():
    with pytest.raises(ValueError, match=r"LayerQuantConfig\.weight must be a RoleConfig or None \(got str\)"):
        LayerQuantConfig(None, "E4M3", None)
    with pytest.raises(ValueError, match=r"LayerQuantConfig\.master_rounding must be one of 'nearest', 'stochastic'"):
        LayerQuantConfig(None, None, None, master_rounding="floor")
    with pytest.raises(ValueError, match=r"LayerQuantConfig\.master_weights: unknown format 'E4M4'"):
        LayerQuantConfig(None, None, None, master_weights="E4M4")


# -- LayerPrecisionRule ------------------------------------------------------------------------
def test_rule_matches_with_re_search():
    rule = LayerPrecisionRule(r"mlp\.c_(fc|proj)$", "E5M2")
    assert rule.matches("transformer.h.0.mlp.c_fc")
    assert rule.matches("mlp.c_proj")
    assert not rule.matches("transformer.h.0.attn.c_proj")
    assert not rule.matches("transformer.h.0.mlp.c_fc.extra")
    assert rule.format is E5M2


def test_rule_overrides_distinguish_none_from_not_given():
    rule = LayerPrecisionRule("attn", "E4M3", grad_output="E5M2", input=None)
    assert rule.weight is INHERIT and rule.weight_grad is INHERIT
    assert rule.role_format("weight", E4M3) is E4M3
    assert rule.role_format("input", E4M3) is None
    assert rule.role_format("grad_output", E4M3) is E5M2
    assert rule.to_dict() == {"pattern": "attn", "format": "E4M3", "input": None, "grad_output": "E5M2"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(pattern="attn[", format="E4M3"),
     r"LayerPrecisionRule\(pattern='attn\['\): pattern 'attn\[' is not a valid regex: unterminated"),
    (dict(pattern="(mlp", format=None), r"pattern '\(mlp' is not a valid regex: missing \)"),
    (dict(pattern=3, format="E4M3"), r"pattern must be a regex string \(got int\)"),
    (dict(pattern="mlp", format="E5M3"), r"LayerPrecisionRule\(pattern='mlp'\)\.format: unknown format 'E5M3'"),
    (dict(pattern="mlp", format="E5M2", grad_output="E8M0"),
     r"LayerPrecisionRule\(pattern='mlp'\)\.grad_output: unknown format 'E8M0'"),
])
def test_rule_bad_input_names_the_rule(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerPrecisionRule(**kwargs)


def weight_format(cfg, name):
    """The weight role's format of the layer called name (None: the layer stays high precision)."""
    lc = cfg.layer_config(name)
    return None if lc is None else lc.weight.format


# -- QuantizationConfig resolution -------------------------------------------------------------
def test_role_formats_default_to_default_format():
    cfg = QuantizationConfig("E5M2")
    assert (cfg.input_format, cfg.weight_format, cfg.grad_output_format) == (E5M2, E5M2, E5M2)
    assert cfg.weight_grad_format is None and cfg.enabled
    for name in GPT_LINEARS:
        assert names(cfg.layer_config(name)) == {"input": "E5M2", "weight": "E5M2",
                                                 "grad_output": "E5M2", "weight_grad": None}
        assert weight_format(cfg, name) is E5M2


def test_hybrid_recipe_per_role():
    cfg = QuantizationConfig("E4M3", grad_output_format="E5M2")
    layer = cfg.layer_config("transformer.h.1.mlp.c_fc")
    assert layer.describe() == "i:E4M3 w:E4M3 go:E5M2"
    # a role can be kept in high precision explicitly
    cfg = QuantizationConfig("E4M3", input_format=None)
    assert cfg.layer_config("lm_head").describe() == "i:- w:E4M3 go:E4M3"


def test_first_matching_rule_wins_and_order_matters():
    specific = LayerPrecisionRule(r"h\.0\.mlp", "E3M4")
    general = LayerPrecisionRule(r"mlp", "E5M2")
    cfg = QuantizationConfig("E4M3", layer_rules=[specific, general])
    assert weight_format(cfg, "transformer.h.0.mlp.c_fc") is E3M4
    assert weight_format(cfg, "transformer.h.1.mlp.c_fc") is E5M2
    assert weight_format(cfg, "transformer.h.0.attn.c_attn") is E4M3  # no rule: default
    swapped = QuantizationConfig("E4M3", layer_rules=[general, specific])
    assert weight_format(swapped, "transformer.h.0.mlp.c_fc") is E5M2


def test_rule_format_none_keeps_layer_high_precision():
    cfg = QuantizationConfig("E4M3", grad_output_format="E5M2", master_weights="E4M3",
                             layer_rules=[LayerPrecisionRule("lm_head", None)])
    assert cfg.layer_config("lm_head") is None
    assert weight_format(cfg, "lm_head") is None
    other = cfg.layer_config("transformer.h.0.attn.c_attn")
    assert other.describe() == "i:E4M3 w:E4M3 go:E5M2 mw:E4M3(nearest)"


def test_rule_decides_all_roles_and_overrides_per_role():
    # the config's own grad_output format applies only where no rule matches
    cfg = QuantizationConfig("E4M3", grad_output_format="E5M2", layer_rules=[
        LayerPrecisionRule(r"mlp", "E3M4"),
        LayerPrecisionRule(r"attn", "E4M3", grad_output="E5M2", input=None),
        LayerPrecisionRule(r"lm_head", None, grad_output="E5M2"),  # only gradients quantized
    ])
    assert cfg.layer_config("h.0.mlp.c_fc").describe() == "i:E3M4 w:E3M4 go:E3M4"
    assert cfg.layer_config("h.0.attn.c_attn").describe() == "i:- w:E4M3 go:E5M2"
    assert cfg.layer_config("lm_head").describe() == "i:- w:- go:E5M2"
    assert cfg.layer_config("wte_proj").describe() == "i:E4M3 w:E4M3 go:E5M2"


def test_different_formats_on_different_layers_of_one_model():
    fmts = ["E5M2", "E4M3", "E3M4", "E2M5", "E1M6", "E6M1", "E7M0", "E0M7"]
    rules = [LayerPrecisionRule(rf"^layers\.{i}$", f) for i, f in enumerate(fmts)]
    cfg = QuantizationConfig(None, layer_rules=rules)
    for i, f in enumerate(fmts):
        assert cfg.layer_config(f"layers.{i}").weight.format is get_format(f)
    assert cfg.layer_config("layers.8") is None  # no rule, default None: high precision
    assert cfg.layer_config("layers.10") is None  # the anchors keep layers.1 from matching


def test_weight_grad_and_master_weights_resolution():
    off = QuantizationConfig("E4M3", layer_rules=[LayerPrecisionRule("mlp", "E3M4")])
    assert off.layer_config("mlp.c_fc").weight_grad is None
    on = QuantizationConfig("E4M3", weight_grad_format="E5M2", master_weights="E4M3",
                            master_rounding="stochastic",
                            layer_rules=[LayerPrecisionRule("mlp", "E3M4"),
                                         LayerPrecisionRule("attn", "E4M3", weight_grad=None)])
    assert on.layer_config("lm_head").describe() == "i:E4M3 w:E4M3 go:E4M3 wg:E5M2 mw:E4M3(stochastic)"
    assert on.layer_config("mlp.c_fc").weight_grad.format is E3M4  # dW follows the rule's format
    assert on.layer_config("attn.c_attn").weight_grad is None


def test_master_weights_alone_makes_a_layer_quantized():
    cfg = QuantizationConfig(None, master_weights="E5M2")
    layer = cfg.layer_config("fc")
    assert layer is not None and layer.describe() == "i:- w:- go:- mw:E5M2(nearest)"
    assert cfg.enabled


def test_scaling_options_reach_every_role():
    cfg = QuantizationConfig("E4M3", grad_output_format="E5M2", weight_grad_format="E5M2", scaling="current",
                             history_len=7, amax_algo="most_recent", margin=3, pow2=True,
                             rounding="stochastic", saturate=False)
    layer = cfg.layer_config("fc")
    for role in ("input", "weight", "grad_output", "weight_grad"):
        rc = getattr(layer, role)
        assert (rc.scaling, rc.history_len, rc.amax_algo, rc.margin, rc.pow2, rc.rounding, rc.saturate) == (
            "current", 7, "most_recent", 3, True, "stochastic", False)


def test_a_null_rule_first_keeps_a_layer_in_high_precision():
    cfg = QuantizationConfig("E5M2", layer_rules=[LayerPrecisionRule(r"lm_head$", None),
                                                  LayerPrecisionRule("lm_head", "E4M3")])
    assert cfg.layer_config("lm_head") is None and weight_format(cfg, "lm_head") is None
    assert cfg.layer_config("lm_head_proj").weight.format is E4M3
    assert cfg.layer_config("h.0.mlp.c_fc").weight.format is E5M2


@pytest.mark.parametrize("name", ["bf16", "BF16", "fp32", "none"])
def test_high_precision_is_written_null_and_names_are_refused(name):
    for make in (lambda: QuantizationConfig(name), lambda: QuantizationConfig("E4M3", grad_output_format=name),
                 lambda: QuantizationConfig.from_dict({"default_format": "E4M3",
                                                       "layer_rules": [{"pattern": "x", "format": name}]})):
        with pytest.raises(ConfigError, match=rf"'{name}' is not a format; write null \(None\) for high precision"):
            make()


def test_skip_patterns_is_refused_naming_the_rule_to_write():
    with pytest.raises(ConfigError, match=r"^quant\.skip_patterns: not a key; .* \{pattern: REGEX, format: null\}$"):
        QuantizationConfig.from_dict({"default_format": "E4M3", "skip_patterns": ["lm_head"]})


def test_high_precision_default_is_the_baseline():
    baseline = None
    cfg = QuantizationConfig(baseline)
    assert cfg.default_format is None and not cfg.enabled
    assert all(cfg.layer_config(n) is None for n in GPT_LINEARS)
    assert cfg.to_dict()["default_format"] is None
    # a rule can still quantize one part of a baseline model
    part = QuantizationConfig(baseline, layer_rules=[LayerPrecisionRule("mlp", "E5M2")])
    assert part.enabled and part.layer_config("h.0.mlp.c_fc") is not None and part.layer_config("lm_head") is None


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match=r"^quant\.scaling must be one of 'delayed', 'current', 'none'"):
        QuantizationConfig("E5M2", scaling="dynamic")
    with pytest.raises(ConfigError, match=r"^quant\.grad_output_format: unknown format 'E5M3'"):
        QuantizationConfig("E4M3", grad_output_format="E5M3")
    with pytest.raises(ConfigError, match=r"^quant\.layer_rules\[1\]: pattern 'lm_head\(' is not a valid regex"):
        QuantizationConfig.from_dict({"default_format": "E4M3", "layer_rules": [
            {"pattern": "attn", "format": None}, {"pattern": "lm_head(", "format": None}]})
    with pytest.raises(ValueError, match=r"layer_rules must be a list of rules \(got LayerPrecisionRule\)"):
        QuantizationConfig("E4M3", layer_rules=LayerPrecisionRule("mlp", None))
    with pytest.raises(ValueError, match=r"layer_rules\[1\] must be a mapping with keys pattern, format, .* or a LayerPrecisionRule \(got str\)"):
        QuantizationConfig("E4M3", layer_rules=[LayerPrecisionRule("mlp", None), "attn"])


# -- from_dict / to_dict -----------------------------------------------------------------------
QUANT_YAML = """
default_format: e4m3
grad_output_format: E5M2
scaling: current
margin: 1
master_weights: E3M4_NONE_B1
master_rounding: stochastic
layer_rules:
  - {pattern: '^transformer\\.wpe', format: null}
  - {pattern: 'lm_head$', format: null}
  - {pattern: 'mlp\\.c_fc', format: P3109_P4, grad_output: E5M2, weight_grad: E5M2}
  - {pattern: 'attn', format: null, input: E2M5}
"""


def test_from_yaml_section_and_round_trip():
    cfg = QuantizationConfig.from_dict(yaml.safe_load(QUANT_YAML))
    assert cfg.layer_config("transformer.wpe") is None
    assert cfg.layer_config("lm_head") is None
    fc = cfg.layer_config("transformer.h.0.mlp.c_fc")
    assert names(fc) == {"input": "P3109_P4", "weight": "P3109_P4", "grad_output": "E5M2", "weight_grad": "E5M2"}
    assert fc.master_weights.name == "E3M4_NONE_B1" and fc.input.scaling == "current" and fc.input.margin == 1
    assert cfg.layer_config("transformer.h.0.attn.c_proj").describe() == "i:E2M5 w:- go:-"
    assert cfg.layer_config("transformer.h.0.mlp.c_proj").describe() == \
        "i:E4M3 w:E4M3 go:E5M2 mw:E3M4_NONE_B1(stochastic)"
    # to_dict is plain data: it survives YAML and rebuilds an equal config
    d = cfg.to_dict()
    assert d["default_format"] == "E4M3" and d["layer_rules"][3] == {"pattern": "attn", "format": None,
                                                                    "input": "E2M5"}
    again = QuantizationConfig.from_dict(yaml.safe_load(yaml.safe_dump(d)))
    assert again == cfg
    for name in GPT_LINEARS + ["transformer.wpe"]:
        assert again.layer_config(name) == cfg.layer_config(name)


def test_from_dict_minimal_and_empty_lists():
    cfg = QuantizationConfig.from_dict({"default_format": "E5M2", "layer_rules": None})
    assert cfg == QuantizationConfig("E5M2")


@pytest.mark.parametrize("section, match", [
    ({"default_format": "E4M3", "scale": "delayed"},
     r"^quant: unknown key 'scale'; allowed keys: default_format, layer_rules, .*master_rounding, scaling, .*scale_rounding$"),
    ({"grad_output_format": "E5M2"}, r"^quant: missing key 'default_format'"),
    ({"default_format": "E4M4"}, r"^quant\.default_format: unknown format 'E4M4'"),
    ({"default_format": "E4M3", "history_len": 0}, r"^quant\.history_len must be an int >= 1 \(got 0\)"),
    ({"default_format": "E4M3", "layer_rules": [{"pattern": "mlp", "format": "E5M2"}, {"pattern": "attn["}]},
     r"^quant\.layer_rules\[1\]: missing key 'format'"),
    ({"default_format": "E4M3", "layer_rules": [{"pattern": "attn[", "format": "E5M2"}]},
     r"^quant\.layer_rules\[0\]: pattern 'attn\[' is not a valid regex"),
    ({"default_format": "E4M3", "scaling": {"grad_output": "cur"}},
     r"^quant\.scaling\.grad_output must be one of 'delayed', 'current', 'none' \(got 'cur'\)$"),
    ({"default_format": "E4M3", "margin": {"wgrad": 1}}, r"^quant\.margin: unknown key 'wgrad'; allowed keys: input,"),
    ({"default_format": "E4M3", "layer_rules": [{"pattern": "mlp", "format": "E5M2", "go": "E5M2"}]},
     r"^quant\.layer_rules\[0\]: unknown key 'go'; allowed keys: pattern, format, input, weight, grad_output"),
    ({"default_format": "E4M3", "layer_rules": {"pattern": "mlp", "format": "E5M2"}},
     r"^quant\.layer_rules must be a list of rules \(got dict\)"),
    ("E4M3", r"^quant must be a mapping \(got str\)"),
])
def test_from_dict_errors_name_the_key(section, match):
    with pytest.raises(ConfigError, match=match):
        QuantizationConfig.from_dict(section)


# -- create_mixed_precision_config -------------------------------------------------------------
def test_mixed_precision_config_on_nanogpt_names():
    cfg = create_mixed_precision_config()  # attention high precision, MLP E5M2, lm_head high precision
    for name in GPT_LINEARS:
        expected = E5M2 if ".mlp." in name else None
        assert weight_format(cfg, name) is expected, name
        assert (cfg.layer_config(name) is None) == (expected is None), name
    mixed = create_mixed_precision_config("E4M3", "E3M4", "E5M2", scaling="current", grad_output_format="E5M2")
    assert mixed.layer_config("transformer.h.1.attn.c_proj").describe() == "i:E4M3 w:E4M3 go:E4M3"
    assert mixed.layer_config("transformer.h.1.mlp.c_proj").describe() == "i:E3M4 w:E3M4 go:E3M4"
    assert mixed.layer_config("lm_head").input.scaling == "current"
    # names outside the nanoGPT blocks fall to the config's role formats (default None, go E5M2 here)
    assert mixed.layer_config("transformer.h.0.crossattn.c_attn").describe() == "i:- w:- go:E5M2"
    assert mixed.layer_config("encoder.lm_head_extra").describe() == "i:- w:- go:E5M2"
    assert create_mixed_precision_config("E4M3").layer_config("transformer.h.0.crossattn.c_attn") is None


def test_mixed_precision_user_rules_come_first():
    cfg = create_mixed_precision_config(mlp_format="E5M2", default_format="E4M3",
                                        layer_rules=[LayerPrecisionRule(r"h\.0\.mlp", None)])
    assert cfg.layer_config("transformer.h.0.mlp.c_fc") is None
    assert weight_format(cfg, "transformer.h.1.mlp.c_fc") is E5M2
    assert weight_format(cfg, "transformer.h.1.attn.c_attn") is None
    assert weight_format(cfg, "some.other.proj") is E4M3


def test_configs_survive_pickle_and_deepcopy():
    # checkpoints and inplace=False surgery copy configs; rules keep their "not given" overrides
    cfg = QuantizationConfig("E4M3", layer_rules=[LayerPrecisionRule("wpe", None),
        LayerPrecisionRule("mlp", "E5M2", input=None), LayerPrecisionRule("attn", None)])
    for clone in (pickle.loads(pickle.dumps(cfg)), copy.deepcopy(cfg)):
        assert clone == cfg and clone.layer_rules[1].weight is INHERIT
        assert clone.layer_config("h.0.mlp.c_fc").describe() == "i:- w:E5M2 go:E5M2"
        assert clone.layer_config("transformer.wpe_proj") is None and clone.layer_config("attn.c_attn") is None


def test_every_role_option_can_differ_per_role():
    """Each scaling / rounding option takes a mapping role -> value; absent roles keep RoleConfig's default."""
    per_role = {"scaling": {"input": "current", "grad_output": "none"}, "history_len": {"weight": 4},
                "amax_algo": {"grad_output": "most_recent"}, "margin": {"input": 2}, "pow2": {"weight": True},
                "rounding": {"grad_output": "stochastic"}, "saturate": {"input": False},
                "granularity": {"input": "row"}, "scale_format": {"input": "fp32"}}
    cfg = QuantizationConfig.from_dict({"default_format": "E4M3", **per_role})
    layer = cfg.layer_config("h.0.mlp.c_fc")
    default = RoleConfig("E4M3")
    for key, by_role in per_role.items():
        for role in ("input", "weight", "grad_output"):
            assert getattr(getattr(layer, role), key) == by_role.get(role, getattr(default, key)), (key, role)
    assert QuantizationConfig.from_dict(cfg.to_dict()) == cfg


def test_role_options_are_declared_once_for_both_configs():
    options = {f.name: f.default for f in dataclasses.fields(RoleOptions)}
    assert tuple(options) == ROLE_OPTIONS
    for cls in (RoleConfig, QuantizationConfig):
        assert issubclass(cls, RoleOptions)
        assert {f.name: f.default for f in dataclasses.fields(cls) if f.name in options} == options
    # the options are keyword-only: the format (RoleConfig) / default_format stay the first positional
    assert RoleConfig("E4M3").format.name == "E4M3" and QuantizationConfig("E5M2").default_format.name == "E5M2"
    with pytest.raises(TypeError):
        RoleConfig("E4M3", "current")
    assert list(RoleConfig("E4M3").to_dict()) == ["format", *ROLE_OPTIONS]
