"""QuantizedLinear's products when any operand role has row or block scales.

Each of the three GEMMs quantizes its operands along its own reduction dimension K, as MX
training does (Rouhani et al. 2023; Mishra et al. 2025), so an operand used twice is cast twice:

    forward  y  = x  · W^T     A = x  (T, in),   B = W   (out, in)   K = in_features
    dgrad    dx = dy · W       A = dy (T, out),  B = W^T (in, out)   K = out_features
    wgrad    dW = dy^T · x     A = dy^T (out, T), B = x^T (in, T)    K = tokens
    db = sum(dy)  (not quantized); weight_grad, when set, is applied to dW afterwards

A role with granularity "tensor" keeps its per-tensor scale (QuantizedLinear's own scaler,
delayed or current), is cast once and reused transposed; a high-precision role passes through.
Saved for backward: the high-precision x and W (each backward use re-casts along its K) and
the forward's per-tensor casts.

Products (`blockwise_matmul`): every value q·2**X of an e8m0-scaled operand is exact in fp32, so
those operands are dequantized first and multiplied as plain values. fp32 row scales factor out
of the sum (epilogue inv_a[m]·inv_b[n]); fp32 block scales do not, so the product is a sum of
per-block partial products, each scaled by its two blocks' inv_scales (chunks of the smaller
block size when the two differ). All in fp32 with fp32 accumulation: results equal a float64
product of the same quantized operands up to accumulation order. That torch product is the
reference. On CUDA (backend "auto"; the layer's backend "auto" or "triton") the products run in
kernels/block_scaled_matmul.py instead: the operands unfolded, each K step's partial product scaled
by its blocks' inv_scales (exact for e8m0 scales, correct for fp32 ones), row and per-tensor
scales in the epilogue; equal to the reference up to fp32 accumulation order. A high-precision
operand (no inv_scale: not format-domain values), a block size outside 16/32/64/128, or an
e8m0-scaled operand of a format reaching 2**HEADROOM_LOG2 (E7M0: its unscaled products overflow the
kernel's fp32 partial sums) keeps the torch product on every device.

E7M0-range formats with fp32 scales are rounded in the same format with bias + k (values carried
2**-k lower, k = ceil(log2 max) - 52) so fp32 sums of products stay finite, as the per-tensor path
does; e8m0 operands are dequantized to their true magnitudes and need no headroom.

Stats per use: the first use of each role ("input", "weight": forward; "grad_output": dgrad) goes
into QuantizedLinear's stats buffer for the role (so `mod.stats` and the metrics read it); every
use, the second ones ("input:wgrad", "weight:dgrad", "grad_output:wgrad") included, is in
`mod.blockwise_stats[use]`. `scale` is the median block scale; the other fields are as for
per-tensor roles. Stochastic rounding draws from a generator keyed by the layer's sr_state and the
use (never the global RNG); the weight is cast at every forward (weight_cache does not apply).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from altgrad.blockwise import expand_scales, quantize_blockwise_cast
from altgrad.config import RoleConfig
from altgrad.formats import FormatSpec
from altgrad.scaling import relative_error
from altgrad.vocabulary import STAT_FIELDS, StatsLevel, stat_fields

__all__ = ["blockwise_linear", "blockwise_matmul", "needs_blockwise", "weight_block_scales", "MATMUL_BACKENDS"]

HEADROOM_LOG2 = 52  # operands are carried below 2**52 so fp32 sums of their products stay finite


class Operand(NamedTuple):
    """A GEMM operand as (rows, K): format-domain values q (fp32) and its inv_scale: None (high
    precision or already dequantized), a 0-dim tensor (per tensor) or (rows, nb) per block of
    `block` elements of K (nb = 1: per row)."""

    q: torch.Tensor
    inv: torch.Tensor | None
    block: int

    def t(self) -> "Operand":
        """The transposed operand, for a per-tensor (or unscaled) cast reused in the other GEMM."""
        assert self.inv is None or self.inv.dim() == 0, "only per-tensor casts are reused transposed"
        return Operand(self.q.t(), self.inv, self.q.shape[0])


def needs_blockwise(role_configs: dict[str, RoleConfig]) -> bool:
    """True when any role of a layer has row or block scales."""
    return any(rc.granularity != "tensor" for rc in role_configs.values())


# -- casts ---------------------------------------------------------------------------------------
def accumulation_domain(fmt: FormatSpec) -> FormatSpec:
    """The format an operand of fmt is rounded to so a GEMM's fp32 sums stay finite: fmt itself
    when fmt.max < 2**HEADROOM_LOG2, else fmt with its bias raised by k (values scaled by 2**-k,
    named "<fmt>>>k"); the GEMM multiplies the 2**k back in through inv_scale. Used by
    QuantizedLinear's per-tensor casts and the fp32-scaled block casts here."""
    k = max(0, math.ceil(math.log2(fmt.max)) - HEADROOM_LOG2)
    return fmt if k == 0 else FormatSpec(f"{fmt.name}>>{k}", fmt.exp_bits, fmt.man_bits, fmt.bias + k, fmt.specials)


