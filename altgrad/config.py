"""Quantization config: which format each Linear layer uses, per tensor role.

Config is data: frozen dataclasses that validate themselves, built in Python or from the
`quant:` section of a YAML config (`QuantizationConfig.from_dict`, which the run config calls:
the one path from YAML), and written back with `to_dict()` (format names as strings) so a run
can save what it resolved. Every mistake raises `ConfigError` (a ValueError) with one line
naming the key (`quant.scaling`, `quant.layer_rules[1].format`, ...) and what is allowed.

    RoleConfig          how one operand (input, weight, grad_output, weight_grad) is quantized
    LayerQuantConfig    what one QuantizedLinear receives: a RoleConfig (or None) per role
    LayerPrecisionRule  regex on a layer's qualified name -> that layer's formats
    QuantizationConfig  default formats + rules + per-role options -> layer_config(name)

How a layer's formats are resolved (`QuantizationConfig.layer_config`):
  1. the first rule whose pattern `re.search`es the name decides the layer on its own:
     its `format` for input, weight and grad_output (None = high precision), then its per-role
     overrides; weight_grad gets the rule's format only when the config quantizes weight
     gradients at all (`weight_grad_format` set), unless overridden;
  2. else the config's role formats (`input_format`, `weight_format`, `grad_output_format`,
     `weight_grad_format`), where the first three default to `default_format`.
  A layer whose roles all come out None (and that gets no master-weight format) stays an
  nn.Linear. Master weights apply to every quantized layer except those a `format=None` rule
  keeps in high precision.

High precision is written one way: `None` (YAML `null`). The layer or role then keeps the
model's own compute precision (BF16 autocast on CUDA, fp32 on CPU). To keep a *layer* in high
precision, put a rule `{pattern: REGEX, format: null}` first in `layer_rules`; to keep a *role*
in high precision, set its format to null (`grad_output_format: null`, or a rule's
`grad_output: null`). Names such as "bf16" are not formats and raise, saying to write null;
the former `skip_patterns` key raises, saying to write a rule.

Per-role options: every scaling / rounding option (`ROLE_OPTIONS`) takes one value for every
role, or a mapping role -> value (`scaling: {input: delayed, grad_output: current}`); a role the
mapping leaves out takes RoleConfig's default.
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Mapping

from altgrad.formats import FormatSpec, get_format
from altgrad.vocabulary import (BLOCK_SIZES, HIGH_PRECISION_NAMES, ROLE_ABBREV, AmaxAlgo, Granularity, Role,
                                Rounding, ScaleFormat, ScaleRounding, ScalingType, choices)

__all__ = [
    "ConfigError",
    "ROLES",
    "ROLE_OPTIONS",
    "INHERIT",
    "RoleOptions",
    "RoleConfig",
    "LayerQuantConfig",
    "LayerPrecisionRule",
    "QuantizationConfig",
    "create_mixed_precision_config",
    "compile_pattern",
    "format_or_none",
    "config_fields",
]


class ConfigError(ValueError):
    """A mistake in a config (a YAML file, an override or a Python call): one line naming the key
    and what is allowed. The one error type of altgrad.config and altgrad.runconfig."""


# operands a config can quantize, in the order they are shown ("i:E4M3 w:E4M3 go:E5M2 wg:...")
ROLES = choices(Role)

# the allowed strings of each option, from altgrad.vocabulary (kept as names other modules import)
SCALING_MODES = choices(ScalingType)
AMAX_ALGOS = choices(AmaxAlgo)
ROUNDINGS = choices(Rounding)
# fine-grained (row / block) scaling: granularity tensor (one scale), row (one per slice along the
# GEMM's K), block (one per block_size run of K; block_2d: block_size x block_size tiles, weights
# only). scale_format e8m0 is a power of two (OCP MX) rounded by scale_rounding; fp32 is
# fmt.max / amax. altgrad.blockwise holds the rules.
GRANULARITIES = choices(Granularity)
SCALE_FORMATS = choices(ScaleFormat)
SCALE_ROUNDINGS = choices(ScaleRounding)
GRANULARITY_KEYS = ("granularity", "block_size", "block_2d", "scale_format", "scale_rounding")


# -- validation helpers ------------------------------------------------------------------------
def _check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, allowed))} (got {value!r})")


def _check_int(where: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `history_len: true` in YAML is a typo, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} must be an int >= {minimum} (got {value!r})")


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false (got {value!r})")


_OPTION_CHECKS = {
    "scaling": lambda where, v: _check_choice(where, v, SCALING_MODES),
    "history_len": lambda where, v: _check_int(where, v, 1),
    "amax_algo": lambda where, v: _check_choice(where, v, AMAX_ALGOS),
    "margin": lambda where, v: _check_int(where, v, 0),
    "pow2": _check_bool,
    "rounding": lambda where, v: _check_choice(where, v, ROUNDINGS),
    "saturate": _check_bool,
    "granularity": lambda where, v: _check_choice(where, v, GRANULARITIES),
    "block_size": lambda where, v: _check_choice(where, v, BLOCK_SIZES),
    "block_2d": _check_bool,
    "scale_format": lambda where, v: _check_choice(where, v, SCALE_FORMATS),
    "scale_rounding": lambda where, v: _check_choice(where, v, SCALE_ROUNDINGS),
}


def _check_role_options(name, role: str, opts: Mapping) -> None:
    """Validate one role's options (opts: every key of ROLE_OPTIONS); name(key) is the key as
    the user wrote it, for the message."""
    for key in ROLE_OPTIONS:
        _OPTION_CHECKS[key](name(key), opts[key])
    if opts["granularity"] != "tensor" and opts["scaling"] != "current":
        raise ConfigError(f"{name('granularity')}: {opts['granularity']} scales are current (computed from the "
                          f"tensor itself); scaling {opts['scaling']!r} is per-tensor only, so set "
                          f"{name('scaling')}: current for {role}")
    if opts["block_2d"] and (opts["granularity"] != "block" or role != "weight"):
        raise ConfigError(f"{name('block_2d')}: 2-D tiles are for granularity block on the weight role "
                          f"(got granularity {opts['granularity']!r} on {role})")


def _granularity_tag(g: Mapping) -> str:
    """'' for tensor scaling, else e.g. '/b32-e8m0', '/b32x32-e8m0-ceil', '/row-fp32'."""
    if g["granularity"] == "tensor":
        return ""
    bs = g["block_size"]
    gran = "row" if g["granularity"] == "row" else (f"b{bs}x{bs}" if g["block_2d"] else f"b{bs}")
    return f"/{gran}-{g['scale_format']}" + ("-ceil" if g["scale_rounding"] == "ceil" else "")


def format_or_none(where: str, value: Any) -> FormatSpec | None:
    """A format name / FormatSpec -> FormatSpec; None -> None (high precision). Raises ConfigError
    naming `where` for an unknown name."""
    if value is None or isinstance(value, FormatSpec):
        return value
    if isinstance(value, str) and value.strip().lower() in HIGH_PRECISION_NAMES:
        raise ConfigError(f"{where}: {value!r} is not a format; write null (None) for high precision, "
                          "the model's own precision (BF16 autocast on CUDA, fp32 on CPU)")
    try:
        return get_format(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err} (or null for high precision)") from None


def _format_name(fmt: FormatSpec | None) -> str | None:
    return None if fmt is None else fmt.name


def compile_pattern(where: str, pattern: Any) -> re.Pattern:
    """A layer-name regex, compiled; `where` names the key in the one-line ConfigError on a bad one."""
    if not isinstance(pattern, str):
        raise ConfigError(f"{where}: pattern must be a regex string (got {type(pattern).__name__})")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"{where}: pattern {pattern!r} is not a valid regex: {err}") from None


def _check_keys(where: str, d: Mapping, allowed: tuple) -> None:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a mapping (got {type(d).__name__})")
    for key in d:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


# -- one role ----------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class RoleOptions:
    """Every option a quantized role carries besides its format, with its default: declared once,
    shared by RoleConfig (one role's values) and QuantizationConfig (a value for every role, or a
    mapping role -> value). Scaling: docs/design.md §4; rounding: §3; granularity: docs/block_scaling.md."""

    scaling: str = "delayed"  # delayed | current | none
    history_len: int = 16  # delayed scaling's amax history length
    amax_algo: str = "max"  # max | most_recent over the history
    margin: int = 0  # scale = fmt.max / amax / 2**margin
    pow2: bool = False  # round the per-tensor scale down to a power of two
    rounding: str = "nearest"  # nearest | stochastic
    saturate: bool = True  # overflow to +-max (else inf / NaN)
    granularity: str = "tensor"  # tensor | row | block
    block_size: int = 32  # elements per block along K (granularity block)
    block_2d: bool = False  # block_size x block_size tiles (weights)
    scale_format: str = "e8m0"  # e8m0 (power of two) | fp32, for row / block scales
    scale_rounding: str = "floor"  # e8m0 exponent: floor (OCP MX) | ceil (never saturates)


# every option a role carries besides its format, in declaration order
ROLE_OPTIONS = tuple(f.name for f in fields(RoleOptions))


@dataclass(frozen=True)
class RoleConfig(RoleOptions):
    """How one operand is quantized: its format and its RoleOptions (keyword-only).

    `format` may be given as a name; it is stored as the FormatSpec."""

    format: FormatSpec

    def __post_init__(self):
        if self.format is None:
            raise ConfigError("RoleConfig.format must be a format name or FormatSpec; "
                              "a high-precision role is written as None in LayerQuantConfig")
        object.__setattr__(self, "format", format_or_none("RoleConfig.format", self.format))
        # block_2d is checked per role by QuantizationConfig; here any role may carry it
        _check_role_options(lambda key: f"RoleConfig.{key}", "weight", self.options)

    @property
    def options(self) -> dict:
        """Every option but the format (ROLE_OPTIONS -> value)."""
        return {k: getattr(self, k) for k in ROLE_OPTIONS}

    @classmethod
    def create(cls, format: str | FormatSpec, **options) -> "RoleConfig":
        return cls(format, **options)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "RoleConfig") -> "RoleConfig":
        _check_keys(where, d, ("format", *ROLE_OPTIONS))
        if "format" not in d:
            raise ConfigError(f"{where}: missing key 'format'")
        return cls(**d)

    def to_dict(self) -> dict:
        return {"format": self.format.name, **self.options}


# -- one layer ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerQuantConfig:
    """What one QuantizedLinear receives: a RoleConfig per operand (None = high precision),
    optionally a format for dW before the optimizer (`weight_grad`) and a storage format for
    the weights themselves after each optimizer step (`master_weights`, docs/design.md §5)."""

    input: RoleConfig | None
    weight: RoleConfig | None
    grad_output: RoleConfig | None
    weight_grad: RoleConfig | None = None
    master_weights: FormatSpec | None = None
    master_rounding: str = "nearest"

    def __post_init__(self):
        for role in ROLES:
            value = getattr(self, role)
            if value is not None and not isinstance(value, RoleConfig):
                raise ConfigError(f"LayerQuantConfig.{role} must be a RoleConfig or None (got {type(value).__name__})")
        object.__setattr__(self, "master_weights",
                           format_or_none("LayerQuantConfig.master_weights", self.master_weights))
        _check_choice("LayerQuantConfig.master_rounding", self.master_rounding, ROUNDINGS)

    @property
    def formats(self) -> dict[str, FormatSpec | None]:
        """role -> FormatSpec or None, for every role in ROLES."""
        return {role: (rc.format if (rc := getattr(self, role)) is not None else None) for role in ROLES}

    def describe(self) -> str:
        """e.g. 'i:E4M3 w:E4M3 go:E5M2'; weight_grad / master weights appear only when set."""
        fmts = self.formats
        tags = {r: (_granularity_tag(rc.options) if (rc := getattr(self, r)) else "") for r in ROLES}
        parts = [f"{ROLE_ABBREV[r]}:{fmts[r].name if fmts[r] else '-'}{tags[r]}" for r in ROLES[:3]]
        if fmts["weight_grad"] is not None:
            parts.append(f"wg:{fmts['weight_grad'].name}{tags['weight_grad']}")
        if self.master_weights is not None:
            parts.append(f"mw:{self.master_weights.name}({self.master_rounding})")
        return " ".join(parts)

    def to_dict(self) -> dict:
        d: dict[str, Any] = {role: (rc.to_dict() if (rc := getattr(self, role)) else None) for role in ROLES}
        d["master_weights"] = _format_name(self.master_weights)
        d["master_rounding"] = self.master_rounding
        return d


# -- rules -------------------------------------------------------------------------------------
class _Inherit:
    """Marker for a per-role override that was not given (None would mean high precision)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self):
        return "INHERIT"

    def __reduce__(self):  # keep the singleton through copy.deepcopy and pickle
        return (_Inherit, ())


