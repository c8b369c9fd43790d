"""Floating-point format registry: one FormatSpec describes a format everywhere.

A format has 1 sign bit, `exp_bits` exponent bits, `man_bits` mantissa bits and a `bias`.
Magnitudes are addressed by a *code* c = (biased_exponent << man_bits) | mantissa, so codes
order like the values they encode:

    c >= 2**M  (normal)     value = 2**((c >> M) - bias) * (1 + (c & (2**M - 1)) / 2**M)
    c <  2**M  (subnormal)  value = c * 2**(1 - bias - M)

`specials` says which codes are not finite (values checked against gfloat 0.5 / ml_dtypes 0.6):

    ieee   top exponent code: +-inf (mantissa 0), NaN (otherwise)      E5M2 = torch.float8_e5m2
    fn     no inf; only S.1..1.1..1 is NaN                              E4M3 = torch.float8_e4m3fn
    fnuz   no inf, no -0; the -0 pattern (0x80) is the single NaN       ml_dtypes float8_e5m2fnuz
    p3109  as fnuz, plus 0x7F / 0xFF are +-inf                          IEEE P3109 binary8pP
    none   every code finite (NaN inputs still propagate, as a simulation convenience)

A bare name means the most widely deployed definition of that bit layout; where none exists,
IEEE P3109's (docs/design.md §2). `python -m altgrad.formats` prints the table.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

SPECIALS = ("ieee", "fn", "fnuz", "p3109", "none")

__all__ = ["FormatSpec", "FORMAT_REGISTRY", "SPECIALS", "get_format", "format_table"]


@dataclass(frozen=True)
class FormatSpec:
    """A sign + `exp_bits` + `man_bits` floating-point format with the given bias and specials."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    specials: str

    def __post_init__(self):
        e, m = self.exp_bits, self.man_bits
        if not (isinstance(e, int) and isinstance(m, int) and e >= 0 and m >= 0 and 1 <= e + m <= 7):
            raise ValueError(f"format {self.name!r}: exp_bits + man_bits must be 1..7 (got E{e}M{m})")
        if self.specials not in SPECIALS:
            raise ValueError(f"format {self.name!r}: specials must be one of {SPECIALS} (got {self.specials!r})")
        if self.specials == "ieee" and e == 0:
            raise ValueError(f"format {self.name!r}: ieee specials need at least one exponent bit")
        # every value must be an exact bf16/fp32 normal number, so kernels can carry them in bf16
        if not (-126 <= 1 - self.bias - m and (2**e - 1) - self.bias <= 127):
            raise ValueError(f"format {self.name!r}: bias {self.bias} puts values outside bf16's exponent range")
        if self.max_code < 1:
            raise ValueError(f"format {self.name!r}: has no positive finite value")

    # -- bit layout --------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (also sets the subnormal quantum)."""
        return 1 - self.bias

    @property
    def max_code(self) -> int:
        """Magnitude code of the largest finite value."""
        e, m, top = self.exp_bits, self.man_bits, (1 << (self.exp_bits + self.man_bits)) - 1
        if self.specials == "ieee":
            return ((2**e - 2) << m) | (2**m - 1)  # top exponent code is reserved
        if self.specials in ("fn", "p3109"):
            return top - 1  # all-ones magnitude is NaN (fn) or inf (p3109)
        return top  # fnuz, none

    # -- derived values ----------------------------------------------------------------------
    def code_value(self, code: int) -> float:
        """Value of a magnitude code (0 .. 2**(E+M)-1), ignoring specials."""
        m = self.man_bits
        if code >= (1 << m):
            return math.ldexp(1.0 + (code & ((1 << m) - 1)) / 2**m, (code >> m) - self.bias)
        return math.ldexp(code, self.emin - m)

    @property
    def max(self) -> float:
        return self.code_value(self.max_code)

    @property
    def min_normal(self) -> float | None:
        """Smallest normal value, or None where the format has no normals (E0M7, ieee E1M6)."""
        return self.code_value(1 << self.man_bits) if (1 << self.man_bits) <= self.max_code else None

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (equals min_normal when man_bits == 0)."""
        return self.code_value(1)

    @property
    def has_inf(self) -> bool:
        return self.specials in ("ieee", "p3109")

    @property
    def has_nan(self) -> bool:
        # ieee with no mantissa bits (E7M0) has only inf in its top exponent code
        return self.specials in ("fn", "fnuz", "p3109") or (self.specials == "ieee" and self.man_bits > 0)

    @property
    def kernel_fields(self) -> dict:
        """{exp_bits, man_bits, bias, specials}: the format as the kernels in kernels/ take it, as
        keywords (`cast(x, scale, **fmt.kernel_fields)`) or, in this order, as scaled_matmul's
        `fmt_a` tuple. The kernels' own `check_format` accepts every registered format."""
        return {"exp_bits": self.exp_bits, "man_bits": self.man_bits, "bias": self.bias, "specials": self.specials}

    @property
    def has_neg_zero(self) -> bool:
        return self.specials in ("ieee", "fn", "none")

    # -- codes <-> values --------------------------------------------------------------------
    def decode(self, code: int) -> float:
        """Real value of a `bits`-wide code (0 .. 2**bits - 1), specials included."""
        width = self.exp_bits + self.man_bits
        if not (isinstance(code, int) and 0 <= code < 2**self.bits):
            raise ValueError(f"code must be an int in [0, {2**self.bits - 1}] for {self.name} (got {code!r})")
        sign, mag = code >> width, code & ((1 << width) - 1)
        sp = self.specials
        if sp == "ieee" and (mag >> self.man_bits) == 2**self.exp_bits - 1:
            val = math.inf if (mag & ((1 << self.man_bits) - 1)) == 0 else math.nan
        elif sp == "fn" and mag == (1 << width) - 1:
            val = math.nan
        elif sp in ("fnuz", "p3109") and sign and mag == 0:
            return math.nan
        elif sp == "p3109" and mag == (1 << width) - 1:
            val = math.inf
        else:
            val = self.code_value(mag)
        return -val if sign else val

    def decode_all(self) -> torch.Tensor:
        """fp32 tensor of the values of all 2**bits codes, in code order."""
        return torch.tensor([self.decode(c) for c in range(2**self.bits)], dtype=torch.float32)

    def encode(self, value: float, *, saturate: bool = True) -> int:
        """The `bits`-wide code of `value` rounded to nearest, ties to the even code — the scalar twin
        of the vectorised quantizer (tests check the two agree), written for reading.

        `value` is first rounded to fp32, as the quantizer sees it. A value that rounds above max
        (or ±inf) is an overflow: ±max with `saturate`, else the ±inf code where the format has one,
        else its NaN code. NaN gets the NaN code: the all-ones magnitude with the input's sign
        (ieee, fn) or the -0 pattern (fnuz, p3109). Negative values that round to 0 give -0 only
        where the format has -0.

        Raises:
            ValueError: the result is NaN (NaN input, or overflow with saturate=False in a format
                without inf) and the format has no NaN code (E0M7 and the other `none` formats).
        """
        v = torch.tensor(float(value), dtype=torch.float32).item()
        width = self.exp_bits + self.man_bits
        top = (1 << width) - 1
        negative = math.copysign(1.0, v) < 0
        nan = math.isnan(v)
        code = 0 if nan else self._nearest_code(abs(v))
        if not nan and code > self.max_code:  # an overflow
            if saturate:
                code = self.max_code
            elif self.has_inf:
                code = top if self.specials == "p3109" else (top >> self.man_bits) << self.man_bits
            else:
                nan = True
        if nan:
            if not self.has_nan:
                raise ValueError(f"{self.name} has no NaN code (NaN input, or overflow with saturate=False)")
            if self.specials in ("fnuz", "p3109"):
                return 1 << width
            return top | (int(negative) << width)
        sign = negative and (code != 0 or self.has_neg_zero)
        return code | (int(sign) << width)

    def _nearest_code(self, a: float) -> int:
        """Magnitude code nearest to a >= 0 (ties to the even code), on the grid extended by one code
        past max (max_code + 1, its value as if the exponent were unbounded), so that a result above
        max_code means "rounds above max". Neighbouring values differ by at most 2x, so the two
        distances below are exact in float64 (Sterbenz)."""
        grid = self._magnitude_grid
        if math.isinf(a) or a >= grid[-1]:
            return len(grid) - 1
        lo, hi = 0, len(grid) - 1  # grid[lo] <= a < grid[hi]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if grid[mid] <= a else (lo, mid)
        below, above = a - grid[lo], grid[hi] - a
        if below != above:
            return lo if below < above else hi
        return lo if lo % 2 == 0 else hi

    @functools.cached_property
    def _magnitude_grid(self) -> tuple[float, ...]:
        """Values of magnitude codes 0 .. max_code + 1, increasing."""
        return tuple(self.code_value(c) for c in range(self.max_code + 2))

    def values(self) -> torch.Tensor:
        """Sorted fp32 tensor of every finite value (zero once)."""
        pos = [self.code_value(c) for c in range(1, self.max_code + 1)]
        return torch.tensor([-v for v in reversed(pos)] + [0.0] + pos, dtype=torch.float32)

    def ulp(self, x: float | torch.Tensor) -> float | torch.Tensor:
        """Spacing of the format's values at |x| (the binade's quantum; the subnormal quantum below
        min normal; the top binade's quantum at and past max)."""
        if isinstance(x, torch.Tensor):
            a = x.detach().abs().float().clamp(max=self.max)
            e = torch.floor(torch.log2(a.clamp(min=math.ldexp(1.0, self.emin))))
            return torch.exp2(e - self.man_bits)
        a = min(abs(float(x)), self.max)
        e = max(math.floor(math.log2(a)) if a > 0 else self.emin, self.emin)
        return math.ldexp(1.0, e - self.man_bits)

    def describe(self) -> str:
        return f"{self.name} (E{self.exp_bits}M{self.man_bits}, bias {self.bias}, {self.specials})"


