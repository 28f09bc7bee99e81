"""Quantization whose elements are not plain integers with float32 scales: minifloat elements (FP8, FP6, FP4)
with float32, E8M0 (OCP MX) or FP8 (NVFP4) block scales, and integer elements under a power-of-two shared
scale (MXINT8, block floating point BFP16). FORMATS.md 5.

Every spec here is symmetric: w ~ scale * v, v on the element grid. `scale` is the *effective* float32 scale
of each block (for two-level specs the FP8 block scale times the per-tensor scale), so the algorithms see
one kind of parameter whatever the storage. Rules:
- float32 scales: scale = amax / element max (amax of the block, times a clipping factor when given).
- E8M0 scales (MX, MXINT8, BFP16): shared exponent e from the block amax, by `spec.scale_rule`:
  "floor" (OCP MX v1.0 section 6.3): e = floor(log2 amax) - emax_elem; the block's top can exceed the
  element max and saturates (FP4: amax / 2^e in [4, 8) against a max of 6);
  "even" (AMD Quark's default): amax's mantissa first rounded to the element's mantissa width (FP4: 1.75
  and up round to the next power of two), then as floor;
  "ceil": the smallest e with amax / 2^e <= element max (nothing saturates);
  "mse": per block, floor's e or e + 1, whichever gives the block the smaller squared rounding error.
  e is clamped to [-127, 127]; an all-zero block gets -127. Integer elements (MXINT8, BFP16) are
  b-bit sign-magnitude style values k / 2^(b-2), |k| <= 2^(b-1) - 1 (emax_elem 0).
- block floating point (BFP16, MX6, MX9): see bfp_scales.
- FP8 block scales with a tensor scale (NVFP4, Quark's fp4_scale_fp8): t = amax(tensor) / (element max *
  448); each block's scale is E4M3(amax_b / element max / t), floored at E4M3's smallest subnormal so no
  block divides by zero; the effective scale is that times t.
Rounding: round-to-nearest-even on the element grid, saturating (minifloat.MiniFloat.round).
"""

from __future__ import annotations

import torch

from ..spec import QuantSpec
from .integer import _block_view, _blockwise
from .minifloat import E4M3FN, MiniFloat, minifloat

FP8_SCALE_TINY = 2.0 ** -9  # E4M3's smallest subnormal


def element(spec: QuantSpec) -> MiniFloat | None:
    """The minifloat element of a float spec (None for integer elements)."""
    return minifloat(spec.exponent_bits, spec.mantissa_bits, spec.fnuz) if spec.kind == "float" else None


def element_max(spec: QuantSpec) -> float:
    """The largest element magnitude, in units of the effective scale."""
    elem = element(spec)
    return elem.max if elem is not None else float(spec.qmax)


def fraction_bits(spec: QuantSpec) -> int:
    """Integer elements under an E8M0 scale are k / 2^(bits-2): the scale carries that factor."""
    return 0 if spec.kind == "float" else spec.bits - 2


def _emax(spec: QuantSpec) -> int:
    elem = element(spec)
    return elem.emax if elem is not None else 0