def _domain(rc: RoleConfig) -> FormatSpec:
    # E8M0 block scales are powers of two with their own range: no shift needed
    return accumulation_domain(rc.format) if rc.scale_format == "fp32" else rc.format


_USES = ("input", "weight", "grad_output", "weight_grad", "input:wgrad", "weight:dgrad", "grad_output:wgrad")


def _generator(mod, role: str, use: str, device) -> torch.Generator:
    """Stochastic-rounding draws keyed by the layer's sr_state (base seed, training-forward count)
    and the use, as QuantizedLinear's per-tensor casts are: the global RNG is never touched."""
    seed = (mod.role_seed(role) * len(_USES) + _USES.index(use)) % (2**63 - 1)
    return torch.Generator(device).manual_seed(seed)


def _block_cast(mod, rc: RoleConfig, use: str, mat: torch.Tensor, block_2d: bool):
    """Blockwise cast of mat (rows, K) along K; records stats under `use`. Returns (q, inv, block)
    with inv per (tile-row, K-block) for 2-D tiles, else (rows, nb)."""
    bs = rc.block_size if rc.granularity == "block" else None
    role = use.split(":")[0]
    gen = _generator(mod, role, use, mat.device) if rc.rounding == "stochastic" else None
    c = quantize_blockwise_cast(mat, _domain(rc), bs, scale_format=rc.scale_format,
                                scale_rounding=rc.scale_rounding, rounding=rc.rounding, saturate=rc.saturate,
                                block_2d=block_2d, generator=gen, backend=_cast_backend(mod, gen),
                                masks=False)
    _record(mod, use, mat, c, lambda: expand_scales(c.inv_scale, mat.shape, -1, bs, block_2d))
    return c.q, c.inv_scale, bs or mat.shape[1]


def _cast_backend(mod, generator) -> str:
    """The layer's backend ("torch" is the reference everywhere); stochastic rounding draws from a
    torch.Generator, which only the reference takes."""
    return "torch" if generator is not None or mod.backend == "torch" else mod.backend