# -- names ---------------------------------------------------------------------------------------
def _default_bias(exp_bits: int, specials: str) -> int:
    if exp_bits == 0:
        return 1  # fixed point: value = code * 2**-M
    return 2 ** (exp_bits - 1) if specials in ("fnuz", "p3109") else 2 ** (exp_bits - 1) - 1


# the most widely deployed definition of each bit layout; P3109 where none exists
_DEFAULT_SPECIALS = {
    (5, 2): "ieee",  # torch.float8_e5m2, OCP E5M2
    (4, 3): "fn",  # torch.float8_e4m3fn, OCP E4M3
    (3, 4): "ieee",  # ml_dtypes.float8_e3m4
    (2, 5): "p3109",
    (1, 6): "p3109",
    (6, 1): "p3109",
    (7, 0): "p3109",
    (0, 7): "none",  # sign-magnitude fixed point
    (2, 1): "none",  # OCP MX FP4 (E2M1): all codes finite
    (2, 3): "none",  # OCP MX FP6
    (3, 2): "none",  # OCP MX FP6
}

_NAME_RE = re.compile(r"^E(\d)M(\d)(?:_(IEEE|FN|FNUZ|P3109|NONE))?(?:_B(-?\d+))?$")
_P3109_RE = re.compile(r"^P3109_P(\d)$")


