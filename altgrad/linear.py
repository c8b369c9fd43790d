"""QuantizedLinear: an nn.Linear whose three matmuls run on simulated-format operands.

    y  = (Q_i(x·s_i) @ Q_w(W·s_w)^T) · inv_s_i · inv_s_w + b
    dx = (Q_g(dy·s_g) @ Q_w(W·s_w))  · inv_s_g · inv_s_w
    dW = (Q_g(dy·s_g)^T @ Q_i(x·s_i)) · inv_s_g · inv_s_i          (optionally Q_wg(dW) afterwards)
    db = sum(dy)                                                  (not quantized)

Q_r(·) are format-domain values (x·scale rounded), exact in bf16, so the products are exact and
only fp32 accumulation order differs between backends. A role whose format is None is
high precision (passed through in fp32). Decisions written down here:

- Backends. Each operand is cast once by `altgrad.quantize.quantize_operand`, which also yields
  the role's stats in the same pass. "torch" uses the reference rounding and fp32 matmuls (the
  oracle); "fast" uses the fused exact cast (bit-identical to the reference) and fp32 matmuls:
  `altgrad.fast_cast.cast_operand`, one compiled call per operand for the scale, the rounding,
  the stats and the scaling-state update (docs/design.md, "The fused cast");
  "triton" casts with kernels/quantize.py and multiplies with kernels/scaled_matmul.py (CUDA, or
  CPU under TRITON_INTERPRET=1); "auto" is triton on CUDA tensors when all three operand roles have
  a format, else fast. Training uses "auto".
- Evaluation forwards cast the input and then multiply, like training. In-loop quantization (the
  matmul rounding each tile as it loads it) re-rounds every tile once per N-tile and measured
  4-15x slower than a separate cast at GPT-small shapes; until GPU measurements say otherwise for
  some shape, the cast is used everywhere.
- Saved for backward are the quantized operands (format-domain values: bf16, or fp32 from the
  fused cast on the CPU, where the fp32 matmuls then need no upcast) and 0-dim scales.
- The weight is cast at every forward by default, so any change of its values (optimizer step,
  `.data` writes, `copy_`, `load_state_dict`, `nn.init`, EMA code) is seen at the next forward.
  `weight_cache = True` (see `set_weight_cache`) is an explicit opt-in for gradient accumulation:
  the cast is reused until `weight_updated(model)` is called (train.py calls it at the end of
  every step, skipped ones included) or the layer's mode, backend, device or stats level changes;
  eager only, a compiled forward always casts.
- Scaling state (delayed histories, last scales, the stochastic-rounding counter) is updated by
  training-mode calls only, so evaluation frequency does not change the training trajectory.
- Stochastic rounding never touches the global RNG: each cast draws Philox bits keyed by a seed
  mixed from the layer's `sr_state` buffer [base seed, training-forward count] and the role, so
  the stream is saved in checkpoints with the model's state_dict and evaluation (which does not
  advance the count), logging and shadow models never consume it. The base seed defaults to a
  hash of `torch.initial_seed()` (the run seed) and the layer's name. Every data-parallel rank
  draws the same stream (the weight's draws must agree across ranks). The seed is read on the
  host: on CUDA a stochastic cast costs one device sync (nearest rounding none).
- Empty batches (zero-size inputs) give empty outputs like nn.Linear and leave every scaling state
  unchanged.
- Distributed data parallel: `sync_amax_history(model, group)` max-reduces every delayed history
  across the group in one all-reduce, so all ranks compute the same scales (TransformerEngine's
  default semantics); see its docstring for when to call it.
- Accumulation headroom: E7M0 values reach 2**62, so a product of two reaches 2**124 and an fp32
  sum of 16 overflows. Operands of formats whose max exceeds 2**52 are therefore carried as
  q·2**-k (k = log2(max) - 52, 10 for E7M0): rounding x·scale·2**-k to the same format with bias + k
  gives exactly q·2**-k, and inv_scale·2**k undoes it in the epilogue. Rounding, stats and results
  are unchanged; products stay inside fp32 (2**-146 .. 2**104 for E7M0 x E7M0, K < 2**23).
- Stats per role, kept on device (no host sync) in one float64 vector per role: amax, scale,
  overflow, underflow, nan, nonzero, numel and rel_err = ||Q(x)·inv_s - x|| / ||x||. What a cast
  records is the layer's `stats_level` (vocabulary.StatsLevel): "counts" by default (all but rel_err,
  an extra pass per operand), "full" with rel_err, "scale" only amax, scale and numel (the four counts
  cost about a quarter of a fast cast's pass; train.py counts on logging steps only).
- torch.compile: every cast and matmul is a `torch.library` op (`altgrad::cast_operand`,
  `altgrad::scaled_mm`, schemas marking the mutated buffers) with a fake implementation; the casts
  mutate the scaling buffers in place, the autograd function holds no module, and per-role options
  travel as constant strings, so `torch.compile(model, fullgraph=True)` traces a quantized model once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
import zlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from altgrad import fast_cast
from altgrad.config import LayerQuantConfig, RoleConfig
from altgrad.formats import FormatSpec
from altgrad.linear_blockwise import accumulation_domain, blockwise_linear, needs_blockwise, weight_block_scales
from altgrad.quantize import BACKENDS, quantize_operand, round_with_masks
from altgrad.scaling import TensorScaler, compute_scale, relative_error
from altgrad.vocabulary import OPERAND_ROLES, STAT_FIELDS, Role, StatsLevel, stat_fields

__all__ = ["QuantizedLinear", "round_master_weights", "set_stats_level", "set_weight_cache", "weight_updated",
           "sync_amax_history"]

_ROLES = (*OPERAND_ROLES, Role.WEIGHT_GRAD)  # the state tuples' order
_ROLE_ID = {r: i for i, r in enumerate(_ROLES, start=1)}  # stochastic-rounding stream per role


# -- one operand's plan: everything a cast needs that is not a tensor, as one constant string ----


@dataclasses.dataclass(frozen=True)
class _Plan:
    fmt: FormatSpec  # the role's format (scale computation)
    domain: FormatSpec  # the format rounded to: fmt with bias + k
    k: int
    rounding: str
    saturate: bool
    scaling: str
    margin: int
    pow2: bool
    amax_algo: str
    role: str
    backend: str  # cast backend: torch / fast / triton
    fused: bool  # the fast backend's fused cast serves it (altgrad.fast_cast.cast_operand)
    fmt_key: tuple  # kernel_fields values of fmt and of domain (fast_cast.operand_params' keys)
    domain_key: tuple


def _plan_key(rc: RoleConfig, role: str, backend: str) -> str:
    f = rc.format
    return "|".join(map(str, (f.name, f.exp_bits, f.man_bits, f.bias, f.specials, rc.rounding, int(rc.saturate),
                              rc.scaling, rc.margin, int(rc.pow2), rc.amax_algo, role, backend)))


@functools.lru_cache(maxsize=None)
def _plan(key: str) -> _Plan:
    name, e, m, bias, specials, rounding, sat, scaling, margin, pow2, algo, role, backend = key.split("|")
    fmt = FormatSpec(name, int(e), int(m), int(bias), specials)
    domain = accumulation_domain(fmt)
    k = domain.bias - fmt.bias
    fused = backend == "fast" and fast_cast.fused_supported(domain, rounding)
    return _Plan(fmt, domain, k, rounding, bool(int(sat)), scaling, int(margin), bool(int(pow2)), algo, role, backend,
                 fused, tuple(fmt.kernel_fields.values()), tuple(domain.kernel_fields.values()))


def _q_dtype(p: _Plan, device: torch.device) -> torch.dtype:
    """dtype of a cast's format-domain values: fp32 from the fused cast on the CPU (the matmul needs
    no upcast; the values are the same), else bf16."""
    return torch.float32 if p.fused and device.type == "cpu" else torch.bfloat16


def sr_seed(sr_state: torch.Tensor, role: str) -> int:
    """Philox seed of one stochastic cast: (base seed, training-forward count, role) mixed into 31 bits."""
    base, count = (int(v) for v in sr_state.tolist())
    h = (base * 0x9E3779B97F4A7C15 + count * 0xBF58476D1CE4E5B9 + _ROLE_ID[role] * 0x94D049BB133111EB) % 2**64
    h ^= h >> 31
    return h % 2**63


# -- the ops, registered on the dispatcher directly ----------------------------------------------
# torch.library.Library define + impl (CompositeExplicitAutograd: every device; no autograd formula,
# the ops run inside _QuantizedLinearFn) instead of torch.library.custom_op, whose Python wrapper
# (defaults, version bumps of every mutated buffer, its autograd shim) costs ~100 us per eager call.
_LIB = torch.library.Library("altgrad", "FRAGMENT")
_LIB.define("cast_operand(Tensor x, Tensor(a1!) scale, Tensor(a2!) inv_scale, Tensor(a3!)? history, "
            "Tensor(a4!)? count, Tensor(a5!)? filled, Tensor(a6!) stats, Tensor(a7!) sr_state, str plan, "
            "bool update, bool advance, Tensor stats_level) -> (Tensor, Tensor)")
_LIB.define("scaled_mm(Tensor a, Tensor b, Tensor? inv_a, Tensor? inv_b, Tensor? bias, ScalarType out_dtype, "
            "str backend) -> Tensor")


def _no_autocast(device_type: str):
    """autocast off (the casts and products are exact fp32 work), entered only where it is on."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NULL


