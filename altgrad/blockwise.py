"""Fine-grained scaling: one scale per row or per block of `block_size` elements (MX-style).

Per-tensor scaling gives a whole tensor one scale, so one outlier pushes every other element
towards underflow. Row-wise scaling gives every slice along `axis` (the GEMM's reduction
dimension K) its own scale, block scaling every run of `block_size` consecutive elements of that
slice (OCP Microscaling, Rouhani et al. 2023), and `block_2d` every block_size x block_size tile
of a matrix (DeepSeek-V3's weight blocks). For one block with amax = max |x| over the block:

    scale_format="fp32":  scale = fmt.max / amax                        (as per tensor)
    scale_format="e8m0":  inv_scale = 2**X, X = floor(log2 amax) - emax_elem   (scale_rounding="floor")
                          X + 1 where amax * 2**-X would still exceed fmt.max  (scale_rounding="ceil")
    q = round_fmt(x * scale)        x ~ q * inv_scale,  inv_scale = 1 / scale

emax_elem = floor(log2(fmt.max)) for every format (E0M7's is -1, E7M0's 62). "floor" is OCP MX
v1.0's rule (gfloat's `compute_scale_amax`): the block's largest element lands in the format's
top binade and may saturate when its mantissa exceeds the format's largest; "ceil" is the MXFP8
recipe of Mishra et al. 2025, which never saturates. E8M0 holds 2**-127 .. 2**127, so X is
clipped to that range.

Edge rules, decided here:
- All-zero block: e8m0 uses the smallest scale exponent (X = -127, as gfloat does), fp32 scale 1;
  its elements stay zero (with their sign where the format has -0).
- NaN in a block: e8m0 -> the scale is NaN (E8M0's NaN code) and every element of the block
  decodes to NaN, as OCP MX specifies for a NaN scale. fp32 -> the per-tensor rule: an amax that
  is 0 or not finite (or a scale that would overflow) gives scale 1; NaNs stay NaN, the rest round
  at scale 1.
- inf in a block: e8m0 clips X to 127 (inf saturates to max, or stays inf / NaN with
  saturate=False); fp32 -> scale 1 as above.
- Length along `axis` not a multiple of block_size: the last block is short and its scale comes
  from its own elements only (equivalently, the slice is padded with zeros, which never change an
  amax). block_2d pads both dimensions the same way.

Exactness: x * scale is an exact fp32 product for e8m0 scales whenever it is an fp32 normal; a
product below 2**-126 is under half the smallest subnormal of every format whose min_subnormal is
at least 2**-125 (all registered formats), so it rounds to zero either way. Dequantized values
q * 2**X are exact in fp32 (and in bf16) wherever they are normal numbers there.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from altgrad.formats import FormatSpec, get_format
from altgrad.scaling import compute_scale
from altgrad.vocabulary import ScaleFormat, ScaleRounding, choices

__all__ = [
    "BlockCast",
    "emax_elem",
    "block_scales",
    "quantize_blockwise",
    "quantize_blockwise_cast",
]

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # OCP E8M0: 2**-127 .. 2**127, 0xFF is NaN


class BlockCast(NamedTuple):
    """One blockwise cast, for kernels and the layer.

    q: format-domain values (x * scale rounded), fp32, x's shape; every NaN (a NaN element, every
    element of a block with a NaN scale, an overflow without saturation in a format without inf)
    is the positive quiet NaN 0x7FC00000 on every backend.
    scale, inv_scale: fp32 per block, x's shape with the `axis` dimension replaced by the number
    of blocks along it (1 for row-wise); with block_2d also the other matrix dimension by its
    number of tiles. x ~ q * inv_scale expanded over each block.
    overflow, nan: bool masks of x's shape (overflow: non-NaN elements whose rounded magnitude
    exceeds fmt.max, inf included).
    stats: from the "fast" backend (else None): (amax fp32 0-dim of |x| over the non-NaN elements
    of blocks whose scale is not NaN, as the reference's stats count them, int64[4]
    counts of overflow, underflow (nonzero x rounded to 0), NaN and nonzero elements), counted in
    the rounding pass.
    """

    q: torch.Tensor
    scale: torch.Tensor
    inv_scale: torch.Tensor
    overflow: torch.Tensor | None
    nan: torch.Tensor | None
    stats: tuple[torch.Tensor, torch.Tensor] | None = None


def emax_elem(fmt: FormatSpec | str) -> int:
    """floor(log2(fmt.max)): the exponent of the format's top binade."""
    return math.frexp(get_format(fmt).max)[1] - 1


