"""Model surgery: swap a model's nn.Linear layers for QuantizedLinear and back.

`quantize_model(model, "E5M2")` or `quantize_model(model, config=QuantizationConfig(...))` is
the one seam between a model and altgrad (as torchao's `convert_to_float8_training`). It works
on any nn.Module tree -- a GPT from any nanoGPT fork, an nn.Sequential, nested containers --
because it looks only at nn.Linear instances and their qualified names, never at model classes.

Each QuantizedLinear wraps the original layer's *own* Parameters, so an optimizer built before
surgery, weight tying (`transformer.wte.weight is lm_head.weight`) and a shadow model stay
attached, and `dequantize_model` puts the very same nn.Linear objects back.

Layers left alone (they stay nn.Linear and show as "high precision" in describe_quantization):
  - those the config resolves to no quantization (a `format=None` rule, config skip_patterns,
    a high-precision default), those matching `skip_patterns`, and those `module_filter_fn`
    rejects;
  - nn.Linear subclasses that override `forward` (swapping them would drop their behaviour);
  - the `out_proj` of nn.MultiheadAttention, whose forward reads `out_proj.weight` directly
    and never calls the layer, so a swap would change nothing and claim otherwise.
A module registered in several places (shared) is swapped once, under its first qualified name,
and the one QuantizedLinear is put in every place, so it stays shared.
"""

from __future__ import annotations

import copy
import re
import zlib
from collections.abc import Callable, Iterable, Mapping

import torch.nn as nn

from altgrad.config import QuantizationConfig, compile_pattern, format_or_none
from altgrad.formats import FormatSpec
from altgrad.linear import BACKENDS, QuantizedLinear
from altgrad.vocabulary import ROLE_ABBREV, Role

__all__ = ["quantize_model", "dequantize_model", "describe_quantization", "quantized_layers"]

# -- arguments ---------------------------------------------------------------------------------
def _resolve_config(fmt: str | FormatSpec | None, config) -> QuantizationConfig:
    """Exactly one of fmt / config -> a QuantizationConfig."""
    if (fmt is None) == (config is None):
        got = "both" if fmt is not None else "neither"
        raise ValueError("quantize_model: pass exactly one of fmt (a format name or FormatSpec, every role "
                         f"in that format) or config (a QuantizationConfig); got {got}")
    if fmt is not None:
        # a bare format: every role in it, delayed scaling (QuantizationConfig's defaults)
        return QuantizationConfig(format_or_none("quantize_model fmt", fmt))
    if isinstance(config, Mapping):
        return QuantizationConfig.from_dict(config)
    if not isinstance(config, QuantizationConfig):
        raise TypeError(f"quantize_model: config must be a QuantizationConfig or a dict (got {type(config).__name__})")
    return config


def _compile_skip_patterns(patterns) -> tuple[re.Pattern, ...]:
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = (patterns,)  # one regex, not a list of characters
    return tuple(compile_pattern(f"quantize_model skip_patterns[{i}]", p) for i, p in enumerate(patterns))


# -- finding the layers ------------------------------------------------------------------------
def _slots(model: nn.Module, kind: type) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) for every place a `kind` module sits, shared modules once per place."""
    return [(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, kind)]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return model.get_submodule(parent_name), attr


def _swappable(model: nn.Module, name: str, linear: nn.Linear) -> bool:
    if type(linear).forward is not nn.Linear.forward:
        return False  # a subclass with its own forward (LoRA, ...): swapping would drop it
    return not (name and isinstance(_parent(model, name)[0], nn.MultiheadAttention))


def _group_by_module(slots: Iterable[tuple[str, nn.Module]]) -> list[tuple[list[str], nn.Module]]:
    """[(names, module)] in first-appearance order: a shared module is one entry with all its names."""
    groups: dict[int, tuple[list[str], nn.Module]] = {}
    for name, module in slots:
        groups.setdefault(id(module), ([], module))[0].append(name)
    return list(groups.values())


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at `name`; returns the (possibly new) root, since the root itself may be swapped."""
    if name == "":
        return new
    parent, attr = _parent(model, name)
    setattr(parent, attr, new)  # works for attributes, Sequential / ModuleList indices and ModuleDict keys
    return model


def _select(model, config, skips, module_filter_fn) -> list[tuple[list[str], nn.Linear, object]]:
    """[(names, linear, layer_config)] for every nn.Linear to swap; skip patterns come before the
    filter, so the filter never sees a skipped layer."""
    targets = []
    for names, linear in _group_by_module(_slots(model, nn.Linear)):
        name = names[0]
        if not _swappable(model, name, linear) or any(rx.search(name) for rx in skips):
            continue
        if module_filter_fn is not None and not module_filter_fn(linear, name):
            continue
        if (layer_config := config.layer_config(name)) is not None:
            targets.append((names, linear, layer_config))
    return targets


