"""Quantization config: which format each Linear layer uses, per tensor role.

Config is data: frozen dataclasses that validate themselves, built in Python or from the
`quant:` section of a YAML config (`QuantizationConfig.from_dict`), and written back with
`to_dict()` (format names as strings) so a run can save what it resolved.

    RoleConfig          how one operand (input, weight, grad_output, weight_grad) is quantized
    LayerQuantConfig    what one QuantizedLinear receives: a RoleConfig (or None) per role
    LayerPrecisionRule  regex on a layer's qualified name -> that layer's formats
    QuantizationConfig  default formats + rules + scaling options -> layer_config(name)

How a layer's formats are resolved (`QuantizationConfig.layer_config`):
  1. a layer matching any `skip_patterns` regex stays an nn.Linear;
  2. else the first rule whose pattern `re.search`es the name decides the layer on its own:
     its `format` for input, weight and grad_output (None = high precision), then its per-role
     overrides; weight_grad gets the rule's format only when the config quantizes weight
     gradients at all (`weight_grad_format` set), unless overridden;
  3. else the config's role formats (`input_format`, `weight_format`, `grad_output_format`,
     `weight_grad_format`), where the first three default to `default_format`.
  A layer whose roles all come out None (and that gets no master-weight format) stays an
  nn.Linear. Master weights apply to every quantized layer except those a `format=None` rule
  keeps in high precision.

High precision: `None` (YAML `null`) or one of the names "bf16", "fp32", "none" means *not
quantized* -- the layer keeps the model's own compute precision (BF16 autocast on CUDA, fp32
on CPU; DESIGN §7). So `default_format: bf16` with no rules is the BF16 baseline: no layer is
quantized. The names do not force a dtype; they only say "leave this alone".
"""

from __future__ import annotations

import re
from dataclasses import KW_ONLY, dataclass, fields
from typing import Any, Mapping

from altgrad.formats import FormatSpec, get_format

__all__ = [
    "ROLES",
    "INHERIT",
    "HIGH_PRECISION_NAMES",
    "RoleConfig",
    "LayerQuantConfig",
    "LayerPrecisionRule",
    "QuantizationConfig",
    "create_mixed_precision_config",
]

# operands a config can quantize, in the order they are shown ("i:E4M3 w:E4M3 go:E5M2 wg:...")
ROLES = ("input", "weight", "grad_output", "weight_grad")
_ROLE_ABBREV = {"input": "i", "weight": "w", "grad_output": "go", "weight_grad": "wg"}

HIGH_PRECISION_NAMES = ("bf16", "fp32", "none")
SCALING_MODES = ("delayed", "current", "none")
AMAX_ALGOS = ("max", "most_recent")
ROUNDINGS = ("nearest", "stochastic")

# -- fine-grained (row / block) scaling keys, per role ------------------------------------------
# granularity: tensor (one scale), row (one per slice along the GEMM's K), block (one per
# block_size run of K; block_2d: block_size x block_size tiles, weights only). scale_format e8m0 is
# a power of two (OCP MX) rounded by scale_rounding; fp32 is fmt.max / amax. altgrad.blockwise
# holds the rules.
GRANULARITIES = ("tensor", "row", "block")
BLOCK_SIZES = (16, 32, 64, 128)
SCALE_FORMATS = ("fp32", "e8m0")
SCALE_ROUNDINGS = ("floor", "ceil")
GRANULARITY_KEYS = ("granularity", "block_size", "block_2d", "scale_format", "scale_rounding")
GRANULARITY_DEFAULTS = {"granularity": "tensor", "block_size": 32, "block_2d": False,
                        "scale_format": "e8m0", "scale_rounding": "floor"}


def _check_granularity(where: str, role: str, g: Mapping, scaling: str) -> None:
    """Validate one role's granularity keys (g: key -> value) against its scaling mode."""
    _check_choice(f"{where}.granularity", g["granularity"], GRANULARITIES)
    _check_choice(f"{where}.block_size", g["block_size"], BLOCK_SIZES)
    _check_bool(f"{where}.block_2d", g["block_2d"])
    _check_choice(f"{where}.scale_format", g["scale_format"], SCALE_FORMATS)
    _check_choice(f"{where}.scale_rounding", g["scale_rounding"], SCALE_ROUNDINGS)
    if g["granularity"] != "tensor" and scaling != "current":
        raise ValueError(f"{where}: {g['granularity']} scales are current (computed from the tensor itself); "
                         f"scaling {scaling!r} is per-tensor only, so set scaling: current for {role}")
    if g["block_2d"] and (g["granularity"] != "block" or role != "weight"):
        raise ValueError(f"{where}.block_2d: 2-D tiles are for granularity block on the weight role "
                         f"(got granularity {g['granularity']!r} on {role})")


