"""The fast exact cast: round one operand to a format and count its stats in one fused pass.

`cast(x, fmt, scale, ...)` returns what the reference (`altgrad.quantize`, backend "torch") returns
for the same arguments, bit for bit, for every format, both saturate modes and both rounding modes
(stochastic rounding draws the same Philox bits per element). Each variant (rounding mode, stats,
amax source) is compiled once per input dtype and state-buffer shape, with the format passed as
small parameter tensors and the length symbolic, so one compiled graph serves every format and
length. On the CPU inductor compiles a make_fx trace and the cast calls its code directly (dynamo's
per-call frame hooks and guards would cost ~30 us of each ~60 us call on small operands);
elsewhere, or if that trace fails, `torch.compile` serves. Without a working compiler the same code
runs eagerly (slower, identical bits).

Nearest rounding uses fp32 addition instead of bit fields ("magic constant" rounding). With
m = min(|v|, 2**(t+1)) (t the exponent of the format's max) and e = max(exponent(m), emin),

    C = 1.5 * 2**(e - M + 23)        r = (m + C) - C

rounds m to a multiple of the quantum 2**(e - M) with IEEE round-half-to-even: C + m lies in
[2**(e-M+23), 2**(e-M+24)), where the fp32 spacing is the quantum, and C is an even multiple of it,
so "even" is the even code. Three fix-ups on the integer bits complete it:
  - M = 0 (E7M0): codes are exponents, and a tie at 1.5 * 2**e goes to the even *exponent code*,
    while the addition always rounds it up: ties in binades with an even biased exponent go down.
  - overflow is r > max (inf is clamped to 2**(t+1) first); saturate or write inf / NaN.
  - the sign is copied on the bits (inductor compiles with -fno-signed-zeros, so no float negation),
    dropped on zero where the format has no -0; NaN becomes the canonical bf16 NaN 0x7FC0 (in a
    second pass that runs only when the fused pass counted a NaN result).
The construction needs C to be a finite fp32 number: t + 24 - M <= 127, true for every registered
format; a format past that (an extreme custom bias) uses the integer path.

Stochastic rounding is the reference's integer recipe (32 bits below the code's LSB plus a 32-bit
Philox draw), compiled.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import torch

from altgrad.formats import FormatSpec
from altgrad.scaling import MIN_SCALE

__all__ = ["cast", "cast_operand", "fused_supported", "magic_supported", "operand_params"]

CANONICAL_NAN_BF16 = 0x7FC0  # the bf16 NaN every backend writes for a NaN result
CANONICAL_NAN_FP32 = 0x7FC00000  # its fp32 form (the format-domain values of row / block casts)
_INT32_SIGN = -(2**31)


def magic_supported(fmt: FormatSpec) -> bool:
    """Whether the magic-constant rounding's constant C stays a finite fp32 number for fmt."""
    return math.floor(math.log2(fmt.max)) + 24 - fmt.man_bits <= 127