# -- surgery -----------------------------------------------------------------------------------
def quantize_model(model: nn.Module, fmt: str | FormatSpec | None = None, *,
                   config: QuantizationConfig | Mapping | None = None,
                   skip_patterns: str | Iterable[str] | None = None,
                   module_filter_fn: Callable[[nn.Module, str], bool] | None = None,
                   inplace: bool = True, backend: str = "auto", seed: int | None = None) -> nn.Module:
    """Replace every selected nn.Linear of `model` by a QuantizedLinear wrapping its Parameters.

    fmt / config: exactly one; a format name or FormatSpec quantizes every role of every layer in
      that format with delayed scaling, a QuantizationConfig (or its dict form) decides per layer.
    skip_patterns: regexes (re.search on the qualified name) of layers to leave alone.
    module_filter_fn(module, fqn) -> bool: as torchao's, True = quantize this nn.Linear.
    inplace: False deep-copies the model first (tying inside the copy is kept).
    backend: "auto" (default), "torch" (the reference), "fast" or "triton"; see altgrad.linear.
    seed: base of the stochastic-rounding streams; each layer's seed mixes it with the layer's name
      (default: the run seed, torch.initial_seed()).
    Returns the model -- a new object when `model` is itself an nn.Linear or inplace=False. Each
    QuantizedLinear keeps its nn.Linear's Parameters (same objects, dtypes, devices and
    state_dict keys); shapes of inputs and outputs are the nn.Linear's, (..., in) -> (..., out).

    Raises:
        TypeError: module_filter_fn is not callable, or config of the wrong type.
        ValueError: both or neither of fmt / config; an unknown format, backend or bad
            skip_patterns regex; a model that already holds QuantizedLinear layers.
    """
    config = _resolve_config(fmt, config)
    skips = _compile_skip_patterns(skip_patterns)
    if backend not in BACKENDS:  # checked here too, so a model with nothing to swap still says so
        raise ValueError(f"quantize_model: backend must be one of {', '.join(map(repr, BACKENDS))} (got {backend!r})")
    if module_filter_fn is not None and not callable(module_filter_fn):
        raise TypeError(f"quantize_model: module_filter_fn must be callable (got {type(module_filter_fn).__name__})")
    if already := quantized_layers(model):
        raise ValueError(f"quantize_model: model already has QuantizedLinear layers (e.g. {already[0][0]!r}); "
                         "call dequantize_model(model) first")
    if not inplace:
        model = copy.deepcopy(model)  # deepcopy's memo keeps tied Parameters tied in the copy

    # collect every target first, then swap: never mutate the tree while named_modules walks it
    for names, linear, layer_config in _select(model, config, skips, module_filter_fn):
        layer_seed = None if seed is None else (seed * 1000003 + zlib.crc32(names[0].encode())) % 2**62
        qlinear = QuantizedLinear(linear, layer_config, name=names[0], backend=backend, seed=layer_seed)
        qlinear.train(linear.training)  # a model put in eval() before surgery stays in eval()
        # scaling buffers are born on the CPU; put them where the weights live (a model is often
        # moved to CUDA before surgery). Same-device .to() keeps the Parameter objects themselves.
        qlinear.to(device=linear.weight.device)
        for name in names:
            model = _replace(model, name, qlinear)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Put the original nn.Linear objects (`QuantizedLinear.linear`) back, holding the Parameters the
    QuantizedLinear trained (also after `load_state_dict(..., assign=True)` replaced them); returns
    the model (the nn.Linear itself when `model` is a QuantizedLinear). Scaling state is dropped."""
    for name, qlinear in _slots(model, QuantizedLinear):
        # .linear is not a submodule, so model.train()/eval() after surgery never reached it
        qlinear.linear.train(qlinear.training)
        model = _replace(model, name, qlinear.linear)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """(qualified name, layer) of every QuantizedLinear in `model`, each once, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


# -- describing --------------------------------------------------------------------------------
def _options_summary(layer_config) -> str:
    """'scaling=delayed', or per role where roles differ; rounding/saturation only when unusual."""
    present = [r for r in Role if getattr(layer_config, r) is not None]
    parts = []
    for option, usual in (("scaling", None), ("rounding", "nearest"), ("saturate", True)):
        values = {r: getattr(getattr(layer_config, r), option) for r in present}
        distinct = set(values.values())
        if not distinct or distinct == {usual}:
            continue
        if len(distinct) == 1:
            parts.append(f"{option}={distinct.pop()}")
        else:
            parts.append(f"{option}=" + ",".join(f"{ROLE_ABBREV[r]}:{v}" for r, v in values.items()))
    return " ".join(parts)


def describe_quantization(model: nn.Module) -> str:
    """One line per Linear layer: name, in->out, per-role formats (i/w/go/wg, mw = master weights)
    and scaling options; layers left as nn.Linear read "high precision"."""
    quantized = dict(quantized_layers(model))
    inner = {id(q.linear) for q in quantized.values()}  # a QuantizedLinear's own .linear is not a layer
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            lin = m.linear
            rows.append((name or "<root>", f"{lin.in_features}->{lin.out_features}",
                         m.layer_config.describe(), _options_summary(m.layer_config)))
        elif isinstance(m, nn.Linear) and id(m) not in inner:
            rows.append((name or "<root>", f"{m.in_features}->{m.out_features}", "high precision", ""))
    if not rows:
        return "no Linear layers"
    header = ("layer", "in->out", "formats", "options")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in [header] + rows]
    lines.append(f"{len(quantized)} of {len(rows)} Linear layers quantized")
    return "\n".join(line.rstrip() for line in lines)