INHERIT = _Inherit()
_RULE_KEYS = ("pattern", "format") + ROLES


@dataclass(frozen=True)
class LayerPrecisionRule:
    """Layers whose qualified name matches `pattern` (re.search) use `format` for every role
    (None = high precision), except the roles given as keyword overrides (a name or None)."""

    pattern: str
    format: FormatSpec | None
    _: KW_ONLY  # overrides are keyword-only: LayerPrecisionRule("mlp", "E4M3", grad_output="E5M2")
    input: Any = INHERIT
    weight: Any = INHERIT
    grad_output: Any = INHERIT
    weight_grad: Any = INHERIT

    def __post_init__(self):
        self._resolve(f"LayerPrecisionRule(pattern={self.pattern!r})")

    def _resolve(self, where: str) -> None:
        """Compile the pattern and turn names into FormatSpecs; errors name `where`."""
        object.__setattr__(self, "_regex", compile_pattern(where, self.pattern))
        object.__setattr__(self, "format", format_or_none(f"{where}.format", self.format))
        for role in ROLES:
            value = getattr(self, role)
            if value is not INHERIT:
                object.__setattr__(self, role, format_or_none(f"{where}.{role}", value))

    def matches(self, name: str) -> bool:
        return self._regex.search(name) is not None

    def role_format(self, role: str, default: FormatSpec | None) -> FormatSpec | None:
        """The override for `role` if one was given, else `default`."""
        value = getattr(self, role)
        return default if value is INHERIT else value

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "layer rule") -> "LayerPrecisionRule":
        _check_keys(where, d, _RULE_KEYS)
        for key in ("pattern", "format"):
            if key not in d:
                raise ConfigError(f"{where}: missing key {key!r} (use format: null for high precision)")
        rule = cls.__new__(cls)  # resolved once, with errors that name the rule's place in the file
        for f in fields(cls):
            object.__setattr__(rule, f.name, d.get(f.name, INHERIT))
        rule._resolve(where)
        return rule

    def to_dict(self) -> dict:
        d = {"pattern": self.pattern, "format": _format_name(self.format)}
        for role in ROLES:
            value = getattr(self, role)
            if value is not INHERIT:
                d[role] = _format_name(value)
        return d


