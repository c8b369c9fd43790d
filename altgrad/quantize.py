"""Torch reference quantizer: the bit-exact oracle the Triton kernels must equal.

Convention (docs/design.md §3): `quantize(x, fmt, scale)` returns `round_fmt(x * scale) * inv_scale` in x's
dtype, computed in fp32 with `inv_scale = 1 / scale` (fp32). Rounding works on the fp32 bit pattern
with integer arithmetic only, so it is exact on every device and needs no float casts:

    bits -> sign, fp32 exponent e, 24-bit significand sig
    e >= emin:  wide = ((e + bias - 1) << 23) + sig, shift = 23 - M    (top bits of `wide` are the code)
    e <  emin:  wide = sig,                          shift = 23 - M + (emin - e)
    nearest:    code = (wide + 2**(shift-1) - 1 + ((wide >> shift) & 1)) >> shift   (ties to even code)
    stochastic: code = (wide + r) >> shift, r uniform on [0, 2**shift) from 32 random bits

"Ties to even code" is RNE on the mantissa for M >= 1 and ties to the even biased exponent for E7M0,
as gfloat does. A code above `fmt.max_code` is an overflow: saturate to max, or become inf / NaN.
"""

from __future__ import annotations

import math

from typing import NamedTuple

import torch

from altgrad.formats import FormatSpec, get_format
from altgrad.vocabulary import Backend, Rounding, choices

__all__ = ["quantize", "quantize_ste", "quantize_with_stats", "quantize_operand", "round_to_format",
           "round_to_codes", "QuantStats"]

ROUNDING_MODES = choices(Rounding)
BACKENDS = choices(Backend)  # quantize_operand's: every backend
CAST_BACKENDS = tuple(b for b in BACKENDS if b != Backend.FAST)  # quantize / quantize_with_stats: no fused cast
_SR_BITS = 32  # random bits per stochastic rounding: P(round up) is exact to 2**-32 of a quantum


class QuantStats(NamedTuple):
    """Per-tensor statistics of one quantization (0-dim tensors on x's device).

    amax: max |x| over non-NaN elements of the unscaled input (0 if none), fp32.
    Counts (int64), with v = x * scale: nan = isnan(v); nonzero = v != 0 and not NaN (inf counts);
    overflow = non-NaN elements whose rounded magnitude exceeds max (inf included);
    underflow = non-zero, non-NaN elements that round to zero.
    """

    amax: torch.Tensor
    overflow: torch.Tensor
    underflow: torch.Tensor
    nonzero: torch.Tensor
    nan: torch.Tensor


# -- counter-based random bits ------------------------------------------------------------------
# Philox4x32 with 10 rounds (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
# with the constants and word order of Triton's `tl.randint(seed, offset)`: counter (offset_lo,
# offset_hi, 0, 0), key (seed_lo, seed_hi); the draw is the first output word. Stochastic rounding
# of element i (row-major index) of a call with seed s uses philox_bits(s, i) on every backend.
PHILOX_ROUNDS = 10
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)  # round multipliers A, B
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)  # Weyl key increments
_U32 = 0xFFFFFFFF
SEED_LIMIT = 2**64  # seeds are 64-bit keys: 0 <= seed < 2**64


def _mul_hi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for int64 a in [0, 2**32) and a 32-bit constant b, without
    int64 overflow (a is split in 16-bit halves, so every product stays below 2**48)."""
    t1, t0 = (a >> 16) * b, (a & 0xFFFF) * b
    return (t1 + (t0 >> 16)) >> 16, (((t1 & 0xFFFF) << 16) + t0) & _U32


def philox_bits(seed: int, offset: torch.Tensor) -> torch.Tensor:
    """32 random bits per element, as int64 in [0, 2**32): Philox4x32-10 of counter `offset` (int64
    tensor, 0 <= offset < 2**63) under key `seed` (int, 0 <= seed < 2**64), equal to Triton's
    `tl.randint(seed, offset)` bit for bit."""
    check_seed(seed)
    return philox_from_key(offset, seed & _U32, seed >> 32)


def philox_from_key(offset: torch.Tensor, k0, k1) -> torch.Tensor:
    """philox_bits with the key given as its two 32-bit words (ints, or 0-dim int64 tensors so that a
    compiled caller does not specialise on the seed)."""
    c0, c1 = offset & _U32, (offset >> 32) & _U32
    c2 = c3 = torch.zeros_like(offset)
    a, b = _PHILOX_MUL
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(c2, b)
        hi_a, lo_a = _mul_hi_lo(c0, a)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _U32, (k1 + _PHILOX_KEY_STEP[1]) & _U32
    return c0


def check_seed(seed) -> int:
    """Return `seed` if it is an int in [0, 2**64), else raise ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**64) (got {seed!r})")
    return seed


