"""Run configuration: a YAML file maps 1:1 onto frozen dataclasses (docs/design.md §7).

Sections: `model` (GPTConfig fields), `train` (the loop), `quant` (parsed straight into a
`QuantizationConfig` by its `from_dict`, or null for the high-precision baseline), `data`, `log`.
The section dataclasses' defaults are the base experiment; a config file holds only what
differs from them. Unknown keys and wrong types raise `ConfigError` (altgrad.config's, the one
config error type) with one line naming `section.key` and what is allowed. Command-line overrides `--section.key=value` are parsed with
`yaml.safe_load` and then type-checked exactly like the file.

    cfg = load_config("configs/e5m2_fp8.yaml", ["--train.max_steps=50", "--log.wandb_mode=disabled"])
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from altgrad.config import INHERIT, ROLE_OPTIONS, ConfigError, QuantizationConfig, config_fields

__all__ = [
    "ConfigError",
    "ModelSection",
    "TrainSection",
    "DataSection",
    "LogSection",
    "RunConfig",
    "CliArgs",
    "parse_args",
    "load_config",
    "merge_configs",
    "config_from_dict",
    "apply_overrides",
    "build_quant_config",
    "format_config",
    "save_config",
]


# ----------------------------------------------------------------------------------------
# sections


@dataclass(frozen=True)
class ModelSection:
    """nanoGPT's GPTConfig fields (defaults: the 6L/6H/384 char-level Shakespeare model)."""

    block_size: int = 256
    vocab_size: int | None = None  # null: the data's meta.pkl (data without one must set it, e.g. 50304)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False  # nanoGPT's train.py default: no biases in Linear/LayerNorm


@dataclass(frozen=True)
class TrainSection:
    device: str = "auto"  # auto | cpu | cuda | cuda:N (auto picks CUDA when present)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # autocast dtype; auto = bf16 on CUDA, fp32 on CPU
    compile: bool = False
    tf32: bool = False  # let fp32 matmuls outside the simulated formats use TF32 on CUDA (nanoGPT does)
    batch_size: int = 12  # sequences per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step, summed over all DDP ranks (nanoGPT)
    max_steps: int = 2000
    lr: float = 6e-4
    min_lr: float | None = None  # null: lr / 10 (nanoGPT's ratio)
    warmup: int = 100
    lr_decay_steps: int | None = None  # null: max_steps, so a shorter run decays to min_lr by its end
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)  # beta2 0.99: few tokens per step (nanoGPT shakespeare_char)
    grad_clip: float = 1.0  # 0 disables clipping
    seed: int = 42  # in [0, 2**32)
    eval_interval: int = 100
    eval_iters: int = 100
    log_interval: int = 10
    checkpoint_interval: int = 100  # 0: only the final checkpoint
    max_checkpoints: int = 3
    resume: bool = False
    nan_patience: int = 10  # consecutive non-finite steps before the run is declared diverged
    shadow_interval: int = 10  # FP32 shadow gradient cosine / SNR every N steps; 0 = off
    metrics: bool = True  # quantization / update / dead-neuron diagnostics on logging steps

    def lr_at(self, step: int) -> float:
        """nanoGPT's schedule for optimizer step `step` (0-based): linear warmup over `warmup`
        steps, cosine decay to `min_lr` at `lr_decay_steps`, then constant."""
        min_lr = self.lr / 10 if self.min_lr is None else self.min_lr
        decay_steps = self.max_steps if self.lr_decay_steps is None else self.lr_decay_steps
        if step < self.warmup:
            return self.lr * (step + 1) / (self.warmup + 1)
        if step >= decay_steps:
            return min_lr
        ratio = (step - self.warmup) / max(1, decay_steps - self.warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - min_lr)


@dataclass(frozen=True)
class DataSection:
    dataset: str = "shakespeare_complete_char"  # Shakespeare's complete works (5.06 MB), chars
    dir: str | None = None  # null: data/<dataset>


@dataclass(frozen=True)
class LogSection:
    out_dir: str = "out"
    run_name: str | None = None  # null: the config file's name without .yaml
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"  # offline: no network; `wandb sync` later
    wandb_project: str = "altgrad"
    wandb_entity: str | None = None
    tags: tuple[str, ...] = ()
    overflow_threshold: float = 0.01
    bit_stall_threshold: float = 0.5
    dead_neuron_threshold: float = 1e-8
    dead_neuron_window: int = 100


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    quant: QuantizationConfig | None = None  # None: no matmul quantized (the baseline)
    data: DataSection = field(default_factory=DataSection)
    log: LogSection = field(default_factory=LogSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.log.out_dir) / str(self.log.run_name)

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir is not None else Path("data") / self.data.dataset

    def to_dict(self) -> dict:
        """Plain dict (tuples as lists) that `config_from_dict` turns back into an equal config."""
        out = {}
        for name in _SECTIONS:
            value = getattr(self, name)
            if name == "quant":
                out[name] = None if value is None else value.to_dict()
            else:
                out[name] = _section_to_dict(value)
        return out