# -- the whole model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationConfig(RoleOptions):
    """Formats and options for every Linear layer of a model (resolution order: module docstring).

    `input_format`, `weight_format`, `grad_output_format` default to `default_format`
    (pass None explicitly to keep a role in high precision); the hybrid recipe is
    `QuantizationConfig("E4M3", grad_output_format="E5M2")`. Each option of ROLE_OPTIONS is one
    value for every quantized role or a mapping role -> value (absent roles: RoleConfig's default).

    Raises:
        ConfigError: a bad value, naming the key as the YAML section spells it (`quant.<key>`,
            `quant.<key>.<role>`, `quant.layer_rules[i]...`).
    """

    default_format: FormatSpec | None
    layer_rules: tuple = ()
    input_format: Any = INHERIT
    weight_format: Any = INHERIT
    grad_output_format: Any = INHERIT
    weight_grad_format: FormatSpec | None = None
    # RoleOptions' fields (keyword-only): a value for every role, or a mapping role -> value
    master_weights: FormatSpec | None = None
    master_rounding: str = "nearest"

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        default = format_or_none("quant.default_format", self.default_format)
        set_("default_format", default)
        for role in ROLES:
            name = f"{role}_format"
            value = getattr(self, name)
            set_(name, default if value is INHERIT else format_or_none(f"quant.{name}", value))
        set_("master_weights", format_or_none("quant.master_weights", self.master_weights))
        _check_choice("quant.master_rounding", self.master_rounding, ROUNDINGS)
        for key in ROLE_OPTIONS:
            value = getattr(self, key)
            if isinstance(value, Mapping):
                _check_keys(f"quant.{key}", value, ROLES)
                set_(key, dict(value))
        for role in ROLES:
            per_role = lambda key: f"quant.{key}.{role}" if isinstance(getattr(self, key), dict) else f"quant.{key}"  # noqa: E731
            _check_role_options(per_role, role, self.options_for(role))
        set_("layer_rules", self._rules_tuple(self.layer_rules))

    @staticmethod
    def _rules_tuple(rules) -> tuple:
        if rules is None:
            return ()
        if not isinstance(rules, (list, tuple)):
            raise ConfigError(f"quant.layer_rules must be a list of rules (got {type(rules).__name__})")
        out = []
        for i, rule in enumerate(rules):
            where = f"quant.layer_rules[{i}]"
            if isinstance(rule, Mapping):
                rule = LayerPrecisionRule.from_dict(rule, where)
            elif not isinstance(rule, LayerPrecisionRule):
                raise ConfigError(f"{where} must be a mapping with keys {', '.join(_RULE_KEYS)} (pattern and "
                                  f"format required, e.g. {{pattern: 'lm_head$', format: null}}) or a "
                                  f"LayerPrecisionRule (got {type(rule).__name__})")
            out.append(rule)
        return tuple(out)

    # -- resolution ----------------------------------------------------------------------------
    def matching_rule(self, name: str) -> LayerPrecisionRule | None:
        """The first rule whose pattern matches `name`, or None."""
        return next((rule for rule in self.layer_rules if rule.matches(name)), None)

    def role_formats(self, name: str) -> tuple[dict[str, FormatSpec | None], FormatSpec | None]:
        """(role -> format, master-weight format) for the layer called `name`."""
        rule = self.matching_rule(name)
        if rule is None:
            return {role: getattr(self, f"{role}_format") for role in ROLES}, self.master_weights
        base = dict.fromkeys(ROLES, rule.format)
        if self.weight_grad_format is None:
            base["weight_grad"] = None  # dW quantization is off unless the config turns it on
        fmts = {role: rule.role_format(role, base[role]) for role in ROLES}
        return fmts, (self.master_weights if rule.format is not None else None)

    def layer_config(self, name: str) -> LayerQuantConfig | None:
        """What the QuantizedLinear called `name` receives; None = leave it an nn.Linear."""
        fmts, master = self.role_formats(name)
        if master is None and all(f is None for f in fmts.values()):
            return None
        roles = {role: (RoleConfig(f, **self.options_for(role)) if f is not None else None)
                 for role, f in fmts.items()}
        return LayerQuantConfig(**roles, master_weights=master, master_rounding=self.master_rounding)

    def options_for(self, role: str) -> dict:
        """ROLE_OPTIONS -> value for `role` (a per-role mapping's entry, else the shared value)."""
        defaults = {f.name: f.default for f in fields(RoleConfig)}
        out = {}
        for key in ROLE_OPTIONS:
            value = getattr(self, key)
            out[key] = value.get(role, defaults[key]) if isinstance(value, Mapping) else value
        return out

    @property
    def enabled(self) -> bool:
        """False when no layer can be quantized (the high-precision baseline)."""
        if self.master_weights is not None or any(getattr(self, f"{r}_format") is not None for r in ROLES):
            return True
        return any(rule.format is not None or any(getattr(rule, r) not in (None, INHERIT) for r in ROLES)
                   for rule in self.layer_rules)

    # -- dict round trip -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping) -> "QuantizationConfig":
        """Build from the YAML `quant:` section (a mapping of this class's fields).

        Raises:
            ConfigError: an unknown or missing key, or a bad value (one line naming `quant.<key>`).
        """
        if isinstance(d, Mapping) and "skip_patterns" in d:
            raise ConfigError("quant.skip_patterns: not a key; keep a layer in high precision with a rule "
                              "first in quant.layer_rules: {pattern: REGEX, format: null}")
        _check_keys("quant", d, tuple(f.name for f in config_fields(cls)))
        if "default_format" not in d:
            raise ConfigError("quant: missing key 'default_format' (a format name such as 'E5M2', "
                              "or null for no quantization)")
        return cls(**d)

    def to_dict(self) -> dict:
        """Plain data (format names as strings, None = high precision) that from_dict rebuilds."""
        d = {}
        for f in config_fields(type(self)):
            value = getattr(self, f.name)
            if isinstance(value, FormatSpec) or value is None:
                value = _format_name(value)
            d[f.name] = dict(value) if isinstance(value, Mapping) else value
        d["layer_rules"] = [rule.to_dict() for rule in self.layer_rules]
        return d