def _granularity_tag(g: Mapping) -> str:
    """'' for tensor scaling, else e.g. '/b32-e8m0', '/b32x32-e8m0-ceil', '/row-fp32'."""
    if g["granularity"] == "tensor":
        return ""
    bs = g["block_size"]
    gran = "row" if g["granularity"] == "row" else (f"b{bs}x{bs}" if g["block_2d"] else f"b{bs}")
    return f"/{gran}-{g['scale_format']}" + ("-ceil" if g["scale_rounding"] == "ceil" else "")


# -- validation helpers ------------------------------------------------------------------------
def _check_choice(where: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, allowed))} (got {value!r})")


def _check_int(where: str, value: Any, minimum: int) -> None:
    # bool is an int subclass; `history_len: true` in YAML is a typo, not 1
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum} (got {value!r})")


def _check_bool(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{where} must be true or false (got {value!r})")


def _format_or_none(where: str, value: Any) -> FormatSpec | None:
    """A format name / FormatSpec -> FormatSpec; None or a high-precision name -> None."""
    if value is None or isinstance(value, FormatSpec):
        return value
    if isinstance(value, str) and value.strip().lower() in HIGH_PRECISION_NAMES:
        return None
    try:
        return get_format(value)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err} (or null / {', '.join(HIGH_PRECISION_NAMES)} for high precision)") from None


def _format_name(fmt: FormatSpec | None) -> str | None:
    return None if fmt is None else fmt.name


def _compile(where: str, pattern: Any) -> re.Pattern:
    if not isinstance(pattern, str):
        raise ValueError(f"{where}: pattern must be a regex string (got {type(pattern).__name__})")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{where}: pattern {pattern!r} is not a valid regex: {err}") from None


def _check_keys(where: str, d: Mapping, allowed: tuple) -> None:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping (got {type(d).__name__})")
    for key in d:
        if key not in allowed:
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {', '.join(allowed)}")


# -- one role ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RoleConfig:
    """How one operand is quantized: its format, scaling (DESIGN §4) and rounding (DESIGN §3).

    `format` may be given as a name; it is stored as the FormatSpec."""

    format: FormatSpec
    scaling: str = "delayed"
    history_len: int = 16
    amax_algo: str = "max"
    margin: int = 0
    pow2: bool = False
    rounding: str = "nearest"
    saturate: bool = True
    granularity: str = "tensor"
    block_size: int = 32
    block_2d: bool = False
    scale_format: str = "e8m0"
    scale_rounding: str = "floor"

    def __post_init__(self):
        fmt = _format_or_none("RoleConfig.format", self.format)
        if fmt is None:
            raise ValueError("RoleConfig.format must be a format name or FormatSpec; "
                             "a high-precision role is written as None in LayerQuantConfig")
        object.__setattr__(self, "format", fmt)
        _check_scaling_options("RoleConfig", self)
        # block_2d is checked per role by QuantizationConfig; here any role may carry it
        _check_granularity("RoleConfig", "weight", self.granularity_options, self.scaling)

    @property
    def granularity_options(self) -> dict:
        return {k: getattr(self, k) for k in GRANULARITY_KEYS}

    @classmethod
    def create(cls, format: str | FormatSpec, **options) -> "RoleConfig":
        return cls(format, **options)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "RoleConfig") -> "RoleConfig":
        _check_keys(where, d, tuple(f.name for f in fields(cls)))
        if "format" not in d:
            raise ValueError(f"{where}: missing key 'format'")
        return cls(**d)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["format"] = self.format.name
        return d


def _check_scaling_options(owner: str, obj: Any) -> None:
    """Validate the scaling/rounding fields shared by RoleConfig and QuantizationConfig."""
    _check_choice(f"{owner}.scaling", obj.scaling, SCALING_MODES)
    _check_int(f"{owner}.history_len", obj.history_len, 1)
    _check_choice(f"{owner}.amax_algo", obj.amax_algo, AMAX_ALGOS)
    _check_int(f"{owner}.margin", obj.margin, 0)
    _check_bool(f"{owner}.pow2", obj.pow2)
    _check_choice(f"{owner}.rounding", obj.rounding, ROUNDINGS)
    _check_bool(f"{owner}.saturate", obj.saturate)