# -- argument checks ---------------------------------------------------------------------------
def _check_args(block_size, scale_format, scale_rounding, block_2d) -> None:
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive int, or None for one scale per row (got {block_size!r})")
    if scale_format not in choices(ScaleFormat):
        raise ValueError(f"scale_format must be one of {choices(ScaleFormat)} (got {scale_format!r})")
    if scale_rounding not in choices(ScaleRounding):
        raise ValueError(f"scale_rounding must be one of {choices(ScaleRounding)} (got {scale_rounding!r})")
    if block_2d and block_size is None:
        raise ValueError("block_2d needs a block_size (2-D tiles of block_size x block_size)")


# -- scales ------------------------------------------------------------------------------------
def block_scales(amax: torch.Tensor, fmt: FormatSpec | str, scale_format: str = "e8m0",
                 scale_rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inv_scale), fp32, for per-block amaxes (any shape; NaN allowed) by the rules in the
    module docstring. Raises: ValueError for an unknown scale_format / scale_rounding."""
    fmt = get_format(fmt)
    _check_args(1, scale_format, scale_rounding, False)
    amax = amax.float()
    if scale_format == "fp32":
        scale = compute_scale(amax, fmt)
        return scale, torch.reciprocal(scale)
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1): floor(log2 amax) = exp - 1
    x = (exp - 1 - emax_elem(fmt)).double()
    if scale_rounding == "ceil":
        # amax * 2**-x = 2*mant * 2**emax_elem; step up one binade when that still exceeds fmt.max
        top_mant = fmt.max / 2.0 ** emax_elem(fmt)
        x = x + (2 * mant.double() > top_mant).double()
    x = torch.where(amax == 0, float(E8M0_MIN_EXP), x)
    x = torch.where(torch.isinf(amax), float(E8M0_MAX_EXP), x).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    nan = torch.isnan(amax)
    # powers of two in float64 are exact, and 2**-127 .. 2**127 are all fp32 numbers; a NaN block's
    # scales are the positive quiet NaN 0x7FC00000, as the kernels write them
    scale, inv_scale = torch.exp2(-x).float(), torch.exp2(x).float()
    return torch.where(nan, torch.nan, scale), torch.where(nan, torch.nan, inv_scale)


# -- layout: (..., K) <-> blocks -----------------------------------------------------------------
def _blocked(v: torch.Tensor, axis: int, block_size: int | None, block_2d: bool):
    """v with `axis` moved last, zero-padded and viewed as blocks; returns (blocks, undo) where
    blocks is (*lead, nb, bs) (or (nr, bs, nb, bs) for 2-D tiles) and undo(t) maps a blocked tensor
    back to v's layout and shape."""
    t = v.movedim(axis, -1)
    shape = t.shape
    k = shape[-1]
    bs = k if block_size is None else block_size
    nb = -(-k // bs) if k else 0
    t = torch.nn.functional.pad(t, (0, nb * bs - k)).contiguous()  # one layout for every backend
    if block_2d:
        r = shape[0]
        nr = -(-r // bs)
        t = torch.nn.functional.pad(t, (0, 0, 0, nr * bs - r)).reshape(nr, bs, nb, bs)

        def undo(b):
            return b.reshape(nr * bs, nb * bs)[:r, :k].movedim(-1, axis)
    else:
        t = t.reshape(*shape[:-1], nb, bs)

        def undo(b):
            return b.reshape(*shape[:-1], nb * bs)[..., :k].movedim(-1, axis)
    return t, undo


def _check_tensor_layout(x: torch.Tensor, axis: int, block_2d: bool) -> int:
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to scale along")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} is out of range for a {x.dim()}-D tensor")
    if block_2d and x.dim() != 2:
        raise ValueError(f"block_2d tiles a matrix: x must be 2-D (got {x.dim()}-D)")
    return axis % x.dim()


# -- the reference -------------------------------------------------------------------------------
def _cast(x, fmt, block_size, axis, scale_format, scale_rounding, rounding, saturate, block_2d, generator,
          fast: bool, masks: bool) -> BlockCast:
    """The torch cast: block amaxes and scales, then the rounding, by the reference (fast=False) or
    by altgrad.fast_cast.round_blocks (nearest rounding; the same bits, and the stats in one pass)."""
    from altgrad import fast_cast
    from altgrad.quantize import round_with_masks  # local: altgrad.quantize re-exports this module

    v = x.float()
    blocks, undo = _blocked(v, axis, block_size, block_2d)
    amax_dims = (1, 3) if block_2d else (-1,)
    amax = blocks.abs().amax(dim=amax_dims, keepdim=True) if blocks.numel() else blocks.sum(amax_dims, keepdim=True)
    scale, inv_scale = block_scales(amax, fmt, scale_format, scale_rounding)
    out = fast_cast.round_blocks(blocks, fmt, scale, saturate, masks) if fast and rounding == "nearest" else None
    stats = None
    if out is None:
        q, overflow, nan = round_with_masks(blocks * scale, fmt, rounding, saturate, generator)
    else:
        q, overflow, nan, amax_x, counts = out
        # the zero padding counts only where a NaN scale made it NaN: take those back out
        pad = _padding_per_block(x.shape[axis], block_size, block_2d and x.shape[1 - axis], blocks.shape,
                                 scale.device)
        if pad is not None:
            counts = counts.clone()
            counts[2] -= (torch.isnan(scale) * pad).sum()
        stats = (amax_x, counts)
    squeeze = (lambda s: s[:, 0, :, 0].movedim(-1, axis)) if block_2d else (lambda s: s.squeeze(-1).movedim(-1, axis))
    return BlockCast(undo(q), squeeze(scale), squeeze(inv_scale), None if overflow is None else undo(overflow),
                     None if nan is None else undo(nan), stats)


def _padding_per_block(k: int, block_size: int | None, rows, blocked_shape, device):
    """Zero-padding elements in each block (the blocked layout's scale shape), or None if none:
    the last block of each slice is short by nb * bs - k (and 2-D tiles also by their rows)."""
    if block_size is None:
        return None
    nb, bs = blocked_shape[-2], blocked_shape[-1]
    col_pad = nb * bs - k
    row_pad = (blocked_shape[0] * bs - rows) if rows else 0
    if col_pad == 0 and row_pad == 0:
        return None
    cols = torch.full((nb,), bs, device=device)
    cols[-1] -= col_pad
    if not rows:
        return (bs - cols).reshape(nb, 1)  # broadcasts over the leading dimensions of (..., nb, 1)
    nr = blocked_shape[0]
    rws = torch.full((nr,), bs, device=device)
    rws[-1] -= row_pad
    return (bs * bs - rws[:, None] * cols[None, :]).reshape(nr, 1, nb, 1)


def expand_scales(s: torch.Tensor, shape, axis: int = -1, block_size: int | None = None,
                  block_2d: bool = False) -> torch.Tensor:
    """Per-block `s` (as BlockCast holds it) repeated over each block, cut to x's `shape`."""
    axis = axis % len(shape)
    k = shape[axis]
    bs = k if block_size is None else block_size
    out = s.repeat_interleave(bs, dim=axis).narrow(axis, 0, k)
    if block_2d:
        other = 1 - axis
        out = out.repeat_interleave(bs, dim=other).narrow(other, 0, shape[other])
    return out


def quantize_blockwise_cast(x: torch.Tensor, fmt: FormatSpec | str, block_size: int | None = 32, *,
                            axis: int = -1, scale_format: str = "e8m0", scale_rounding: str = "floor",
                            rounding: str = "nearest", saturate: bool = True, block_2d: bool = False,
                            generator: torch.Generator | None = None, backend: str = "auto",
                            masks: bool = True) -> BlockCast:
    """Blockwise cast of x: format-domain values and per-block scales (see BlockCast).

    x: float32 / bfloat16 / float16, any shape (2-D for block_2d). block_size: elements per
    block along `axis`, or None for one scale per slice along `axis` (row-wise). backend:
    "torch" (this reference), "fast" (the reference's scales, then the rounding and stats in one
    compiled pass of altgrad.fast_cast; stochastic rounding runs the reference), "triton"
    (kernels/block_quantize.py; CUDA, or CPU under TRITON_INTERPRET=1; 2-D x, axis -1, e8m0
    scales, no block_2d), "auto" (triton on CUDA where supported, else fast). All give identical
    results for rounding="nearest". masks=False lets the fast backend skip writing the overflow
    and nan masks (then None; its `stats` still count them).

    Raises:
        TypeError: x is not a float tensor.
        ValueError: an unknown format, block_size, axis, scale_format, scale_rounding, rounding
            or backend, or block_2d on a tensor that is not 2-D.
    """
    from altgrad.quantize import BACKENDS, as_fp32, check_rounding, kernel_seed  # local: see _cast

    fmt = get_format(fmt)
    as_fp32(x, "x")
    _check_args(block_size, scale_format, scale_rounding, block_2d)
    check_rounding(rounding)
    axis = _check_tensor_layout(x, axis, block_2d)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
    want = ("triton" if x.is_cuda else "fast") if backend == "auto" else backend
    kernel_ok = x.dim() == 2 and axis == 1 and not block_2d and scale_format == "e8m0"
    if want == "triton" and kernel_ok:
        from altgrad.kernels import block_quantize as kbq

        res = kbq.block_quantize(x, **fmt.kernel_fields, block_size=block_size or x.shape[1],
                                 emax_elem=emax_elem(fmt), fmt_max=fmt.max, scale_format=scale_format,
                                 scale_rounding=scale_rounding, rounding=rounding, saturate=saturate,
                                 seed=kernel_seed(rounding, generator))
        return BlockCast(res.q, res.scale, res.inv_scale, res.overflow, res.nan)
    if backend == "triton":
        raise ValueError("backend='triton' casts 2-D tensors along their last axis with e8m0 scales and no "
                         "block_2d; use backend='torch', 'fast' or 'auto' for other layouts and fp32 scales")
    return _cast(x, fmt, block_size, axis, scale_format, scale_rounding, rounding, saturate, block_2d, generator,
                 fast=want != "torch", masks=masks)


def quantize_blockwise(x: torch.Tensor, fmt: FormatSpec | str, block_size: int | None = 32, *,
                       axis: int = -1, scale_format: str = "e8m0", scale_rounding: str = "floor",
                       rounding: str = "nearest", saturate: bool = True, block_2d: bool = False,
                       generator: torch.Generator | None = None, backend: str = "auto") -> torch.Tensor:
    """Fake-quantize x with one scale per block of `block_size` elements along `axis`
    (block_size=None: one per slice, row-wise): q * inv_scale in x's dtype and shape.

    x: float32 / bfloat16 / float16, any shape (2-D for block_2d). Scales are E8M0 powers of two
    (scale_format="e8m0", OCP MX) or fp32 amax-based (docs/design.md §4); rounding and saturate as
    `altgrad.quantize.quantize`. Returns a new tensor of x's shape and dtype.

    Raises:
        TypeError: x is not a float tensor.
        ValueError: an unknown format, block_size, axis, scale_format, scale_rounding, rounding
            or backend, or block_2d on a tensor that is not 2-D (as `quantize_blockwise_cast`).
    """
    axis_ = axis % x.dim() if isinstance(x, torch.Tensor) and x.dim() else axis
    c = quantize_blockwise_cast(x, fmt, block_size, axis=axis, scale_format=scale_format,
                                scale_rounding=scale_rounding, rounding=rounding, saturate=saturate,
                                block_2d=block_2d, generator=generator, backend=backend)
    inv = expand_scales(c.inv_scale, x.shape, axis_, block_size, block_2d)
    return (c.q * inv).to(x.dtype)