def config_fields(cls) -> list:
    """cls's dataclass fields with RoleOptions' (keyword-only, declared first) after its own: the
    order a config is written and described in."""
    own = [f for f in fields(cls) if f.name not in ROLE_OPTIONS]
    return own + [f for f in fields(cls) if f.name in ROLE_OPTIONS]


def create_mixed_precision_config(attention_format: str | FormatSpec | None = None,
                                  mlp_format: str | FormatSpec | None = "E5M2",
                                  lm_head_format: str | FormatSpec | None = None,
                                  **kwargs) -> QuantizationConfig:
    """Per-block formats for nanoGPT module names (`transformer.h.N.attn.c_attn`, ...).

    Rules for attention (c_attn, c_proj), MLP (c_fc, c_proj) and lm_head; layers none of them
    match use `default_format` (default None: high precision). Rules passed in `layer_rules`
    come first, so they win over the generated ones. Other keywords go to QuantizationConfig."""
    rules = tuple(kwargs.pop("layer_rules", ())) + (
        LayerPrecisionRule(r"(^|\.)attn\.(c_attn|c_proj)$", attention_format),
        LayerPrecisionRule(r"(^|\.)mlp\.(c_fc|c_proj)$", mlp_format),
        LayerPrecisionRule(r"(^|\.)lm_head$", lm_head_format),
    )
    kwargs.setdefault("default_format", None)
    return QuantizationConfig(layer_rules=rules, **kwargs)