# -- the rounding core ---------------------------------------------------------------------------
def _round_fields(v: torch.Tensor, fmt: FormatSpec, rounding: str, seed: int | None):
    """Round fp32 `v` in fmt's code space (exponent unbounded above, so overflow is visible).

    Returns (negative, code, nan, inf): the magnitude code may exceed fmt.max_code (an overflow).
    int32 arithmetic suffices for nearest rounding: exponents past the format's top binade + 1 are
    clamped first (they overflow either way), so `wide` stays below 2**31. Stochastic rounding keeps
    the 32 bits below the code's LSB in int64 and adds 32 random bits (`philox_bits(seed, index)`).
    """
    bits = v.contiguous().view(torch.int32)
    negative = bits < 0
    a = bits & 0x7FFFFFFF
    fe = a >> 23
    nan = a > 0x7F800000
    inf = a == 0x7F800000
    sig = (a & 0x7FFFFF) | ((fe != 0).to(torch.int32) << 23)
    m, emin = fmt.man_bits, fmt.emin
    top = (1 << fmt.exp_bits) - fmt.bias  # one past the exponent of the format's top binade
    e = (fe.clamp(min=1) - 127).clamp(max=top)  # fp32 subnormals share the smallest normal exponent
    normal = e >= emin
    wide = torch.where(normal, ((e + (fmt.bias - 1)) << 23) + sig, sig)
    shift = torch.where(normal, 23 - m, (23 - m + emin) - e)
    if rounding == "nearest":
        # sig < 2**24, so any shift >= 25 already rounds to 0; 30 keeps int32 shifts defined
        shift = shift.clamp(max=30)
        half = (1 << (shift - 1)) - 1
        code = (wide + half + ((wide >> shift) & 1)) >> shift
    else:
        # P(round up) = the discarded fraction truncated to 32 bits: keep at most 32 bits below the
        # code's LSB, add 32 uniform bits, carry. Shifts past 56 give 0 either way; 60 keeps them defined.
        wide, shift = wide.to(torch.int64), shift.to(torch.int64).clamp(max=60)
        drop = (shift - _SR_BITS).clamp(min=0)
        wide, shift = wide >> drop, shift - drop
        index = torch.arange(v.numel(), dtype=torch.int64, device=v.device).view(v.shape)
        r = philox_bits(seed, index)
        code = ((wide + (r >> (_SR_BITS - shift))) >> shift).to(torch.int32)
    return negative, code, nan, inf


def _code_values(code: torch.Tensor, fmt: FormatSpec) -> torch.Tensor:
    """fp32 value of in-range magnitude codes (exact: every format value is an fp32 number)."""
    m = fmt.man_bits
    exp_field = code >> m
    normal_bits = ((exp_field + (127 - fmt.bias)) << 23) | ((code & ((1 << m) - 1)) << (23 - m))
    normal = normal_bits.clamp(min=0).view(torch.float32)
    subnormal = code.to(torch.float32) * 2.0 ** (fmt.emin - m)
    return torch.where(code >= (1 << m), normal, subnormal)


