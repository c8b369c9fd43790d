"""Scaled matmul of quantized operands, with optional in-loop quantization (fused quantize-scale-matmul).

    C = (A_q @ B_q^T) * inv_scale_a * inv_scale_b (+ bias)        A: (M, K), B: (N, K), C: (M, N)

A_q, B_q are format-domain values (x * scale rounded to the format, as `quantize.py` produces them).
Either pass them directly, or pass high-precision A / B plus a format and a scale (`fmt_a`, `scale_a`):
the kernel then rounds every tile in registers right before `tl.dot` (nearest-even, saturating), with the
same rounding helper as `quantize.py` — bit-identical to quantizing first.

Operands may have any strides, so one kernel serves a Linear layer's three GEMMs as views, no copies:
    forward  y  = x @ W^T         A = x_q,        B = w_q
    dgrad    dx = dy @ W          A = dy_q,       B = w_q.t()
    wgrad    dW = dy^T @ x        A = dy_q.t(),   B = x_q.t()

Numerics: every format value is exact in bf16 and every product of two is exact in fp32, so the dot
operands are bf16 on the GPU (fp32 under the Triton interpreter, whose bf16 dot is broken) and only the
fp32 accumulation differs from a float64 reference: its order (fixed by the tile, see below), and on
tensor cores the hardware's own alignment of partial sums, which is not IEEE round-to-nearest. The
scales are applied in fp32 in the epilogue (which ptxas may contract into one FMA with the bias).
The accumulator is fp32: |A_q|·|B_q|·K must stay below 3.4e38 (only E7M0 scaled to its full 2**62
range gets near that; leave it headroom with a smaller scale).

fp8=True (sm_89+ GPUs, E4M3 = torch.float8_e4m3fn and E5M2 = torch.float8_e5m2 only) feeds real float8
operands to `tl.dot` (FP8 tensor cores). Hopper accumulates FP8 products with ~14 significant bits, so
the kernel promotes partial sums to fp32 every BLOCK_K = 128 elements of K (`max_num_imprecise_acc`),
as DeepSeek-V3 does; results then differ from the simulated path by that accumulation error only.

Tiles (GPU): each path (pre-quantized bf16, in-loop, FP8, FP8 in-loop) has its own short list,
MATMUL_CONFIGS, checked to fit sm_90 and sm_80 without spills. By default the tile is a fixed function
of the output shape (`pick_config`), so the same call gives bit-identical results in every process;
timing-based autotuning over the same list is opt-in (autotune=True or ALTGRAD_MATMUL_AUTOTUNE=1).
Index math is int32, and int64 (a second specialisation) once an operand's offsets reach 2**31.

Self-contained: imports torch, triton, the stdlib and `quantize.py` (paste both files side by side).
`python kernels/scaled_matmul.py` checks itself against `scaled_matmul_ref` (CPU: TRITON_INTERPRET=1)
and, with CUDA, prints TFLOP/s against torch's bf16 matmul.
"""

from __future__ import annotations

import os
from collections import namedtuple

import torch
import triton
import triton.language as tl

try:  # installed as altgrad.kernels
    from .quantize import (SPECIALS, check_device, scalar_tensor, check_format, fp32_to_bf16_rne, run_self_check,
                           cast_ref, round_fp32_to_format, ROUNDING_NEAREST)
except ImportError:  # pasted next to quantize.py, or run as a script
    from quantize import (SPECIALS, check_device, scalar_tensor, check_format, fp32_to_bf16_rne, run_self_check,
                          cast_ref, round_fp32_to_format, ROUNDING_NEAREST)

