"""Blockwise cast with E8M0 (power-of-two) scales: one scale per run of BLOCK_SIZE elements of a row.

For each block of a row of x (R, K) (the last block may be short):
    amax = max |x| over the block
    X    = floor(log2 amax) - EMAX_ELEM   (+1 with CEIL where amax * 2**-X still exceeds the format's max)
           -127 for an all-zero block, clipped to the E8M0 range [-127, 127]; NaN if the block has a NaN
    q    = round_fmt(x * 2**-X)           format-domain values, fp32
    scale = 2**-X, inv_scale = 2**X       fp32, (R, NB)
EMAX_ELEM = floor(log2(fmt.max)). This is OCP MX v1.0's rule (CEIL: the MXFP8 recipe's), the same as
`altgrad.blockwise`'s reference, which this kernel equals bit for bit. One program casts BLOCK_R rows
of one block: one read of x, one write of q, of the scales and of the overflow / NaN masks. The
exponent comes from integer arithmetic on amax's bits (subnormal amaxes are renormalised by an exact
2**64), and 2**X is built from bits, so no float log or pow is involved. fp32 (non power-of-two)
block scales are not handled here: altgrad.blockwise computes them in torch.

Self-contained but for `quantize.py` (paste the two side by side). `python kernels/block_quantize.py`
checks itself against a torch reference on every format (CPU: TRITON_INTERPRET=1).
"""

from __future__ import annotations

import math
import os
from collections import namedtuple

import torch
import triton
import triton.language as tl

try:  # installed as altgrad.kernels
    from .quantize import (ROUNDING, ROUNDING_STOCHASTIC, SPECIALS, check_device, check_format,
                           round_fp32_to_format, run_self_check)
except ImportError:  # pasted next to quantize.py, or run as a script
    from quantize import (ROUNDING, ROUNDING_STOCHASTIC, SPECIALS, check_device, check_format,
                          round_fp32_to_format, run_self_check)

