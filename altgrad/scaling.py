"""Per-tensor scaling (docs/design.md §4), in the torchao / TransformerEngine convention:

    scale = fmt.max / amax / 2**margin       q = round_fmt(x * scale)       x ~ q * inv_scale

Computed scales stay in [2**-126, FLT_MAX], so both scale and inv_scale = 1 / scale are finite
normal fp32 numbers: a scale below 2**-126 (amax near FLT_MAX in a format whose max is below 1,
such as E0M7) is raised to 2**-126, which still saturates that amax at the format's max.

Modes: `delayed` (amax from an AmaxHistory of earlier steps; the first call, with an empty
history, uses the tensor's own amax), `current` (the tensor's own amax every call), `none`
(scale 1: the format's raw range). Edge rule from TransformerEngine: an amax that is 0 or not
finite — or a scale that would not be finite — keeps the previous scale.

Scales and histories are module buffers on the tensor's device (no host sync per step) and travel
in `state_dict()`, so checkpoints restore them exactly. Data parallel: each rank pushes its own
amaxes; `altgrad.linear.sync_amax_history` max-reduces the histories across the group (one
all-reduce), so every rank quantizes with the same scale, as TransformerEngine does by default.
"""

from __future__ import annotations

import torch
from torch import nn

from altgrad.formats import FormatSpec, get_format
from altgrad.vocabulary import AmaxAlgo, ScalingType, choices

__all__ = ["AmaxHistory", "TensorScaler", "compute_scale", "l2_norm", "norm_scale", "relative_error", "SCALING_MODES", "AMAX_ALGOS"]

SCALING_MODES = choices(ScalingType)
MIN_SCALE = 2.0**-126  # smallest normal fp32: its reciprocal 2**126 is finite
AMAX_ALGOS = choices(AmaxAlgo)


def l2_norm(t: torch.Tensor, amax: torch.Tensor | None = None) -> torch.Tensor:
    """||t||_2 as a 0-dim fp32 tensor, accumulated at t·2**-e with 2**e near `amax` (default
    max|t|): in fp32 the squares of values past ~1.8e19 overflow and those below ~1e-19 flush to
    zero, so an unscaled norm reads inf or 0 where the norm itself is an ordinary number. Scaling by
    a power of two is exact. NaN where t holds a NaN, inf where it holds an inf (or the norm
    exceeds fp32's range). t: any float tensor; amax: a 0-dim tensor of about max|t| (e.g. the
    amax a cast already computed; one far below max|t|, or 0 / NaN / inf with t finite, gives the
    unscaled norm's overflow)."""
    t = t.float()
    if amax is None:
        amax = t.abs().amax() if t.numel() else torch.zeros((), device=t.device)
    s = norm_scale(amax)
    return torch.linalg.vector_norm(t * s) / s


