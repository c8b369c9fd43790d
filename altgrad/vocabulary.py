"""The words altgrad uses, each defined once: tensor roles, scaling types, rounding modes, backends
and scaling granularities (docs/design.md §3–§5). torchao's `ScalingType` / `GemmInputRole` enums
are the model.

Every member *is* its string (`Role.INPUT == "input"`, `str(Role.INPUT) == "input"`), so YAML
values, metric keys, reprs and plain-string comparisons need no conversion, and `Role("input")`
validates a string. `choices(Enum)` gives the allowed strings for error messages.

This module imports nothing from altgrad: every other module may import it.
"""

from __future__ import annotations

import enum

__all__ = [
    "Role", "OPERAND_ROLES", "ROLE_ABBREV", "ScalingType", "AmaxAlgo", "Rounding", "Backend",
    "Granularity", "ScaleFormat", "ScaleRounding", "BLOCK_SIZES", "HIGH_PRECISION_NAMES", "STAT_FIELDS", "COUNT_FIELDS",
    "StatsLevel", "stat_fields", "choices",
]


class _Word(str, enum.Enum):
    """A str-valued enum whose members print and format as their value (enum.StrEnum, Python 3.11+)."""

    __str__ = str.__str__
    __format__ = str.__format__


class Role(_Word):
    """A tensor role in QuantizedLinear's three GEMMs (forward, dgrad, wgrad)."""

    INPUT = "input"  # x: forward A, wgrad B
    WEIGHT = "weight"  # W: forward B, dgrad B
    GRAD_OUTPUT = "grad_output"  # dy: dgrad A, wgrad A
    WEIGHT_GRAD = "weight_grad"  # dW after the wgrad GEMM (optional, the original altgrad experiment)


OPERAND_ROLES = (Role.INPUT, Role.WEIGHT, Role.GRAD_OUTPUT)  # the roles that enter a GEMM
ROLE_ABBREV = {Role.INPUT: "i", Role.WEIGHT: "w", Role.GRAD_OUTPUT: "go", Role.WEIGHT_GRAD: "wg"}


class ScalingType(_Word):
    """Where a per-tensor scale's amax comes from (docs/design.md §4)."""

    DELAYED = "delayed"  # the max of an amax history of earlier steps
    CURRENT = "current"  # the tensor's own amax, every call
    NONE = "none"  # scale 1: the format's raw range


class AmaxAlgo(_Word):
    """How a delayed-scaling amax history is reduced."""

    MAX = "max"
    MOST_RECENT = "most_recent"


class Rounding(_Word):
    NEAREST = "nearest"  # to nearest, ties to the even code
    STOCHASTIC = "stochastic"  # up with probability (v - a) / (b - a), Philox draws


class Backend(_Word):
    """Which implementation casts (and multiplies)."""

    AUTO = "auto"  # triton for CUDA tensors, fast elsewhere
    TORCH = "torch"  # the reference: slow, obvious, the oracle
    FAST = "fast"  # the fused exact cast (torch.compile'd where available)
    TRITON = "triton"  # kernels/ (CUDA, or the CPU under TRITON_INTERPRET=1)


class Granularity(_Word):
    """How many scales an operand gets (docs/design.md §4)."""

    TENSOR = "tensor"  # one
    ROW = "row"  # one per slice along the GEMM's reduction dimension K
    BLOCK = "block"  # one per 1 x block_size run of K (or block_size x block_size tile, block_2d)


class ScaleFormat(_Word):
    FP32 = "fp32"  # scale = fmt.max / amax
    E8M0 = "e8m0"  # a power of two, OCP MX v1.0


class ScaleRounding(_Word):
    FLOOR = "floor"  # OCP MX: 2**(floor(log2 amax) - emax_elem); the block max may saturate
    CEIL = "ceil"  # rounded up so nothing saturates


BLOCK_SIZES = (16, 32, 64, 128)

# the per-role statistics of one cast, in the order QuantizedLinear's stats buffers hold them:
# amax and scale (fp32 values), overflow / underflow / nan / nonzero / numel (element counts), and
# rel_err (relative error of the cast, only at StatsLevel.FULL; always last)
STAT_FIELDS = ("amax", "scale", "overflow", "underflow", "nan", "nonzero", "numel", "rel_err")
COUNT_FIELDS = ("overflow", "underflow", "nan", "nonzero")


class StatsLevel(_Word):
    """What each cast of a QuantizedLinear records (`stats_level`), cheapest first. A field a level
    does not record is absent from the layer's `stats` (its buffer slot holds NaN, 0 after an empty
    batch, or an old rel_err)."""

    SCALE = "scale"  # amax, scale, numel: what the scaling needs (train.py between logging steps)
    COUNTS = "counts"  # and overflow / underflow / nan / nonzero, counted in the cast's pass (default)
    FULL = "full"  # and rel_err: an extra pass per operand (train.py's logging steps)


def stat_fields(level: StatsLevel | str) -> tuple[str, ...]:
    """The STAT_FIELDS a StatsLevel records, in buffer order. Raises ValueError for another value."""
    if level not in tuple(StatsLevel):
        raise ValueError(f"stats level must be one of {', '.join(StatsLevel)} (got {level!r})")
    level = StatsLevel(level)
    return tuple(f for f in STAT_FIELDS if (f not in COUNT_FIELDS or level != StatsLevel.SCALE)
                 and (f != "rel_err" or level == StatsLevel.FULL))

# format names that mean "not quantized: keep the model's own compute precision"
HIGH_PRECISION_NAMES = ("bf16", "fp32", "none")


def choices(kind: type[enum.Enum]) -> tuple[str, ...]:
    """The allowed strings of an enum, for one-line error messages."""
    return tuple(m.value for m in kind)