__all__ = ["block_quantize", "BlockQuantizeResult"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BlockQuantizeResult = namedtuple("BlockQuantizeResult", "q scale inv_scale overflow nan")
BlockQuantizeResult.__doc__ = """q: (R, K) fp32 format-domain values; scale, inv_scale: (R, NB) fp32;
overflow, nan: (R, K) bool (overflow: non-NaN elements whose rounded magnitude exceeds max)."""


# ---------------------------------------------------------------------------------------------
# device code
@triton.jit
def _pow2(y):
    """2**y as fp32 for int32 y in [-149, 127], from bits."""
    bits = tl.where(y >= -126, (y + 127) << 23, 1 << tl.maximum(y + 149, 0))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _block_quantize_kernel(
        # tensors: x (R, K) fp32, any strides; q (R, K) fp32; scale / inv (R, NB) fp32; over / nan (R, K) int8
        x_ptr, q_ptr, scale_ptr, inv_ptr, over_ptr, nan_ptr,
        # the stochastic-rounding seed, the shape (NB blocks per row), x's strides
        seed, R, K, NB, stride_xr, stride_xk,
        # the element format
        EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr, SPECIALS: tl.constexpr,
        # the cast
        SATURATE: tl.constexpr, ROUNDING: tl.constexpr,
        # the E8M0 scale rule: emax of the element format, fmt.max's significand, ceil rounding
        EMAX_ELEM: tl.constexpr, TOP_MANT: tl.constexpr, CEIL: tl.constexpr,
        # tile: BLOCK_R rows x one block of BLOCK_SIZE elements (padded to the power of two BS_POW2)
        BLOCK_SIZE: tl.constexpr, BS_POW2: tl.constexpr, BLOCK_R: tl.constexpr):
    """x (R, K) -> q (R, K), scale and inv (R, NB), overflow and NaN masks (R, K): program
    (i, j) casts block j of BLOCK_R rows with one E8M0 scale per row."""
    pid_r, blk = tl.program_id(0), tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = blk * BLOCK_SIZE + tl.arange(0, BS_POW2)
    mask = (rows[:, None] < R) & (cols[None, :] < K) & (tl.arange(0, BS_POW2)[None, :] < BLOCK_SIZE)
    src = rows[:, None].to(tl.int64) * stride_xr + cols[None, :].to(tl.int64) * stride_xk
    x = tl.load(x_ptr + src, mask=mask, other=0.0).to(tl.float32)

    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    amax = tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1)  # (BLOCK_R,)
    # floor(log2 amax) from the exponent field; subnormal amaxes are renormalised by 2**64 (exact)
    sub = amax < 1.1754943508222875e-38
    an = tl.where(sub, amax * 18446744073709551616.0, amax)
    ab = an.to(tl.int32, bitcast=True)
    e = (ab >> 23) - 127 - tl.where(sub, 64, 0)
    xexp = e - EMAX_ELEM
    if CEIL:
        mant = ((ab & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)  # amax's significand, [1, 2)
        xexp = xexp + tl.where(mant > TOP_MANT, 1, 0)
    xexp = tl.where(amax == 0, -127, xexp)
    xexp = tl.where(amax == float("inf"), 127, xexp)  # log2(inf) clips to E8M0's top
    xexp = tl.minimum(tl.maximum(xexp, -127), 127)
    scale = tl.where(has_nan, float("nan"), _pow2(-xexp))
    inv = tl.where(has_nan, float("nan"), _pow2(xexp))

    v = x * scale[:, None]  # one fp32 multiply, as the reference
    idx = rows[:, None] * K + cols[None, :]  # logical index of the output element
    if ROUNDING == ROUNDING_STOCHASTIC:
        rbits = tl.randint(seed, idx.to(tl.int32))
    else:
        rbits = v  # unused
    q, overflow = round_fp32_to_format(v, rbits, EXP_BITS, MAN_BITS, BIAS, SPECIALS, SATURATE, ROUNDING)
    out = rows[:, None].to(tl.int64) * K + cols[None, :]
    tl.store(q_ptr + out, q, mask=mask)
    tl.store(over_ptr + out, overflow.to(tl.int8), mask=mask)
    tl.store(nan_ptr + out, (v != v).to(tl.int8), mask=mask)
    srow = rows.to(tl.int64) * NB + blk
    tl.store(scale_ptr + srow, scale, mask=rows < R)
    tl.store(inv_ptr + srow, inv, mask=rows < R)


# ---------------------------------------------------------------------------------------------
# host code
def block_quantize(x: torch.Tensor, *, exp_bits: int, man_bits: int, bias: int, specials: str, block_size: int,
                   emax_elem: int, fmt_max: float, scale_format: str = "e8m0", scale_rounding: str = "floor",
                   rounding: str = "nearest", saturate: bool = True, seed: int = 0) -> BlockQuantizeResult:
    """Blockwise cast of 2-D x (R, K) along K with E8M0 scales (module docstring).

    x: float32 / bfloat16 / float16, any strides, CUDA (or CPU under TRITON_INTERPRET=1).
    block_size: elements per block (K or more: one scale per row). emax_elem: floor(log2(fmt_max)).
    Raises: ValueError for a bad format, a non-2-D x, x on a device the kernel cannot run on (CPU
    without TRITON_INTERPRET=1), scale_format other than e8m0, or a bad option.
    """
    check_format(exp_bits, man_bits, bias, specials)
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (got {getattr(x, 'shape', type(x))})")
    check_device(x, "x")
    if scale_format != "e8m0":
        raise ValueError(f"this kernel computes e8m0 scales only (got scale_format={scale_format!r})")
    if scale_rounding not in ("floor", "ceil"):
        raise ValueError(f"scale_rounding must be 'floor' or 'ceil' (got {scale_rounding!r})")
    if rounding not in ROUNDING:
        raise ValueError(f"rounding must be one of {tuple(ROUNDING)} (got {rounding!r})")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (got {block_size!r})")
    if x.dtype != torch.float32:
        # widened in torch (exact): the interpreter's in-kernel bf16 -> fp32 cast flushes subnormals
        x = x.float()
    r, k = x.shape
    bs = min(block_size, max(k, 1))
    nb = -(-k // bs) if k else 0
    dev = x.device
    q = torch.empty((r, k), dtype=torch.float32, device=dev)
    scale = torch.empty((r, nb), dtype=torch.float32, device=dev)
    inv = torch.empty_like(scale)
    over = torch.empty((r, k), dtype=torch.int8, device=dev)
    nan = torch.empty_like(over)
    if r and k:
        bs_pow2 = triton.next_power_of_2(bs)
        block_r = max(1, min(16, 4096 // bs_pow2))
        grid = (triton.cdiv(r, block_r), nb)
        _block_quantize_kernel[grid](
            x, q, scale, inv, over, nan, seed, r, k, nb, x.stride(0), x.stride(1),
            EXP_BITS=exp_bits, MAN_BITS=man_bits, BIAS=bias, SPECIALS=SPECIALS[specials], SATURATE=saturate,
            ROUNDING=ROUNDING[rounding], EMAX_ELEM=emax_elem, TOP_MANT=fmt_max / 2.0**emax_elem,
            CEIL=scale_rounding == "ceil", BLOCK_SIZE=bs, BS_POW2=bs_pow2, BLOCK_R=block_r)
    return BlockQuantizeResult(q, scale, inv, over.bool(), nan.bool())


# ---------------------------------------------------------------------------------------------
# self-check
def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (so -0 != +0), any NaN equal to any NaN."""
    if not a.is_floating_point():
        return torch.equal(a, b)
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())).all())


def _self_check(device) -> bool:
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from altgrad.blockwise import emax_elem, quantize_blockwise_cast
    from altgrad.formats import FORMAT_REGISTRY

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 200, generator=g) * torch.exp2(torch.randint(-40, 40, (64, 1), generator=g).float()))
    x[3, 7], x[5, 0], x[9, :] = math.nan, math.inf, 0.0
    x = x.to(device)
    ok = True
    for name, f in FORMAT_REGISTRY.items():
        for bs in (16, 32, 128):
            for rnd in ("floor", "ceil"):
                ref = quantize_blockwise_cast(x, f, bs, scale_rounding=rnd, backend="torch")
                got = block_quantize(x, **f.kernel_fields,
                                     block_size=bs, emax_elem=emax_elem(f), fmt_max=f.max, scale_rounding=rnd)
                same = all(_same(a, b) for a, b in zip(got, ref))
                if not same:
                    print(f"MISMATCH {name} block {bs} {rnd}")
                    ok = False
    print("block_quantize self-check:", "ok" if ok else "FAILED")
    return ok


def _benchmark() -> None:
    x = torch.randn(8192, 8192, device="cuda")
    ms = triton.testing.do_bench(lambda: block_quantize(x, exp_bits=4, man_bits=3, bias=7, specials="fn",
                                                        block_size=32, emax_elem=8, fmt_max=448.0))
    print(f"block_quantize E4M3/b32: {ms:.3f} ms, {x.numel() * 4 * 2 / ms / 1e6:.0f} GB/s (read x, write q)")


if __name__ == "__main__":
    run_self_check(_self_check, _benchmark)