# -- one layer ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerQuantConfig:
    """What one QuantizedLinear receives: a RoleConfig per operand (None = high precision),
    optionally a format for dW before the optimizer (`weight_grad`) and a storage format for
    the weights themselves after each optimizer step (`master_weights`, DESIGN §5)."""

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
                raise ValueError(f"LayerQuantConfig.{role} must be a RoleConfig or None (got {type(value).__name__})")
        object.__setattr__(self, "master_weights",
                           _format_or_none("LayerQuantConfig.master_weights", self.master_weights))
        _check_choice("LayerQuantConfig.master_rounding", self.master_rounding, ROUNDINGS)

    @property
    def formats(self) -> dict[str, FormatSpec | None]:
        """role -> FormatSpec or None, for every role in ROLES."""
        return {role: (rc.format if (rc := getattr(self, role)) is not None else None) for role in ROLES}

    def describe(self) -> str:
        """e.g. 'i:E4M3 w:E4M3 go:E5M2'; weight_grad / master weights appear only when set."""
        fmts = self.formats
        tags = {r: (_granularity_tag(rc.granularity_options) if (rc := getattr(self, r)) else "") for r in ROLES}
        parts = [f"{_ROLE_ABBREV[r]}:{fmts[r].name if fmts[r] else '-'}{tags[r]}" for r in ROLES[:3]]
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
        where = f"LayerPrecisionRule(pattern={self.pattern!r})"
        object.__setattr__(self, "_regex", _compile(where, self.pattern))
        object.__setattr__(self, "format", _format_or_none(f"{where}.format", self.format))
        for role in ROLES:
            value = getattr(self, role)
            if value is not INHERIT:
                object.__setattr__(self, role, _format_or_none(f"{where}.{role}", value))

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
                raise ValueError(f"{where}: missing key {key!r} (use format: null for high precision)")
        try:
            return cls(**d)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        d = {"pattern": self.pattern, "format": _format_name(self.format)}
        for role in ROLES:
            value = getattr(self, role)
            if value is not INHERIT:
                d[role] = _format_name(value)
        return d