_NULL = contextlib.nullcontext()


# -- the cast op: scale from the state, round, stats, history push -----------------------------
def _cast_operand(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor, history: Optional[torch.Tensor],
                  count: Optional[torch.Tensor], filled: Optional[torch.Tensor], stats: torch.Tensor,
                  sr_state: torch.Tensor, plan: str, update: bool, advance: bool,
                  stats_level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """altgrad::cast_operand: (q with x's shape, inv_scale·2**k 0-dim fp32) for one operand, q the
    format-domain values (fp32 from the fused cast on the CPU, else bf16); in training (`update`)
    also stores the scale used and pushes x's amax into the delayed history; `advance` counts one
    training forward in sr_state after this cast's draws. stats_level: a 0-dim CPU int8 tensor, the
    index of the layer's StatsLevel (so changing it for a logging step changes no compiled graph)."""
    with _no_autocast(x.device.type):
        return _cast_operand_impl(x, scale, inv_scale, history, count, filled, stats, sr_state, _plan(plan), update,
                                  advance, int(stats_level))


_LIB.impl("cast_operand", _cast_operand, "CompositeExplicitAutograd")


_LEVELS = tuple(StatsLevel)  # a stats level travels as its index: 0 scale, 1 counts, 2 full
_COUNTS, _FULL = _LEVELS.index(StatsLevel.COUNTS), _LEVELS.index(StatsLevel.FULL)


def _level_index(level) -> int:
    if not isinstance(level, str) or level not in _LEVELS:
        raise ValueError(f"stats_level must be one of {', '.join(_LEVELS)} (got {level!r})")
    return _LEVELS.index(StatsLevel(level))


def _cast_operand_impl(x, scale, inv_scale, history, count, filled, stats, sr_state, p, update, advance, level):
    if x.numel() == 0:  # nothing to scale, round or observe: state unchanged, stats of nothing
        stats.zero_()
        stats[1] = scale
        return torch.empty(x.shape, dtype=_q_dtype(p, x.device), device=x.device), inv_scale * 2.0**p.k
    if p.fused:
        # the fused cast keeps fp32 scaling buffers and counts in int32
        if scale.dtype == torch.float32 and (history is None or history.dtype == torch.float32) and \
                x.numel() < 2**31:
            return _cast_fused(x, scale, inv_scale, history, count, filled, stats, sr_state, p, update, advance,
                               level)
        # buffers converted by module.to(dtype) (the unfused bookkeeping converts as it goes), or huge x
        q, q_inv = _cast_operand_impl(x, scale, inv_scale, history, count, filled, stats, sr_state,
                                      dataclasses.replace(p, fused=False), update, advance, level)
        return q.to(_q_dtype(p, x.device)), q_inv
    if p.scaling == "none":
        s = scale.to(torch.float32, copy=True)  # a module converted to bf16 keeps its scale buffer in bf16; the cast takes fp32
    else:
        n = 0 if p.scaling == "current" else int(filled)  # filled: a CPU mirror of count, no device sync
        if n == 0:  # current scaling, or a delayed history still empty: the tensor's own amax
            amax = x.detach().abs().amax().float()
        else:
            amax = history[:n].amax() if p.amax_algo == "max" else history[0]
        s = compute_scale(amax, p.fmt, p.margin, p.pow2, prev_scale=scale)
    inv = torch.reciprocal(s)
    seed = sr_seed(sr_state, p.role) if p.rounding == "stochastic" else 0
    q_inv = inv * 2.0**p.k if p.k else inv
    q, st = quantize_operand(x, p.domain, s * 2.0**-p.k if p.k else s, rounding=p.rounding,
                             saturate=p.saturate, seed=seed, stats=True, backend=p.backend)
    if update:
        scale.copy_(s)
        inv_scale.copy_(inv)
        if history is not None:
            # roll in place: newest at index 0, as TransformerEngine keeps its amax_history
            history.copy_(torch.roll(history, 1))
            history[0] = st.amax
            count.add_(1).clamp_(max=history.numel())
            filled.add_(1).clamp_(max=history.numel())
    if advance:
        sr_state[1] += 1
    # stats: [amax, scale | overflow, underflow, nan, nonzero | numel, rel_err] (copy_ converts dtypes);
    # counts the level does not record are NaN, as the fused cast writes them
    stats[:2].copy_(torch.stack([st.amax, s]))
    if level >= _COUNTS:
        stats[2:6].copy_(torch.stack([st.overflow, st.underflow, st.nan, st.nonzero]))
    else:
        stats[2:6] = math.nan
    stats[6] = x.numel()
    if level >= _FULL:
        _rel_err(x, q, q_inv, stats)
    return q, q_inv


def _rel_err(x, q, q_inv, stats):
    """stats[7] = ||q·inv_scale - x|| / ||x|| (stats[0], x's amax, already written): an extra
    pass, at stats level "full" only."""
    stats[7] = relative_error(x, q, q_inv, stats[0])


def _cast_fused(x, scale, inv_scale, history, count, filled, stats, sr_state, p, update, advance, level):
    """_cast_operand_impl's work in one compiled call (altgrad.fast_cast.cast_operand), same bits.
    Whether the delayed history is empty is read from its CPU mirror `filled` (no device sync)."""
    if p.scaling == "delayed":
        n = int(filled)
        source = "history" if n else "own_push"
    else:
        source = "own" if p.scaling == "current" else "none"
    seed = sr_seed(sr_state, p.role) if p.rounding == "stochastic" else 0
    params = fast_cast.operand_params(p.fmt_key, p.domain_key, p.saturate, p.margin, p.pow2, p.amax_algo == "max",
                                      p.k, x.device)
    q, q_inv = fast_cast.cast_operand(x, scale, inv_scale, history, count, stats, sr_state, params, source=source,
                                      rounding=p.rounding, seed=seed, update=update, advance=advance,
                                      out_dtype=_q_dtype(p, x.device), counts=level >= _COUNTS)
    if update and history is not None:
        filled.fill_(min(n + 1, history.numel()))
    if level >= _FULL:
        _rel_err(x, q, q_inv, stats)
    return q, q_inv


@torch.library.register_fake("altgrad::cast_operand")
def _(x, scale, inv_scale, history, count, filled, stats, sr_state, plan, update, advance, stats_level):
    return (torch.empty(x.shape, dtype=_q_dtype(_plan(plan), x.device), device=x.device),
            torch.empty((), dtype=torch.float32, device=x.device))


# -- the matmul op: (a @ b^T) · inv_a · inv_b (+ bias) -----------------------------------------
def _matmul_torch(a, b, inv_a, inv_b, bias, out_dtype):
    """(a @ b^T) · inv_a · inv_b (+ bias), fp32 accumulation; a, b may be any strided views."""
    c = a.float() @ b.float().t()  # no copy for fp32 operands (the fused cast's on the CPU)
    # in place, in this order: (c · inv_a) · inv_b + bias (inv_a · inv_b first would round differently)
    if inv_a is not None:
        c.mul_(inv_a)
    if inv_b is not None:
        c.mul_(inv_b)
    if bias is not None:
        c.add_(bias.float())
    return c.to(out_dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, inv_a: Optional[torch.Tensor], inv_b: Optional[torch.Tensor],
               bias: Optional[torch.Tensor], out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """altgrad::scaled_mm: (a @ b^T) · inv_a · inv_b (+ bias) in out_dtype; backend "triton" uses
    kernels/scaled_matmul.py. The products are exact fp32 work on format-domain values: autocast
    must not make them bf16."""
    with _no_autocast(a.device.type):
        return _scaled_mm_impl(a, b, inv_a, inv_b, bias, out_dtype, backend)


_LIB.impl("scaled_mm", _scaled_mm, "CompositeExplicitAutograd")


def _scaled_mm_impl(a, b, inv_a, inv_b, bias, out_dtype, backend):
    if backend != "triton" or 0 in (a.shape[0], b.shape[0], a.shape[1]):
        return _matmul_torch(a, b, inv_a, inv_b, bias, out_dtype)
    from altgrad.kernels import scaled_matmul as ksm

    kernel_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    return ksm.scaled_matmul(a, b, inv_a, inv_b, bias=bias, out_dtype=kernel_dtype).to(out_dtype)


@torch.library.register_fake("altgrad::scaled_mm")
def _(a, b, inv_a, inv_b, bias, out_dtype, backend):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


# -- the autograd function ---------------------------------------------------------------------
def cast_role(x, state, plan, update, advance, stats_level):
    """One operand through the altgrad::cast_operand op: (bf16 format-domain values, inv_scale).

    state: QuantizedLinear._state(role) (scale, inv_scale, history, stats buffer, sr_state); plan:
    the role's plan string (None = high precision: x itself, inv_scale None); update: refresh the
    scale and stats; advance: push amax into the history; stats_level: the layer's CPU int8 tensor
    (what the stats record, QuantizedLinear.stats_level)
    Shared with altgrad.linear_blockwise, whose tensor-scaled roles go through the same op."""
    if plan is None:
        return x, None
    return torch.ops.altgrad.cast_operand(x, *state, plan, update, advance, stats_level)


class _QuantizedLinearFn(torch.autograd.Function):
    """The forward casts W and x and multiplies, the backward casts dy and runs dgrad and wgrad.
    Scaling state travels as tensor tuples and per-role options as plan strings (no module), so
    torch.compile traces it; casts run inside (under no grad), so no operand needs a detach."""

    @staticmethod
    def forward(ctx, x, weight, bias, cached_w, states, plans, mm_backend, flags):
        update, stats_level = flags
        i_plan, w_plan, g_plan, wg_plan = plans
        i_state, w_state, g_state, wg_state = states
        # the last cast of a training forward counts it in sr_state (after its own draws)
        adv_w, adv_i = update and i_plan is None, update and i_plan is not None
        q_w, inv_w = cached_w if cached_w is not None else cast_role(weight, w_state, w_plan, update, adv_w, stats_level)
        q_i, inv_i = cast_role(x, i_state, i_plan, update, adv_i, stats_level)
        q_i = q_i.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: in_features may be 0
        y = torch.ops.altgrad.scaled_mm(q_i, q_w, inv_i, inv_w, bias, _output_dtype(x), mm_backend)
        ctx.save_for_backward(q_i, q_w, inv_i, inv_w)
        ctx.g_state, ctx.wg_state, ctx.plans, ctx.mm_backend = g_state, wg_state, (g_plan, wg_plan), mm_backend
        # no cast in this forward (only gradient roles quantized): the grad_output cast counts it
        ctx.flags = (update, stats_level, update and i_plan is None and (w_plan is None or cached_w is not None))
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.w_dtype, ctx.b_dtype = weight.dtype, None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        q_i, q_w, inv_i, inv_w = ctx.saved_tensors
        g_plan, wg_plan = ctx.plans
        update, stats_level, advance = ctx.flags
        dy2 = dy.reshape(math.prod(dy.shape[:-1]), dy.shape[-1])
        q_g, inv_g = cast_role(dy2, ctx.g_state, g_plan, update, advance, stats_level)
        mm = functools.partial(torch.ops.altgrad.scaled_mm, backend=ctx.mm_backend)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx (M, in) = Q_g (M, out) @ Q_w (out, in): B = Q_w^T as a strided view
            dx = mm(q_g, q_w.t(), inv_g, inv_w, None, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # dW (out, in) = Q_g^T (out, M) @ Q_i (M, in): A = Q_g^T, B = Q_i^T as views
            dw = mm(q_g.t(), q_i.t(), inv_g, inv_i, None, torch.float32)
            if wg_plan is not None and dy2.shape[0] > 0:  # an empty batch has no gradient to observe
                q, inv = cast_role(dw, ctx.wg_state, wg_plan, update, False, stats_level)
                dw = q.float() * inv
            dw = dw.to(ctx.w_dtype)
        if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.b_dtype)
        return dx, dw, db, None, None, None, None, None


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype inside autocast, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# -- the module --------------------------------------------------------------------------------
def _default_seed(name: str) -> int:
    """Base stochastic-rounding seed of a layer: the run seed (torch.initial_seed()) and its name."""
    return (torch.initial_seed() * 1000003 + zlib.crc32(name.encode())) % 2**62


class QuantizedLinear(nn.Module):
    """An nn.Linear computing with simulated-format operands (see the module docstring).

    It owns the wrapped layer's own Parameters (same objects, same state_dict keys `weight`,
    `bias`), so optimizer state, weight tying and shadow models stay attached; `.linear` returns
    the original nn.Linear holding this module's current Parameters (one source of truth, also
    after `load_state_dict(..., assign=True)`), which is what dequantize_model puts back.

    forward(x): x (..., in_features) in fp32 / bf16 / fp16 (autocast's dtype under autocast) ->
    (..., out_features) in the same dtype. Three GEMMs, each operand cast to its role's format
    (docs/design.md §5): forward y = x W^T, dgrad dx = dy W, wgrad dW = dy^T x. Per-role stats
    (`stats`, `weight_format_and_scale()`) are the interface altgrad.metrics reads. forward raises
    ValueError when x's last dimension is not in_features or x is not a float tensor on the weight's device.

    Args:
        linear: the nn.Linear to wrap.
        layer_config: per-role formats and scaling options.
        name: the layer's qualified name (messages, metrics, default seed).
        backend: "auto", "torch", "fast" or "triton" (see the module docstring).
        seed: base seed of the layer's stochastic-rounding stream (default: from the run seed
            and `name`); stored in the `sr_state` buffer.
    Raises:
        TypeError: linear is not an nn.Linear, or layer_config not a LayerQuantConfig.
        ValueError: unknown backend, or seed not an int in [0, 2**62).
    """

    def __init__(self, linear: nn.Linear, layer_config: LayerQuantConfig, name: str = "", backend: str = "auto",
                 seed: int | None = None):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear wraps an nn.Linear (got {type(linear).__name__})")
        if not isinstance(layer_config, LayerQuantConfig):
            raise TypeError(f"layer_config must be a LayerQuantConfig (got {type(layer_config).__name__})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62):
            raise ValueError(f"seed must be an int in [0, 2**62) (got {seed!r})")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects, under the same state_dict keys
        self.bias = linear.bias
        object.__setattr__(self, "_linear", linear)  # not a submodule: no duplicate parameter names
        self.layer_config, self.name, self.backend = layer_config, name, backend
        roles = {r: getattr(layer_config, r) for r in _ROLES}
        self.role_configs = {r: rc for r, rc in roles.items() if rc is not None}
        device = linear.weight.device
        self.scalers = nn.ModuleDict({
            r: TensorScaler(rc.format, rc.scaling, rc.history_len, rc.amax_algo, rc.margin, rc.pow2)
            for r, rc in self.role_configs.items()
        }).to(device)
        for r in self.role_configs:
            self.register_buffer(f"_stats_{r}", torch.zeros(len(STAT_FIELDS), dtype=torch.float64, device=device),
                                 persistent=False)
        self.register_buffer("sr_state", torch.tensor([_default_seed(name) if seed is None else seed, 0],
                                                      dtype=torch.int64, device=device))
        if layer_config.master_weights is not None:
            # a power-of-two scale: the grid moves only when amax crosses a binade, not on every step
            self.master_scaler = TensorScaler(layer_config.master_weights, "current", pow2=True).to(device)
        # plan strings per cast backend (torch / fast / triton) and role
        self._plans = {b: tuple(_plan_key(self.role_configs[r], r, b) if r in self.role_configs else None
                                for r in _ROLES) for b in ("torch", "fast", "triton")}
        # the StatsLevel's index, a CPU tensor read inside the cast op (no graph changes with it)
        self._stats_level = torch.tensor(_COUNTS, dtype=torch.int8)
        self.weight_cache = False
        self._weight_cast = None
        self._warned_fallback = False
        self._register_load_state_dict_pre_hook(_drop_weight_cast, with_module=True)

    @property
    def linear(self) -> nn.Linear:
        """The wrapped nn.Linear, holding this module's current weight and bias Parameters."""
        lin = self._linear
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    @property
    def stats_level(self) -> StatsLevel:
        """What each cast records in `stats` (vocabulary.StatsLevel): "scale" (amax, scale, numel),
        "counts" (and overflow / underflow / nan / nonzero; the default) or "full" (and rel_err, an
        extra pass per operand). Setting it raises ValueError for another value."""
        return _LEVELS[int(self._stats_level)]

    @stats_level.setter
    def stats_level(self, level: StatsLevel | str) -> None:
        self._stats_level.fill_(_level_index(level))

    @property
    def formats(self) -> dict[str, FormatSpec | None]:
        return {r: (rc.format if (rc := getattr(self.layer_config, r)) else None)
                for r in _ROLES}

    @property
    def stats(self) -> dict[str, dict[str, torch.Tensor]]:
        """The layer's declared stats interface (altgrad.metrics reads only this and
        `weight_format_and_scale`): {role: {field: value}} of the last cast of each quantized role,
        the fields of the layer's `stats_level` (vocabulary.stat_fields) in STAT_FIELDS order, values
        0-dim float64 views of device buffers (read them on logging steps: reading syncs)."""
        fields = stat_fields(self.stats_level)
        out = {}
        for r in self.role_configs:
            buf = getattr(self, f"_stats_{r}")
            out[r] = {f: buf[STAT_FIELDS.index(f)] for f in fields}
        # row / block roles: each GEMM casts along its own K, so an operand's second use (e.g.
        # "input:wgrad", x cast along the tokens) has stats of its own (one cast serving two uses
        # is reported once)
        block_uses = getattr(self, "blockwise_stats", {})
        first_uses = {id(st) for use, st in block_uses.items() if ":" not in use}
        for use, st in block_uses.items():
            if ":" in use and id(st) not in first_uses:
                out[use] = st
        return out

    def weight_format_and_scale(self) -> tuple[FormatSpec | None, torch.Tensor | None]:
        """(weight role's FormatSpec, the scale its next forward cast uses, detached fp32), or
        (None, None) when the weight is kept in high precision. The scale is 0-dim for per-tensor
        scaling; for row / block scaling it is per element, of the weight's shape (out, in), the
        block scales of the forward GEMM's cast along in_features computed from the current weight."""
        fmt = self.formats["weight"]
        if fmt is None:
            return None, None
        rc = self.role_configs["weight"]
        if rc.granularity == "tensor":
            return fmt, self.scalers["weight"].scale.detach().float().clone()
        return fmt, weight_block_scales(self.weight.detach(), rc)

    # -- backend choice --
    def _backends(self, x: torch.Tensor) -> tuple[str, str]:
        """(cast backend, matmul backend) for this call."""
        all_roles = all(r in self.role_configs for r in OPERAND_ROLES)
        if self.backend in ("torch", "fast"):
            return self.backend, "torch"
        if self.backend == "triton":
            if not all_roles:
                raise ValueError(f"{self.name or 'QuantizedLinear'}: backend='triton' needs a format for every "
                                 f"operand role (input, weight, grad_output); use backend='auto' or 'torch'")
            return "triton", "triton"
        if x.is_cuda and not all_roles and not self._warned_fallback:
            warnings.warn(f"{self.name or 'QuantizedLinear'}: a high-precision role runs on the fast torch path "
                          f"(the Triton path needs every operand role quantized)", stacklevel=3)
            self._warned_fallback = True
        return ("triton", "triton") if x.is_cuda and all_roles else ("fast", "torch")

    def _state(self, role: str):
        """The tensors altgrad::cast_operand reads and updates for role (None if high precision)."""
        if role not in self.role_configs:
            return None
        sc = self.scalers[role]
        h = sc.amax_history
        hist = (None, None, None) if h is None else (h.history, h.count, h.filled)
        return (sc.scale, sc.inv_scale, *hist, getattr(self, f"_stats_{role}"), self.sr_state)

    # -- the interface altgrad.linear_blockwise casts per-tensor roles through --
    def role_seed(self, role: str) -> int:
        """The stochastic-rounding seed of role's next cast: sr_seed(self.sr_state, role)."""
        return sr_seed(self.sr_state, role)

    def cast_tensor_role(self, role: str, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cast `mat` with role's per-tensor scaling state (scaler, delayed history, stats buffer),
        as the forward does: (bf16 format-domain values of mat's shape, 0-dim fp32 inv_scale).
        Updates the state in training mode for non-empty `mat`."""
        backend = self.backend if self.backend in ("torch", "fast") else ("triton" if mat.is_cuda else "fast")
        plan = self._plans[backend][_ROLES.index(role)]
        update = self.training and mat.numel() > 0
        return cast_role(mat, self._state(role), plan, update, False, self._stats_level)

    def _cached_weight(self, cast_backend: str, plan: str | None, update: bool):
        """The opt-in cross-micro-batch weight cast (eager only), or None to cast in the forward."""
        if not self.weight_cache or plan is None or torch.compiler.is_compiling():
            return None
        # a new level must record its own fields (a cast at "scale" has no counts for a logging step)
        key = (cast_backend, update, self.weight.device, int(self._stats_level))
        if self._weight_cast is None or self._weight_cast[0] != key:
            with torch.no_grad():
                q = cast_role(self.weight, self._state("weight"), plan, update, False, self._stats_level)
            self._weight_cast = (key, q)
        return self._weight_cast[1]

    # -- forward --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantizedLinear'}: input has {x.shape[-1]} features, "
                             f"expected in_features={self.in_features}")
        if not (x.is_floating_point() and x.device == self.weight.device):
            raise ValueError(f"{self.name or 'QuantizedLinear'}: input must be a float tensor on "
                             f"{self.weight.device} (got {x.dtype} on {x.device})")
        if not self.role_configs:
            return nn.functional.linear(x, self.weight, self.bias)
        # -- row / block scales: each GEMM casts along its own K (altgrad/linear_blockwise.py) --
        if needs_blockwise(self.role_configs):
            return blockwise_linear(x, self.weight, self.bias, self)
        cast_backend, mm_backend = self._backends(x)
        # an empty batch is no training step: it observes nothing and advances nothing
        update = self.training and x.numel() > 0
        plans = self._plans[cast_backend]
        states = tuple(self._state(r) for r in _ROLES)
        i_state, w_state, g_state, wg_state = states
        return _QuantizedLinearFn.apply(x, self.weight, self.bias, self._cached_weight(cast_backend, plans[1], update),
                                        (i_state, w_state, g_state, wg_state), plans, mm_backend,
                                        (update, self._stats_level))

    @torch.no_grad()
    def round_master_weights(self) -> None:
        """Store the weights themselves in the master-weights format (call after optimizer.step())."""
        fmt = self.layer_config.master_weights
        if fmt is None:
            return
        w = self.weight
        scale, inv = self.master_scaler.scale_for(w)
        q, _, _ = round_with_masks(w.float() * scale, fmt, self.layer_config.master_rounding, True, None)
        w.copy_((q * inv).to(w.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.layer_config.describe()}"


def _drop_weight_cast(module, *args, **kwargs):
    module._weight_cast = None


def _layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def round_master_weights(model: nn.Module) -> None:
    """Apply every QuantizedLinear's master-weights format (a no-op where none is set)."""
    for m in _layers(model):
        m.round_master_weights()


def set_stats_level(model: nn.Module, level: StatsLevel | str) -> None:
    """Set every QuantizedLinear's `stats_level`: train.py records "full" stats on logging steps and
    "scale" between them (the counts and rel_err are read on logging steps only). Raises ValueError
    for a level that is not a StatsLevel."""
    index = _level_index(level)
    for m in _layers(model):
        m._stats_level.fill_(index)


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Opt in (or out) of casting each weight once per optimizer step instead of once per forward.

    With it on, the weight cast is reused by every forward until `weight_updated(model)` is
    called (or the layer's mode, backend, device, stats level or state_dict changes): call that
    after every `optimizer.step()` (train.py: at the end of every step, skipped ones included, so
    each step casts its weights once) and after any other change of the weights' values. Eager only: a forward
    under torch.compile always casts. Off (the default), every forward sees the current weights."""
    for m in _layers(model):
        m.weight_cache = bool(enabled)
        m._weight_cast = None


def weight_updated(model: nn.Module) -> None:
    """The weights changed (optimizer step, EMA, manual edits): drop every cached weight cast."""
    for m in _layers(model):
        m._weight_cast = None


def sync_amax_history(model: nn.Module, group=None) -> None:
    """Max-reduce every delayed-scaling amax history of `model` across the data-parallel `group`.

    Semantics (TransformerEngine's default): after the call every rank holds the same histories,
    each entry the largest amax any rank saw, so every rank derives the same scale for the next
    cast of each tensor; wrap the model in DDP with `broadcast_buffers=False` (DDP's buffer
    broadcast would otherwise copy rank 0's histories over the others'). One all-reduce (MAX) of
    all histories concatenated, whatever the number of layers. Call it after each backward (each
    micro-batch): with one micro-batch per rank and step that is one reduction per optimizer step;
    with several, the micro-batches of a step after the first quantize with local amaxes pushed
    since the last call. The first forward (empty histories) uses each rank's own amax.
    A no-op when torch.distributed is not initialised or the group has one rank.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    hists = [sc.amax_history.history for m in _layers(model) for sc in m.scalers.values()
             if sc.amax_history is not None]
    if not hists:
        return
    flat = torch.cat(hists)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=group)
    for h, v in zip(hists, flat.split([h.numel() for h in hists])):
        h.copy_(v)
