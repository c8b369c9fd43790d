"""Stability metrics for quantized training (docs/design.md §8): where a format hurts.

All functions read device tensors and cross to the host once per call (one stacked `.tolist()`),
so train.py calls them on logging steps only and the other steps pay nothing.

- `quant_metrics(model)`: per layer and role, and per role over all layers, the stats of the last
  quantization: `quant/<layer>/<role>/{amax,scale,overflow,underflow,nan,rel_err}` and
  `quant/<role>/...`. overflow and nan are fractions of all elements, underflow a fraction of the
  non-zero elements. Role aggregates weight each layer by its element count (underflow by its
  non-zero count); amax is the max over layers and scale the element-weighted geometric mean.
- `UpdateTracker(model)`: what the optimizer step did to each quantized weight, seen through the
  weight's format at the scale of the step (the same scale before and after, so a change of scale
  is not mistaken for an update). `update/bit_stall`: of the elements the step changed, the
  fraction whose quantized value stayed the same; `update/flip`: of all elements, the fraction
  whose quantized value changed; `update/zero_frac`: of all elements, the fraction the step left
  exactly unchanged; `update/ulp_ratio`: (lower) median over changed elements of |Δw| in units of
  the format's ULP at w. With `master_weights` the stored weight is already rounded, so an update
  lost to rounding shows up in `zero_frac`, not in `bit_stall` (that one then measures lag).
- `DeadNeuronTracker(model, threshold, window)`: hidden MLP units whose |activation| stayed below
  `threshold` on every training forward of the last `window` optimizer steps.
- `grad_norms(model)`: per-layer L2 and L∞ of the gradients.
- `alerts(metrics, overflow_threshold, bit_stall_threshold)`: human-readable warnings to log.
"""

from __future__ import annotations

import math
from collections import deque

import torch
from torch import nn

from altgrad.linear import QuantizedLinear
from altgrad.scaling import l2_norm
from altgrad.vocabulary import STAT_FIELDS

__all__ = [
    "quant_metrics", "UpdateTracker", "DeadNeuronTracker", "grad_norms", "alerts",
    "layer_parameters",
]



# ---- finding layers --------------------------------------------------------------------------------


def is_quantized(module: nn.Module) -> bool:
    """Whether module is a QuantizedLinear: these metrics read its declared interface (`stats`,
    `weight_format_and_scale()`, `.linear`, `.weight`) and nothing else."""
    return isinstance(module, QuantizedLinear)


def _label(name: str) -> str:
    # the root module has the empty name; metric keys need a non-empty path segment
    return name or "model"


