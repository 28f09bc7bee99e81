"""Minifloat element formats (FP8 E4M3FN / E4M3FNUZ / E5M2 / E5M2FNUZ, FP6 E3M2 / E2M3, FP4 E2M1): exact
rounding, bit-level encoding and decoding (FORMATS.md 5.1, 5.2).

Rounding is round-to-nearest-even on the element grid (subnormals included) and *saturating*: values beyond
the largest finite number, and +-Inf, become +-max. NaN stays NaN (and encodes to the format's NaN code where
one exists). Decoding goes through a table of all 2^bits codes, built arithmetically from the bit layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

VARIANTS = ("ieee", "fn", "fnuz", "finite")


@dataclass(frozen=True)
class MiniFloat:
    """A sign + exponent_bits + mantissa_bits float. variant: "ieee" (top exponent is Inf/NaN, as E5M2),
    "fn" (only S.1111.111 is NaN, as E4M3FN), "fnuz" (bias + 1, 0x80 is the only NaN, no -0, as MI300's FP8),
    "finite" (every code is a number, as FP6 and FP4)."""

    exponent_bits: int
    mantissa_bits: int
    variant: str = "finite"

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown minifloat variant {self.variant!r}; use one of {VARIANTS}")

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1 + (self.variant == "fnuz")

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number (subnormals share its step)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = (1 << self.exponent_bits) - 1
        return (top - 1 if self.variant == "ieee" else top) - self.bias

    @property
    def max(self) -> float:
        m = self.mantissa_bits
        top_mantissa = (1 << m) - (2 if self.variant == "fn" else 1)  # fn reserves the all-ones mantissa
        return (1 + top_mantissa / (1 << m)) * 2.0 ** self.emax

    @property
    def name(self) -> str:
        suffix = {"ieee": "", "finite": "", "fn": "fn", "fnuz": "fnuz"}[self.variant]
        return f"e{self.exponent_bits}m{self.mantissa_bits}{suffix}"

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest representable value of each element of x (float32), ties to even, saturating."""
        x = x.float()
        a = x.abs()
        _, exp = torch.frexp(a)  # a = f * 2^exp with f in [0.5, 1): floor(log2 a) = exp - 1
        e = (exp - 1).clamp(min=self.emin)
        step = torch.ldexp(torch.ones_like(a), e - self.mantissa_bits)
        q = torch.round(a / step) * step
        q = torch.minimum(q, torch.tensor(self.max))
        return torch.copysign(q, x)

    @cached_property
    def table(self) -> torch.Tensor:
        """The value of every code 0 .. 2^bits - 1 (float32; NaN / Inf where the code means that)."""
        E, M = self.exponent_bits, self.mantissa_bits
        codes = torch.arange(1 << self.bits)
        sign = torch.where(codes >> (E + M) == 1, -1.0, 1.0)
        ef = (codes >> M) & ((1 << E) - 1)
        mf = (codes & ((1 << M) - 1)).float() / (1 << M)
        normal = torch.ldexp(1 + mf, ef - self.bias)
        subnormal = torch.ldexp(mf, torch.full_like(ef, self.emin))
        values = sign * torch.where(ef == 0, subnormal, normal)
        top = ef == (1 << E) - 1
        if self.variant == "ieee":
            values = torch.where(top & (mf == 0), sign * float("inf"), values)
            values[top & (mf != 0)] = float("nan")
        elif self.variant == "fn":
            values[top & (mf == (1 - 2.0 ** -M))] = float("nan")
        elif self.variant == "fnuz":
            values[1 << (E + M)] = float("nan")
        return values

    @property
    def nan_code(self) -> int | None:
        E, M = self.exponent_bits, self.mantissa_bits
        return {"ieee": ((1 << E) - 1) << M | 1 << (M - 1) if M else None, "fn": (1 << (E + M)) - 1,
                "fnuz": 1 << (E + M), "finite": None}[self.variant]

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Bit codes (int32, 0 .. 2^bits - 1) of values already on the grid (from `round`); NaN gets the
        NaN code, and a format without one refuses it."""
        v = values.float()
        E, M = self.exponent_bits, self.mantissa_bits
        a = v.abs()
        _, exp = torch.frexp(a)
        normal = a >= 2.0 ** self.emin
        e = torch.where(normal, exp - 1, torch.full_like(exp, self.emin))
        mant = torch.ldexp(a, M - e) - normal.float() * (1 << M)
        ef = torch.where(normal, e + self.bias, torch.zeros_like(e))
        if self.variant == "ieee":
            inf = torch.isinf(a)
            ef = torch.where(inf, torch.full_like(ef, (1 << E) - 1), ef)
            mant = torch.where(inf, torch.zeros_like(mant), mant)
        negative = torch.signbit(v) & ((a != 0) if self.variant == "fnuz" else torch.ones_like(normal))
        codes = (negative.int() << (E + M)) | (ef.int() << M) | torch.nan_to_num(mant).round().int()
        nan = torch.isnan(v)
        if nan.any():
            if self.nan_code is None:
                raise ValueError(f"{self.name} has no NaN code, and the input holds NaN")
            codes = torch.where(nan, torch.full_like(codes, self.nan_code), codes)
        return codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.table[codes.long()]


E4M3FN = MiniFloat(4, 3, "fn")
E4M3FNUZ = MiniFloat(4, 3, "fnuz")
E5M2 = MiniFloat(5, 2, "ieee")
E5M2FNUZ = MiniFloat(5, 2, "fnuz")
E3M2 = MiniFloat(3, 2)
E2M3 = MiniFloat(2, 3)
E2M1 = MiniFloat(2, 1)


def minifloat(exponent_bits: int, mantissa_bits: int, fnuz: bool = False) -> MiniFloat:
    """The element format of a float spec: 8-bit E4M3 is OCP's FN variant and E5M2 IEEE-like (or both FNUZ
    when asked); narrower formats have no Inf or NaN."""
    if fnuz:
        return MiniFloat(exponent_bits, mantissa_bits, "fnuz")
    if 1 + exponent_bits + mantissa_bits == 8:
        return MiniFloat(exponent_bits, mantissa_bits, "ieee" if exponent_bits == 5 else "fn")
    return MiniFloat(exponent_bits, mantissa_bits)