def _spec(name: str, e: int, m: int, specials: str | None = None, bias: int | None = None) -> FormatSpec:
    specials = specials or _DEFAULT_SPECIALS.get((e, m), "p3109")
    bias = _default_bias(e, specials) if bias is None else bias
    return FormatSpec(name, e, m, bias, specials)


FORMAT_REGISTRY: dict[str, FormatSpec] = {}


def _register(spec: FormatSpec) -> None:
    FORMAT_REGISTRY[spec.name] = spec


for _e, _m in [(5, 2), (4, 3), (3, 4), (2, 5), (1, 6), (6, 1), (7, 0), (0, 7)]:
    _register(_spec(f"E{_e}M{_m}", _e, _m))
for _name, _args in {
    "E4M3_IEEE": (4, 3, "ieee"),
    "E4M3_FNUZ": (4, 3, "fnuz"),
    "E5M2_FNUZ": (5, 2, "fnuz"),
    "E5M2_FN": (5, 2, "fn"),
    "E3M4_NONE_B1": (3, 4, "none", 1),  # the original altgrad E3M4 (max 124)
    "E1M6_NONE": (1, 6, "none"),  # the original altgrad E1M6 (max 3.96875)
    "E7M0_NONE": (7, 0, "none"),  # the original altgrad E7M0
    "E2M1": (2, 1),  # OCP MX FP4
    "E2M3": (2, 3),
    "E3M2": (3, 2),  # OCP MX FP6
}.items():
    _register(_spec(_name, *_args))