def _record(mod, use, mat, c, inv_full) -> None:
    """Stats of one use in QuantizedLinear's field order (amax, scale, overflow, underflow, nan,
    nonzero, numel, rel_err): a role's first use into its stats buffer (so `mod.stats` and the
    metrics see it), every use into `mod.blockwise_stats[use]`. Counted in the cast's own pass
    when it gives them (`c.stats`), else from its masks."""
    x = mat.detach().float()
    dev = x.device
    level = mod.stats_level
    if c.stats is not None:
        amax, counts = c.stats
        overflow, underflow, nan, nonzero = counts.unbind(0)
    else:
        amax = torch.where(c.nan, 0.0, x.abs()).amax() if x.numel() else torch.zeros((), device=dev)
        if level != StatsLevel.SCALE:
            nz = (x != 0) & ~c.nan
            overflow, underflow, nan, nonzero = c.overflow.sum(), (nz & (c.q == 0)).sum(), c.nan.sum(), nz.sum()
    if level == StatsLevel.SCALE:  # not recorded at this level: NaN, as in the per-tensor casts
        overflow = underflow = nan = nonzero = torch.full((), math.nan, device=dev)
    rel_err = torch.full((), math.nan, device=dev)
    if level == StatsLevel.FULL:
        rel_err = relative_error(x, c.q, inv_full(), amax)  # as the per-tensor casts
    values = (amax, c.scale.flatten().nanmedian() if c.scale.numel() else torch.ones((), device=dev),
              overflow, underflow, nan, nonzero, torch.tensor(x.numel(), device=dev), rel_err)
    vec = torch.stack([v.to(torch.float64) for v in values])
    if ":" not in use:
        getattr(mod, f"_stats_{use}").copy_(vec)
    if not hasattr(mod, "blockwise_stats"):
        mod.blockwise_stats = {}
    mod.blockwise_stats[use] = {f: vec[STAT_FIELDS.index(f)] for f in stat_fields(level)}


def _operand(mod, role: str, use: str, mat: torch.Tensor) -> Operand:
    """The operand for one use of `role`: mat (rows, K) cast along K (row / block roles)."""
    rc = mod.role_configs[role]
    q, inv, block = _block_cast(mod, rc, use, mat, block_2d=False)
    return Operand(q, inv, block)


def _weight_operands(mod, w: torch.Tensor) -> tuple[Operand, Operand | None]:
    """(forward operand W along in_features, dgrad operand W^T along out_features or None when
    it must be cast in backward). 2-D tiles serve both GEMMs from one cast."""
    rc = mod.role_configs.get("weight")
    if rc is None:
        return Operand(w.float(), None, w.shape[1]), Operand(w.float().t(), None, w.shape[0])
    if rc.granularity == "tensor":
        q, inv = _tensor_cast(mod, "weight", w)
        op = Operand(q, inv, w.shape[1])
        return op, op.t()
    if not rc.block_2d:
        return _operand(mod, "weight", "weight", w), None
    q, inv, bs = _block_cast(mod, rc, "weight", w, block_2d=True)
    fwd = Operand(q, inv.repeat_interleave(bs, 0)[: w.shape[0]], bs)
    dgrad = Operand(q.t(), inv.t().repeat_interleave(bs, 0)[: w.shape[1]], bs)
    mod.blockwise_stats["weight:dgrad"] = mod.blockwise_stats["weight"]  # one cast serves both uses
    return fwd, dgrad


def weight_block_scales(w: torch.Tensor, rc: RoleConfig) -> torch.Tensor:
    """The per-element scale (w's shape (out, in), fp32) of the forward GEMM's cast of w along
    in_features under rc's row / block scaling (2-D tiles with block_2d): what the bit-stall metric
    needs to tell whether an update moved a weight's code. Nearest-rounding casts, no state touched."""
    bs = rc.block_size if rc.granularity == "block" else None
    c = quantize_blockwise_cast(w, rc.format, bs, scale_format=rc.scale_format, scale_rounding=rc.scale_rounding,
                                saturate=rc.saturate, block_2d=rc.block_2d, masks=False)
    return expand_scales(c.scale, w.shape, -1, bs, rc.block_2d)


def _tensor_cast(mod, role: str, mat: torch.Tensor):
    """(q fp32, inv 0-dim) of a per-tensor role through QuantizedLinear's own cast (its scaler,
    delayed history and stats buffer)."""
    q, inv = mod.cast_tensor_role(role, mat)
    return q.float(), inv


def _role_operand(mod, role: str, use: str, mat: torch.Tensor) -> Operand:
    """Operand for a role that is high precision, per tensor (cast here) or row / block."""
    rc = mod.role_configs.get(role)
    if rc is None:
        return Operand(mat.float(), None, mat.shape[1])
    if rc.granularity == "tensor":
        q, inv = _tensor_cast(mod, role, mat)
        return Operand(q, inv, mat.shape[1])
    return _operand(mod, role, use, mat)