def grid_round(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The nearest element value of each x (already divided by its scale), saturating."""
    elem = element(spec)
    if elem is not None:
        return elem.round(x)
    return torch.round(x.float()).clamp_(spec.qmin, spec.qmax)


def shared_exponent(amax: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The E8M0 exponent (int32, in [-127, 127]) of blocks with largest magnitude amax, by spec.scale_rule."""
    a = amax.float()
    if spec.scale_rule == "ceil":  # element max in units of the shared scale X (k / 2^(b-2) for integers)
        f, exp = torch.frexp(a / (element_max(spec) / 2 ** fraction_bits(spec)))
        e = torch.where(f == 0.5, exp - 1, exp)  # ratio = f * 2^exp, f in [0.5, 1): its ceil(log2)
    elif spec.scale_rule == "even":  # Quark's even_round: amax's mantissa rounded to the element's width
        m = element(spec).mantissa_bits if spec.kind == "float" else spec.bits
        bits = torch.where(a > 0, a, torch.full_like(a, 2.0 ** -126)).view(torch.int32)
        e = (((bits + (1 << (22 - m))) >> 23) & 0xFF) - 127 - _emax(spec)
    else:  # floor, and the first candidate of mse
        _, exp = torch.frexp(a)
        e = exp - 1 - _emax(spec)  # floor(log2 a) - emax
    e = torch.where(a > 0, e, torch.full_like(e, -127))
    return e.clamp(-127, 127).int()


def _floor_log2(a: torch.Tensor) -> torch.Tensor:
    _, exp = torch.frexp(a)
    return torch.where(a > 0, exp - 1, torch.full_like(exp, -127)).clamp(-127, 127)


def bfp_scales(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Steps of block floating point (AMD Quark's BFP16 and MX6/MX9, FORMATS.md 5.4): shared exponent
    E = floor(log2 amax) per group; elements are b-bit sign-magnitude with step 2^(E - (b - 2)).
    Without sub-blocks (BFP16) E rises by one where the largest element would round past the magnitude
    range. With sub-blocks (MX6, MX9) a sub-block whose elements all lie below 2^E gets a one-bit shift
    (step halved); the result then has one step per sub-block. `clip` shrinks each scale block's amax."""
    a = w.float().abs()
    frac = fraction_bits(spec)
    if not spec.subblock_size:
        amax = _block_view(a, (1, spec.group_size)).amax(dim=(1, 3))
        if clip is not None:
            amax = amax * clip
        e = _floor_log2(amax)
        e = torch.where(torch.round(torch.ldexp(amax, frac - e)) > spec.qmax, e + 1, e).clamp(max=127)
        return torch.ldexp(torch.ones_like(amax), e - frac)
    sub = _block_view(a, (1, spec.subblock_size)).amax(dim=(1, 3))  # (rows, sub-blocks)
    if clip is not None:
        sub = sub * clip
    per = spec.group_size // spec.subblock_size
    padded = torch.nn.functional.pad(sub, (0, -sub.shape[1] % per))
    e = _floor_log2(padded.reshape(sub.shape[0], -1, per).amax(dim=-1))
    e = e.repeat_interleave(per, dim=1)[:, :sub.shape[1]]
    shift = (_floor_log2(sub) <= e - 1).int()  # zeros count as exponent -127, as in Quark
    return torch.ldexp(torch.ones_like(sub), e - shift - frac)


def tensor_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The per-tensor second-level scale of a two-level spec (None otherwise)."""
    if not spec.tensor_scale:
        return None
    amax = w.float().abs().amax()
    return (amax / (element_max(spec) * E4M3FN.max)).clamp_min(1e-30)


def scales_from_amax(amax: torch.Tensor, spec: QuantSpec, t: torch.Tensor | None = None) -> torch.Tensor:
    """Effective float32 scales from each block's (possibly clipped) largest magnitude."""
    if spec.scale_dtype == "e8m0":
        return torch.ldexp(torch.ones_like(amax, dtype=torch.float32),
                           shared_exponent(amax, spec) - fraction_bits(spec))
    raw = amax.float() / element_max(spec)
    if spec.scale_dtype == "fp8_e4m3":
        t = torch.ones(()) if t is None else t
        return E4M3FN.round(raw / t).clamp_min(FP8_SCALE_TINY) * t
    return torch.where(raw > 0, raw, torch.ones_like(raw))


def compute_qparams(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None,
                    t: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
    """Effective scales of each block of the 2-D weight w (no zero point). `t`: the tensor scale to use
    (two-level specs; computed from w when None)."""
    if spec.kind == "bfp":
        return bfp_scales(w, spec, clip), None
    blocks = _block_view(w.float().abs(), spec.block_shape(*w.shape))
    amax = blocks.amax(dim=(1, 3))
    if clip is not None:
        amax = amax * clip
    if spec.tensor_scale and t is None:
        t = tensor_scale(w, spec)
    scale = scales_from_amax(amax, spec, t)
    if spec.scale_dtype == "e8m0" and spec.scale_rule == "mse":
        scale = _lower_error_scale(w, spec, scale)
    return scale, None


def _lower_error_scale(w: torch.Tensor, spec: QuantSpec, floor_scale: torch.Tensor) -> torch.Tensor:
    """Per block, the floor rule's power of two or the next one up, whichever rounds the block with the
    smaller squared error (the block's top saturates under the first, loses a step of resolution under
    the second)."""
    view = _block_view(w.float(), spec.block_shape(*w.shape))

    def error(s):
        s = s[:, None, :, None]
        return (grid_round(view / s, spec).mul_(s) - view).pow_(2).sum(dim=(1, 3))

    up = (floor_scale * 2).clamp(max=2.0 ** (127 - fraction_bits(spec)))
    return torch.where(error(up) < error(floor_scale), up, floor_scale)


def to_codes(values: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """int32 codes of element values: minifloat bit patterns, or the integers themselves."""
    elem = element(spec)
    return elem.encode(values) if elem is not None else values.round().to(torch.int32)


def from_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Element values (float32) of int32 codes."""
    elem = element(spec)
    return elem.decode(codes) if elem is not None else codes.float()


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    values = _blockwise(lambda b, s: grid_round(b / s, spec), w.float(), spec.block_shape(*w.shape), scale.float())
    return to_codes(values, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return _blockwise(lambda v, s: v * s, from_codes(codes, spec), spec.block_shape(*codes.shape), scale.float())


def fake_quant(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None,
               t: torch.Tensor | None = None) -> torch.Tensor:
    scale, _ = compute_qparams(w, spec, clip, t)
    return _blockwise(lambda b, s: grid_round(b / s, spec).mul_(s), w.float(), spec.block_shape(*w.shape), scale)