def _quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every quantized layer, in module order."""
    return [(_label(name), m) for name, m in model.named_modules() if is_quantized(m)]


def layer_parameters(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """(layer name, its parameters) for every module that owns parameters, each parameter once.

    A tied parameter belongs to the matmul layer (nn.Linear or quantized layer) that owns it, so
    nanoGPT's shared wte / lm_head weight is reported as `lm_head` both before and after surgery;
    other sharing goes to the first owner. A QuantizedLinear's wrapped `.linear` (when registered
    as a submodule) is reported under the QuantizedLinear's name.
    """
    alias = {id(m.linear): name for name, m in _quantized_layers(model)}
    modules = [(alias.get(id(m), _label(name)), m) for name, m in model.named_modules()]
    owner: dict[int, str] = {}
    for matmul_first in (True, False):
        for name, module in modules:
            if matmul_first and not (isinstance(module, nn.Linear) or is_quantized(module)):
                continue
            for p in module.parameters(recurse=False):
                owner.setdefault(id(p), name)
    layers: dict[str, list[nn.Parameter]] = {}
    for name, module in modules:
        for p in module.parameters(recurse=False):
            if owner.get(id(p)) == name and all(p is not q for q in layers.get(name, [])):
                layers.setdefault(name, []).append(p)
    return list(layers.items())


def to_host(tensors: list[torch.Tensor]) -> list[float]:
    """One host sync for a list of 0-dim tensors (float64 keeps int64 counts exact up to 2**53)."""
    if not tensors:
        return []
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    out = [0.0] * len(tensors)
    for idx in by_device.values():
        vals = torch.stack([tensors[i].detach().reshape(()).to(torch.float64) for i in idx]).tolist()
        for i, v in zip(idx, vals):
            out[i] = v
    return out


# ---- quantization stats ----------------------------------------------------------------------------


def _read_stats(model: nn.Module) -> list[tuple[str, str, dict[str, float]]]:
    """[(layer, role, {field: float})] for every role that has stats, with one host sync."""
    entries, tensors = [], []
    for name, layer in _quantized_layers(model):
        for role, stats in layer.stats.items():
            if not stats:
                continue
            fields = [f for f in STAT_FIELDS if isinstance(stats.get(f), torch.Tensor)]
            plain = {f: float(stats[f]) for f in STAT_FIELDS if isinstance(stats.get(f), (int, float))}
            entries.append((name, role, fields, plain))
            tensors.extend(stats[f] for f in fields)
    values, out, i = to_host(tensors), [], 0
    for name, role, fields, plain in entries:
        out.append((name, role, dict(zip(fields, values[i:i + len(fields)])) | plain))
        i += len(fields)
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    """num / den (0 for an empty den); None where either was not recorded (None or NaN)."""
    if num is None or den is None or math.isnan(num) or math.isnan(den):
        return None
    return num / den if den > 0 else 0.0


def _layer_values(s: dict[str, float]) -> dict[str, float | None]:
    return {
        "amax": s.get("amax"),
        "scale": s.get("scale"),
        "overflow": _ratio(s.get("overflow"), s.get("numel")),
        "underflow": _ratio(s.get("underflow"), s.get("nonzero")),
        "nan": _ratio(s.get("nan"), s.get("numel")),
        "rel_err": s.get("rel_err"),
    }


def _aggregate(items: list[dict[str, float]]) -> dict[str, float]:
    """Per-role aggregate over layers: counts summed over the layers whose stats level records them,
    rel_err element-weighted, amax max, scale element-weighted geometric mean (scales span many binades)."""
    counted = [s for s in items if "overflow" in s]  # layers whose stats level records the counts

    def total(field):
        vals = [s[field] for s in counted if field in s]
        return sum(vals) if vals else None

    agg = {
        "overflow": _ratio(total("overflow"), total("numel")),
        "underflow": _ratio(total("underflow"), total("nonzero")),
        "nan": _ratio(total("nan"), total("numel")),
    }
    amaxes = [s["amax"] for s in items if "amax" in s]
    agg["amax"] = max(amaxes) if amaxes else None
    weighted = [(s["rel_err"], s.get("numel", 1.0)) for s in items if "rel_err" in s]
    if weighted and sum(w for _, w in weighted) > 0:
        agg["rel_err"] = sum(v * w for v, w in weighted) / sum(w for _, w in weighted)
    logs = [(math.log2(s["scale"]), s.get("numel", 1.0)) for s in items if s.get("scale", 0) > 0]
    if logs and sum(w for _, w in logs) > 0:
        agg["scale"] = 2.0 ** (sum(v * w for v, w in logs) / sum(w for _, w in logs))
    return agg


def quant_metrics(model: nn.Module) -> dict[str, float]:
    """quant/<layer>/<role>/<metric> and quant/<role>/<metric> for every quantized layer."""
    out, by_role = {}, {}
    for name, role, stats in _read_stats(model):
        for metric, val in _layer_values(stats).items():
            if val is not None:
                out[f"quant/{name}/{role}/{metric}"] = val
        by_role.setdefault(role, []).append(stats)
    for role, items in by_role.items():
        for metric, val in _aggregate(items).items():
            if val is not None:
                out[f"quant/{role}/{metric}"] = val
    return out


# ---- optimizer-step effect: bit-stall, flips, ULP ratio ---------------------------------------------


def _round_nearest(w: torch.Tensor, scale: torch.Tensor, fmt) -> torch.Tensor:
    """round_fmt(w·scale), nearest: the fused fast cast off CUDA for a per-tensor scale (the same
    values as the reference, as bf16), else the reference round_to_format."""
    from altgrad.quantize import quantize_operand, round_to_format

    if scale.numel() == 1 and not w.is_cuda:
        return quantize_operand(w, fmt, scale.reshape(()), stats=False, backend="fast")[0]
    return round_to_format(w * scale, fmt)


class UpdateTracker:
    """Call `before_step()` just before `optimizer.step()` and `after_step()` just after, on the
    steps you log (it copies every quantized weight, so not on every step)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._before: list[tuple[str, nn.Parameter, torch.Tensor, object, torch.Tensor]] = []

    def before_step(self) -> None:
        self._before = []
        for name, layer in _quantized_layers(self.model):
            fmt, scale = layer.weight_format_and_scale()
            if fmt is not None:
                self._before.append((name, layer.weight, layer.weight.detach().float().clone(), fmt, scale))

    def after_step(self) -> dict[str, float]:
        """update/{bit_stall,flip,zero_frac,ulp_ratio} over all quantized weights, and
        update/<layer>/bit_stall per layer; {} when before_step captured nothing."""
        if not self._before:
            return {}
        counts, ratios, names = [], [], []
        for name, param, w0, fmt, scale in self._before:
            w1 = param.detach().float()
            changed = w1 != w0  # (out, in)
            # nearest rounding regardless of the role's rounding: a stochastic draw would flip codes
            # of weights the step did not move, and this metric is about the update
            q0, q1 = _round_nearest(w0, scale, fmt), _round_nearest(w1, scale, fmt)
            moved = q1 != q0
            counts.append(torch.stack([
                changed.sum(), (changed & ~moved).sum(), moved.sum(),
                torch.tensor(w0.numel(), device=w0.device),
            ]))
            # |Δw| in ULPs of the format at w, in the scaled (format) domain
            ratios.append(((w1 - w0).abs() * scale / fmt.ulp(w0 * scale))[changed])
            names.append(name)
        self._before = []
        ratio = torch.cat([r.to(ratios[0].device) for r in ratios])
        median = ratio.median() if ratio.numel() else torch.zeros((), device=ratio.device)
        host = to_host([c.to(torch.float64) for cnt in counts for c in cnt] + [median])
        per_layer = [host[4 * i: 4 * i + 4] for i in range(len(names))]
        changed, stalled, moved, numel = (sum(col) for col in zip(*per_layer))
        out = {"update/flip": moved / numel, "update/zero_frac": 1.0 - changed / numel}
        if changed:  # stall and ULP ratio are fractions of the changed elements: none, no value
            out.update({"update/bit_stall": stalled / changed, "update/ulp_ratio": host[-1]})
        for name, (c, s, _, _) in zip(names, per_layer):
            if c:
                out[f"update/{name}/bit_stall"] = s / c
        return out