__all__ = ["scaled_matmul", "scaled_matmul_ref", "FP8_FORMATS", "MATMUL_CONFIGS", "MatmulConfig",
           "pick_config", "matmul_path", "is_aligned"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# formats with a hardware float8 type: fields -> (torch dtype, triton dtype)
FP8_FORMATS = {
    (4, 3, 7, "fn"): (torch.float8_e4m3fn, tl.float8e4nv),
    (5, 2, 15, "ieee"): (torch.float8_e5m2, tl.float8e5),
}
_NO_FMT = (1, 0, 0, "none")  # placeholder fields for an operand that is not quantized in the loop


# ---------------------------------------------------------------------------------------------
# device code
@triton.jit
def _load_operand(ptrs, mask, scale, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr,
                  SPECIALS: tl.constexpr, QUANT: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Load a tile; if QUANT, round tile * scale to the format (nearest, saturate); cast for tl.dot
    (exact: format values fit every DOT_DTYPE used here)."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if QUANT:
        t, _ = round_fp32_to_format(t.to(tl.float32) * scale, t, EXP_BITS, MAN_BITS, BIAS, SPECIALS,
                                    True, ROUNDING_NEAREST)
    return t.to(DOT_DTYPE)


@triton.jit
def _scaled_matmul_kernel(
        # tensors: a (M, K), b (N, K), c (M, N), bias (N,); scale_* and inv_* (1,) fp32
        a_ptr, b_ptr, c_ptr, bias_ptr, scale_a_ptr, scale_b_ptr, inv_a_ptr, inv_b_ptr,
        # shapes and strides (elements)
        M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        # the formats a and b are rounded to in the loop (when QUANT_A / QUANT_B)
        A_EXP_BITS: tl.constexpr, A_MAN_BITS: tl.constexpr, A_BIAS: tl.constexpr, A_SPECIALS: tl.constexpr,
        B_EXP_BITS: tl.constexpr, B_MAN_BITS: tl.constexpr, B_BIAS: tl.constexpr, B_SPECIALS: tl.constexpr,
        # the path: in-loop quantization, tl.dot operand dtypes, FP8 inputs, bias, output dtype, 64-bit offsets
        QUANT_A: tl.constexpr, QUANT_B: tl.constexpr, A_DOT: tl.constexpr, B_DOT: tl.constexpr,
        FP8: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, IDX64: tl.constexpr,
        # tiles
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c (M, N) = (a (M, K) @ b (N, K)^T) * inv_a * inv_b (+ bias), fp32 accumulation: one program
    per BLOCK_M x BLOCK_N tile of c."""
    # grouped tile order: GROUP_M row-tiles share B tiles in L2 (Triton matmul tutorial)
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if IDX64:  # element offsets past 2**31 (chosen on the host): 64-bit index math
        offs_m, offs_n, offs_k = offs_m.to(tl.int64), offs_n.to(tl.int64), offs_k.to(tl.int64)
        a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
        b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K
    else:
        a_step = BLOCK_K * stride_ak
        b_step = BLOCK_K * stride_bk
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N) = B^T tile
    sa = tl.load(scale_a_ptr) if QUANT_A else 1.0
    sb = tl.load(scale_b_ptr) if QUANT_B else 1.0

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = _load_operand(a_ptrs, (offs_m[:, None] < M) & (offs_k[None, :] < k_left), sa,
                          A_EXP_BITS, A_MAN_BITS, A_BIAS, A_SPECIALS, QUANT_A, A_DOT)
        b = _load_operand(b_ptrs, (offs_k[:, None] < k_left) & (offs_n[None, :] < N), sb,
                          B_EXP_BITS, B_MAN_BITS, B_BIAS, B_SPECIALS, QUANT_B, B_DOT)
        if FP8:
            # promote the FP8 tensor-core partial sums to fp32 every BLOCK_K (= 128) products
            acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        elif A_DOT == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")  # never tf32
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step

    # epilogue in fp32: unscale, add bias, store
    c = acc * tl.load(inv_a_ptr) * tl.load(inv_b_ptr)
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if OUT_BF16:
        tl.store(c_ptrs, fp32_to_bf16_rne(c), mask=c_mask)  # RNE, also under the interpreter
    else:
        tl.store(c_ptrs, c, mask=c_mask)


MatmulConfig = namedtuple("MatmulConfig", "block_m block_n block_k num_stages num_warps")
MatmulConfig.__doc__ = "One tile configuration of the matmul kernel (a triton.Config's fields)."

# Tile configurations per path, largest tile first. Every entry fits sm_90 (227 KB shared memory per
# block) and sm_80 (163 KB; the FP8 paths: sm_90 only) with no register spills, for every operand
# layout and input dtype the path accepts: `altgrad.compile_check` compiles them all with Triton's
# ptxas and asserts it. The in-loop paths stage the unrounded tiles (fp32 or bf16) in shared memory
# and round them in registers, so they get smaller tiles and fewer stages. Operands whose strides or
# addresses, or whose M, N, K, are not multiples of 16 elements / 16 bytes (an odd feature count such
# as a 65-character vocabulary, an odd token count, an offset view) are loaded without vector
# instructions, which costs registers: those calls take the "/unaligned" lists.
MATMUL_CONFIGS = {
    # pre-quantized bf16 operands (bf16 tensor cores)
    "bf16": [MatmulConfig(128, 256, 64, 3, 8), MatmulConfig(128, 128, 64, 4, 8),
             MatmulConfig(64, 128, 64, 4, 4), MatmulConfig(64, 64, 32, 4, 4)],
    # at least one operand rounded in the loop, bf16 tensor cores
    "in_loop": [MatmulConfig(64, 128, 32, 3, 8), MatmulConfig(64, 64, 32, 3, 4)],
    # float8 operands (FP8 tensor cores, sm_89+); BLOCK_K = 128 is the fp32 promotion interval
    "fp8": [MatmulConfig(128, 128, 128, 4, 8), MatmulConfig(128, 64, 128, 4, 4),
            MatmulConfig(64, 64, 128, 4, 4)],
    # at least one operand rounded in the loop, then fed to FP8 tensor cores
    "fp8_in_loop": [MatmulConfig(64, 128, 128, 2, 8), MatmulConfig(64, 64, 128, 2, 8)],
    "bf16/unaligned": [MatmulConfig(128, 64, 32, 3, 8), MatmulConfig(64, 128, 32, 3, 8),
                       MatmulConfig(64, 64, 32, 4, 4)],
    "in_loop/unaligned": [MatmulConfig(64, 64, 32, 3, 8)],
}  # fp8=True refuses unaligned operands (byte-wise float8 loads spill every tile), as cuBLAS FP8 does
# The deterministic choice aims for one full wave: at least this many output tiles (an H100/H200
# has 132 SMs); smaller problems take the path's smallest tile.
_WAVE_TILES = 128
_INTERPRET_CONFIG = MatmulConfig(32, 32, 32, 1, 1)  # one fixed tile under the interpreter
_GROUP_M = 8


def matmul_path(quant: bool, fp8: bool, aligned: bool = True) -> str:
    """Key of MATMUL_CONFIGS for a call: in-loop quantization (of A or B), FP8 tensor cores, and
    whether every operand is 16-aligned (see `is_aligned`; FP8 needs aligned operands)."""
    path = ("fp8_in_loop" if quant else "fp8") if fp8 else ("in_loop" if quant else "bf16")
    return path if aligned else path + "/unaligned"


def is_aligned(*tensors: torch.Tensor) -> bool:
    """True when every tensor's address is a multiple of 16 bytes and every stride other than 1 a
    multiple of 16 elements (what Triton's launch specialises on for vector loads)."""
    return all(t.data_ptr() % 16 == 0 and all(st == 1 or st % 16 == 0 for st in t.stride()) for t in tensors)


def pick_config(path: str, M: int, N: int) -> MatmulConfig:
    """The tile for an (M, N) output on `path`, a pure function of the shape (no timing): the largest
    tile of MATMUL_CONFIGS[path] that still gives >= 128 output tiles, else the path's smallest.
    The same shape therefore always runs the same tile, so the fp32 accumulation order, and the
    result, are identical across processes."""
    configs = MATMUL_CONFIGS[path]
    for cfg in configs:
        if triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) >= _WAVE_TILES:
            return cfg
    return configs[-1]


def _triton_config(cfg: MatmulConfig) -> triton.Config:
    return triton.Config({"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                          "GROUP_M": _GROUP_M}, num_stages=cfg.num_stages, num_warps=cfg.num_warps)


# opt-in timing-based choice over the same lists (benchmarks, ALTGRAD_MATMUL_AUTOTUNE=1); the key
# holds the layout (strides) and every constexpr that changes the code
_AUTOTUNE_KEY = ["M", "N", "K", "stride_am", "stride_ak", "stride_bn", "stride_bk", "QUANT_A", "QUANT_B",
                 "A_EXP_BITS", "A_MAN_BITS", "B_EXP_BITS", "B_MAN_BITS", "FP8", "HAS_BIAS", "OUT_BF16", "IDX64"]
_AUTOTUNED = {}  # path -> triton.autotune over MATMUL_CONFIGS[path], made on first use


def _autotuned(path: str):
    if path not in _AUTOTUNED:
        configs = [_triton_config(c) for c in MATMUL_CONFIGS[path]]
        _AUTOTUNED[path] = triton.autotune(configs=configs, key=_AUTOTUNE_KEY)(_scaled_matmul_kernel)
    return _AUTOTUNED[path]


AUTOTUNE_ENV = "ALTGRAD_MATMUL_AUTOTUNE"
INT32_LIMIT = 2**31  # element offsets at or past this need 64-bit index math


# ---------------------------------------------------------------------------------------------
# host code
_HP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_operand(t, name: str, fmt, fp8: bool):
    """Validate one operand; returns its format fields (or the placeholder) and the tl dot dtype."""
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D tensor (got {getattr(t, 'shape', type(t))})")
    if fmt is not None:
        if not (isinstance(fmt, tuple) and len(fmt) == 4):
            raise ValueError(f"fmt_{name} must be (exp_bits, man_bits, bias, specials) or None (got {fmt!r})")
        check_format(*fmt)
        if t.dtype not in _HP_DTYPES:
            raise ValueError(f"{name} must be float32/bfloat16/float16 to quantize in the loop (got {t.dtype})")
    if fp8:
        fields = fmt if fmt is not None else next((f for f, (td, _) in FP8_FORMATS.items() if td == t.dtype), None)
        if fields not in FP8_FORMATS:
            raise ValueError(f"fp8=True needs {name} as torch.float8_e4m3fn / float8_e5m2, or fmt_{name} = "
                             f"E4M3 (4, 3, 7, 'fn') / E5M2 (5, 2, 15, 'ieee') (got {t.dtype}, fmt {fmt!r})")
        return fmt or _NO_FMT, FP8_FORMATS[fields][1]
    if t.dtype not in _HP_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16 (got {t.dtype}); float8 needs fp8=True")
    return fmt or _NO_FMT, tl.float32 if _INTERPRET else tl.bfloat16


def _device_capability(device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _check_fp8_device(device) -> None:
    if _INTERPRET:  # (CPU tensors without the interpreter are refused by check_device)
        raise ValueError("fp8=True needs a CUDA GPU with FP8 tensor cores (sm_89+); not available under "
                         "TRITON_INTERPRET or on the CPU")
    cap = _device_capability(device)
    if cap < (8, 9):
        raise ValueError(f"fp8=True needs an sm_89+ GPU (this one is sm_{cap[0]}{cap[1]})")


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, inv_scale_a=None, inv_scale_b=None, bias=None, *,
                  out_dtype: torch.dtype = torch.float32, fmt_a=None, scale_a=None, fmt_b=None, scale_b=None,
                  fp8: bool = False, config: MatmulConfig | None = None, autotune: bool | None = None) -> torch.Tensor:
    """C = (A_q @ B_q^T) * inv_scale_a * inv_scale_b (+ bias), fp32 accumulation. Returns a new (M, N) tensor.

    a: (M, K), b: (N, K), any strides. Without fmt_x, operand x already holds format-domain values
    (fp32/bf16/fp16; float8 tensors with fp8=True). With fmt_x = (exp_bits, man_bits, bias, specials)
    and scale_x, the kernel quantizes x * scale_x in the loop (nearest, saturate); inv_scale_x then
    defaults to 1/scale_x, else to 1. Scales: None, floats or 1-element fp32 device tensors (no sync).
    bias: (N,) or None. out_dtype: torch.float32 or torch.bfloat16. fp8: real FP8 tensor cores (sm_89+).

    Tile choice on the GPU: `pick_config` (a fixed function of the shape: bit-identical results across
    processes) unless `config` names one of MATMUL_CONFIGS[matmul_path(...)], or autotune=True (default: the
    environment variable ALTGRAD_MATMUL_AUTOTUNE=1) times every config of the path once per shape and
    layout, as triton.autotune does. Index math is int32, or int64 when an operand's element offsets
    reach 2**31. Under TRITON_INTERPRET one 32x32x32 tile is used.

    Returns: C (M, N) in out_dtype on a's device, in the units of x = A_q * inv_scale_a times
    W = B_q * inv_scale_b (the scales undo the quantization scales).

    Raises:
        ValueError: a or b not 2-D tensors or K differing; a dtype, device or format (check_format)
            the kernel cannot take; a scale that is not None, a float or a 1-element float tensor;
            a `config` outside the path's list.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise ValueError("a and b must be tensors")
    fa, a_dot = _check_operand(a, "a", fmt_a, fp8)
    fb, b_dot = _check_operand(b, "b", fmt_b, fp8)
    (M, K), (N, Kb) = a.shape, b.shape
    if K != Kb:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} and b must be (N, K) with the same K (got {tuple(b.shape)})")
    dev = a.device
    if b.device != dev:
        raise ValueError(f"a is on {dev} but b is on {b.device}")
    check_device(a, "a")
    if fp8:
        _check_fp8_device(dev)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16 (got {out_dtype})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.device != dev
                             or bias.dtype not in _HP_DTYPES):
        raise ValueError(f"bias must be a float tensor of shape ({N},) on {dev} (got "
                         f"{getattr(bias, 'shape', type(bias))} {getattr(bias, 'dtype', '')})")
    if fmt_a is None and scale_a is not None:
        raise ValueError("scale_a is only used with fmt_a (in-loop quantization); pass inv_scale_a instead")
    if fmt_b is None and scale_b is not None:
        raise ValueError("scale_b is only used with fmt_b (in-loop quantization); pass inv_scale_b instead")

    sa, sb = scalar_tensor(scale_a, "scale_a", dev), scalar_tensor(scale_b, "scale_b", dev)
    inv_a = torch.reciprocal(sa) if fmt_a is not None and inv_scale_a is None else \
        scalar_tensor(inv_scale_a, "inv_scale_a", dev)
    inv_b = torch.reciprocal(sb) if fmt_b is not None and inv_scale_b is None else \
        scalar_tensor(inv_scale_b, "inv_scale_b", dev)
    bias_arg = bias.contiguous() if bias is not None else None
    # the masks' bounds M, N, K decide vector loads as much as the strides (C is (M, N) contiguous)
    aligned = is_aligned(a, b, *([bias_arg] if bias is not None else [])) and M % 16 == N % 16 == K % 16 == 0
    if fp8 and not aligned:
        raise ValueError(f"fp8=True needs M, N, K that are multiples of 16 and 16-byte aligned operands with "
                         f"strides in multiples of 16 elements, as cuBLAS FP8 does (got M, N, K = {M}, {N}, {K}, "
                         f"strides {a.stride()} and {b.stride()})")
    path = matmul_path(fmt_a is not None or fmt_b is not None, fp8, aligned)
    if config is not None and (_INTERPRET or config not in MATMUL_CONFIGS[path]):
        raise ValueError(f"config must be one of MATMUL_CONFIGS[{path!r}] = {MATMUL_CONFIGS[path]} on the GPU "
                         f"(got {config!r}{'; the interpreter uses one fixed tile' if _INTERPRET else ''})")
    if autotune is None:
        autotune = os.environ.get(AUTOTUNE_ENV, "0") == "1"
    c = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return c
    args = (a, b, c, bias_arg if bias is not None else c, sa, sb, inv_a, inv_b, M, N, K, a.stride(0), a.stride(1),
            b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    idx64 = max(_max_offset(a), _max_offset(b), _max_offset(c)) >= INT32_LIMIT
    meta = dict(A_EXP_BITS=fa[0], A_MAN_BITS=fa[1], A_BIAS=fa[2], A_SPECIALS=SPECIALS[fa[3]],
                B_EXP_BITS=fb[0], B_MAN_BITS=fb[1], B_BIAS=fb[2], B_SPECIALS=SPECIALS[fb[3]],
                QUANT_A=fmt_a is not None, QUANT_B=fmt_b is not None, A_DOT=a_dot, B_DOT=b_dot, FP8=fp8,
                HAS_BIAS=bias is not None, OUT_BF16=out_dtype == torch.bfloat16, IDX64=idx64)
    if autotune and not _INTERPRET and config is None:
        grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        _autotuned(path)[grid](*args, **meta)
        return c
    cfg = _INTERPRET_CONFIG if _INTERPRET else (config or pick_config(path, M, N))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _scaled_matmul_kernel[grid](*args, **meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                GROUP_M=_GROUP_M, num_stages=cfg.num_stages, num_warps=cfg.num_warps)
    return c


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset the kernel may form for a 2-D operand: rows and columns rounded up by a
    tile (masked lanes compute their offsets too)."""
    return sum((n + 256) * abs(st) for n, st in zip(t.shape, t.stride()))


def scaled_matmul_ref(a: torch.Tensor, b: torch.Tensor, inv_scale_a=None, inv_scale_b=None, bias=None, *,
                      out_dtype: torch.dtype = torch.float32, fmt_a=None, scale_a=None, fmt_b=None,
                      scale_b=None) -> torch.Tensor:
    """Same contract as `scaled_matmul`, in float64 torch (operands quantized by `cast_ref`)."""
    def operand(t, fmt, scale, inv):
        if fmt is None:
            return t.double(), (1.0 if inv is None else inv)
        q = cast_ref(t, scale, exp_bits=fmt[0], man_bits=fmt[1], bias=fmt[2], specials=fmt[3]).q
        s = torch.as_tensor(scale, dtype=torch.float32, device=t.device)
        return q.double(), (torch.reciprocal(s) if inv is None else inv)

    aq, ia = operand(a, fmt_a, scale_a, inv_scale_a)
    bq, ib = operand(b, fmt_b, scale_b, inv_scale_b)
    c = (aq @ bq.T) * torch.as_tensor(ia, device=a.device).double() * torch.as_tensor(ib, device=a.device).double()
    if bias is not None:
        c = c + bias.double()
    return c.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# self-check and benchmark
def _self_check(device) -> bool:
    g = torch.Generator().manual_seed(0)
    e4m3, e5m2 = (4, 3, 7, "fn"), (5, 2, 15, "ieee")
    M, N, K = 37, 53, 29
    x, w, dy = (torch.randn(shape, generator=g).to(device) for shape in ((M, K), (N, K), (M, N)))
    bias = torch.randn(N, generator=g).to(device)
    sx, sw, sg = (torch.tensor(v, device=device) for v in (50.0, 200.0, 3e3))
    xq, wq, gq = (cast_ref(t, s, exp_bits=f[0], man_bits=f[1], bias=f[2], specials=f[3]).q
                  for t, s, f in ((x, sx, e4m3), (w, sw, e4m3), (dy, sg, e5m2)))
    ix, iw, ig = (torch.reciprocal(s) for s in (sx, sw, sg))
    cases = {
        "fwd (cast first)": dict(a=xq, b=wq, inv_scale_a=ix, inv_scale_b=iw, bias=bias),
        "dgrad (cast first)": dict(a=gq, b=wq.t(), inv_scale_a=ig, inv_scale_b=iw),
        "wgrad (cast first)": dict(a=gq.t(), b=xq.t(), inv_scale_a=ig, inv_scale_b=ix),
        "fwd (in-loop A and B)": dict(a=x, b=w, fmt_a=e4m3, scale_a=sx, fmt_b=e4m3, scale_b=sw, bias=bias),
        "wgrad (in-loop A)": dict(a=dy.t(), b=xq.t(), fmt_a=e5m2, scale_a=sg, inv_scale_b=ix),
    }
    ok = True
    for name, kw in cases.items():
        got, ref = scaled_matmul(**kw).double(), scaled_matmul_ref(**kw).double()
        err = ((got - ref).norm() / ref.norm()).item()
        ok &= err <= 1e-6
        print(f"{name:<24} rel err {err:.2e} {'ok' if err <= 1e-6 else 'FAIL'}")
    return ok


def _benchmark() -> None:
    shapes = [(3072, 1536, 384), (3072, 384, 1536), (3072, 1152, 384), (4096, 4096, 4096)]  # (M, N, K)
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    for M, N, K in shapes:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        one = torch.ones((), device="cuda")
        tflops = lambda ms: 2 * M * N * K / ms / 1e9  # noqa: E731
        line = f"M={M} N={N} K={K}: torch bf16 {tflops(triton.testing.do_bench(lambda: x @ w.T)):.0f}"
        line += f" | pre-quantized {tflops(triton.testing.do_bench(lambda: scaled_matmul(x, w))):.0f}"
        f43 = (4, 3, 7, "fn")
        ms = triton.testing.do_bench(lambda: scaled_matmul(x, w, fmt_a=f43, scale_a=one, fmt_b=f43, scale_b=one))
        line += f" | in-loop {tflops(ms):.0f}"
        if fp8_ok:
            x8, w8 = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
            line += f" | fp8 {tflops(triton.testing.do_bench(lambda: scaled_matmul(x8, w8, fp8=True))):.0f}"
        print(line + " TFLOP/s")


if __name__ == "__main__":
    run_self_check(_self_check, _benchmark)