@functools.lru_cache(maxsize=None)
def _params(fmt_key: tuple, saturate: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 params, fp32 params) of a format layout, as device tensors the compiled cast reads."""
    fmt = FormatSpec("cast", *fmt_key)
    top_exp = math.floor(math.log2(fmt.max))
    lim_bits = (top_exp + 1 + 127) << 23  # 2**(top_exp + 1): past max, and C stays finite
    ip = torch.tensor([fmt.man_bits, fmt.emin, fmt.bias, lim_bits, int(fmt.has_neg_zero), int(saturate),
                       (1 << fmt.exp_bits) - fmt.bias, fmt.max_code], dtype=torch.int32, device=device)
    fp = torch.tensor([fmt.max, math.inf if fmt.has_inf else math.nan, 2.0 ** (fmt.emin - fmt.man_bits)],
                      dtype=torch.float32, device=device)
    return ip, fp


def _finish(x, v, bits, nan, overflow, r, ip, fp, with_stats: bool, out_dtype=None, counts: bool = True):
    """Shared tail: saturate or mark overflow, sign, bf16, stats. Returns (q bf16, amax bits,
    counts, NaN-output count); NaN lanes of q are fixed up by the caller (see cast). With an
    out_dtype (cast_operand), q is fp32 or bf16 taken from the bits, NaN lanes already canonical.
    counts=False (with stats): the amax alone, counts None."""
    negzero, sat = ip[4], ip[5]
    fmax, ovf = fp[0], fp[1]
    mag = torch.where(overflow, torch.where(sat != 0, fmax, ovf), r)
    mag_bits = mag.view(torch.int32)
    keep_sign = (mag_bits != 0) | (negzero != 0)
    q_bits = torch.where(keep_sign, mag_bits | (bits & _INT32_SIGN), mag_bits)
    nan_out = nan | (mag_bits > 0x7F800000)
    q_bits = torch.where(nan_out, CANONICAL_NAN_BF16 << 16, q_bits)
    if out_dtype == torch.float32:
        q = q_bits.view(torch.float32)
    elif out_dtype == torch.bfloat16:  # the high half: every format value is a bf16 number
        q = (q_bits >> 16).to(torch.int16).view(torch.bfloat16)
    # exact for every format value; a NaN converts to a NaN whose bits depend on the vector lane
    # (so the caller rewrites NaN lanes); an int32 -> int16 narrowing instead would not vectorize
    else:
        q = q_bits.view(torch.float32).to(torch.bfloat16)
    n_nan_out = nan_out.sum()
    if not with_stats:
        return q, None, None, n_nan_out
    abs_bits = torch.where(nan, 0, x.float().view(torch.int32) & 0x7FFFFFFF)
    if not counts:
        return q, abs_bits.amax(), None, n_nan_out
    nonzero = (v != 0) & ~nan
    underflow = nonzero & (r == 0)
    # cast_operand (out_dtype given) counts in int32, exact below 2**31 elements (its callers check):
    # int64 accumulators cost ~30 % of the whole pass on AVX-512
    cdt = torch.int64 if out_dtype is None else torch.int32
    sums = torch.stack([overflow.sum(dtype=cdt), underflow.sum(dtype=cdt), nonzero.sum(dtype=cdt), nan.sum(dtype=cdt)])
    return q, abs_bits.amax(), sums, n_nan_out


def _cast_nearest(x, scale, ip, fp, with_stats: bool, out_dtype=None, m0: bool = True, counts: bool = True):
    """x: 1-D, non-empty. Returns _finish's tuple. m0: the format has no mantissa bits (the tie
    fix-up below is compiled only then; it is a no-op for other formats)."""
    m_, emin, bias, lim = ip[0], ip[1], ip[2], ip[3]
    v = x.float() * scale
    bits = v.view(torch.int32)
    a = bits & 0x7FFFFFFF
    nan = a > 0x7F800000
    mb = torch.minimum(a, lim)
    e = (mb >> 23) - 127
    ec = torch.maximum(e, emin)
    c = (((ec + (150 - m_)) << 23) | 0x400000).view(torch.float32)
    m = mb.view(torch.float32)
    r = (m + c) - c
    if m0:  # M = 0: ties go to the even exponent code, not always up
        tie = (m_ == 0) & ((mb & 0x7FFFFF) == 0x400000) & (e >= emin) & (((e + bias) & 1) == 0)
        r = torch.where(tie, (mb & 0x7F800000).view(torch.float32), r)
    overflow = (r > fp[0]) & ~nan
    return _finish(x, v, bits, nan, overflow, r, ip, fp, with_stats, out_dtype, counts)


def _cast_stochastic(x, scale, k0, k1, ip, fp, with_stats: bool, out_dtype=None, counts: bool = True):
    """As _cast_nearest, rounding stochastically with the Philox key (k0, k1) (0-dim int64)."""
    from altgrad.quantize import philox_from_key

    m_, emin, bias, top, max_code = ip[0], ip[1], ip[2], ip[6], ip[7]
    v = x.float() * scale
    bits = v.view(torch.int32)
    a = bits & 0x7FFFFFFF
    nan = a > 0x7F800000
    inf = a == 0x7F800000
    fe = a >> 23
    sig = (a & 0x7FFFFF) | ((fe != 0).to(torch.int32) << 23)
    e = torch.minimum(torch.clamp(fe, min=1) - 127, top)
    normal = e >= emin
    wide = torch.where(normal, ((e + (bias - 1)) << 23) + sig, sig).to(torch.int64)
    shift = torch.where(normal, 23 - m_, (23 - m_ + emin) - e).to(torch.int64).clamp(max=60)
    drop = (shift - 32).clamp(min=0)
    wide, shift = wide >> drop, shift - drop
    rbits = philox_from_key(torch.arange(x.numel(), dtype=torch.int64, device=x.device), k0, k1)
    code = ((wide + (rbits >> (32 - shift))) >> shift).to(torch.int32)
    overflow = ((code > max_code) | inf) & ~nan
    code = torch.minimum(code, max_code)
    # shifts by the 0-dim m_ as torch.bitwise_*_shift: the `>>` / `<<` operators' meta functions fail
    # to broadcast a 0-dim tensor over a symbolic length (make_fx tracing, see _compile_direct)
    lsb_code = torch.bitwise_left_shift(torch.ones_like(m_), m_)
    exp_field = (torch.bitwise_right_shift(code, m_) + (127 - bias)) << 23
    normal_bits = exp_field | torch.bitwise_left_shift(code & (lsb_code - 1), 23 - m_)
    r = torch.where(code >= lsb_code, normal_bits.view(torch.float32), code.to(torch.float32) * fp[2])
    return _finish(x, v, bits, nan, overflow, r, ip, fp, with_stats, out_dtype, counts)


# one top-level function per (rounding, stats) variant: dynamo keeps its compiled graphs per code
# object, so each variant holds at most one graph per input dtype (no recompile limit in reach)
def _nearest_stats(x, scale, ip, fp, m0):
    return _cast_nearest(x, scale, ip, fp, True, None, m0)


def _nearest_plain(x, scale, ip, fp, m0):
    return _cast_nearest(x, scale, ip, fp, False, None, m0)


def _stochastic_stats(x, scale, k0, k1, ip, fp):
    return _cast_stochastic(x, scale, k0, k1, ip, fp, True)


def _stochastic_plain(x, scale, k0, k1, ip, fp):
    return _cast_stochastic(x, scale, k0, k1, ip, fp, False)


_VARIANTS = {("nearest", True): _nearest_stats, ("nearest", False): _nearest_plain,
             ("stochastic", True): _stochastic_stats, ("stochastic", False): _stochastic_plain}
_COMPILED: dict[tuple, object] = {}  # (variant, argument descriptions) -> compiled callable
_DYNAMO: dict[object, object] = {}
# variant -> positions of the arguments that have the first argument's (x's) shape in every call
_SHARED_LENGTH: dict[object, tuple[int, ...]] = {}


@functools.lru_cache(maxsize=None)
def _canonical_nan(device: torch.device) -> torch.Tensor:
    return torch.tensor(CANONICAL_NAN_BF16, dtype=torch.int16, device=device).view(torch.bfloat16)
COMPILE = True  # set False to run the cast eagerly (same bits, slower)
# inline masks read by several consumers (overflow: the count and the saturation) instead of
# storing them as bool buffers and summing them in a second pass (4x slower when it happens)
# (and no size / alignment / scalar asserts on the inputs: ~10 us of wrapper time per call)
_INDUCTOR_OPTIONS = {"realize_reads_threshold": 100, "size_asserts": False, "alignment_asserts": False,
                     "scalar_asserts": False}


def _inductor_options() -> dict:
    """_INDUCTOR_OPTIONS that this torch's inductor knows (an unknown one would fail the compile)."""
    from torch._inductor import config

    return {k: v for k, v in _INDUCTOR_OPTIONS.items() if hasattr(config, k)}