_SECTIONS: dict[str, type | None] = {
    "model": ModelSection,
    "train": TrainSection,
    "quant": QuantizationConfig,  # nested mappings (layer_rules, per-role options): altgrad.config
    "data": DataSection,
    "log": LogSection,
}


def _section_to_dict(section) -> dict:
    return {f.name: _plain(getattr(section, f.name)) for f in dataclasses.fields(section)}


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ----------------------------------------------------------------------------------------
# type checking: one function per annotation shape, errors name section.key


def _describe(tp) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(args[0], str(args[0]))}"
    if origin is tuple:
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_describe(a) for a in inner) + " or null"
    return str(tp)


def _coerce(value, tp, where: str):
    """Return `value` converted to annotation `tp`, or raise ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    if type(None) in args:  # X | None
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: unsupported annotation {tp}")  # a bug here, not a user error
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads 6e-4 (no dot) as a string: accept any string float() parses
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"{where}: unsupported annotation {tp}")  # a bug here, not a user error


def _unknown_key(where: str, key, allowed, kind: str = "key") -> ConfigError:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(f"{where}{key}: unknown {kind}{hint}; allowed: {', '.join(allowed)}")


def _build_section(cls, raw, name: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in hints:
            raise _unknown_key(f"{name}.", key, allowed)
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**kwargs)


# ----------------------------------------------------------------------------------------
# value checks (types are already right here)


def _require(ok: bool, where: str, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{where}: must be {what}, got {value!r}")


def _valid_run_name(name: str) -> bool:
    # one directory under out_dir: not ".", "..", hidden (the run lock is out/.<run_name>.lock) or a path
    return name.strip() != "" and not name.startswith(".") and not any(c in name for c in "/\\\0")


def _check_values(cfg: RunConfig) -> None:
    m, t, lg = cfg.model, cfg.train, cfg.log
    for key in ("block_size", "n_layer", "n_head", "n_embd"):
        _require(getattr(m, key) >= 1, f"model.{key}", ">= 1", getattr(m, key))
    _require(m.vocab_size is None or m.vocab_size >= 1, "model.vocab_size", ">= 1 or null", m.vocab_size)
    _require(m.n_embd % m.n_head == 0, "model.n_embd", f"a multiple of model.n_head={m.n_head}", m.n_embd)
    _require(0.0 <= m.dropout < 1.0, "model.dropout", "in [0, 1)", m.dropout)
    dev = t.device
    _require(dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit()),
             "train.device", "one of auto, cpu, cuda, cuda:N", dev)
    for key in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_iters", "log_interval",
                "max_checkpoints", "nan_patience"):
        _require(getattr(t, key) >= 1, f"train.{key}", ">= 1", getattr(t, key))
    for key in ("warmup", "checkpoint_interval", "shadow_interval"):
        _require(getattr(t, key) >= 0, f"train.{key}", ">= 0", getattr(t, key))
    _require(math.isfinite(t.lr) and t.lr > 0, "train.lr", "a finite number > 0", t.lr)
    if t.min_lr is not None and not 0 <= t.min_lr <= t.lr:
        raise ConfigError(f"train.min_lr: must be in [0, train.lr={t.lr:g}] or null (null: lr / 10), got "
                          f"{t.min_lr!r}; set --train.min_lr=null or a smaller value")
    _require(t.lr_decay_steps is None or t.lr_decay_steps > t.warmup, "train.lr_decay_steps",
             "> train.warmup or null", t.lr_decay_steps)
    _require(t.weight_decay >= 0, "train.weight_decay", ">= 0", t.weight_decay)
    _require(all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", list(t.betas))
    _require(t.grad_clip >= 0, "train.grad_clip", ">= 0 (0 disables clipping)", t.grad_clip)
    _require(0 <= t.seed < 2**32, "train.seed", "in [0, 2**32) (numpy's seed range)", t.seed)
    _require(lg.run_name is None or _valid_run_name(lg.run_name), "log.run_name",
             "a directory name: not empty, no '/', '\\' or NUL, not starting with '.'", lg.run_name)
    for key in ("overflow_threshold", "bit_stall_threshold"):
        _require(0 <= getattr(lg, key) <= 1, f"log.{key}", "a fraction in [0, 1]", getattr(lg, key))
    _require(lg.dead_neuron_threshold >= 0, "log.dead_neuron_threshold", ">= 0", lg.dead_neuron_threshold)
    _require(lg.dead_neuron_window >= 1, "log.dead_neuron_window", ">= 1", lg.dead_neuron_window)


# ----------------------------------------------------------------------------------------
# building: dict -> RunConfig, overrides, quant validation


def config_from_dict(raw: dict | None) -> RunConfig:
    """Build and validate a RunConfig from a plain mapping (a parsed YAML file)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping with sections {', '.join(_SECTIONS)}, got {raw!r}")
    for key in raw:
        if key not in _SECTIONS:
            raise _unknown_key("", key, list(_SECTIONS), "section")
    quant = raw.get("quant")
    if quant is not None and not isinstance(quant, dict):
        raise ConfigError(f"quant: expected a mapping (see altgrad/config.py) or null, got {quant!r}")
    cfg = RunConfig(
        model=_build_section(ModelSection, raw.get("model"), "model"),
        train=_build_section(TrainSection, raw.get("train"), "train"),
        quant=None if quant is None else QuantizationConfig.from_dict(copy.deepcopy(quant)),
        data=_build_section(DataSection, raw.get("data"), "data"),
        log=_build_section(LogSection, raw.get("log"), "log"),
    )
    _check_values(cfg)
    return cfg