def relative_error(x: torch.Tensor, q: torch.Tensor, inv_scale: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """rel_err of a cast, ||q·inv_scale - x|| / ||x||, as a 0-dim fp32 tensor (0 for an all-zero x).

    x: the tensor cast (any float dtype); q: its format-domain values, x's shape; inv_scale: 0-dim,
    or per element (x's shape, block scaling); amax: x's amax (0-dim, the cast's own). Both norms are
    taken at ·2**-e with 2**e near amax (norm_scale), so their squares stay in fp32's range, and
    q·inv_scale is formed before that factor: inv_scale·2**-e alone overflows where inv_scale far
    exceeds amax (a delayed scale from a larger history, a kept scale, E7M0's inv_scale·2**k), and
    0·inf would read NaN."""
    s = norm_scale(amax)
    neg_xs = x.detach().float() * -s
    err = torch.linalg.vector_norm(torch.addcmul(neg_xs, q.float() * inv_scale, s))  # (q·inv - x)·2**-e
    return err / torch.linalg.vector_norm(neg_xs).clamp(min=torch.finfo(torch.float32).tiny)


def norm_scale(amax: torch.Tensor) -> torch.Tensor:
    """2**-e (0-dim fp32) with 2**e the power of two at or below amax (2 for a zero or non-finite
    amax), e clamped to [-126, 126] (so 2**-e is a normal number): amax scaled by it lies in [1, 2)
    for normal amax up to 2**127 ([2, 4) above; a subnormal amax stays below 1, its squares still
    normal), so the squares of values up to amax neither overflow nor (down to amax·2**-60) flush
    to zero in fp32 (l2_norm)."""
    e = torch.frexp(amax.float())[1]  # amax = m·2**e with m in [0.5, 1); e = 0 for 0, inf and NaN
    return torch.exp2((1 - e).clamp(-126, 126).float())


def compute_scale(amax: torch.Tensor, fmt: FormatSpec | str, margin: int = 0, pow2: bool = False,
                  prev_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The per-tensor scale that maps amax onto the format's largest value (docs/design.md §4).

    scale = fmt.max / amax / 2**margin, one correctly rounded fp32 division, raised to at least
    2**-126 so that 1 / scale is finite; prev_scale (default 1) is kept where amax is 0 or not
    finite or the scale would overflow. pow2 rounds the scale down to a power of two, so
    dequantization is exact.

    Args:
        amax: max |x| of the unscaled tensor, any shape (usually 0-dim), any float dtype and device.
        fmt: a FormatSpec or a name for get_format.
        margin: an int >= 0; the scale leaves 2**margin of headroom above amax.
        pow2: round the scale down to a power of two.
        prev_scale: the scale to keep when amax gives none (amax's shape, or broadcastable).
    Returns:
        fp32 scale of amax's shape, on amax's device (units: format values per unit of x).
    Raises:
        ValueError: margin is not an int >= 0, or an unknown format name.
    """
    fmt = get_format(fmt)
    if not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0 (got {margin!r})")
    amax = torch.as_tensor(amax, dtype=torch.float32)
    prev = torch.ones_like(amax) if prev_scale is None else prev_scale.to(amax.device, torch.float32)
    # tensor / tensor: one correctly rounded IEEE division (torch evaluates `number / tensor` as
    # reciprocal(tensor) * number, which rounds twice and can miss the quotient by an ulp)
    scale = ((torch.full_like(amax, fmt.max) / amax) / float(2**margin)).clamp(min=MIN_SCALE)
    if pow2:
        # clear the mantissa bits: 2**floor(log2(scale)) for every positive normal fp32
        scale = (scale.view(torch.int32) & ~0x7FFFFF).view(torch.float32)
    ok = (amax > 0) & torch.isfinite(amax) & torch.isfinite(scale) & (scale > 0)
    return torch.where(ok, scale, prev)


class AmaxHistory(nn.Module):
    """The last `length` amaxes (newest first); `get()` reduces them with `algo` ("max" or
    "most_recent"). An amax is pushed after the tensor it came from has been quantized."""

    def __init__(self, length: int = 16, algo: str = "max"):
        super().__init__()
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"history length must be an int >= 1 (got {length!r})")
        if algo not in AMAX_ALGOS:
            raise ValueError(f"amax algo must be one of {AMAX_ALGOS} (got {algo!r})")
        self.length, self.algo = length, algo
        self.register_buffer("history", torch.zeros(length, dtype=torch.float32))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))
        # host (CPU) mirror of `count`, so emptiness needs no device sync; a tensor, so a compiled
        # QuantizedLinear updates it in place like the buffers
        self.filled = torch.zeros((), dtype=torch.int64)

    def push(self, amax: torch.Tensor) -> None:
        # roll in place: newest at index 0, as TransformerEngine keeps its amax_history
        self.history.copy_(torch.roll(self.history, 1))
        self.history[0] = amax.detach().to(self.history)
        self.count.add_(1).clamp_(max=self.length)
        self.filled.add_(1).clamp_(max=self.length)

    @property
    def empty(self) -> bool:
        return int(self.filled) == 0

    def get(self) -> torch.Tensor:
        valid = self.history[: max(int(self.filled), 1)]
        return valid.amax() if self.algo == "max" else valid[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.filled = torch.tensor(int(self.count), dtype=torch.int64)

    def extra_repr(self) -> str:
        return f"length={self.length}, algo={self.algo}"


class TensorScaler(nn.Module):
    """Scale state of one tensor role: `scale_for(x)` returns (scale, inv_scale) to quantize x with;
    `observe(amax)` records x's amax after use (delayed mode). `.scale` / `.inv_scale` are the
    last ones used."""

    def __init__(self, fmt: FormatSpec | str, mode: str = "delayed", history_len: int = 16,
                 algo: str = "max", margin: int = 0, pow2: bool = False):
        super().__init__()
        if mode not in SCALING_MODES:
            raise ValueError(f"scaling mode must be one of {SCALING_MODES} (got {mode!r})")
        if not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an int >= 0 (got {margin!r})")
        self.fmt, self.mode, self.margin, self.pow2 = get_format(fmt), mode, margin, pow2
        self.amax_history = AmaxHistory(history_len, algo) if mode == "delayed" else None
        self.register_buffer("scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("inv_scale", torch.ones((), dtype=torch.float32))

    def scale_for(self, x: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, inv_scale) for quantizing x; stored as the last used when `update` (training
        calls). Evaluation calls pass update=False so they leave no trace in the scaling state."""
        if self.mode == "none":
            return self.scale.clone(), self.inv_scale.clone()
        if self.mode == "current" or self.amax_history.empty:
            amax = x.detach().abs().amax().float()
        else:
            amax = self.amax_history.get()
        scale = compute_scale(amax, self.fmt, self.margin, self.pow2, prev_scale=self.scale)
        inv_scale = torch.reciprocal(scale)
        if update:
            self.scale.copy_(scale)
            self.inv_scale.copy_(inv_scale)
        return scale, inv_scale  # fresh tensors: later calls update the buffers in place

    def observe(self, amax: torch.Tensor) -> None:
        if self.amax_history is not None:
            self.amax_history.push(amax)

    def extra_repr(self) -> str:
        return f"{self.fmt.name}, mode={self.mode}, margin={self.margin}, pow2={self.pow2}"
