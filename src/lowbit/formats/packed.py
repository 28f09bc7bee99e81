"""The packed form of a quantized linear, as lowbit's native checkpoint stores it (and the loader, every exporter
and the ONNX writer read it): pure tensor maths, no files.

Per quantized linear `p` (weight of shape (N, K)):
- `p.qweight`  uint8 (N, ceil(K * bits / 8) rounded to whole packing runs): integer codes minus qmin (so
  always unsigned) or minifloat bit patterns, packed LSB-first along K per row (formats.packing);
- `p.scales`   (row blocks, column blocks): (N, ceil(K / group)) per group, (N, 1) per channel, (1, 1) per
  tensor. float32 for float32 scales; uint8 E8M0 bytes (shared exponent + 127) for MX / MXINT8 / BFP
  specs, whose effective scale is 2^(byte - 127) / 2^(bits - 2) for integer elements; float8_e4m3fn block
  scales for two-level specs, with `p.tensor_scale` float32 (1,), effective scale = block scale x tensor scale;
- `p.shifts`   uint8, MX6/MX9 only: one microexponent bit per sub-block, packed LSB-first per row (the
  scales then hold one exponent per group);
- `p.qzeros`   uint8, same shape as the scales, zero point minus qmin: asymmetric specs only (a symmetric
  spec's zero point is implied: 0 signed, 2^(bits-1) unsigned);
- K-quant grids (spec.gguf_grid): `p.scales` float32 (N, K / group) effective sub-block scales, `p.zeros` float32
  (same shape) float zero points (affine grids only), `p.super_scales` float16 (N, K / 256, 2): d and dmin
  (K-quant grids only; formats.gguf_grid; no `p.qzeros`);
- `p.bias` unchanged when the layer has one;
- `p.input_scale` float32, for a static input-activation spec: the scale (symmetric) or (scale, zero point).
"""

from __future__ import annotations

import torch

from ..spec import QuantSpec
from .minifloat import E4M3FN
from .packing import pack_rows, unpack_rows
from .quantized import Quantized, dequantize
from .scaled import fraction_bits

FORMAT_VERSION = 1


def _code_offset(spec: QuantSpec) -> int:
    return 0 if spec.kind == "float" else spec.qmin


def _exponents(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Shared exponents (int32) of power-of-two effective scales."""
    _, exp = torch.frexp(scale.float())
    return exp - 1 + fraction_bits(spec)


def pack_linear(qt: Quantized) -> dict[str, torch.Tensor]:
    spec = qt.spec
    out = {"qweight": pack_rows(qt.codes - _code_offset(spec), spec.bits)}
    if spec.gguf_grid:
        out["scales"] = qt.scale.float().contiguous()
        if qt.tensor_scale is not None:
            out["super_scales"] = qt.tensor_scale.to(torch.float16).contiguous()
        if qt.zero is not None:
            out["zeros"] = qt.zero.float().contiguous()
        return out
    if spec.scale_dtype == "float32":
        out["scales"] = qt.scale.float().contiguous()
    elif spec.scale_dtype == "fp8_e4m3":
        out["scales"] = E4M3FN.round(qt.scale.float() / qt.tensor_scale).to(torch.float8_e4m3fn)
        out["tensor_scale"] = qt.tensor_scale.float().reshape(1)
    elif spec.subblock_size:  # step 2^(E - shift - frac) per sub-block: E per group, shift bits per sub-block
        step_exp = _exponents(qt.scale, spec)
        per = spec.group_size // spec.subblock_size
        padded = torch.nn.functional.pad(step_exp, (0, -step_exp.shape[1] % per), value=-1 << 20)
        shared = padded.reshape(step_exp.shape[0], -1, per).amax(dim=-1)
        out["scales"] = (shared + 127).to(torch.uint8)
        out["shifts"] = pack_rows(shared.repeat_interleave(per, dim=1)[:, :step_exp.shape[1]] - step_exp, 1)
    else:
        out["scales"] = (_exponents(qt.scale, spec) + 127).to(torch.uint8)
    if spec.plain_int and not spec.symmetric:
        out["qzeros"] = (qt.zero - spec.qmin).to(torch.uint8)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Quantized:
    codes = unpack_rows(tensors["qweight"], spec.bits, shape[1]) + _code_offset(spec)
    stored = tensors["scales"]
    if spec.gguf_grid:
        zero = tensors["zeros"].float() if "zeros" in tensors else None
        supers = tensors["super_scales"].float() if "super_scales" in tensors else None
        return Quantized(codes, stored.float(), zero, spec, supers)
    t = None
    if spec.scale_dtype == "float32":
        scale = stored.float()
    elif spec.scale_dtype == "fp8_e4m3":
        t = tensors["tensor_scale"].float().reshape(())
        scale = stored.float() * t
    else:
        exps = stored.to(torch.int32) - 127 - fraction_bits(spec)
        if spec.subblock_size:
            n_sub = -(-shape[1] // spec.subblock_size)
            per = spec.group_size // spec.subblock_size
            exps = exps.repeat_interleave(per, dim=1)[:, :n_sub] - unpack_rows(tensors["shifts"], 1, n_sub)
        scale = torch.ldexp(torch.ones(exps.shape), exps)
    if not spec.plain_int or spec.symmetric:
        zero = None if not spec.plain_int or spec.signed else \
            torch.full(scale.shape, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        zero = tensors["qzeros"].to(torch.int32) + spec.qmin
    return Quantized(codes, scale, zero, spec, t)


def stored_names(spec: QuantSpec) -> list[str]:
    """The tensors a packed linear of this spec has (besides its bias)."""
    names = ["qweight", "scales"]
    if spec.gguf_grid:
        return names + (["super_scales"] if spec.gguf_grid.endswith("_k") else []) + \
            ([] if spec.symmetric else ["zeros"])
    if spec.scale_dtype == "fp8_e4m3":
        names.append("tensor_scale")
    if spec.subblock_size:
        names.append("shifts")
    if spec.plain_int and not spec.symmetric:
        names.append("qzeros")
    return names


def read_linear(ckpt, module_name: str, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """The dequantized float32 weight (N, K) of a packed linear in a lowbit checkpoint."""
    qt = unpack_linear({n: ckpt.get(f"{module_name}.{n}") for n in stored_names(spec)}, spec, shape)
    return dequantize(qt.codes, qt.scale, qt.zero, spec)