for _p in range(1, 8):
    _register(_spec(f"P3109_P{_p}", 8 - _p, _p - 1, "p3109"))


def _canonical(spec: FormatSpec) -> FormatSpec:
    """The registered spec with the same layout, so one format has one name (and one kernel)."""
    for reg in FORMAT_REGISTRY.values():
        if (reg.exp_bits, reg.man_bits, reg.bias, reg.specials) == (
            spec.exp_bits, spec.man_bits, spec.bias, spec.specials,
        ) and not reg.name.startswith("P3109_"):
            return reg
    return spec


def get_format(name: str | FormatSpec) -> FormatSpec:
    """The FormatSpec a name means: a registered name ("E4M3", "E5M2", "P3109_P3", ...), or one
    parsed from `E<e>M<m>[_<SPECIALS>][_B<bias>]` (e + m in 1..7; default specials and bias as in
    docs/design.md §2) or `P3109_P<p>` (p in 1..7), case-insensitive. A FormatSpec passes through
    unchanged; a parsed name that equals a registered format returns the registered object.

    Raises:
        TypeError: name is neither a str nor a FormatSpec.
        ValueError: a malformed name, or fields no format can have (bits, specials, a bias that
            puts values outside bf16's exponent range); the message names the grammar.
    """
    if isinstance(name, FormatSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or FormatSpec (got {type(name).__name__})")
    key = name.strip().upper()
    if key in FORMAT_REGISTRY:
        return FORMAT_REGISTRY[key]
    try:
        if mp := _P3109_RE.match(key):
            p = int(mp.group(1))
            if not 1 <= p <= 7:
                raise ValueError(f"precision must be 1..7 (got {p})")
            return _canonical(_spec(key, 8 - p, p - 1, "p3109"))
        if mn := _NAME_RE.match(key):
            e, m = int(mn.group(1)), int(mn.group(2))
            specials = mn.group(3).lower() if mn.group(3) else None
            bias = int(mn.group(4)) if mn.group(4) else None
            return _canonical(_spec(key, e, m, specials, bias))
        reason = "malformed name (grammar: E<e>M<m>[_IEEE|_FN|_FNUZ|_P3109|_NONE][_B<bias>] or P3109_P<p>)"
    except ValueError as err:
        reason = str(err)
    raise ValueError(f"unknown format {name!r}: {reason}; registered: {', '.join(FORMAT_REGISTRY)}")


def format_table(names=None) -> str:
    """Plain-text table of formats: layout, bias, specials, max, min normal, min subnormal."""
    specs = [get_format(n) for n in (names or FORMAT_REGISTRY)]
    head = f"{'name':<13}{'E':>2}{'M':>2}{'bias':>5}  {'specials':<7}{'max':>13}{'min normal':>13}{'min subnorm':>13}"
    rows = [head, "-" * len(head)]
    for f in specs:
        mn = f"{f.min_normal:.4g}" if f.min_normal is not None else "-"
        rows.append(
            f"{f.name:<13}{f.exp_bits:>2}{f.man_bits:>2}{f.bias:>5}  {f.specials:<7}"
            f"{f.max:>13.6g}{mn:>13}{f.min_subnormal:>13.4g}"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(format_table())
