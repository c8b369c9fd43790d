"""QuantizedLinear: an nn.Linear whose three matmuls run on simulated-format operands (DESIGN §5).

    y  = (Q_i(x·s_i) @ Q_w(W·s_w)^T) · inv_s_i · inv_s_w + b
    dx = (Q_g(dy·s_g) @ Q_w(W·s_w))  · inv_s_g · inv_s_w
    dW = (Q_g(dy·s_g)^T @ Q_i(x·s_i)) · inv_s_g · inv_s_i          (optionally Q_wg(dW) afterwards)
    db = sum(dy)                                                  (not quantized)

Q_r(·) are format-domain values (x·scale rounded), exact in bf16, so the products are exact and
only fp32 accumulation order differs between backends. A role whose format is None is
high precision (passed through in fp32). Decisions written down here:

- Backends. "triton" (CUDA, or CPU under TRITON_INTERPRET=1) casts each operand once with
  kernels/quantize.py — which also yields the role's stats in the same pass — and multiplies with
  kernels/scaled_matmul.py; "torch" is the reference (altgrad.quantize) with fp32 matmuls; "auto"
  is triton on CUDA tensors when all three operand roles have a format, else torch.
- Cast-then-matmul vs in-loop quantization: in training each quantized operand is used twice
  (forward and a backward product) and the cast pass gives the exact stats and the amax for
  delayed scaling, so training always casts once. In-loop quantization re-rounds each tile once
  per N-tile, which only pays when the operand is used once and no stats are wanted: evaluation
  forwards (module.eval() under no_grad) use it for the input. GPU measurements that would refine
  this per shape are still owed (benchmarks/RESULTS.md).
- Saved for backward are the quantized operands (bf16 format-domain values) and 0-dim scales.
- The quantized weight is cached and recomputed only when the Parameter changes (its version
  counter or storage), i.e. once per optimizer step, however many micro-batches run.
- Scaling state (delayed histories and last scales) is updated by training-mode calls only, so
  evaluation frequency does not change the training trajectory.
- Accumulation headroom: E7M0 values reach 2**62, so a product of two reaches 2**124 and an fp32
  sum of 16 overflows. Operands of formats whose max exceeds 2**52 are therefore carried as
  q·2**-k (k = log2(max) - 52, 10 for E7M0): rounding x·scale·2**-k to the same format with bias + k
  gives exactly q·2**-k, and inv_scale·2**k undoes it in the epilogue. Rounding, stats and results
  are unchanged; products stay inside fp32 (2**-146 .. 2**104 for E7M0 x E7M0, K < 2**23).
- Stats per role, kept on device (no host sync): amax, scale, overflow, underflow, nan, nonzero
  (0-dim tensors), numel (an int) and, when `full_stats` is on, rel_err = ||Q(x)·inv_s - x|| / ||x||.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import nn

from altgrad.config import LayerQuantConfig, RoleConfig
from altgrad.formats import FormatSpec
from altgrad.linear_blockwise import blockwise_linear, needs_blockwise
from altgrad.quantize import QuantStats, _round, kernel_seed, stats_from_masks
from altgrad.scaling import TensorScaler

__all__ = ["QuantizedLinear", "round_master_weights", "set_full_stats"]

OPERAND_ROLES = ("input", "weight", "grad_output")
BACKENDS = ("auto", "torch", "triton")


# -- one operand: cast to the format-domain (bf16) + stats -----------------------------------
_HEADROOM_LOG2 = 52  # operands are carried below 2**52 so fp32 sums of their products stay finite


def _accumulation_domain(rc: RoleConfig) -> tuple[RoleConfig, int]:
    """(rc rounding to its format with bias + k, k): the same rounding, values carried 2**-k lower
    (see the module docstring)."""
    fmt = rc.format
    k = max(0, math.ceil(math.log2(fmt.max)) - _HEADROOM_LOG2)
    if k == 0:
        return rc, 0
    shifted = FormatSpec(f"{fmt.name}>>{k}", fmt.exp_bits, fmt.man_bits, fmt.bias + k, fmt.specials)
    return dataclasses.replace(rc, format=shifted), k


def _cast_torch(x2: torch.Tensor, rc: RoleConfig, scale: torch.Tensor):
    v = x2.float() * scale
    q, overflow, nan = _round(v, rc.format, rc.rounding, rc.saturate, None)
    return q.to(torch.bfloat16), stats_from_masks(x2, v, q, overflow, nan)


def _cast_triton(x2: torch.Tensor, rc: RoleConfig, scale: torch.Tensor, inv_scale: torch.Tensor):
    from altgrad.kernels import quantize as kq

    f = rc.format
    seed = kernel_seed(rc.rounding)
    res = kq.quantize(x2, scale, inv_scale=inv_scale, exp_bits=f.exp_bits, man_bits=f.man_bits, bias=f.bias,
                      specials=f.specials, rounding=rc.rounding, saturate=rc.saturate, seed=seed,
                      out_q=True, out_dq=False, stats=True)
    return res.q, QuantStats(res.amax, *res.counts.unbind(0))


def _matmul_torch(a, b, inv_a, inv_b, bias, out_dtype):
    """(a @ b^T) · inv_a · inv_b (+ bias), fp32 accumulation; a, b may be any strided views."""
    c = a.float() @ b.float().t()
    if inv_a is not None:
        c = c * inv_a
    if inv_b is not None:
        c = c * inv_b
    if bias is not None:
        c = c + bias.float()
    return c.to(out_dtype)


def _matmul_triton(a, b, inv_a, inv_b, bias, out_dtype, **in_loop):
    from altgrad.kernels import scaled_matmul as ksm

    kernel_dtype = torch.bfloat16 if out_dtype == torch.bfloat16 else torch.float32
    return ksm.scaled_matmul(a, b, inv_a, inv_b, bias=bias, out_dtype=kernel_dtype, **in_loop).to(out_dtype)


# -- the autograd function ---------------------------------------------------------------------
class _QuantizedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mod: "QuantizedLinear"):
        out_dtype = _output_dtype(x)
        # the products below are exact fp32 work on format-domain values: autocast must not
        # turn them into bf16 matmuls (the output is cast to the autocast dtype at the end)
        with torch.autocast(x.device.type, enabled=False):
            return _QuantizedLinearFn._forward(ctx, x, bias, mod, out_dtype)

    @staticmethod
    def _forward(ctx, x, bias, mod, out_dtype):
        x2 = x.reshape(-1, x.shape[-1])
        triton = mod._use_triton(x)
        q_w, inv_w = mod._quantized_weight(triton)
        if triton and not mod.training and not torch.is_grad_enabled():
            # evaluation: the input is used once and needs no stats, so quantize it in the loop
            y = mod._in_loop_forward(x2, q_w, inv_w, bias, out_dtype)
            return y.reshape(*x.shape[:-1], y.shape[-1])
        q_i, inv_i = mod._operand("input", x2, triton)
        mm = _matmul_triton if triton else _matmul_torch
        y = mm(q_i, q_w, inv_i, inv_w, bias, out_dtype)
        ctx.save_for_backward(q_i, q_w, inv_i, inv_w)
        ctx.mod, ctx.triton, ctx.has_bias = mod, triton, bias is not None
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _QuantizedLinearFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        q_i, q_w, inv_i, inv_w = ctx.saved_tensors
        mod, triton = ctx.mod, ctx.triton
        dy2 = dy.reshape(-1, dy.shape[-1])
        q_g, inv_g = mod._operand("grad_output", dy2, triton)
        mm = _matmul_triton if triton else _matmul_torch
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx (M, in) = Q_g (M, out) @ Q_w (out, in): B = Q_w^T as a strided view
            dx = mm(q_g, q_w.t(), inv_g, inv_w, None, ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # dW (out, in) = Q_g^T (out, M) @ Q_i (M, in): A = Q_g^T, B = Q_i^T as views
            dw = mm(q_g.t(), q_i.t(), inv_g, inv_i, None, torch.float32)
            dw = mod._quantize_weight_grad(dw).to(mod.weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(mod.bias.dtype)
        return dx, dw, db, None


def _output_dtype(x: torch.Tensor) -> torch.dtype:
    """What nn.Linear would return: the autocast dtype inside autocast, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# -- the module --------------------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """Wraps an nn.Linear's own Parameters (optimizer state, weight tying and shadow models stay
    attached); the original module stays reachable as `.linear` for dequantize_model."""

    def __init__(self, linear: nn.Linear, layer_config: LayerQuantConfig, name: str = "", backend: str = "auto"):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"QuantizedLinear wraps an nn.Linear (got {type(linear).__name__})")
        if not isinstance(layer_config, LayerQuantConfig):
            raise TypeError(f"layer_config must be a LayerQuantConfig (got {type(layer_config).__name__})")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} (got {backend!r})")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter objects, under the same state_dict keys
        self.bias = linear.bias
        object.__setattr__(self, "linear", linear)  # not a submodule: no duplicate parameter names
        self.layer_config, self.name, self.backend = layer_config, name, backend
        roles = {r: getattr(layer_config, r) for r in (*OPERAND_ROLES, "weight_grad")}
        self.role_configs = {r: rc for r, rc in roles.items() if rc is not None}
        # the format each operand is rounded in for the matmul, and its power-of-two shift
        self._domains = {r: _accumulation_domain(rc) for r, rc in self.role_configs.items()
                         if r in OPERAND_ROLES}
        self.scalers = nn.ModuleDict({
            r: TensorScaler(rc.format, rc.scaling, rc.history_len, rc.amax_algo, rc.margin, rc.pow2)
            for r, rc in self.role_configs.items()
        }).to(linear.weight.device)
        if layer_config.master_weights is not None:
            # a power-of-two scale: the grid moves only when amax crosses a binade, not on every step
            self.master_scaler = TensorScaler(layer_config.master_weights, "current", pow2=True).to(linear.weight.device)
        self.full_stats = True
        self.stats: dict[str, dict[str, torch.Tensor]] = {}
        self._weight_cache = None
        self._warned_fallback = False

    @property
    def formats(self) -> dict[str, FormatSpec | None]:
        return {r: (rc.format if (rc := getattr(self.layer_config, r)) else None)
                for r in (*OPERAND_ROLES, "weight_grad")}

    # -- backend choice --
    def _use_triton(self, x: torch.Tensor) -> bool:
        all_roles = all(r in self.role_configs for r in OPERAND_ROLES)
        if self.backend == "torch":
            return False
        if self.backend == "triton":
            if not all_roles:
                raise ValueError(f"{self.name or 'QuantizedLinear'}: backend='triton' needs a format for every "
                                 f"operand role (input, weight, grad_output); use backend='auto' or 'torch'")
            return True
        if x.is_cuda and not all_roles and not self._warned_fallback:
            warnings.warn(f"{self.name or 'QuantizedLinear'}: a high-precision role runs on the torch path "
                          f"(the Triton path needs every operand role quantized)", stacklevel=3)
            self._warned_fallback = True
        return x.is_cuda and all_roles

    # -- operands --
    def _operand(self, role: str, x2: torch.Tensor, triton: bool):
        """(format-domain operand, inv_scale) for role, updating its scaler and stats."""
        rc = self.role_configs.get(role)
        if rc is None:
            return x2, None
        scaler = self.scalers[role]
        scale, inv_scale = scaler.scale_for(x2, update=self.training)
        rc, k = self._domains.get(role, (rc, 0))
        # exact power-of-two shifts (k = 0 but for huge formats): the same rounding, carried 2**-k lower
        q_scale, q_inv = (scale * 2.0**-k, inv_scale * 2.0**k) if k else (scale, inv_scale)
        q, st = _cast_triton(x2, rc, q_scale, q_inv) if triton else _cast_torch(x2, rc, q_scale)
        if self.training:
            scaler.observe(st.amax)
        self._record(role, x2, q, st, scale, q_inv)
        return q, q_inv

    def _quantized_weight(self, triton: bool):
        w = self.weight
        # training mode is part of the key: the first training call after an eval must still push
        # this step's weight amax into the delayed history (eval calls never do)
        key = (w._version, w.data_ptr(), w.device, triton, self.training)
        if self._weight_cache is None or self._weight_cache[0] != key:
            q, inv = self._operand("weight", w.detach(), triton)
            self._weight_cache = (key, q, inv)
        return self._weight_cache[1], self._weight_cache[2]

    def _in_loop_forward(self, x2, q_w, inv_w, bias, out_dtype):
        rc, k = self._domains["input"]
        f = rc.format
        if rc.rounding != "nearest" or not rc.saturate:  # the in-loop path rounds nearest, saturating
            q_i, inv_i = self._operand("input", x2, True)
            return _matmul_triton(q_i, q_w, inv_i, inv_w, bias, out_dtype)
        scale, inv_i = self.scalers["input"].scale_for(x2, update=False)
        scale, inv_i = scale * 2.0**-k, inv_i * 2.0**k
        return _matmul_triton(x2, q_w, inv_i, inv_w, bias, out_dtype,
                              fmt_a=(f.exp_bits, f.man_bits, f.bias, f.specials), scale_a=scale)

    def _quantize_weight_grad(self, dw: torch.Tensor) -> torch.Tensor:
        rc = self.role_configs.get("weight_grad")
        if rc is None:
            return dw
        q, inv = self._operand("weight_grad", dw, triton=False)
        return q.float() * inv

    def _record(self, role, x2, q, st, scale, inv_scale):
        stats = {"amax": st.amax, "scale": scale, "overflow": st.overflow, "underflow": st.underflow,
                 "nan": st.nan, "nonzero": st.nonzero, "numel": x2.numel()}  # numel: known on the host
        if self.full_stats:
            x32 = x2.detach().float()
            err = torch.linalg.vector_norm(q.float() * inv_scale - x32)
            stats["rel_err"] = err / torch.linalg.vector_norm(x32).clamp(min=torch.finfo(torch.float32).tiny)
        self.stats[role] = stats

    # -- forward --
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'QuantizedLinear'}: input has {x.shape[-1]} features, "
                             f"expected in_features={self.in_features}")
        if not (x.is_floating_point() and x.device == self.weight.device):
            raise ValueError(f"{self.name or 'QuantizedLinear'}: input must be a float tensor on "
                             f"{self.weight.device} (got {x.dtype} on {x.device})")
        if not any(r in self.role_configs for r in OPERAND_ROLES) and "weight_grad" not in self.role_configs:
            return self.linear(x)
        # -- row / block scales: each GEMM casts along its own K (altgrad/linear_blockwise.py) --
        if needs_blockwise(self.role_configs):
            return blockwise_linear(x, self.weight, self.bias, self)
        return _QuantizedLinearFn.apply(x, self.weight, self.bias, self)

    @torch.no_grad()
    def round_master_weights(self) -> None:
        """Store the weights themselves in the master-weights format (call after optimizer.step())."""
        fmt = self.layer_config.master_weights
        if fmt is None:
            return
        w = self.weight
        scale, inv = self.master_scaler.scale_for(w)
        q, _, _ = _round(w.float() * scale, fmt, self.layer_config.master_rounding, True, None)
        w.copy_((q * inv).to(w.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.layer_config.describe()}"


def round_master_weights(model: nn.Module) -> None:
    """Apply every QuantizedLinear's master-weights format (a no-op where none is set)."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.round_master_weights()


def set_full_stats(model: nn.Module, enabled: bool) -> None:
    """Turn rel_err (an extra pass per operand) on for logging steps, off otherwise."""
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.full_stats = enabled