def round_with_masks(v: torch.Tensor, fmt: FormatSpec, rounding: str, saturate: bool,
           generator: torch.Generator | None = None, seed: int | None = None):
    """round_fmt(v) for fp32 v, unchecked (callers validate): the reference rounding every cast shares.

    Returns (q fp32 of v's shape, every NaN the positive quiet NaN 0x7FC00000; overflow bool mask;
    nan bool mask of v). Stochastic rounding uses
    `seed`, or one drawn from `generator` (the global CPU RNG by default) when seed is None."""
    if rounding == "stochastic" and seed is None:
        seed = kernel_seed(rounding, generator)
    negative, code, nan, inf = _round_fields(v, fmt, rounding, seed)
    overflow = (code > fmt.max_code) | inf
    mag = _code_values(code.clamp(max=fmt.max_code), fmt)
    if not saturate:
        mag = torch.where(overflow, torch.inf if fmt.has_inf else torch.nan, mag)
    # -0 exists only where the format has it; every NaN result is the positive quiet NaN 0x7FC00000
    # (as the kernels write it: a NaN's sign and payload would otherwise depend on which operand
    # of an earlier multiplication the hardware kept)
    q = torch.where(negative & ((mag != 0) | fmt.has_neg_zero) & ~mag.isnan(), -mag, mag)
    return torch.where(nan, torch.nan, q), overflow & ~nan, nan


def round_to_codes(v: torch.Tensor, fmt: FormatSpec | str, *, saturate: bool = True) -> torch.Tensor:
    """Integer codes (sign bit at position E+M) of fp32 `v` rounded to nearest; used by encode().
    NaN (and overflow with saturate=False in a format without inf) gets the format's NaN code:
    all-ones magnitude with x's sign (ieee, fn) or the -0 pattern (fnuz, p3109)."""
    fmt = get_format(fmt)
    negative, code, nan, inf = _round_fields(v.float(), fmt, "nearest", None)
    width = fmt.exp_bits + fmt.man_bits
    top = (1 << width) - 1
    overflow = (code > fmt.max_code) | inf
    code = code.clamp(max=fmt.max_code)
    if not saturate:
        if fmt.has_inf:
            inf_code = top if fmt.specials == "p3109" else (top >> fmt.man_bits) << fmt.man_bits
            code = torch.where(overflow & ~nan, inf_code, code)
        else:
            nan = nan | overflow
    if bool(nan.any()) and not fmt.has_nan:
        raise ValueError(f"{fmt.name} has no NaN code (NaN input, or overflow with saturate=False)")
    sign = negative & ((code != 0) | fmt.has_neg_zero)
    code = torch.where(nan & (fmt.specials in ("ieee", "fn")), top, code)
    code = code.to(torch.int64) | (sign.to(torch.int64) << width)
    return torch.where(nan & (fmt.specials in ("fnuz", "p3109")), 1 << width, code)


def round_to_format(v: torch.Tensor, fmt: FormatSpec | str, *, rounding: str = "nearest",
                    saturate: bool = True, generator: torch.Generator | None = None,
                    seed: int | None = None) -> torch.Tensor:
    """round_fmt(v): v already scaled; returns fp32 format-domain values (exact in bf16).
    Stochastic rounding: see `quantize` for `seed` and `generator`."""
    fmt = get_format(fmt)
    check_rounding(rounding)
    _check_seed_arg(seed)
    return round_with_masks(as_fp32(v, "v"), fmt, rounding, saturate, generator, seed)[0]


# -- argument checks ----------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def as_fp32(x, arg: str) -> torch.Tensor:
    """x as float32 (a copy only if x is bf16 / fp16). Raises TypeError naming `arg` if x is not a
    float32 / bfloat16 / float16 tensor. Shared by the casts in altgrad.blockwise."""
    _check_float(x, arg)
    return x.float()


def _check_float(x, arg: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor (got {type(x).__name__})")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float32, bfloat16 or float16 (got {x.dtype})")


def check_rounding(rounding: str) -> None:
    """Raises ValueError unless rounding is "nearest" or "stochastic"."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES} (got {rounding!r})")


def _check_seed_arg(seed) -> None:
    if seed is not None:
        check_seed(seed)


def _scale_tensor(scale, device) -> torch.Tensor | None:
    """Validate a user scale (positive, finite, with a finite fp32 reciprocal, so that dequantizing
    by inv_scale = 1 / scale is defined); returns an fp32 tensor or None for 1."""
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a float tensor (got {scale.dtype})")
        s = scale.detach().float().to(device)
    elif isinstance(scale, (int, float)):
        s = torch.tensor(float(scale), dtype=torch.float32, device=device)
    else:
        raise TypeError(f"scale must be None, a number or a tensor (got {type(scale).__name__})")
    if not bool(torch.all(torch.isfinite(s) & (s > 0) & torch.isfinite(torch.reciprocal(s)))):
        raise ValueError(f"scale must be finite and > 2**-128 (so that 1/scale is finite in fp32) "
                         f"(got {scale if s.numel() > 4 else s.tolist()})")
    return s


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend a cast of x runs on: "auto" is "triton" for CUDA x, else "torch".
    Raises ValueError for a name outside CAST_BACKENDS."""
    if backend not in CAST_BACKENDS:
        raise ValueError(f"backend must be one of {CAST_BACKENDS} (got {backend!r})")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    return backend