# -- products ------------------------------------------------------------------------------------
def _fold(op: Operand, pow2: bool) -> Operand:
    """Dequantize e8m0-scaled operands (exact: q·2**X is an fp32 number)."""
    if not pow2 or op.inv is None or op.inv.dim() == 0:
        return op
    k = op.q.shape[1]
    return Operand(op.q * op.inv.repeat_interleave(op.block, 1)[:, :k], None, op.block)


def _is_block(op: Operand) -> bool:
    return op.inv is not None and op.inv.dim() == 2 and op.inv.shape[1] > 1


def _epilogue(c: torch.Tensor, a: Operand, b: Operand) -> torch.Tensor:
    if a.inv is not None and not _is_block(a):
        c = c * (a.inv if a.inv.dim() == 0 else a.inv.reshape(-1, 1))
    if b.inv is not None and not _is_block(b):
        c = c * (b.inv if b.inv.dim() == 0 else b.inv.reshape(1, -1))
    return c


MATMUL_BACKENDS = ("auto", "torch", "triton")


def _kernel_operand(op: Operand):
    """(inv_scale, block) as kernels/block_scaled_matmul.py takes them, or None when the kernel
    cannot take the operand (high precision, or a block size it has no step for)."""
    from altgrad.kernels.block_scaled_matmul import BLOCK_SIZES

    if op.inv is None or op.q.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not _is_block(op):  # per tensor or per row: applied in the epilogue
        return op.inv.float(), None
    return (op.inv.float(), op.block) if op.block in BLOCK_SIZES else None