def build_quant_config(cfg: RunConfig) -> QuantizationConfig | None:
    """`cfg.quant`: the QuantizationConfig, or None for the high-precision baseline."""
    return cfg.quant


def _parse_override(arg: str) -> tuple[list[str], Any]:
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"{arg}: overrides are written --section.key=value (e.g. --train.lr=3e-4)")
    path, _, text = arg[2:].partition("=")
    keys = path.split(".")
    if any(k == "" for k in keys):
        raise ConfigError(f"{arg}: overrides are written --section.key=value (e.g. --train.lr=3e-4)")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text  # not YAML (e.g. an unbalanced bracket): keep the raw text, the type check decides
    return keys, value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of `raw` with `--section.key=value` overrides applied (not yet type-checked).

    `--quant.<key>[.<subkey>...]=value` edits the quant mapping at any depth (creating it
    when the file has none); `--quant=null` selects the baseline.
    """
    raw = copy.deepcopy(raw) if raw else {}
    for arg in overrides:
        keys, value = _parse_override(arg)
        section = keys[0]
        if section not in _SECTIONS:
            raise _unknown_key("--", section, list(_SECTIONS), "section")
        if len(keys) == 1:
            if section != "quant":
                raise ConfigError(f"{arg}: name a key, e.g. --{section}.<key>=value")
            raw["quant"] = value
            continue
        if section != "quant" and len(keys) > 2:
            raise ConfigError(f"{arg}: {section} has no nested keys; write --{section}.<key>=value")
        node = raw.get(section)
        if node is None:
            node = raw[section] = {}
        for depth, key in enumerate(keys[1:-1], start=1):
            if not isinstance(node.get(key), dict):
                if key in node and node[key] is not None:
                    raise ConfigError(f"{arg}: {'.'.join(keys[:depth + 1])} is not a mapping")
                node[key] = {}
            node = node[key]
        node[keys[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice in "
                                      f"one mapping (first on line {seen[key]}); keep one")
                seen[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: let PyYAML report it
                pass
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """A config file's mapping: UTF-8 text, valid YAML, no duplicated keys (ConfigError otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found (see configs/*.yaml)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); "
                          "save the file as UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        first = str(e).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(_SECTIONS)}")
    return raw


def merge_configs(raws: list[dict]) -> dict:
    """Layer config mappings left to right, as a later `--section.key=value` overrides an earlier one:
    each `section.key` of a later mapping replaces the earlier value (a value is replaced whole,
    never merged deeper); a section that is null or not a mapping replaces the whole section
    (`quant: null` selects the baseline, a `quant` mapping over a null one is taken as it is)."""
    out: dict = {}
    for raw in raws:
        for name, section in raw.items():
            if isinstance(section, dict) and isinstance(out.get(name), dict):
                out[name] = {**out[name], **copy.deepcopy(section)}
            else:
                out[name] = copy.deepcopy(section)
    return out