# ---- dead MLP units --------------------------------------------------------------------------------


def _mlp_hook_points(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(mlp name, module to hook, pre_hook?): nanoGPT's `*.mlp.gelu` output, else the input of
    `*.mlp.c_proj` (the hidden activation in any nanoGPT-like MLP)."""
    points = [(n[: -len(".gelu")], m, False) for n, m in model.named_modules()
              if n == "mlp.gelu" or n.endswith(".mlp.gelu")]
    if not points:
        points = [(n[: -len(".c_proj")], m, True) for n, m in model.named_modules()
                  if n == "mlp.c_proj" or n.endswith(".mlp.c_proj")]
    return points


class DeadNeuronTracker:
    """Per hidden MLP unit, the max |activation| over the training forwards of each optimizer step;
    a unit is dead when that max stayed below `threshold` for the last `window` steps.

    Call `step()` once per optimizer step (it closes the step's record); eval forwards
    (`model.eval()`) are ignored. Until `window` steps have been seen, the window is the steps so
    far. `remove()` detaches the hooks.
    """

    def __init__(self, model: nn.Module, threshold: float = 1e-8, window: int = 100):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"dead_neuron_window must be an int >= 1 (got {window!r})")
        if not threshold >= 0:
            raise ValueError(f"dead_neuron_threshold must be >= 0 (got {threshold!r})")
        self.threshold, self.window = float(threshold), window
        self._current: dict[str, torch.Tensor] = {}
        self._history: dict[str, deque] = {}
        self._handles = []
        for name, module, pre in _mlp_hook_points(model):
            hook = self._make_hook(name, pre)
            self._handles.append(module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook))
            self._history[name] = deque(maxlen=window)

    def _make_hook(self, name: str, pre: bool):
        def hook(module, args, output=None):
            if not module.training:
                return
            act = args[0] if pre else output  # (B, T, hidden)
            peak = act.detach().abs().reshape(-1, act.shape[-1]).amax(dim=0).float()  # (hidden,)
            prev = self._current.get(name)
            self._current[name] = peak if prev is None else torch.maximum(prev, peak)
        return hook

    def step(self) -> None:
        for name, peak in self._current.items():
            self._history[name].append(peak)
        self._current = {}

    def metrics(self) -> dict[str, float]:
        """mlp/dead_frac over all MLPs and mlp/<mlp>/dead_frac per MLP; {} before any record."""
        names, counts = [], []
        for name, hist in self._history.items():
            peaks = list(hist) + ([self._current[name]] if name in self._current else [])
            if not peaks:
                continue
            window_max = torch.stack(peaks).amax(dim=0)  # (hidden,)
            names.append(name)
            counts += [(window_max < self.threshold).sum(), torch.tensor(window_max.numel(), device=window_max.device)]
        if not names:
            return {}
        host = to_host(counts)
        out = {f"mlp/{n}/dead_frac": host[2 * i] / host[2 * i + 1] for i, n in enumerate(names)}
        out["mlp/dead_frac"] = sum(host[0::2]) / sum(host[1::2])
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


# ---- gradients -------------------------------------------------------------------------------------


def grad_norms(model: nn.Module) -> dict[str, float]:
    """grad/<layer>/l2 and grad/<layer>/linf for every layer whose parameters have gradients."""
    names, tensors = [], []
    for name, params in layer_parameters(model):
        grads = [p.grad.detach().float().reshape(-1) for p in params if p.grad is not None]
        if not grads:
            continue
        g = torch.cat(grads)
        names.append(name)
        linf = g.abs().max()
        tensors += [l2_norm(g, linf), linf]  # scaled: the squares of huge or tiny gradients stay in range
    host = to_host(tensors)
    out = {}
    for i, name in enumerate(names):
        out[f"grad/{name}/l2"], out[f"grad/{name}/linf"] = host[2 * i], host[2 * i + 1]
    return out


# ---- alerts ----------------------------------------------------------------------------------------


def alerts(metrics: dict[str, float], overflow_threshold: float | None = None,
           bit_stall_threshold: float | None = None) -> list[str]:
    """Warnings for metrics past their thresholds (None disables a check). Never raises: a
    diagnostic must not stop a run."""
    out = []
    for key, val in sorted(metrics.items()):
        parts = key.split("/")
        if len(parts) != 3 or parts[0] != "quant" or not isinstance(val, (int, float)):
            continue
        role, metric = parts[1], parts[2]
        if metric == "overflow" and overflow_threshold is not None and val > overflow_threshold:
            worst = _worst_layer(metrics, role, "overflow")
            out.append(f"overflow: {val:.2%} of {role} elements exceed the format's max "
                       f"(threshold {overflow_threshold:.2%}){worst}")
        elif metric == "nan" and val > 0:
            out.append(f"nan: {val:.2%} of {role} elements are NaN{_worst_layer(metrics, role, 'nan')}")
    stall, zero = metrics.get("update/bit_stall"), metrics.get("update/zero_frac")
    if bit_stall_threshold is not None and isinstance(stall, (int, float)) and stall > bit_stall_threshold:
        out.append(f"bit-stall: {stall:.1%} of weight updates left the quantized weight unchanged "
                   f"(threshold {bit_stall_threshold:.1%})")
    # with master_weights the stored weight is rounded after the step, so lost updates are zeros
    if bit_stall_threshold is not None and isinstance(zero, (int, float)) and zero > bit_stall_threshold:
        out.append(f"zero update: {zero:.1%} of quantized weights did not change at all this step "
                   f"(threshold {bit_stall_threshold:.1%}; master_weights rounding or zero gradients)")
    return out


def _worst_layer(metrics: dict[str, float], role: str, metric: str) -> str:
    suffix = f"/{role}/{metric}"
    layers = [(v, k[len("quant/"): -len(suffix)]) for k, v in metrics.items()
              if k.startswith("quant/") and k.endswith(suffix) and k.count("/") == 3]
    if not layers:
        return ""
    val, name = max(layers)
    return f"; worst layer {name}: {val:.2%}"
