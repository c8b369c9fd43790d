"""Cast a tensor to a small floating-point format (E0M7 ... E7M0), with fused per-tensor stats.

    q  = round_fmt(x * scale)            format-domain values, bf16 (every format value is exact in bf16)
    dq = q * inv_scale                   fake-quantized x, in x's dtype
    amax = max |x| (unscaled, NaN ignored); counts = [overflow, underflow, nonzero, nan]

One read of x, one write per requested output, stats reduced per block and combined with atomics.
Self-contained (imports only torch, triton and the stdlib): copy this file into another repo as is.
`scaled_matmul.py` imports `round_fp32_to_format` from here, so paste the two files side by side.

A format is given by its scalar fields (EXP_BITS, MAN_BITS, BIAS, SPECIALS); each format compiles its
own specialisation. SPECIALS is one of

    ieee   top exponent code is inf / NaN         (torch.float8_e5m2)
    fn     no inf, only the all-ones code is NaN  (torch.float8_e4m3fn)
    fnuz   no inf, no -0                          (ml_dtypes float8_e5m2fnuz)
    p3109  no -0, all-ones magnitude is inf       (IEEE P3109 binary8pP)
    none   every code is finite

Rounding is integer arithmetic on the fp32 bit pattern (no float-to-float casts, which differ between
the GPU and the Triton interpreter), so the result is bit-identical on every backend:

    wide = ((e + BIAS - 1) << 23) + significand   if e >= emin   (the top bits of `wide` are the code)
         = significand, shifted further right      otherwise      (subnormals of the format)
    nearest:    code = (wide + 2**(shift-1) - 1 + lsb) >> shift   ties to the even code (E7M0: even exponent)
    stochastic: code = floor((wide + r) / 2**shift)               r uniform on [0, 2**shift), 32 Philox bits

Stochastic rounding of element i (row-major index, 64-bit) draws `philox_u32(seed, i)`: Philox4x32-10
with Triton's constants and word order, so it equals `tl.randint(seed, i)` and the torch reference's
`altgrad.quantize.philox_bits(seed, i)`; the seed is a 64-bit key, passed as two 32-bit halves.

Dequantized output (dq) under SATURATE is clamped to the output dtype's largest finite value: a
format value times inv_scale can exceed fp16/bf16 (E6M1's max is 2**31).

Run `python kernels/quantize.py` for a self-check against `cast_ref` on every format (CPU: set
TRITON_INTERPRET=1) and, with CUDA, a bandwidth benchmark; `python kernels/quantize.py --sass` prints
the sm_90 SASS instructions per element (compiled without a GPU).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections import namedtuple

import torch
import triton
import triton.language as tl

__all__ = ["cast", "cast_ref", "CastResult", "round_fp32_to_format", "fp32_to_bf16_rne",
           "SPECIALS", "ROUNDING", "check_format", "max_code"]

# the SPECIALS constexpr: which codes of a format are special (see the module docstring)
SPECIALS_IEEE = tl.constexpr(0)
SPECIALS_FN = tl.constexpr(1)
SPECIALS_FNUZ = tl.constexpr(2)
SPECIALS_P3109 = tl.constexpr(3)
SPECIALS_NONE = tl.constexpr(4)
# the ROUNDING constexpr
ROUNDING_NEAREST = tl.constexpr(0)  # to nearest, ties to the even code
ROUNDING_STOCHASTIC = tl.constexpr(1)  # up with probability (v - lo) / (hi - lo), 32 Philox bits

# host names -> constexpr values
SPECIALS = {"ieee": SPECIALS_IEEE.value, "fn": SPECIALS_FN.value, "fnuz": SPECIALS_FNUZ.value,
            "p3109": SPECIALS_P3109.value, "none": SPECIALS_NONE.value}
ROUNDING = {"nearest": ROUNDING_NEAREST.value, "stochastic": ROUNDING_STOCHASTIC.value}
COUNT_NAMES = ("overflow", "underflow", "nonzero", "nan")  # order of CastResult.counts

CastResult = namedtuple("CastResult", "q dq amax counts")
CastResult.__doc__ = """q: round_fmt(x*scale) in bf16 (or None); dq: q*inv_scale in x.dtype (or None);
amax: fp32 0-dim max |x| over non-NaN elements; counts: int64 [overflow, underflow, nonzero, nan] (or None)."""

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# device code
@triton.jit
def round_fp32_to_format(v, rbits, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr,
                         SPECIALS: tl.constexpr, SATURATE: tl.constexpr, ROUNDING: tl.constexpr):
    """round_fmt(v) for an fp32 tensor v. Returns (q fp32, overflow mask).

    rbits: uint32 random bits of v's shape (used only when ROUNDING == ROUNDING_STOCHASTIC).
    overflow: non-NaN elements whose rounded magnitude exceeds the format's max (inf included).
    """
    # largest finite magnitude code; codes are (biased exponent << MAN_BITS) | mantissa
    ALL_ONES: tl.constexpr = (1 << (EXP_BITS + MAN_BITS)) - 1
    # ieee gives the top exponent code to inf / NaN; fn and p3109 give the all-ones code to NaN / inf
    MAX_CODE: tl.constexpr = ((((1 << EXP_BITS) - 2) << MAN_BITS) | ((1 << MAN_BITS) - 1)) \
        if SPECIALS == SPECIALS_IEEE else \
        (ALL_ONES - 1 if SPECIALS == SPECIALS_FN or SPECIALS == SPECIALS_P3109 else ALL_ONES)
    HAS_INF: tl.constexpr = SPECIALS == SPECIALS_IEEE or SPECIALS == SPECIALS_P3109
    HAS_NEG_ZERO: tl.constexpr = SPECIALS == SPECIALS_IEEE or SPECIALS == SPECIALS_FN or SPECIALS == SPECIALS_NONE
    EMIN: tl.constexpr = 1 - BIAS
    # 2**E_HI is past every value of the format (one binade past the top exponent code)
    E_HI: tl.constexpr = (1 << EXP_BITS) - BIAS
    # fp32 bits of the largest finite value
    MAX_BITS: tl.constexpr = ((((MAX_CODE >> MAN_BITS) + (127 - BIAS)) << 23) | ((MAX_CODE & ((1 << MAN_BITS) - 1)) << (23 - MAN_BITS))) \
        if MAX_CODE >= (1 << MAN_BITS) else 0
    # the magic constant 1.5 * 2**(e - M + 23) must stay a finite fp32 number up to e = E_HI
    MAGIC: tl.constexpr = ROUNDING == ROUNDING_NEAREST and MAX_CODE >= (1 << MAN_BITS) and E_HI - MAN_BITS + 23 <= 127

    bits = v.to(tl.int32, bitcast=True)
    a = bits & 0x7FFFFFFF
    is_nan = a > 0x7F800000
    if MAGIC:
        # nearest by the fp32 adder: C + m lies in a binade whose spacing is the format's quantum
        # 2**(e - M) and C is an even multiple of it, so IEEE round-half-even rounds m to the
        # nearest multiple, ties to the even code; inf and huge values are clamped to 2**E_HI first
        mb = tl.minimum(a, (E_HI + 127) << 23)
        e = (mb >> 23) - 127
        c = ((tl.maximum(e, EMIN) + (150 - MAN_BITS)) << 23) | 0x400000
        cf = c.to(tl.float32, bitcast=True)
        r = (mb.to(tl.float32, bitcast=True) + cf) - cf
        mag = r.to(tl.int32, bitcast=True)
        if MAN_BITS == 0:
            # codes are exponents: a tie 1.5 * 2**e goes to the even biased exponent, not always up
            tie = ((mb & 0x7FFFFF) == 0x400000) & (e >= EMIN) & (((e + BIAS) & 1) == 0)
            mag = tl.where(tie, mb & 0x7F800000, mag)
        overflow = (mag > MAX_BITS) & (~is_nan)
        if SATURATE:
            mag = tl.where(overflow, MAX_BITS, mag)
    else:
        fe = a >> 23
        sig = (a & 0x7FFFFF) | tl.where(fe != 0, 0x800000, 0)
        e = tl.minimum(tl.maximum(fe, 1) - 127, E_HI)  # fp32 subnormals share the smallest normal exponent
        normal = e >= EMIN
        wide = tl.where(normal, ((e + (BIAS - 1)) << 23) + sig, sig)
        shift = tl.where(normal, 23 - MAN_BITS, 23 - MAN_BITS + (EMIN - e))
        if ROUNDING == ROUNDING_STOCHASTIC:
            # keep at most 32 bits below the code's LSB (truncating the rest: bias < 2**-32 of a
            # quantum), then add as many uniform random bits; shifts >= 56 give 0 either way
            shift = tl.minimum(shift, 60)
            drop = tl.maximum(shift - 32, 0)
            w64 = wide.to(tl.int64) >> drop
            s2 = shift - drop
            r = rbits.to(tl.int64) >> (32 - s2)  # uint32 -> int64 zero-extends
            code = ((w64 + r) >> s2).to(tl.int32)
        else:
            # wide < 2**24 on the subnormal path, so any shift >= 25 rounds to 0: cap at 30 (int32-safe)
            shift = tl.minimum(shift, 30)
            code = (wide + ((1 << (shift - 1)) - 1) + ((wide >> shift) & 1)) >> shift
        overflow = (code > MAX_CODE) & (~is_nan)
        if SATURATE:
            code = tl.minimum(code, MAX_CODE)
        # code -> fp32 bits: normal codes map onto fp32's fields directly; subnormal codes are
        # code * 2**(EMIN - MAN_BITS), built by adding to the exponent field of float(code)
        mag_normal = (code << (23 - MAN_BITS)) + ((127 - BIAS) << 23)
        c_bits = code.to(tl.float32).to(tl.int32, bitcast=True)
        mag_sub = tl.where(code == 0, 0, c_bits + ((EMIN - MAN_BITS) << 23))
        mag = tl.where(code >= (1 << MAN_BITS), mag_normal, mag_sub)
    if not SATURATE:
        mag = tl.where(overflow, 0x7F800000 if HAS_INF else 0x7FC00000, mag)
    # -0 only where the format has it; NaN stays (a positive quiet) NaN in every format
    keep_sign = (bits < 0) & ((mag != 0) | HAS_NEG_ZERO) & (mag <= 0x7F800000)
    out = tl.where(is_nan, 0x7FC00000, tl.where(keep_sign, mag | (bits & (-2147483648)), mag))
    return out.to(tl.float32, bitcast=True), overflow


@triton.jit
def philox_u32(seed_lo, seed_hi, offset):
    """32 random bits (uint32) per element of the int64 `offset` tensor: Philox4x32 with 10 rounds, key
    (seed_lo, seed_hi), counter (offset_lo, offset_hi, 0, 0), first output word. Written out rather than
    calling tl.randint so that every Triton version draws the same bits for 64-bit offsets."""
    c0 = offset.to(tl.uint32)
    c1 = (offset >> 32).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = seed_lo.to(tl.uint32)  # runtime scalars: the kernel never specialises them (do_not_specialize)
    k1 = seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        _c0, _c2 = c0, c2
        c0 = tl.umulhi(_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = _c2 * 0xCD9E8D57
        c3 = _c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0


@triton.jit
def fp32_to_bf16_rne(y):
    """fp32 -> bf16 with round-to-nearest-even by integer arithmetic (the interpreter's cast truncates)."""
    b = y.to(tl.int32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where(y != y, 0x7FC0, r & 0xFFFF)
    return r.to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _cast_kernel(
        # tensors: x (N elements, any strides), q and dq (N, contiguous), scale / inv_scale (1,),
        # amax (1,) int32 bits of an fp32, counts (4,) int64 [overflow, underflow, nonzero, nan]
        x_ptr, q_ptr, dq_ptr, scale_ptr, inv_scale_ptr, amax_ptr, counts_ptr,
        # the Philox key (two 32-bit halves), the element count, tiles per program
        seed_lo, seed_hi, N, tiles_per_program,
        # x's layout after collapsing to <= 4 dims: sizes of dims 1..3 (dim 0's is implied by N), strides of 0..3
        size1, size2, size3, stride0, stride1, stride2, stride3,
        # the format
        EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, SPECIALS: tl.constexpr,
        # the cast
        SATURATE: tl.constexpr, ROUNDING: tl.constexpr,
        # what to read and write
        CONTIGUOUS: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_DQ: tl.constexpr, STATS: tl.constexpr,
        X_BF16: tl.constexpr, DQ_BF16: tl.constexpr, DQ_MAX: tl.constexpr,
        # elements per tile
        BLOCK: tl.constexpr):
    """x (N,) -> q (N,) bf16, dq (N,) x.dtype, amax, counts. Each program casts `tiles_per_program`
    consecutive BLOCK-element tiles, keeps its stats in per-lane int32 registers, and reduces them
    once: one atomic per counter per program."""
    scale = tl.load(scale_ptr)
    inv_scale = tl.load(inv_scale_ptr)
    amax_acc = tl.zeros([BLOCK], dtype=tl.int32)
    n_overflow = tl.zeros([BLOCK], dtype=tl.int32)
    n_underflow = tl.zeros([BLOCK], dtype=tl.int32)
    n_nonzero = tl.zeros([BLOCK], dtype=tl.int32)
    n_nan = tl.zeros([BLOCK], dtype=tl.int32)
    first = tl.program_id(0).to(tl.int64) * tiles_per_program
    for t in range(0, tiles_per_program):
        idx = (first + t) * BLOCK + tl.arange(0, BLOCK)  # logical (row-major) index
        mask = idx < N
        if CONTIGUOUS:
            src = idx
        else:
            # up to 4 collapsed dims with arbitrary strides: the row-major index -> the element's offset
            i3 = idx % size3
            rest = idx // size3
            i2 = rest % size2
            rest = rest // size2
            src = (rest // size1) * stride0 + (rest % size1) * stride1 + i2 * stride2 + i3 * stride3
        if X_BF16:
            # bf16 arrives as its int16 bits: widening by a shift is exact for subnormals on every
            # backend (the interpreter's bf16 -> fp32 conversion flushes them)
            x = (tl.load(x_ptr + src, mask=mask, other=0).to(tl.int32) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)
        v = x * scale  # one fp32 multiply, as the reference
        if ROUNDING == ROUNDING_STOCHASTIC:
            rbits = philox_u32(seed_lo, seed_hi, idx)  # keyed by the element's 64-bit index: reproducible
        else:
            rbits = v  # unused
        q, overflow = round_fp32_to_format(v, rbits, EXP_BITS, MAN_BITS, BIAS, SPECIALS, SATURATE, ROUNDING)

        if WRITE_Q:
            tl.store(q_ptr + idx, q.to(tl.bfloat16), mask=mask)  # exact: q has <= 8 significant bits
        if WRITE_DQ:
            dq = q * inv_scale
            if SATURATE:  # stay finite in the output dtype too (NaN compares false and passes)
                dq = tl.where(dq > DQ_MAX, DQ_MAX, tl.where(dq < -DQ_MAX, -DQ_MAX, dq))
            if DQ_BF16:
                tl.store(dq_ptr + idx, fp32_to_bf16_rne(dq), mask=mask)
            else:
                tl.store(dq_ptr + idx, dq.to(dq_ptr.dtype.element_ty), mask=mask)  # fp32, or fp16 (RNE)
        if STATS:
            # masked lanes load 0, which counts as nothing
            is_nan = v != v
            nonzero = (v != 0) & (~is_nan)
            n_overflow += overflow.to(tl.int32)
            n_underflow += (nonzero & (q == 0)).to(tl.int32)
            n_nonzero += nonzero.to(tl.int32)
            n_nan += is_nan.to(tl.int32)
            # non-negative floats order like their int32 bit patterns: max on the bits
            amax_acc = tl.maximum(amax_acc, tl.where(is_nan, 0, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF))
    if STATS:
        tl.atomic_max(amax_ptr, tl.max(amax_acc, axis=0), sem="relaxed")
        tl.atomic_add(counts_ptr + 0, tl.sum(n_overflow.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counts_ptr + 1, tl.sum(n_underflow.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counts_ptr + 2, tl.sum(n_nonzero.to(tl.int64), axis=0), sem="relaxed")
        tl.atomic_add(counts_ptr + 3, tl.sum(n_nan.to(tl.int64), axis=0), sem="relaxed")


def _grid(n: int, block: int, device) -> tuple[int, int]:
    """(programs, tiles per program): about PROGRAMS_PER_SM programs per SM on a GPU, each looping over
    consecutive tiles (the interpreter uses at most 2 programs, so the loop is exercised on the CPU)."""
    tiles = triton.cdiv(n, block)
    if _INTERPRET or device.type != "cuda":
        cap = 2
    else:
        cap = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    per_program = triton.cdiv(tiles, min(tiles, cap))
    return triton.cdiv(tiles, per_program), per_program


PROGRAMS_PER_SM = 4


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# ---------------------------------------------------------------------------------------------
# host code
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def max_code(exp_bits: int, man_bits: int, specials: str) -> int:
    """Magnitude code of the largest finite value (as the kernel computes it)."""
    all_ones = (1 << (exp_bits + man_bits)) - 1
    if specials == "ieee":
        return (((1 << exp_bits) - 2) << man_bits) | ((1 << man_bits) - 1)
    return all_ones - 1 if specials in ("fn", "p3109") else all_ones


def check_format(exp_bits, man_bits, bias, specials) -> None:
    """Raise ValueError unless the fields describe a format whose values are all exact in bf16."""
    if not all(isinstance(f, int) and not isinstance(f, bool) for f in (exp_bits, man_bits, bias)):
        raise ValueError(f"exp_bits, man_bits, bias must be ints (got {exp_bits!r}, {man_bits!r}, {bias!r})")
    if exp_bits < 0 or man_bits < 0 or not 1 <= exp_bits + man_bits <= 7:
        raise ValueError(f"exp_bits + man_bits must be 1..7, both >= 0 (got E{exp_bits}M{man_bits})")
    if specials not in SPECIALS:
        raise ValueError(f"specials must be one of {tuple(SPECIALS)} (got {specials!r})")
    if not (1 - bias - man_bits >= -126 and (1 << exp_bits) - 1 - bias <= 127):
        raise ValueError(f"bias {bias} puts E{exp_bits}M{man_bits} values outside bf16's exponent range")
    if max_code(exp_bits, man_bits, specials) < 1:
        raise ValueError(f"E{exp_bits}M{man_bits} with {specials} specials has no positive finite value")


def check_device(x: torch.Tensor, name: str) -> None:
    """Raise ValueError unless x can feed a kernel: a CUDA tensor, or a CPU one under TRITON_INTERPRET=1."""
    if not (x.is_cuda or (_INTERPRET and x.device.type == "cpu")):
        raise ValueError(f"{name} is on {x.device}: the Triton kernels need a CUDA tensor, or a CPU tensor "
                         f"with TRITON_INTERPRET=1 set before triton is imported")


def scalar_tensor(s, name: str, device) -> torch.Tensor:
    """A 1-element fp32 tensor on `device` from None (-> 1), a float or a 1-element float tensor on
    `device` (no host sync). Raises ValueError naming `name` otherwise. Shared by every launcher."""
    if s is None:
        return torch.ones(1, dtype=torch.float32, device=device)
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return torch.full((1,), float(s), dtype=torch.float32, device=device)
    if not isinstance(s, torch.Tensor) or s.numel() != 1 or not s.is_floating_point():
        raise ValueError(f"{name} must be None, a float or a 1-element float tensor (got {s!r:.60})")
    if s.device != device:
        raise ValueError(f"{name} is on {s.device} but the data is on {device}")
    return s.detach().reshape(1).to(torch.float32)


def _collapse(shape, strides):
    """Merge dims that are contiguous with their neighbour and drop size-1 dims: (sizes, strides)."""
    sizes, strs = [], []
    for n, st in zip(shape, strides):
        if n == 1:
            continue
        if sizes and strs[-1] == st * n:
            sizes[-1] *= n
            strs[-1] = st
        else:
            sizes.append(n)
            strs.append(st)
    return sizes, strs


def _strided_args(x: torch.Tensor):
    """(x, contiguous?, sizes of dims 1..3, strides of dims 0..3) for the kernel's index math (<= 4 dims after
    collapsing; otherwise a contiguous copy is made)."""
    sizes, strs = _collapse(x.shape, x.stride())
    if len(sizes) <= 1 and (not strs or strs[0] == 1):
        return x, True, (1, 1, 1), (0, 0, 0, 0)
    if len(sizes) > 4:
        return x.contiguous(), True, (1, 1, 1), (0, 0, 0, 0)
    pad = 4 - len(sizes)
    sizes, strs = [1] * pad + sizes, [0] * pad + strs
    return x, False, tuple(sizes[1:]), tuple(strs)


def _check_common(x, rounding, saturate):
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be a float32, bfloat16 or float16 tensor (got {getattr(x, 'dtype', type(x))})")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {tuple(ROUNDING)} (got {rounding!r})")
    if not isinstance(saturate, bool):
        raise ValueError(f"saturate must be a bool (got {saturate!r})")


def cast(x: torch.Tensor, scale=None, *, exp_bits: int, man_bits: int, bias: int, specials: str,
             inv_scale=None, rounding: str = "nearest", saturate: bool = True, seed: int = 0,
             out_q: bool = True, out_dq: bool = True, stats: bool = True) -> CastResult:
    """Round x*scale to the format (Triton). Returns CastResult(q, dq, amax, counts).

    x: fp32/bf16/fp16, any shape and strides (views with > 4 non-mergeable dims are copied first).
    scale, inv_scale: None (1), a float, or 1-element fp32 device tensors (read on device: no sync);
    inv_scale defaults to torch.reciprocal(scale). Outputs are new contiguous tensors of x's shape.
    rounding: "nearest" (ties to even code) or "stochastic" (philox_u32(seed, row-major index)).
    saturate: overflow -> +-max, and dq beyond x.dtype's range -> +-finfo(x.dtype).max; otherwise
    +-inf where the format has inf, else NaN.
    seed: int in [0, 2**64), the Philox key (unused for nearest rounding).
    """
    _check_common(x, rounding, saturate)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64) (got {seed!r})")
    check_format(exp_bits, man_bits, bias, specials)
    check_device(x, "x")
    s = scalar_tensor(scale, "scale", x.device)
    inv = torch.reciprocal(s) if inv_scale is None else scalar_tensor(inv_scale, "inv_scale", x.device)
    q = torch.empty(x.shape, dtype=torch.bfloat16, device=x.device) if out_q else None
    dq = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out_dq else None
    amax_bits = torch.zeros(1, dtype=torch.int32, device=x.device)
    counts = torch.zeros(4, dtype=torch.int64, device=x.device)
    n = x.numel()
    if n:
        xs, contiguous, sizes, strides = _strided_args(x)
        block, warps = (65536, 1) if _INTERPRET else (2048, 8)
        programs, per_program = _grid(n, block, x.device)
        _cast_kernel[(programs,)](
            xs.view(torch.int16) if x.dtype == torch.bfloat16 else xs, q if out_q else amax_bits, dq if out_dq else amax_bits, s, inv, amax_bits, counts,
            seed & 0xFFFFFFFF, seed >> 32, n, per_program, *sizes, *strides,
            EXP_BITS=exp_bits, MAN_BITS=man_bits, BIAS=bias, SPECIALS=SPECIALS[specials],
            SATURATE=saturate, ROUNDING=ROUNDING[rounding], CONTIGUOUS=contiguous,
            WRITE_Q=out_q, WRITE_DQ=out_dq, STATS=stats, X_BF16=x.dtype == torch.bfloat16,
            DQ_BF16=x.dtype == torch.bfloat16,
            DQ_MAX=torch.finfo(x.dtype).max,
            BLOCK=block, num_warps=warps)
    if not stats:
        return CastResult(q, dq, None, None)
    return CastResult(q, dq, amax_bits.view(torch.float32)[0], counts)


# ---------------------------------------------------------------------------------------------
# pure-torch reference: an independent algorithm (enumerate the format's values, pick the nearest)
def _format_values(exp_bits, man_bits, bias, specials) -> torch.Tensor:
    """float64 values of magnitude codes 0 .. max_code + 1 (the last is the first value past max)."""
    vals = []
    for c in range(max_code(exp_bits, man_bits, specials) + 2):
        if c >= (1 << man_bits):
            vals.append(2.0 ** ((c >> man_bits) - bias) * (1 + (c & ((1 << man_bits) - 1)) / 2**man_bits))
        else:
            vals.append(c * 2.0 ** (1 - bias - man_bits))
    return torch.tensor(vals, dtype=torch.float64)


def cast_ref(x: torch.Tensor, scale=None, *, exp_bits: int, man_bits: int, bias: int, specials: str,
                 inv_scale=None, rounding: str = "nearest", saturate: bool = True,
                 generator: torch.Generator | None = None) -> CastResult:
    """Same contract as `cast` (always computes every output), in plain torch on any device.

    Rounding searches the sorted table of the format's values: nearest picks the closer neighbour (the
    even code on a tie; code max_code + 1 means overflow), stochastic picks the upper one with
    probability (|v| - lo) / (hi - lo) using torch's generator.
    """
    _check_common(x, rounding, saturate)
    check_format(exp_bits, man_bits, bias, specials)
    dev = x.device
    s = scalar_tensor(scale, "scale", dev) if scale is not None else torch.ones(1, device=dev)
    inv = torch.reciprocal(s) if inv_scale is None else scalar_tensor(inv_scale, "inv_scale", dev)
    v = x.float() * s  # fp32, one multiply
    table = _format_values(exp_bits, man_bits, bias, specials).to(dev)
    mc = table.numel() - 2
    a = v.double().abs()
    hi = torch.searchsorted(table, a.clamp(max=table[-1]).contiguous()).clamp(1, mc + 1)  # table[hi-1] < a <= table[hi]
    lo = hi - 1
    if rounding == "nearest":
        mid = (table[lo] + table[hi]) / 2  # exact in float64
        up = (a > mid) | ((a == mid) & (hi % 2 == 0))
    else:
        frac = (a - table[lo]) / (table[hi] - table[lo])
        up = torch.rand(a.shape, dtype=torch.float64, generator=generator, device=dev) < frac
    code = torch.where(up | (a > table[-1]), hi, lo)
    code = torch.where(a == table[lo], lo, code)
    is_nan = torch.isnan(v)
    overflow = (code > mc) & ~is_nan
    mag = table[code.clamp(max=mc)].float()
    if not saturate:
        mag = torch.where(overflow, float("inf") if specials in ("ieee", "p3109") else float("nan"), mag)
    neg_zero_ok = specials in ("ieee", "fn", "none")
    q = torch.where(torch.signbit(v) & ((mag != 0) | neg_zero_ok), -mag, mag)
    q = torch.where(is_nan, float("nan"), q)
    dq = q * inv
    if saturate:
        dq = dq.clamp(-torch.finfo(x.dtype).max, torch.finfo(x.dtype).max)
    dq = dq.to(x.dtype)
    nonzero = (v != 0) & ~is_nan
    ax = x.float().abs()
    amax = torch.where(torch.isnan(ax), 0.0, ax).max() if x.numel() else torch.zeros((), device=dev)
    counts = torch.stack([overflow.sum(), (nonzero & (q == 0)).sum(), nonzero.sum(), is_nan.sum()])
    return CastResult(q.to(torch.bfloat16), dq, amax.float(), counts)


# ---------------------------------------------------------------------------------------------
# self-check and benchmark
_DEMO_FORMATS = {  # name: (exp_bits, man_bits, bias, specials)
    "E5M2": (5, 2, 15, "ieee"), "E4M3": (4, 3, 7, "fn"), "E3M4": (3, 4, 3, "ieee"),
    "E2M5": (2, 5, 2, "p3109"), "E1M6": (1, 6, 1, "p3109"), "E6M1": (6, 1, 32, "p3109"),
    "E7M0": (7, 0, 64, "p3109"), "E0M7": (0, 7, 1, "none"), "E5M2_FNUZ": (5, 2, 16, "fnuz"),
}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, except that any NaN equals any NaN."""
    a, b = a.float(), b.float()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))).all())


def _self_check(device) -> bool:
    ok = True
    g = torch.Generator().manual_seed(0)
    bf16_all = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()
    rand = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-40, 40, (4096,), generator=g).float())
    x = torch.cat([bf16_all, rand]).to(device)
    scale = torch.tensor(3.0, device=device)
    for name, fields in _DEMO_FORMATS.items():
        for sat in (True, False):
            kw = dict(exp_bits=fields[0], man_bits=fields[1], bias=fields[2], specials=fields[3], saturate=sat)
            got, ref = cast(x, scale, **kw), cast_ref(x, scale, **kw)
            good = _same(got.q, ref.q) and _same(got.dq, ref.dq) and _same(got.amax, ref.amax) \
                and torch.equal(got.counts, ref.counts)
            ok &= good
            print(f"{name:<10} saturate={sat!s:<5} {'ok' if good else 'MISMATCH'}")
    return ok


def _benchmark() -> None:
    n = 64 * 2**20
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    scale = torch.tensor(100.0, device="cuda")
    for name in ("E4M3", "E2M5", "E7M0"):
        e, m, b, sp = _DEMO_FORMATS[name]
        fn = lambda: cast(x, scale, exp_bits=e, man_bits=m, bias=b, specials=sp, out_q=False)  # noqa: E731
        ms = triton.testing.do_bench(fn)
        gbs = n * (2 + 2) / ms / 1e6  # read bf16 + write bf16
        print(f"cast {name} bf16->bf16 {n / 2**20:.0f}M elements: {ms * 1e3:.0f} us, {gbs:.0f} GB/s")


def run_self_check(self_check, benchmark) -> None:
    """`python <kernel>.py`: the self-check (GPU, or CPU under TRITON_INTERPRET=1), then the
    benchmark on a GPU; exits non-zero when the check fails."""
    if not torch.cuda.is_available() and not _INTERPRET:
        sys.exit("no CUDA device: run with TRITON_INTERPRET=1 to check the kernel on the CPU")
    # the interpreter's numpy warns on inf * x and inf - inf, which the check feeds on purpose
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    on_gpu = torch.cuda.is_available() and not _INTERPRET
    passed = self_check("cuda" if on_gpu else "cpu")
    if passed and on_gpu:
        benchmark()
    sys.exit(0 if passed else 1)


def sass_per_element(rounding: str = "nearest", stats: bool = True, block: int = 2048, warps: int = 8):
    """(instructions in the tile loop per element, instructions outside it) of the sm_90 SASS of the
    E4M3 bf16 -> bf16 cast, compiled with Triton's bundled ptxas and nvdisasm (no GPU needed; run
    without TRITON_INTERPRET). Static counts: the loop body divided by the elements per thread."""
    import re

    from triton.backends.compiler import GPUTarget

    const = dict(EXP_BITS=4, MAN_BITS=3, BIAS=7, SPECIALS=SPECIALS["fn"], SATURATE=True,
                 ROUNDING=ROUNDING[rounding], CONTIGUOUS=True, WRITE_Q=True, WRITE_DQ=False, STATS=stats,
                 X_BF16=True, DQ_BF16=True, DQ_MAX=torch.finfo(torch.bfloat16).max, BLOCK=block)
    ptrs = dict(x_ptr="*i16", q_ptr="*bf16", dq_ptr="*bf16", scale_ptr="*fp32", inv_scale_ptr="*fp32",
                amax_ptr="*i32", counts_ptr="*i64")
    names = _cast_kernel.arg_names
    sig = {n: "constexpr" if n in const else ptrs.get(n, "i32") for n in names}
    src = triton.compiler.ASTSource(fn=_cast_kernel, signature=sig,
                                    constexprs={(names.index(n),): v for n, v in const.items()})
    sass = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["sass"]
    lines = sass.splitlines()
    is_ins = [bool(re.match(r"^[0-9a-f-]{2}:[^\t]*\t\s*[@A-Z]", ln)) and "NOP" not in ln for ln in lines]
    labels = {ln[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\w+:$", ln)}
    body = 0
    for j, ln in enumerate(lines):  # the tile loop: a label and the backward branch to it
        m = re.search(r"BRA (\w+);", ln)
        if m and labels.get(m.group(1), j) < j:
            body = sum(is_ins[labels[m.group(1)]:j + 1])
            break
    per_thread = block // (32 * warps)
    return body / per_thread, sum(is_ins) - body


def _print_sass_counts() -> None:
    for rounding in ROUNDING:
        for stats in (False, True):
            per_element, once = sass_per_element(rounding, stats)
            print(f"{rounding:<10} stats={stats!s:<5} {per_element:5.1f} SASS instructions per element "
                  f"in the tile loop, {once} once per program")


if __name__ == "__main__":
    if sys.argv[1:] == ["--sass"]:
        _print_sass_counts()
    else:
        run_self_check(_self_check, _benchmark)
