"""Block-scaled matmul: per-row or per-block (MX-style) inverse scales along the reduction dimension K.

    C[m, n] = sum_kb (A[m, kb] . B[n, kb]) * inv_a[m, kb] * inv_b[n, kb] (+ bias[n])

A (M, K) and B (N, K) hold format-domain values (x * scale rounded to an 8-bit format, fp32 or bf16,
any strides); inv_a (M, nb_a) and inv_b (N, nb_b) are fp32 inverse scales, one per block of block_a
(block_b) consecutive elements of K, nb = ceil(K / block), the last block short when block does not
divide K. One block per row (block >= K) is row-wise scaling; a single inverse scale per tensor and no
scale at all are accepted too. The three GEMMs of a Linear layer are views, no copies:
    forward  y  = x @ W^T         A = x_q (T, in),       B = w_q (out, in)          K = in
    dgrad    dx = dy @ W          A = dy_q (T, out),     B = w_q^T (in, out) view   K = out
    wgrad    dW = dy^T @ x        A = dy_q^T (out, T),   B = x_q^T (in, T) views    K = T
(each GEMM casts its operands along its own K, so w_q in dgrad is W cast along out_features, etc.)

How: one program per BLOCK_M x BLOCK_N tile of C walks K in steps of BLOCK_K = the smaller block size of
the block-scaled operands, at most 32 (`k_step`; block sizes are 16, 32, 64, 128, so the step divides
every block and never straddles a block of either operand; a block of 64 or 128 takes two or four
steps, each scaled by the same inverse scales). Each step's partial dot product is computed on its own
in fp32, multiplied by its row of inv_a and its column of inv_b, and added to the fp32 accumulator:
    acc += (dot(A_k, B_k^T) * inv_a[:, kb_a]) * inv_b[:, kb_b]
(ptxas may contract the last multiply and the add into one FMA.) This is correct for any fp32 scales
(they do not factor out of a sum over blocks), and for E8M0 (power-of-two) scales both multiplications
are exact, so the result equals a float64 product of the dequantized operands up to the fp32
accumulation order. Row-wise and per-tensor scales factor out of the sum: they are applied once in the
epilogue, and when neither operand is block-scaled the loop is a plain matmul with BLOCK_K = 32.
`altgrad.linear_blockwise.blockwise_matmul` (torch) is the reference; it scales each partial product
in the same order (its steps are whole blocks of the smaller size).
Why steps of at most 32: the operands arrive as fp32 format-domain values (the block casts' output),
staged in shared memory as fp32 and converted to bf16 in registers, and a block-scaled step keeps the
partial product live beside the accumulator; longer steps spill registers (see BLOCK_SCALED_CONFIGS).
The price is two fp32 multiplies per output element per step on the CUDA cores.

Numerics of the dot: every 8-bit format value is exact in bf16 and every product of two is exact in
fp32, so tiles are converted to bf16 for `tl.dot` on the GPU (fp32 under the Triton interpreter, whose
bf16 dot is broken); only fp32 accumulation differs from float64 (order fixed by the tile, and tensor
cores' own alignment of partial sums). Operands must therefore hold format values: high-precision
operands would be rounded to bf16 (`altgrad.linear_blockwise` sends those to torch). The partial sums
are of unscaled values: |A|·|B|·BLOCK_K must stay below 3.4e38, which E7M0 values at the top of
their range (2**62) exceed; carry them lower (a power-of-two shift moved into the inverse scale) or
use the torch product, as `altgrad.linear_blockwise` does.

Tiles (GPU): one short list per K step, BLOCK_SCALED_CONFIGS, every entry compiled for sm_90 and sm_80
by `altgrad.compile_check` (shared memory within the opt-in limit, no register spills) for fp32 and bf16
operands, the three layouts, bias and bf16 output; unaligned operands (odd shapes or strides) take the
smallest tile. The tile is a fixed function of the output shape and the operands' alignment
(`pick_config`), so a call always accumulates in the same order. Index math is int32, and
int64 (a second specialisation) once an operand's offsets reach 2**31.

Verified: under the Triton interpreter (fp32 dot) against float64 and the torch reference
(tests/test_kernels_block_matmul.py); every tile compiled for sm_90 and sm_80 with the ptxas of Triton
3.9 and 3.6 (no spills, shared memory within the limit). Not yet run on a GPU (the bf16 tensor-core
path and its speed are unmeasured).

Self-contained but for `quantize.py` and `scaled_matmul.py` (paste the three side by side).
`python kernels/block_scaled_matmul.py` checks itself against `block_scaled_matmul_ref` (CPU:
TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # installed as altgrad.kernels
    from .quantize import check_device, fp32_to_bf16_rne, run_self_check
    from .scaled_matmul import MatmulConfig, is_aligned
except ImportError:  # pasted next to quantize.py and scaled_matmul.py, or run as a script
    from quantize import check_device, fp32_to_bf16_rne, run_self_check
    from scaled_matmul import MatmulConfig, is_aligned

__all__ = ["block_scaled_matmul", "block_scaled_matmul_ref", "BLOCK_SIZES", "BLOCK_SCALED_CONFIGS",
           "pick_config", "allowed_configs", "k_step"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# how an operand is scaled (the SCALE_A / SCALE_B constexprs)
SCALE_NONE = tl.constexpr(0)   # no inverse scale
SCALE_ROW = tl.constexpr(1)    # one per row (per tensor: a stride-0 row): applied in the epilogue
SCALE_BLOCK = tl.constexpr(2)  # one per block of K: applied to each step's partial product

BLOCK_SIZES = (16, 32, 64, 128)  # block sizes along K the kernel takes (besides one block per row)


# ---------------------------------------------------------------------------------------------
# device code
@triton.jit
def _block_scaled_matmul_kernel(
        # tensors: a (M, K), b (N, K), c (M, N), bias (N,), inv_a (M, NB_A), inv_b (N, NB_B) fp32
        a_ptr, b_ptr, c_ptr, bias_ptr, inv_a_ptr, inv_b_ptr,
        # shapes and strides (elements)
        M, N, K, stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_ia_m, stride_ia_kb, stride_ib_n, stride_ib_kb,
        # scaling of a and b (SCALE_NONE / SCALE_ROW / SCALE_BLOCK) and their block sizes along K
        SCALE_A: tl.constexpr, SCALE_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
        # tl.dot operand dtype, bias, output dtype, 64-bit offsets
        DOT_DTYPE: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_BF16: tl.constexpr, IDX64: tl.constexpr,
        # tiles (BLOCK_K divides every SCALE_BLOCK operand's block size)
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """c (M, N) = sum_kb (a[:, kb] @ b[:, kb]^T) * inv_a[:, kb] * inv_b[:, kb] (+ bias), fp32
    accumulation: one program per BLOCK_M x BLOCK_N tile of c."""
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
        ia_kb = tl.cast(stride_ia_kb, tl.int64)
        ib_kb = tl.cast(stride_ib_kb, tl.int64)
    else:
        a_step = BLOCK_K * stride_ak
        b_step = BLOCK_K * stride_bk
        ia_kb = stride_ia_kb
        ib_kb = stride_ib_kb
    m_in, n_in = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn  # (BLOCK_K, BLOCK_N) = B^T tile
    ia_ptrs = inv_a_ptr + offs_m * stride_ia_m  # (BLOCK_M,) inverse scales of block 0
    ib_ptrs = inv_b_ptr + offs_n * stride_ib_n  # (BLOCK_N,)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_in[:, None] & (offs_k[None, :] < k_left), other=0.0).to(DOT_DTYPE)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & n_in[None, :], other=0.0).to(DOT_DTYPE)
        if SCALE_A == SCALE_BLOCK or SCALE_B == SCALE_BLOCK:
            # this step's partial product on its own, scaled by its blocks' inverse scales, then summed
            if DOT_DTYPE == tl.float32:
                p = tl.dot(a, b, input_precision="ieee")  # never tf32
            else:
                p = tl.dot(a, b)
            if SCALE_A == SCALE_BLOCK:
                kb_a = (k * BLOCK_K) // BLOCK_A
                p = p * tl.load(ia_ptrs + kb_a * ia_kb, mask=m_in, other=0.0)[:, None]
            if SCALE_B == SCALE_BLOCK:
                kb_b = (k * BLOCK_K) // BLOCK_B
                p = p * tl.load(ib_ptrs + kb_b * ib_kb, mask=n_in, other=0.0)[None, :]
            acc += p
        elif DOT_DTYPE == tl.float32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += a_step
        b_ptrs += b_step

    # epilogue in fp32: row (and per-tensor) inverse scales, bias, store
    c = acc
    if SCALE_A == SCALE_ROW:
        c = c * tl.load(ia_ptrs, mask=m_in, other=0.0)[:, None]
    if SCALE_B == SCALE_ROW:
        c = c * tl.load(ib_ptrs, mask=n_in, other=0.0)[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = m_in[:, None] & n_in[None, :]
    if OUT_BF16:
        tl.store(c_ptrs, fp32_to_bf16_rne(c), mask=c_mask)  # RNE, also under the interpreter
    else:
        tl.store(c_ptrs, c, mask=c_mask)


# Tile configurations per K step (`k_step`: 16 or 32), largest tile first. The operands are staged in
# shared memory in their own dtype (fp32 q from the block casts), so the lists are sized for fp32 tiles;
# a block-scaled step keeps a second (BLOCK_M, BLOCK_N) fp32 tile (the partial product) live beside the
# accumulator. Operands that are not 16-aligned (an odd K or feature count, odd strides: see
# `scaled_matmul.is_aligned`) are loaded element by element, which costs registers: those calls take
# the list's last (smallest) tile only (`pick_config`). Every entry fits sm_90 (227 KB) and sm_80
# (163 KB) without register spills for fp32 and bf16 operands in the three layouts, the last entry
# also for unaligned ones: checked by `altgrad.compile_check` (Triton 3.9 and 3.6: at most 183
# registers per thread aligned, 152 unaligned; at most 56 KB shared memory). Tried and dropped (spills): K steps of 64 and
# 128 with fp32 operands at 64 x 64 and larger tiles; 128 x 128 tiles with 8 warps (2-4 stages);
# 64 x 128 with 4 warps or 64 x 128 at any warp count on unaligned fp32 (252-255 registers, no margin).
BLOCK_SCALED_CONFIGS = {
    16: [MatmulConfig(64, 128, 16, 3, 8), MatmulConfig(64, 64, 16, 4, 8)],
    32: [MatmulConfig(64, 128, 32, 3, 8), MatmulConfig(64, 64, 32, 3, 8)],
}
_MAX_K_STEP = 32  # the longest K step (fp32 tiles staged in shared memory: register pressure)
# at least this many output tiles for one full wave (an H100/H200 has 132 SMs), as scaled_matmul
_WAVE_TILES = 128
_GROUP_M = 8
INT32_LIMIT = 2**31  # element offsets at or past this need 64-bit index math


def k_step(block_a: int | None, block_b: int | None) -> int:
    """BLOCK_K for a call: the smaller block size among the block-scaled operands (None: not
    block-scaled), at most 32; 32 when neither is. Block sizes are powers of two, so the step
    divides every block: each step lies inside one block of each operand."""
    blocks = [b for b in (block_a, block_b) if b is not None]
    return min(blocks + [_MAX_K_STEP])


def allowed_configs(step: int, aligned: bool = True) -> list[MatmulConfig]:
    """The tiles a call may run: BLOCK_SCALED_CONFIGS[step], only its last for unaligned operands."""
    configs = BLOCK_SCALED_CONFIGS[step]
    return configs if aligned else configs[-1:]


def pick_config(step: int, M: int, N: int, aligned: bool = True) -> MatmulConfig:
    """The tile for an (M, N) output with K step `step`, a pure function of the shape and operand
    alignment (no timing): the largest of `allowed_configs` giving >= 128 output tiles, else the
    smallest. So a shape always accumulates in the same order, in every process."""
    configs = allowed_configs(step, aligned)
    for cfg in configs:
        if triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n) >= _WAVE_TILES:
            return cfg
    return configs[-1]


# ---------------------------------------------------------------------------------------------
# host code
_DTYPES = (torch.float32, torch.bfloat16)


def _check_scale(inv, name: str, block, rows: int, K: int, dev):
    """(kind, block along K or None, a 2-D fp32 view (rows, nb) with strides) for one operand's
    inverse scales; raises ValueError naming the problem."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block_{name} must be None or a positive int (got {block!r})")
    if inv is None:
        if block is not None:
            raise ValueError(f"block_{name} = {block} needs inv_scale_{name} (got None)")
        return SCALE_NONE.value, None, None
    if not isinstance(inv, torch.Tensor) or inv.dtype != torch.float32:
        raise ValueError(f"inv_scale_{name} must be a float32 tensor (got {getattr(inv, 'dtype', type(inv))})")
    if inv.device != dev:
        raise ValueError(f"inv_scale_{name} is on {inv.device} but the operands are on {dev}")
    if inv.dim() < 2:  # one inverse scale for the whole operand
        if inv.numel() != 1:
            raise ValueError(f"inv_scale_{name} must be one value per tensor (0-dim or (1,)) or ({rows}, nb) "
                             f"per block (got shape {tuple(inv.shape)})")
        if block is not None:
            raise ValueError(f"block_{name} must be None with a per-tensor inv_scale_{name} (got {block})")
        return SCALE_ROW.value, None, inv.reshape(1, 1).expand(rows, 1)
    bs = K if block is None or block >= K else block
    if bs != K and bs not in BLOCK_SIZES:
        raise ValueError(f"block_{name} must be one of {BLOCK_SIZES}, at least K = {K} (one block per row) "
                         f"or None (row-wise) (got {block})")
    nb = -(-K // bs) if K else 0
    if inv.dim() != 2 or tuple(inv.shape) != (rows, nb):
        raise ValueError(f"inv_scale_{name} must be ({rows}, {nb}): one inverse scale per row and block of "
                         f"{bs} elements of K = {K} (got shape {tuple(inv.shape)})")
    if nb <= 1:
        return SCALE_ROW.value, None, inv
    return SCALE_BLOCK.value, bs, inv


def block_scaled_matmul(a: torch.Tensor, b: torch.Tensor, inv_scale_a: torch.Tensor | None = None,
                        inv_scale_b: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                        block_a: int | None = None, block_b: int | None = None,
                        out_dtype: torch.dtype = torch.float32, config: MatmulConfig | None = None) -> torch.Tensor:
    """C (M, N) = sum over blocks kb of K of (A[:, kb] @ B[:, kb]^T) * inv_a[:, kb] * inv_b[:, kb] (+ bias).

    a: (M, K), b: (N, K): format-domain values (each exact in bf16), float32 or bfloat16, any strides,
    on one CUDA device (or the CPU under TRITON_INTERPRET=1).
    inv_scale_a: float32 (M, nb_a) with nb_a = ceil(K / block_a): one inverse scale per row and block
    of block_a elements of K (block_a in 16, 32, 64, 128; None or >= K: one per row, nb_a = 1); or a
    0-dim / (1,) tensor (per tensor, block_a None); or None (unscaled). The same for b with (N, nb_b).
    bias: (N,) float32 / bfloat16 or None. out_dtype: torch.float32 or torch.bfloat16 (rounded to
    nearest even). config: one of `allowed_configs(k_step(...), aligned)` instead of `pick_config`'s
    (GPU; unaligned operands, as `scaled_matmul.is_aligned` and M, N, K multiples of 16 decide, take
    the smallest tile only).
    Under TRITON_INTERPRET one 32 x 32 tile is used.

    Returns: C (M, N) in out_dtype, in the units of the dequantized operands (A * inv_a expanded over
    each block, times B * inv_b), fp32-accumulated.

    Raises:
        ValueError: a or b not 2-D, K differing, a dtype other than float32 / bfloat16, tensors on
            different devices or a device the kernel cannot run on, a block size outside 16 / 32 /
            64 / 128 (and below K), an inverse-scale tensor of the wrong shape or dtype, a bad bias,
            out_dtype or config.
    """
    for t, name in ((a, "a"), (b, "b")):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (got {getattr(t, 'shape', type(t))})")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be float32 or bfloat16 format-domain values (got {t.dtype})")
    (M, K), (N, Kb) = a.shape, b.shape
    if K != Kb:
        raise ValueError(f"a is (M, K) = {tuple(a.shape)} and b must be (N, K) with the same K (got {tuple(b.shape)})")
    dev = a.device
    if b.device != dev:
        raise ValueError(f"a is on {dev} but b is on {b.device}")
    check_device(a, "a")
    kind_a, bs_a, inv_a = _check_scale(inv_scale_a, "a", block_a, M, K, dev)
    kind_b, bs_b, inv_b = _check_scale(inv_scale_b, "b", block_b, N, K, dev)
    if out_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out_dtype must be torch.float32 or torch.bfloat16 (got {out_dtype})")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (N,) or bias.device != dev
                             or bias.dtype not in _DTYPES):
        raise ValueError(f"bias must be a float32 / bfloat16 tensor of shape ({N},) on {dev} (got "
                         f"{getattr(bias, 'shape', type(bias))} {getattr(bias, 'dtype', '')})")
    step = k_step(bs_a, bs_b)
    # the masks' bounds M, N, K decide vector loads as much as the strides (as in scaled_matmul)
    aligned = is_aligned(a, b, *([bias] if bias is not None else [])) and M % 16 == N % 16 == K % 16 == 0
    allowed = allowed_configs(step, aligned)
    if config is not None and (_INTERPRET or config not in allowed):
        raise ValueError(f"config must be one of {allowed} (K step {step}, {'' if aligned else 'un'}aligned operands) "
                         f"on the GPU (got {config!r}{'; the interpreter uses one fixed tile' if _INTERPRET else ''})")

    c = torch.empty((M, N), dtype=out_dtype, device=dev)
    if M == 0 or N == 0:
        return c
    if K == 0:  # an empty sum: the bias (or zeros), as torch's matmul gives
        c.copy_(bias.float().expand(M, N) if bias is not None else torch.zeros((M, N), device=dev))
        return c
    # unscaled operands read a placeholder they never load from
    inv_a = inv_a if inv_a is not None else c
    inv_b = inv_b if inv_b is not None else c
    bias_arg = bias.contiguous() if bias is not None else c
    idx64 = max(_max_offset(a), _max_offset(b), _max_offset(c), _max_offset(inv_a), _max_offset(inv_b)) >= INT32_LIMIT
    cfg = MatmulConfig(32, 32, step, 1, 1) if _INTERPRET else (config or pick_config(step, M, N, aligned))
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
    _block_scaled_matmul_kernel[grid](
        a, b, c, bias_arg, inv_a, inv_b, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        c.stride(0), c.stride(1), inv_a.stride(0), inv_a.stride(1), inv_b.stride(0), inv_b.stride(1),
        SCALE_A=kind_a, SCALE_B=kind_b, BLOCK_A=bs_a or 1, BLOCK_B=bs_b or 1,
        DOT_DTYPE=tl.float32 if _INTERPRET else tl.bfloat16, HAS_BIAS=bias is not None,
        OUT_BF16=out_dtype == torch.bfloat16, IDX64=idx64,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=_GROUP_M,
        num_stages=cfg.num_stages, num_warps=cfg.num_warps)
    return c