def load_config(path: str | os.PathLike | list | tuple | None, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config (None: all defaults), apply overrides, check everything.

    `path` may be a list of files, layered left to right by `merge_configs` (e.g. the cpu_quick
    model and schedule, then a format config's quant section). `log.run_name` defaults to the
    last file's name without extension. Raises ConfigError (one line naming the file or key).
    """
    paths = [] if path is None else [Path(p) for p in path] if isinstance(path, (list, tuple)) else [Path(path)]
    raw = merge_configs([read_yaml(p) for p in paths])
    raw = apply_overrides(raw, list(overrides))
    log = raw.get("log")
    if paths and (log is None or (isinstance(log, dict) and log.get("run_name") is None)):
        raw["log"] = dict(log or {}, run_name=paths[-1].stem)
    cfg = config_from_dict(raw)
    if cfg.log.run_name is None:
        cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, run_name="run"))
    return cfg


# ----------------------------------------------------------------------------------------
# command line


@dataclass(frozen=True)
class CliArgs:
    config_paths: tuple[str, ...]
    overrides: tuple[str, ...]
    resume: bool


USAGE = (
    "usage: python train.py CONFIG.yaml [MORE.yaml ...] [--section.key=value ...] [--resume]\n"
    "  e.g. python train.py configs/e5m2_fp8.yaml --train.max_steps=500 --log.wandb_mode=offline\n"
    "       python train.py configs/cpu_quick.yaml configs/e2m5_block32.yaml   (files layered left to right)"
)


def _field_comments(cls) -> dict[str, str]:
    """The trailing `# comment` of each field in a section's source: the help text of that key."""
    import inspect
    import re

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+):[^#\n]*#\s*(.*)$", source, re.M)}


def help_text() -> str:
    """train.py --help: usage, then every section and key with its type, default and meaning."""
    lines = [USAGE, "", "  --resume   continue out/<run_name>/ from its newest readable checkpoint",
             "", "Keys (--section.key=value; values are YAML: 3e-4, true, null, [0.9, 0.95]):"]
    for name, cls in _SECTIONS.items():
        if name == "quant":
            continue
        lines.append(f"{name}:" + (f"  {cls.__doc__.strip().splitlines()[0]}" if cls.__doc__ and
                                   not cls.__doc__.startswith(cls.__name__) else ""))
        hints, comments = typing.get_type_hints(cls), _field_comments(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = yaml.safe_dump(_plain(default), default_flow_style=True).strip().removesuffix("...").strip()
            comment = f"  {comments[f.name]}" if f.name in comments else ""
            lines.append(f"  {name}.{f.name} ({_describe(hints[f.name])}; default {default}){comment}")
    lines.append("quant:  null = the high-precision baseline, else a mapping (altgrad/config.py, QuantizationConfig):")
    for f in config_fields(QuantizationConfig):
        if f.default is dataclasses.MISSING:
            default = "required: a format name, or null for high precision"
        elif f.default is INHERIT:
            default = "default: default_format"
        else:
            default = "default " + yaml.safe_dump(_plain(f.default), default_flow_style=True).strip()
        per_role = "; or a mapping role -> value" if f.name in ROLE_OPTIONS else ""
        lines.append(f"  quant.{f.name} ({default.removesuffix('...').strip()}{per_role})")
    lines.append("  formats by name: E5M2, E4M3, E3M4, ... (python -m altgrad.formats lists them); null = high precision")
    lines.append("  a layer in high precision: a rule first in layer_rules, {pattern: REGEX, format: null}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> CliArgs:
    """Split train.py's arguments into the config paths (one or more, layered left to right),
    overrides and the --resume flag."""
    paths, overrides, resume = [], [], False
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text())
            sys.exit(0)
        if arg == "--resume":
            resume = True
        elif arg.startswith("--"):
            _parse_override(arg)  # reject malformed overrides before anything runs
            overrides.append(arg)
        elif arg.startswith("-"):
            raise ConfigError(f"{arg}: unknown option; {USAGE.splitlines()[0]}")
        else:
            paths.append(arg)
    if not paths:
        raise ConfigError(f"expected a config file; {USAGE.splitlines()[0]}")
    return CliArgs(tuple(paths), tuple(overrides), resume)


# ----------------------------------------------------------------------------------------
# output


def format_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what train.py prints and saves)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def save_config(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file in the same folder, then os.replace)."""
    from altgrad.tracking import write_text_atomic

    write_text_atomic(path, format_config(cfg))