def _run(fn, x, *args):
    """fn(x, *args) compiled, or eagerly where compiling is off or fails (e.g. no C++ compiler), for
    single elements and under a TorchDispatchMode (op counters, FlopCounterMode: no compiled call
    runs there). On the CPU the compiled code is called without dynamo (`_compile_direct`), elsewhere
    through torch.compile (one graph per input dtype)."""
    if not COMPILE or x.numel() < 2 or torch._C._len_torch_dispatch_stack():
        return fn(x, *args)
    args = (x, *args)
    shared = _SHARED_LENGTH.get(fn, ())
    if any(args[i].shape != x.shape for i in shared):
        return fn(*args)  # not a layout the variant is compiled for (its callers never do this)
    key = (fn, *(_describe(i, a, i in shared) for i, a in enumerate(args)))
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _compile(fn, args)
    if compiled is fn:
        return fn(*args)
    try:
        return compiled(*args)
    except Exception as err:  # a compiler failure: the eager code gives the same bits
        warnings.warn(f"altgrad.fast_cast: torch.compile failed ({type(err).__name__}: {err}); "
                      f"running the cast eagerly", RuntimeWarning, stacklevel=3)
        _COMPILED[key] = fn
        return fn(*args)


def _describe(i: int, a, shared: bool) -> object:
    """What a compiled graph is specialised on: the first argument's dtype, device and rank (its
    length stays symbolic) and those of the arguments of the same length (`shared`), the other
    tensors' dtype, device and shape, other values themselves."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.device, a.dim() if i == 0 or shared else tuple(a.shape))
    return a


def _tensor_fn(fn, args):
    """fn as a function of its tensor arguments only (the others fixed to their values in args)."""
    slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def call(*tensors):
        full = list(args)
        for i, t in zip(slots, tensors):
            full[i] = t
        return fn(*full)

    return call


def _compile(fn, args):
    """fn compiled for calls like args (see _describe)."""
    if args[0].device.type == "cpu":
        direct = _compile_direct(fn, args)
        if direct is not None:
            return _Direct(direct)
    # dynamo keeps its graphs per code object: one per variant function, one graph per input dtype
    dynamo = _DYNAMO.get(fn)
    if dynamo is None:
        dynamo = _DYNAMO[fn] = torch.compile(fn, dynamic=True, fullgraph=True, options=_inductor_options())
    return dynamo


class _Direct:
    """A _compile_direct callable, called with fn's full argument list."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args):
        return self.compiled(*(a for a in args if isinstance(a, torch.Tensor)))