def blockwise_matmul(a: Operand, b: Operand, pow2_a: bool = False, pow2_b: bool = False,
                     backend: str = "auto") -> torch.Tensor:
    """C (M, N) = A (M, K) · B (N, K)^T of two scaled operands, fp32 (see the module docstring).

    pow2_x: x's row / block inv_scales are powers of two (e8m0), so the torch product dequantizes
    x first. backend: "torch" (the reference), "triton" (kernels/block_scaled_matmul.py: CUDA, or
    CPU under TRITON_INTERPRET=1) or "auto" (triton for CUDA operands it can take, else torch).

    Raises:
        ValueError: an unknown backend, or backend="triton" with an operand the kernel cannot take
            (no inv_scale, or a block size outside 16 / 32 / 64 / 128).
    """
    if backend not in MATMUL_BACKENDS:
        raise ValueError(f"backend must be one of {MATMUL_BACKENDS} (got {backend!r})")
    if backend == "triton" or (backend == "auto" and a.q.is_cuda):
        ka, kb = _kernel_operand(a), _kernel_operand(b)
        if ka is not None and kb is not None:
            from altgrad.kernels.block_scaled_matmul import block_scaled_matmul

            return block_scaled_matmul(a.q, b.q, ka[0], kb[0], block_a=ka[1], block_b=kb[1])
        if backend == "triton":
            raise ValueError("backend='triton' multiplies format-domain operands with inverse scales (per tensor, "
                             "row, or blocks of 16/32/64/128); use backend='torch' or 'auto' for the others")
    a, b = _fold(a, pow2_a), _fold(b, pow2_b)
    if not (_is_block(a) or _is_block(b)):
        return _epilogue(a.q @ b.q.t(), a, b)
    k = a.q.shape[1]
    g = min(op.block for op in (a, b) if _is_block(op))
    c = torch.zeros(a.q.shape[0], b.q.shape[0], dtype=torch.float32, device=a.q.device)
    for s in range(0, k, g):
        p = a.q[:, s:s + g] @ b.q[:, s:s + g].t()
        if _is_block(a):
            p = p * a.inv[:, s // a.block].reshape(-1, 1)
        if _is_block(b):
            p = p * b.inv[:, s // b.block].reshape(1, -1)
        c = c + p
    return _epilogue(c, a, b)


def _mm_backend(mod, role_a: str, role_b: str) -> str:
    """The product for one GEMM: the kernel where the layer's backend allows (auto, triton) and the
    operands are on CUDA; backends "torch" and "fast" keep the torch product, as their per-tensor
    matmuls do. So does a GEMM with an e8m0-scaled operand of a format reaching 2**HEADROOM_LOG2
    (E7M0): the kernel multiplies unscaled format values, whose products (up to 2**124) summed over a
    K step overflow fp32, while the torch product dequantizes e8m0 operands first."""
    if mod.backend not in ("auto", "triton"):
        return "torch"
    for role in (role_a, role_b):
        if _pow2(mod, role) and mod.role_configs[role].format.max >= 2.0**HEADROOM_LOG2:
            return "torch"
    return "auto"


def _pow2(mod, role: str) -> bool:
    rc = mod.role_configs.get(role)
    return rc is not None and rc.granularity != "tensor" and rc.scale_format == "e8m0"


# -- the autograd function -----------------------------------------------------------------------
class _BlockwiseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mod, out_dtype):
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: in_features may be 0
        w = weight.detach()
        a = _role_operand(mod, "input", "input", x2)
        b, b_dgrad = _weight_operands(mod, w)
        y = blockwise_matmul(a, b, _pow2(mod, "input"), _pow2(mod, "weight"),
                             _mm_backend(mod, "input", "weight"))
        if mod.training and x.numel() > 0:
            mod.sr_state[1] += 1  # one training forward: the next draws differ
        if bias is not None:
            y = y + bias.float()
        # per-tensor casts are reused transposed in backward; row / block roles re-cast x and W
        ctx.reuse_input = a.t() if a.inv is None or a.inv.dim() == 0 else None
        ctx.reuse_weight = b_dgrad
        ctx.save_for_backward(x2, w)
        ctx.mod, ctx.has_bias, ctx.x_shape, ctx.x_dtype = mod, bias is not None, x.shape, x.dtype
        return y.to(out_dtype).reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _BlockwiseLinearFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, w = ctx.saved_tensors
        mod = ctx.mod
        dy2 = dy.reshape(math.prod(dy.shape[:-1]), dy.shape[-1])
        go_tensor = "grad_output" not in mod.role_configs or mod.role_configs["grad_output"].granularity == "tensor"
        g_dgrad = _role_operand(mod, "grad_output", "grad_output", dy2)  # along out_features
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            b = ctx.reuse_weight or _operand(mod, "weight", "weight:dgrad", w.t())
            dx = blockwise_matmul(g_dgrad, b, _pow2(mod, "grad_output"), _pow2(mod, "weight"),
                                  _mm_backend(mod, "grad_output", "weight"))
            dx = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            a = g_dgrad.t() if go_tensor else _operand(mod, "grad_output", "grad_output:wgrad", dy2.t())
            b = ctx.reuse_input or _operand(mod, "input", "input:wgrad", x2.t())
            dw = blockwise_matmul(a, b, _pow2(mod, "grad_output"), _pow2(mod, "input"),
                                  _mm_backend(mod, "grad_output", "input"))
            dw = _quantize_weight_grad(mod, dw).to(w.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(mod.bias.dtype)
        return dx, dw, db, None, None


def _quantize_weight_grad(mod, dw: torch.Tensor) -> torch.Tensor:
    rc = mod.role_configs.get("weight_grad")
    if rc is None or dw.numel() == 0:
        return dw
    if rc.granularity == "tensor":
        q, inv = _tensor_cast(mod, "weight_grad", dw)
        return q * inv
    q, inv, bs = _block_cast(mod, rc, "weight_grad", dw, block_2d=False)
    return q * expand_scales(inv, dw.shape, -1, bs if rc.granularity == "block" else None)


def blockwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mod) -> torch.Tensor:
    """QuantizedLinear's forward when `needs_blockwise(mod.role_configs)`: y = x·W^T + b with each
    GEMM's operands scaled per row / block along its own K (module docstring). x: (..., in)."""
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):  # exact fp32 products; the output takes autocast's dtype
        return _BlockwiseLinearFn.apply(x, weight, bias, mod, out_dtype)