# -- public API ---------------------------------------------------------------------------------
def dequantize(q: torch.Tensor, inv_scale: torch.Tensor | None, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """q * inv_scale in fp32, rounded to `dtype`. With saturate=True a product beyond dtype's largest
    finite value becomes that value (a format value times inv_scale can exceed fp16/bf16/fp32's range,
    e.g. E6M1's 2**31 in fp16); with saturate=False it becomes inf, as the cast gives. NaN stays NaN."""
    y = q if inv_scale is None else q * inv_scale
    if saturate:
        big = torch.finfo(dtype).max
        y = y.clamp(-big, big)  # NaN passes through clamp
    # every NaN result is the dtype's canonical quiet NaN (0x7FC00000, bf16 0x7FC0, fp16 0x7E00), as
    # the kernel writes it: no backend lets an input NaN's sign or payload through
    # (after the cast: torch's vectorised fp32 -> bf16 cast turns NaN into 0xFFFF)
    y = y.to(dtype)
    return torch.where(torch.isnan(y), torch.full((), math.nan, dtype=dtype, device=y.device), y)


def _quantize_torch(x, fmt, scale, rounding, saturate, seed):
    """(y, q, overflow mask, nan mask, v): y = round_fmt(x * scale) * inv_scale in x.dtype."""
    v = x.float()
    if scale is not None:
        v = v * scale
    q, overflow, nan = round_with_masks(v, fmt, rounding, saturate, seed=seed)
    y = dequantize(q, None if scale is None else torch.reciprocal(scale), x.dtype, saturate)
    return y, q, overflow, nan, v


def kernel_seed(rounding: str, generator: torch.Generator | None = None) -> int:
    """A stochastic-rounding seed drawn from a CPU generator (the global one by default):
    reproducible under a seed and no device sync. 0 for nearest."""
    if rounding != "stochastic":
        return 0
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def _quantize_triton(x, fmt, scale, rounding, saturate, seed, stats):
    from altgrad.kernels import quantize as kq

    s = scale if scale is not None else torch.ones((), dtype=torch.float32, device=x.device)
    return kq.cast(x, s, **fmt.kernel_fields, rounding=rounding, saturate=saturate, seed=seed,
                       out_q=False, out_dq=True, stats=stats)


def quantize(x: torch.Tensor, fmt: FormatSpec | str, scale=None, *, rounding: str = "nearest",
             saturate: bool = True, generator: torch.Generator | None = None, seed: int | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Fake-quantize x: round_fmt(x * scale) * (1 / scale), in x's dtype and shape.

    x: fp32/bf16/fp16, any shape. scale: None (1), a number or a float tensor (format values per
    unit of x, as compute_scale gives it); it must be finite and > 0 with a finite fp32 reciprocal.
    Returns a new tensor of x's shape and dtype, on x's device. rounding: "nearest" (ties to the even code) or "stochastic".
    saturate: True sends overflow to +-max (and a dequantized value beyond x.dtype's range to
    +-finfo(x.dtype).max); False gives +-inf where the format has inf, else NaN (and inf in x.dtype).
    seed: stochastic rounding rounds element i (row-major) up when the 32-bit Philox draw
    `philox_bits(seed, i)` is below the discarded fraction; None draws the seed from `generator`
    (the global CPU RNG by default). Same seed, same bits, on every backend.
    backend: "torch" is this reference (any device), "triton" the kernel in kernels/quantize.py (CUDA,
    or CPU under TRITON_INTERPRET=1), "auto" picks triton for CUDA tensors. Backends are bit-identical.

    Raises:
        TypeError: x is not an fp32/bf16/fp16 tensor, or scale has the wrong type.
        ValueError: unknown format, rounding or backend; a bad scale; seed not an int in [0, 2**64).
    """
    return quantize_with_stats(x, fmt, scale, rounding=rounding, saturate=saturate, generator=generator,
                               seed=seed, backend=backend, stats=False)[0]


def quantize_with_stats(x: torch.Tensor, fmt: FormatSpec | str, scale=None, *, rounding: str = "nearest",
                        saturate: bool = True, generator: torch.Generator | None = None,
                        seed: int | None = None, backend: str = "auto",
                        stats: bool = True) -> tuple[torch.Tensor, QuantStats | None]:
    """quantize() plus per-tensor QuantStats (see its docstring for the exact definitions)."""
    fmt = get_format(fmt)
    _check_float(x, "x")
    check_rounding(rounding)
    _check_seed_arg(seed)
    s = _scale_tensor(scale, x.device)
    backend = resolve_backend(backend, x)
    if rounding == "stochastic" and seed is None:
        seed = kernel_seed(rounding, generator)
    if backend == "triton":
        res = _quantize_triton(x, fmt, s, rounding, saturate, seed or 0, stats)
        if not stats:
            return res.dq, None
        return res.dq, QuantStats(res.amax, *res.counts.unbind(0))
    y, q, overflow, nan, v = _quantize_torch(x, fmt, s, rounding, saturate, seed)
    if not stats:
        return y, None
    return y, stats_from_masks(x, v, q, overflow, nan)


def stats_from_masks(x, v, q, overflow, nan) -> QuantStats:
    """QuantStats from the reference's intermediate tensors (v = x*scale, q = rounded v)."""
    nonzero = (v != 0) & ~nan
    absx = x.detach().float().abs()
    amax = torch.where(nan, 0.0, absx).amax() if x.numel() else torch.zeros((), device=x.device)
    return QuantStats(
        amax=amax.float(),
        overflow=overflow.sum(),
        underflow=(nonzero & (q == 0)).sum(),
        nonzero=nonzero.sum(),
        nan=nan.sum(),
    )


class _QuantizeSTE(torch.autograd.Function):
    """Straight-through estimator: forward quantizes, backward passes the gradient through
    (identity), or zeroes it where the element overflowed (ste="clipped")."""

    @staticmethod
    def forward(ctx, x, fmt, scale, rounding, saturate, seed, backend, ste):
        s = _scale_tensor(scale, x.device)
        if ste == "clipped" or resolve_backend(backend, x) == "torch":
            y, _, overflow, _, _ = _quantize_torch(x, fmt, s, rounding, saturate, seed)
        else:
            y, overflow = quantize(x, fmt, s, rounding=rounding, saturate=saturate,
                                   seed=seed, backend=backend), None
        ctx.save_for_backward(overflow if ste == "clipped" else None)
        ctx.clipped = ste == "clipped"
        return y

    @staticmethod
    def backward(ctx, grad):
        (overflow,) = ctx.saved_tensors
        if ctx.clipped:
            grad = grad.masked_fill(overflow, 0.0)
        return grad, None, None, None, None, None, None, None


STE_MODES = ("identity", "clipped")


def quantize_ste(x: torch.Tensor, fmt: FormatSpec | str, scale=None, *, ste: str = "identity",
                 rounding: str = "nearest", saturate: bool = True,
                 generator: torch.Generator | None = None, seed: int | None = None,
                 backend: str = "auto") -> torch.Tensor:
    """quantize() with a straight-through gradient (identity, or zero where saturated if ste="clipped")."""
    if ste not in STE_MODES:
        raise ValueError(f"ste must be one of {STE_MODES} (got {ste!r})")
    fmt = get_format(fmt)
    _check_float(x, "x")
    check_rounding(rounding)
    _check_seed_arg(seed)
    if rounding == "stochastic" and seed is None:
        seed = kernel_seed(rounding, generator)
    return _QuantizeSTE.apply(x, fmt, scale, rounding, saturate, seed, backend, ste)


# -- casting a matmul operand -------------------------------------------------------------------
CANONICAL_NAN_BF16 = 0x7FC0  # every backend writes this bf16 NaN where the rounded value is NaN


def _to_bf16_canonical(q: torch.Tensor) -> torch.Tensor:
    """fp32 format values -> bf16 (exact), NaN as the canonical 0x7FC0 (bit-level, so no cast
    has a say in the NaN's sign or payload)."""
    bits = (q.view(torch.int32) >> 16).to(torch.int16)
    return torch.where(torch.isnan(q), CANONICAL_NAN_BF16, bits).to(torch.int16).view(torch.bfloat16)


def _operand_scale(scale, device) -> torch.Tensor:
    """The 0-dim fp32 scale of quantize_operand. Its value is checked on the CPU only: on CUDA the
    check would cost a device sync per call, and computed scales are valid by construction."""
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.float32 and scale.numel() == 1):
        raise TypeError(f"scale must be a 1-element float32 tensor (got {getattr(scale, 'dtype', type(scale).__name__)}"
                        f"{'' if not isinstance(scale, torch.Tensor) else f', shape {tuple(scale.shape)}'})")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but x is on {device}")
    if scale.device.type == "cpu":
        _scale_tensor(scale, device)
    return scale.detach().reshape(())


def quantize_operand(x: torch.Tensor, fmt: FormatSpec | str, scale: torch.Tensor, *, rounding: str = "nearest",
                     saturate: bool = True, seed: int = 0, stats: bool = True,
                     backend: str = "auto") -> tuple[torch.Tensor, QuantStats | None]:
    """Cast one matmul operand: q = round_fmt(x * scale), as bfloat16 (exact), with its QuantStats.

    x: fp32/bf16/fp16, any shape and strides. scale: 1-element fp32 tensor on x's device, finite and
    > 2**-128 (checked on CPU tensors). Returns (q, stats): q has x's shape, dtype bfloat16, NaN
    results as the bf16 NaN 0x7FC0; stats is QuantStats (see its docstring), or None when stats=False.
    Zero-size x gives an empty q, amax 0 and counts 0.
    rounding / saturate: as in `quantize` (no dequantization here, so no output-dtype clamp).
    seed: int in [0, 2**64); stochastic rounding of element i (row-major) draws philox_bits(seed, i).
    backend: "torch" the reference in this module, "fast" the fused cast (altgrad.fast_cast:
    torch.compile'd, eager without a compiler), "triton" kernels/quantize.py (CUDA, or the CPU under
    TRITON_INTERPRET=1), "auto" triton for CUDA tensors, else fast. All return the same bits.

    Raises:
        TypeError: x is not an fp32/bf16/fp16 tensor; scale is not a 1-element fp32 tensor.
        ValueError: unknown format, rounding or backend; scale on another device or out of range;
            seed not an int in [0, 2**64).
    """
    fmt = get_format(fmt)
    _check_float(x, "x")
    check_rounding(rounding)
    check_seed(seed)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    if backend == "auto":
        backend = "triton" if x.is_cuda else "fast"
    s = _operand_scale(scale, x.device)
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.int64, device=x.device)
        st = QuantStats(torch.zeros((), device=x.device), zero, zero.clone(), zero.clone(), zero.clone())
        return torch.empty(x.shape, dtype=torch.bfloat16, device=x.device), (st if stats else None)
    if backend == "triton":
        from altgrad.kernels import quantize as kq

        res = kq.cast(x, s, **fmt.kernel_fields, rounding=rounding, saturate=saturate, seed=seed,
                          out_q=True, out_dq=False, stats=stats)
        return res.q, (QuantStats(res.amax, *res.counts.unbind(0)) if stats else None)
    if backend == "fast":
        from altgrad import fast_cast

        out = fast_cast.cast(x, fmt, s, rounding=rounding, saturate=saturate, seed=seed, stats=stats)
        if out is not None:
            q, st = out
            return q, (QuantStats(st[0], *st[1].unbind(0)) if stats else None)
    v = x.float() * s
    q, overflow, nan = round_with_masks(v, fmt, rounding, saturate, seed=seed)
    return _to_bf16_canonical(q), (stats_from_masks(x, v, q, overflow, nan) if stats else None)


from altgrad.blockwise import quantize_blockwise  # noqa: E402  (re-export; blockwise builds on this module)