def _compile_direct(fn, args):
    """Inductor's code for fn, traced with make_fx over fake tensors whose first argument's length
    is symbolic, called without dynamo: dynamo's frame hooks and guards cost ~30 us per call
    (x 51 casts a step). None where tracing or compiling fails, or left a condition on the length
    (beyond the n >= 2 every call has): torch.compile then serves these calls."""
    from torch._guards import TracingContext, tracing
    from torch._inductor import config as inductor_config
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    fake_log = logging.getLogger("torch._subclasses.fake_tensor")  # a failed trace logs an error
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        # duck shaping gives x and the arguments of its length one symbol; all others are static
        mode = FakeTensorMode(shape_env=(env := ShapeEnv(duck_shape=True)))
        length = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DUCK])
        shared = {0, *_SHARED_LENGTH.get(fn, ())}
        fakes = [mode.from_tensor(a, symbolic_context=length) if i in shared else
                 mode.from_tensor(a, static_shapes=True) for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        with torch.no_grad():
            gm = make_fx(_tensor_fn(fn, args), select_decomp_table(), tracing_mode="fake")(*fakes)
            inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
            with tracing(TracingContext(mode)), inductor_config.patch(_inductor_options()):
                compiled = compile_fx(gm, inputs)
    except Exception:
        return None
    finally:
        fake_log.setLevel(level)
    if env.guards:
        return None
    return compiled


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x as a dense 1-D tensor in row-major order (the index is the Philox counter), detached (a view
    of x would make dynamo guard on its base's layout). A broadcast gradient (stride 0, e.g. of
    `y.sum()`) is copied: each of these would compile another graph."""
    flat = x.reshape(-1).detach()
    return flat if flat.numel() < 2 or flat.stride(0) == 1 else flat.contiguous()


def cast(x: torch.Tensor, fmt: FormatSpec, scale: torch.Tensor, *, rounding: str, saturate: bool,
         seed: int, stats: bool):
    """round_fmt(x * scale) as bf16 of x's shape, and (amax fp32 0-dim, counts int64[4]) or None.

    Arguments are trusted (altgrad.quantize.quantize_operand checks them): x fp32/bf16/fp16 with
    numel > 0, scale a 0-dim fp32 tensor on x's device, seed an int in [0, 2**64).
    """
    key = tuple(fmt.kernel_fields.values())
    ip, fp = _params(key, saturate, x.device)
    flat = _flat(x)
    scale = scale.reshape(())
    if rounding == "stochastic":
        k0 = torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64, device=x.device)
        k1 = torch.tensor(seed >> 32, dtype=torch.int64, device=x.device)
        q, amax_bits, counts, n_nan = _run(_VARIANTS[rounding, stats], flat, scale, k0, k1, ip, fp)
    elif magic_supported(fmt):
        q, amax_bits, counts, n_nan = _run(_VARIANTS[rounding, stats], flat, scale, ip, fp, fmt.man_bits == 0)
    else:
        return None  # the caller falls back to the reference
    # NaN results become the canonical bf16 NaN; on the CPU reading the count is free, and NaNs are rare
    if x.device.type != "cpu" or n_nan.item():
        q = torch.where(torch.isnan(q), _canonical_nan(x.device), q)
    q = q.view(x.shape)
    if not stats:
        return q, None
    return q, (amax_bits.view(torch.float32), counts)


# -- the fused operand cast: scale, round, stats and scaling-state update in one compiled call --
# QuantizedLinear's fast backend casts each operand through `cast_operand`: the scale from the
# amax (the delayed history's, or the tensor's own), the rounding, the stats vector, and in
# training the scale / inv_scale buffers and the history push, all in one torch.compile'd function
# that writes its state buffers in place (inductor fuses it into a reduction loop and an
# elementwise loop). Options are parameter tensors (`operand_params`) and per-call switches 0-dim
# tensors, so a graph depends only on the python-level variant: the amax source and the rounding.

AMAX_SOURCES = ("none", "own", "own_push", "history")  # scale 1 / x's amax / x's amax + push / history


def _static(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Mark fixed-size tensors static for dynamo: only x's length (and the history's) stay symbolic,
    so no size of theirs is "duck-shaped" together with a parameter vector's (another graph)."""
    for t in tensors:
        torch._dynamo.mark_static(t)
    return tensors


@functools.lru_cache(maxsize=None)
def operand_params(fmt_key: tuple, domain_key: tuple, saturate: bool, margin: int, pow2: bool, algo_max: bool,
                   k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(ip, fp, sp, si, m0): device tensors of one operand role, the domain format's rounding parameters
    (as `cast`), sp fp32 [fmt.max, 2**margin, 2**-k, 2**k] and si int32 [pow2, amax algo is max],
    and whether the domain format has no mantissa bits.
    fmt_key / domain_key: FormatSpec.kernel_fields values of the role's format and of the format
    rounded to (fmt with bias + k)."""
    fmt = FormatSpec("scale", *fmt_key)
    ip, fp = (t.clone() for t in _params(domain_key, saturate, device))
    sp = torch.tensor([fmt.max, float(2**margin), 2.0**-k, 2.0**k], dtype=torch.float32, device=device)
    si = torch.tensor([int(pow2), int(algo_max)], dtype=torch.int32, device=device)
    return (*_static(ip, fp, sp, si), FormatSpec("domain", *domain_key).man_bits == 0)


@functools.lru_cache(maxsize=None)
def _flag(value: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A 0-dim per-call switch (the graph is the same for both values)."""
    return _static(torch.tensor(value, dtype=dtype, device=device))[0]


def _scale_of(amax, prev, sp, si):
    """altgrad.scaling.compute_scale(amax, fmt, margin, pow2, prev_scale=prev) on 0-dim fp32 tensors,
    the same operations in the same order (two correctly rounded divisions, clamp, pow2 mask), with
    the validity tests on the bits (0 < bits < inf bits: positive and finite)."""
    scale = ((sp[0] / amax) / sp[1]).clamp(min=MIN_SCALE)
    scale_bits = scale.view(torch.int32)
    scale_bits = torch.where(si[0] != 0, scale_bits & ~0x7FFFFF, scale_bits)
    amax_bits = amax.view(torch.int32)
    ok = (amax_bits > 0) & (amax_bits < 0x7F800000) & (scale_bits > 0) & (scale_bits < 0x7F800000)
    return torch.where(ok, scale_bits.view(torch.float32), prev)


def _fused(x, scale, inv_scale, history, count, stats, sr_state, ip, fp, sp, si, upd, adv, key, source, rounding,
           counts, out_dtype, m0):
    """One operand cast with its bookkeeping (see cast_operand): (q, inv_scale * 2**k)."""
    if source == "none":
        s = scale
    else:
        if source == "history":
            # count >= 1 here; entries past it hold nothing pushed: stand in the newest for them
            newest = history[0]
            valid = torch.arange(history.numel(), device=history.device) < count
            amax = torch.where(si[1] != 0, torch.where(valid, history, newest).amax(), newest)
        else:  # the tensor's own amax, NaN if any (compute_scale then keeps the previous scale)
            amax = (x.float().view(torch.int32) & 0x7FFFFFFF).amax().view(torch.float32)
        s = _scale_of(amax, scale, sp, si)
        # the same value, as a reduction's output: inductor stores it once, instead of recomputing
        # the scale (two divisions and its checks) in every vector iteration of the cast loop
        # (reductions under 8 elements become pointwise code again); 1M-element casts ~20 % faster
        s = s.reshape(1).expand(16).amax()
    inv = torch.reciprocal(s)
    if rounding == "nearest":
        q, amax_bits, sums, _ = _cast_nearest(x, s * sp[2], ip, fp, True, out_dtype, m0, counts)
    else:
        q, amax_bits, sums, _ = _cast_stochastic(x, s * sp[2], key[0], key[1], ip, fp, True, out_dtype, counts)
    amax_x = amax_bits.view(torch.float32)
    # stats[:7] = [amax, scale, overflow, underflow, nan, nonzero, numel] (rel_err, stats[7], is the caller's);
    # the counts NaN when not counted
    numel = torch.full((1,), x.numel(), dtype=torch.float64, device=x.device)
    sums = sums[[0, 1, 3, 2]].double() if counts else torch.full((4,), math.nan, dtype=torch.float64, device=x.device)
    stats[:7].copy_(torch.cat([torch.stack([amax_x, s]).double(), sums, numel]))
    sr_state[1:].add_(adv)
    scale.copy_(torch.where(upd, s, scale))
    inv_scale.copy_(torch.where(upd, inv, inv_scale))
    if history is not None:  # roll in and push, newest at index 0 (TransformerEngine's amax_history)
        pushed = torch.cat([amax_x.reshape(1), history[:-1]])
        history.copy_(torch.where(upd, pushed, history))
        count.copy_(torch.where(upd, (count + 1).clamp(max=history.numel()), count))
    return q, inv * sp[3]


def _variant(source: str, rounding: str, counts: bool):
    """_fused for one (amax source, rounding, counts), as a function with a code object of its own:
    where torch.compile serves (not the CPU), dynamo keeps its graphs per code object, so each
    variant holds one graph per input dtype and m0 (no recompile limit in reach)."""

    def fused(x, scale, inv_scale, history, count, stats, sr_state, ip, fp, sp, si, upd, adv, key, out_dtype, m0):
        return _fused(x, scale, inv_scale, history, count, stats, sr_state, ip, fp, sp, si, upd, adv, key,
                      "own" if source == "own_push" else source, rounding, counts, out_dtype, m0)

    fused.__name__ = fused.__qualname__ = f"_{source}_{rounding}" + ("" if counts else "_amax")
    fused.__code__ = fused.__code__.replace(co_name=fused.__name__)
    return fused


_FUSED = {(src, rnd, counts): _variant(src, rnd, counts)
          for src in AMAX_SOURCES for rnd in ("nearest", "stochastic") for counts in (True, False)}


def fused_supported(domain: FormatSpec, rounding: str) -> bool:
    """Whether cast_operand serves this format and rounding (else the caller casts unfused)."""
    return rounding == "stochastic" or magic_supported(domain)


def cast_operand(x: torch.Tensor, scale: torch.Tensor, inv_scale: torch.Tensor, history: torch.Tensor | None,
                 count: torch.Tensor | None, stats: torch.Tensor, sr_state: torch.Tensor,
                 params: tuple[torch.Tensor, ...], *, source: str, rounding: str, seed: int, update: bool,
                 advance: bool, out_dtype: torch.dtype, counts: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One matmul operand cast with its scaling bookkeeping, fused: (q, inv_scale * 2**k).

    q = round_domain(x * scale_new * 2**-k) in out_dtype (fp32 or bf16, x's shape; NaN results are
    the canonical NaN 0x7FC00000 / 0x7FC0), with scale_new = compute_scale(amax, fmt, margin, pow2,
    prev_scale=scale) where amax comes from `source`: "none" keeps `scale`; "own" / "own_push" use
    x's amax (NaN included); "history" reduces `history[:count]` (max, or the newest with the
    "most recent" algo). Writes stats[:7] = [amax of x without NaN, scale_new, overflow, underflow,
    nan, nonzero, numel] (float64; with counts=False the four counts are NaN and not counted, which
    saves about a quarter of the pass). With update: scale / inv_scale (fp32) take the new values and,
    with "own_push" / "history", x's amax is pushed at index 0 of the fp32 history and count
    advanced (capped at its length). advance adds 1 to sr_state[1]. Stochastic rounding draws
    philox_bits(seed, i) for element i (row-major).

    Trusted arguments (QuantizedLinear checks them): x fp32/bf16/fp16 with 0 < numel < 2**31,
    buffers on x's device as the layer keeps them, params from `operand_params`, the format
    `fused_supported`.
    Bit for bit what altgrad.linear's unfused reference bookkeeping gives.
    """
    ip, fp, sp, si, m0 = params
    key = None
    if rounding == "stochastic":
        key = _static(torch.tensor([seed & 0xFFFFFFFF, seed >> 32], dtype=torch.int64, device=x.device))[0]
    with torch.no_grad():
        upd, adv = _flag(update, torch.bool, x.device), _flag(advance, torch.int64, x.device)
        q, q_inv = _run(_FUSED[source, rounding, counts], _flat(x), scale, inv_scale, history, count, stats,
                        sr_state, ip, fp, sp, si, upd, adv, key, out_dtype, m0 and rounding == "nearest")
    return q.view(x.shape), q_inv


# -- blocks: each element rounded at its block's scale (row / block scaling) -------------------------
def _round_blocks(blocks, scale, ip, fp, sat, with_masks: bool, m0: bool):
    """blocks, scale: flat fp32 (one scale per element); ip / fp: the format's params with
    saturate=False (so an overflow shows as inf / NaN), sat: 0-dim int32. Returns what the reference
    round_with_masks gives for blocks * scale (q fp32 with NaN lanes 0x7FC00000, and the overflow and nan
    masks as uint8, or None) and the stats of blocks: (amax bits of the non-NaN |blocks|, counts
    [overflow, underflow, nan, nonzero])."""
    v = blocks * scale
    q, _, _, _ = _cast_nearest(blocks, scale, ip, fp, False, torch.float32, m0)
    q_bits = q.view(torch.int32)
    v_bits = v.view(torch.int32)
    nan = (v_bits & 0x7FFFFFFF) > 0x7F800000
    overflow = ~nan & ((q_bits & 0x7FFFFFFF) >= 0x7F800000)
    special = torch.where(sat != 0, fp[0], fp[1]).view(torch.int32)  # max, or inf / NaN
    signed = torch.where((special & 0x7FFFFFFF) > 0x7F800000, special, special | (v_bits & _INT32_SIGN))
    out = torch.where(nan, CANONICAL_NAN_FP32, torch.where(overflow, signed, q_bits))
    nonzero = (blocks != 0) & ~nan
    underflow = nonzero & ((out & 0x7FFFFFFF) == 0)
    abs_bits = torch.where(nan, 0, blocks.view(torch.int32) & 0x7FFFFFFF)
    counts = torch.stack([overflow.sum(), underflow.sum(), nan.sum(), nonzero.sum()])
    # bool outputs compile to scalar stores on the CPU; uint8 ones vectorize
    masks = (overflow.to(torch.uint8), nan.to(torch.uint8)) if with_masks else (None, None)
    return out.view(torch.float32), *masks, abs_bits.amax(), counts


def _round_blocks_masks(blocks, scale, ip, fp, sat, m0):
    return _round_blocks(blocks, scale, ip, fp, sat, True, m0)


def _round_blocks_stats(blocks, scale, ip, fp, sat, m0):
    return _round_blocks(blocks, scale, ip, fp, sat, False, m0)


_SHARED_LENGTH[_round_blocks_masks] = _SHARED_LENGTH[_round_blocks_stats] = (1,)  # the per-element scale


def round_blocks(blocks: torch.Tensor, fmt: FormatSpec, scale: torch.Tensor, saturate: bool, masks: bool = True):
    """Nearest rounding of fp32 `blocks * scale` (scale per block, broadcastable), bit for bit as
    `altgrad.quantize.round_with_masks`, with the stats of `blocks` in the same pass.

    Returns (q fp32, overflow bool or None, nan bool or None, amax fp32 0-dim of the non-NaN
    |blocks|, counts int64[4]: overflow, underflow, nan, nonzero); the masks only with `masks`.
    None when the magic-constant rounding does not apply to fmt (the caller then uses the
    reference). blocks: non-empty fp32 of blocks' layout; arguments are trusted.
    """
    if not magic_supported(fmt) or blocks.numel() == 0:
        return None
    ip, fp = _params(tuple(fmt.kernel_fields.values()), False, blocks.device)
    sat = _sat_flag(bool(saturate), blocks.device)
    # flat x and a flat per-element scale (written out here: a per-lane gather of the block's scale
    # would cost the compiled loop an integer division per element): one graph for every layout
    shape = blocks.shape
    flat_scale = scale.expand(shape).reshape(-1)
    fn = _round_blocks_masks if masks else _round_blocks_stats
    q, overflow, nan, amax_bits, counts = _run(fn, _flat(blocks), flat_scale, ip, fp, sat, fmt.man_bits == 0)
    if masks:
        overflow, nan = overflow.view(torch.bool).view(shape), nan.view(torch.bool).view(shape)
    return q.view(shape), overflow, nan, amax_bits.view(torch.float32), counts


@functools.lru_cache(maxsize=None)
def _sat_flag(saturate: bool, device: torch.device) -> torch.Tensor:
    return torch.tensor(int(saturate), dtype=torch.int32, device=device)