# -- the whole model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizationConfig:
    """Formats and scaling for every Linear layer of a model (resolution order: module docstring).

    `input_format`, `weight_format`, `grad_output_format` default to `default_format`
    (pass None explicitly to keep a role in high precision); the hybrid recipe is
    `QuantizationConfig("E4M3", grad_output_format="E5M2")`. The scaling and rounding options
    apply to every quantized role."""

    default_format: FormatSpec | None
    layer_rules: tuple = ()
    input_format: Any = INHERIT
    weight_format: Any = INHERIT
    grad_output_format: Any = INHERIT
    weight_grad_format: FormatSpec | None = None
    scaling: str = "delayed"
    history_len: int = 16
    amax_algo: str = "max"
    margin: int = 0
    pow2: bool = False
    rounding: str = "nearest"
    saturate: bool = True
    # fine-grained scaling: each a value for every role, or a mapping role -> value
    granularity: Any = "tensor"
    block_size: Any = 32
    block_2d: Any = False
    scale_format: Any = "e8m0"
    scale_rounding: Any = "floor"
    master_weights: FormatSpec | None = None
    master_rounding: str = "nearest"
    skip_patterns: tuple = ()

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        default = _format_or_none("QuantizationConfig.default_format", self.default_format)
        set_("default_format", default)
        for role in ROLES:
            name = f"{role}_format"
            value = getattr(self, name)
            set_(name, default if value is INHERIT else _format_or_none(f"QuantizationConfig.{name}", value))
        set_("master_weights", _format_or_none("QuantizationConfig.master_weights", self.master_weights))
        _check_choice("QuantizationConfig.master_rounding", self.master_rounding, ROUNDINGS)
        _check_scaling_options("QuantizationConfig", self)
        for key in GRANULARITY_KEYS:
            value = getattr(self, key)
            if isinstance(value, Mapping):
                _check_keys(f"QuantizationConfig.{key}", value, ROLES)
                set_(key, dict(value))
        for role in ROLES:
            _check_granularity("QuantizationConfig", role, self.granularity_for(role), self.scaling)
        set_("layer_rules", self._rules_tuple(self.layer_rules))
        set_("skip_patterns", self._patterns_tuple(self.skip_patterns))
        set_("_skip_regexes", tuple(re.compile(p) for p in self.skip_patterns))

    @staticmethod
    def _rules_tuple(rules) -> tuple:
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"QuantizationConfig.layer_rules must be a list of rules (got {type(rules).__name__})")
        out = []
        for i, rule in enumerate(rules):
            where = f"QuantizationConfig.layer_rules[{i}]"
            if isinstance(rule, Mapping):
                rule = LayerPrecisionRule.from_dict(rule, where)
            elif not isinstance(rule, LayerPrecisionRule):
                raise ValueError(f"{where} must be a LayerPrecisionRule or a mapping (got {type(rule).__name__})")
            out.append(rule)
        return tuple(out)

    @staticmethod
    def _patterns_tuple(patterns) -> tuple:
        if isinstance(patterns, str):
            patterns = (patterns,)  # one regex, not a list of characters
        for i, p in enumerate(patterns):
            _compile(f"QuantizationConfig.skip_patterns[{i}]", p)
        return tuple(patterns)

    # -- resolution ----------------------------------------------------------------------------
    def is_skipped(self, name: str) -> bool:
        return any(rx.search(name) for rx in self._skip_regexes)

    def matching_rule(self, name: str) -> LayerPrecisionRule | None:
        """The first rule whose pattern matches `name`, or None."""
        return next((rule for rule in self.layer_rules if rule.matches(name)), None)

    def get_format_for_layer(self, name: str) -> FormatSpec | None:
        """The layer's main format: the matching rule's `format`, else `default_format`
        (None for skipped layers). Per-role formats may differ: see layer_config."""
        if self.is_skipped(name):
            return None
        rule = self.matching_rule(name)
        return rule.format if rule is not None else self.default_format

    def role_formats(self, name: str) -> tuple[dict[str, FormatSpec | None], FormatSpec | None]:
        """(role -> format, master-weight format) for the layer called `name`."""
        if self.is_skipped(name):
            return dict.fromkeys(ROLES), None
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
        roles = {role: (self._role_config(f, role) if f is not None else None) for role, f in fmts.items()}
        return LayerQuantConfig(**roles, master_weights=master, master_rounding=self.master_rounding)

    def granularity_for(self, role: str) -> dict:
        """The granularity keys for `role` (a per-role mapping's entry, else the shared value)."""
        out = {}
        for key in GRANULARITY_KEYS:
            value = getattr(self, key)
            out[key] = value.get(role, GRANULARITY_DEFAULTS[key]) if isinstance(value, Mapping) else value
        return out

    def _role_config(self, fmt: FormatSpec, role: str) -> RoleConfig:
        return RoleConfig(fmt, scaling=self.scaling, history_len=self.history_len, amax_algo=self.amax_algo,
                          margin=self.margin, pow2=self.pow2, rounding=self.rounding, saturate=self.saturate,
                          **self.granularity_for(role))

    @property
    def enabled(self) -> bool:
        """False when no layer can be quantized (the high-precision baseline)."""
        if self.master_weights is not None or any(getattr(self, f"{r}_format") is not None for r in ROLES):
            return True
        return any(rule.format is not None or any(getattr(rule, r) not in (None, INHERIT) for r in ROLES)
                   for rule in self.layer_rules)

    # -- dict round trip -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping, where: str = "quant") -> "QuantizationConfig":
        """Build from the YAML `quant:` section; unknown keys raise naming the allowed ones."""
        allowed = tuple(f.name for f in fields(cls))
        _check_keys(where, d, allowed)
        if "default_format" not in d:
            raise ValueError(f"{where}: missing key 'default_format' (a format name such as 'E5M2', "
                             "or null / bf16 for no quantization)")
        kwargs = dict(d)
        rules = kwargs.get("layer_rules") or ()
        if not isinstance(rules, (list, tuple)):
            raise ValueError(f"{where}.layer_rules must be a list of rules (got {type(rules).__name__})")
        # rules are built here so an error names the rule's place in the YAML file
        kwargs["layer_rules"] = tuple(LayerPrecisionRule.from_dict(r, f"{where}.layer_rules[{i}]")
                                      if isinstance(r, Mapping) else r for i, r in enumerate(rules))
        kwargs["skip_patterns"] = kwargs.get("skip_patterns") or ()
        try:
            return cls(**kwargs)
        except ValueError as err:
            msg, prefix = str(err), "QuantizationConfig."
            # "quant.scaling must be ..." reads as the YAML key the user wrote
            raise ValueError(f"{where}.{msg[len(prefix):]}" if msg.startswith(prefix) else f"{where}: {msg}") from None

    def to_dict(self) -> dict:
        """Plain data (format names as strings, None = high precision) that from_dict rebuilds."""
        d = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, FormatSpec) or value is None:
                value = _format_name(value)
            d[f.name] = value
        d["layer_rules"] = [rule.to_dict() for rule in self.layer_rules]
        d["skip_patterns"] = list(self.skip_patterns)
        for key in GRANULARITY_KEYS:
            if isinstance(d[key], Mapping):
                d[key] = dict(d[key])
        return d


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