def _max_offset(t: torch.Tensor) -> int:
    """Largest element offset the kernel may form for a 2-D tensor: rows and columns rounded up by
    a tile (masked lanes compute their offsets too)."""
    return sum((n + 256) * abs(st) for n, st in zip(t.shape, t.stride()))


def block_scaled_matmul_ref(a, b, inv_scale_a=None, inv_scale_b=None, bias=None, *, block_a=None, block_b=None,
                            out_dtype=torch.float32) -> torch.Tensor:
    """Same contract as `block_scaled_matmul`, in float64 torch: each operand dequantized (its
    inverse scales repeated over their blocks), multiplied, the bias added, rounded to out_dtype."""
    def dequant(t, inv, block):
        t = t.double()
        if inv is None:
            return t
        if inv.dim() < 2:
            return t * inv.double().reshape(())
        bs = t.shape[1] if block is None or block >= t.shape[1] else block
        return t * inv.double().repeat_interleave(bs, 1)[:, :t.shape[1]]

    c = dequant(a, inv_scale_a, block_a) @ dequant(b, inv_scale_b, block_b).T
    if bias is not None:
        c = c + bias.double()
    return c.to(out_dtype)


# ---------------------------------------------------------------------------------------------
# self-check and benchmark
def _self_check(device) -> bool:
    g = torch.Generator().manual_seed(0)
    M, N, K = 37, 53, 150

    def operand(rows, block):  # E4M3-like values (bf16-exact) and fp32 per-block inverse scales
        q = torch.randint(-448, 449, (rows, K), generator=g).float()
        q = q.to(torch.bfloat16).float()
        nb = -(-K // block) if block else 1
        inv = torch.rand(rows, nb, generator=g) * torch.exp2(torch.randint(-10, 10, (rows, nb), generator=g).float())
        return q.to(device), inv.to(device)

    (qa, ia), (qb, ib) = operand(M, 16), operand(N, 32)
    (qx, ix), (qw, iw) = operand(M, None), operand(N, 64)
    bias = torch.randn(N, generator=g).to(device)
    cases = {
        "fwd blocks 16 x 32 +bias": dict(a=qa, b=qb, inv_scale_a=ia, inv_scale_b=ib, block_a=16, block_b=32,
                                         bias=bias),
        "dgrad (B a view)": dict(a=qa, b=qb.t().contiguous().t(), inv_scale_a=ia, inv_scale_b=ib, block_a=16,
                                 block_b=32),
        "wgrad (views)": dict(a=qa.t().contiguous().t(), b=qb.t().contiguous().t(), inv_scale_a=ia,
                              inv_scale_b=ib, block_a=16, block_b=32),
        "row x block 64": dict(a=qx, b=qw, inv_scale_a=ix, inv_scale_b=iw, block_b=64),
    }
    ok = True
    for name, kw in cases.items():
        got, ref = block_scaled_matmul(**kw).double(), block_scaled_matmul_ref(**kw).double()
        err = ((got - ref).norm() / ref.norm()).item()
        ok &= err <= 1e-6
        print(f"{name:<26} rel err {err:.2e} {'ok' if err <= 1e-6 else 'FAIL'}")
    return ok


def _benchmark() -> None:
    shapes = [(3072, 1536, 384), (3072, 384, 1536), (4096, 4096, 4096)]  # (M, N, K)
    for M, N, K in shapes:
        a = torch.randn(M, K, device="cuda").to(torch.bfloat16)
        b = torch.randn(N, K, device="cuda").to(torch.bfloat16)
        tflops = lambda ms: 2 * M * N * K / ms / 1e9  # noqa: E731
        line = f"M={M} N={N} K={K}: torch bf16 {tflops(triton.testing.do_bench(lambda: a @ b.T)):.0f}"
        for bs in (32, 128):
            ia = torch.ones(M, triton.cdiv(K, bs), device="cuda")
            ib = torch.ones(N, triton.cdiv(K, bs), device="cuda")
            ms = triton.testing.do_bench(lambda: block_scaled_matmul(a, b, ia, ib, block_a=bs, block_b=bs))
            line += f" | block {bs} {tflops(ms):.0f}"
        print(line + " TFLOP/s")


if __name__ == "__main__":
    run_self_check(_self_check, _benchmark)
