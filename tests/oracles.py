"""Shared oracle helpers for the tests: gfloat FormatInfo for a FormatSpec, and the value sets
the reference and the kernels are checked on (docs/design.md §3)."""

from __future__ import annotations

import numpy as np
import torch
from gfloat import FormatInfo, RoundMode, decode_ndarray, round_ndarray
from gfloat.types import Domain

from altgrad.formats import FORMAT_REGISTRY, FormatSpec

# every default name plus qualified ones exercising each convention and a custom bias
ORACLE_FORMATS = list(FORMAT_REGISTRY)


def distinct_layouts() -> list[str]:
    """One registered name per distinct (E, M, bias, specials): aliases compile the same kernel and
    round the same way, so kernel tests run each layout once."""
    seen = {}
    for name, f in FORMAT_REGISTRY.items():
        seen.setdefault(tuple(f.kernel_fields.values()), name)
    return list(seen.values())


def gfloat_info(fmt: FormatSpec) -> FormatInfo:
    """gfloat's description of the same format (an independent implementation)."""
    high_nans = {"ieee": 2**fmt.man_bits - 1, "fn": 1}.get(fmt.specials, 0)
    return FormatInfo(
        name=fmt.name, k=fmt.bits, precision=fmt.man_bits + 1, bias=fmt.bias, is_signed=True,
        domain=Domain.Extended if fmt.has_inf else Domain.Finite, has_nz=fmt.has_neg_zero,
        num_high_nans=high_nans, has_subnormals=True, is_twos_complement=False,
    )


def gfloat_round(fmt: FormatSpec, v: np.ndarray, saturate: bool) -> np.ndarray:
    """gfloat's RNE rounding of fp32 values, as fp32. For formats without inf and saturate=False,
    gfloat raises/keeps values past max where ml_dtypes gives NaN, so callers pass finite-range
    values or compare overflow separately."""
    with np.errstate(invalid="ignore"):  # gfloat casts NaN/inf internally
        out = round_ndarray(gfloat_info(fmt), v.astype(np.float64), RoundMode.TiesToEven, sat=saturate)
    return out.astype(np.float32)


def gfloat_decode(fmt: FormatSpec) -> np.ndarray:
    return decode_ndarray(gfloat_info(fmt), np.arange(2**fmt.bits)).astype(np.float32)


def all_bf16_values() -> torch.Tensor:
    """Every bf16 bit pattern (NaNs, infs, subnormals, +-0 included) as fp32."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float()


def midpoint_values(fmt: FormatSpec) -> torch.Tensor:
    """Every representable value, every midpoint between neighbours, one fp32 ulp either side of
    each midpoint, and values at and past the overflow threshold (both signs)."""
    vals = fmt.values().double()
    pos = vals[vals >= 0]
    mids = ((pos[1:] + pos[:-1]) / 2).float()
    top = torch.tensor([fmt.max + fmt.ulp(fmt.max) / 2], dtype=torch.float32)  # overflow threshold
    edges = torch.cat([mids, top])
    up = torch.nextafter(edges, torch.tensor(float("inf")))
    down = torch.nextafter(edges, torch.tensor(0.0))
    past = torch.tensor([fmt.max * 1.5, fmt.max * 4, 3e38], dtype=torch.float32)
    pos_all = torch.cat([pos.float(), edges, up, down, past])
    return torch.cat([pos_all, -pos_all])


def log_spread_values(fmt: FormatSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """n random fp32 values, log-uniform from min_subnormal/4 to 2*max, random signs."""
    lo, hi = np.log2(fmt.min_subnormal / 4), np.log2(fmt.max * 2)
    e = torch.rand(n, generator=generator, dtype=torch.float64) * (hi - lo) + lo
    sign = torch.randint(0, 2, (n,), generator=generator) * 2 - 1
    return (sign * torch.exp2(e)).float()
