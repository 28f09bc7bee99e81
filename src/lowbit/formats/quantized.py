"""One entry point for every format: a spec's quantization parameters, codes, dequantization and fake
quantization, dispatched to formats.integer (integers with float32 scales and zero points) or formats.scaled
(minifloat elements, E8M0 / FP8 block scales, block floating point). Algorithms call only these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..spec import QuantSpec
from . import gguf_grid, integer, scaled


@dataclass
class Quantized:
    """A quantized 2-D weight: int32 codes (rows, cols) (integers, or minifloat bit patterns), effective
    float32 scales and integer zero points per block, shaped (ceil(rows / block_rows), ceil(cols /
    block_cols)), and for two-level specs the per-tensor scale the block scales are relative to."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    spec: QuantSpec
    tensor_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.spec).to(dtype)

    def to(self, device) -> "Quantized":
        """The same weight with its tensors on `device`."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})

    def compact(self) -> "Quantized":
        """On the host, its codes in the narrowest integer dtype that holds them (one byte up to 8 bits): the form
        sent to other processes. widened() undoes it."""
        host = self.to("cpu")
        if host.codes.numel():
            lo, hi = int(host.codes.min()), int(host.codes.max())
            for dtype in (torch.uint8, torch.int8, torch.int16):
                if torch.iinfo(dtype).min <= lo and hi <= torch.iinfo(dtype).max:
                    return dataclasses.replace(host, codes=host.codes.to(dtype))
        return host

    def widened(self, device) -> "Quantized":
        """A compact() weight as the engine holds it: int32 codes, on `device`."""
        return dataclasses.replace(self.to(device), codes=self.codes.to(device=device, dtype=torch.int32))


def tensor_scale(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor | None:
    """The second-level per-tensor scale of a two-level spec (NVFP4), else None."""
    return scaled.tensor_scale(w, spec)


def compute_qparams(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None,
                    t: torch.Tensor | None = None):
    """(scale, zero point or None) per block of w; `clip` shrinks each block's range; `t` fixes the
    tensor scale of a two-level spec (GPTQ computes group scales piecewise and needs one t for all). K-quant
    grids are made whole (gguf_grid.qparams; quantize keeps their super-scales): clip and t do not apply."""
    if spec.gguf_grid:
        return gguf_grid.qparams(w, spec)[:2]
    if spec.plain_int:
        return integer.compute_qparams(w, spec, clip)
    return scaled.compute_qparams(w, spec, clip, t)


def grid_round(x: torch.Tensor, spec: QuantSpec, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Element values nearest to x (already divided by the scale), relative to the zero point: the
    dequantized value is the result times the scale."""
    if not spec.plain_int:
        return scaled.grid_round(x, spec)
    if spec.gguf_grid:
        return gguf_grid.grid_round(x, spec, zero)
    q = torch.round(x)
    if zero is None:
        return q.clamp_(spec.qmin, spec.qmax)
    return (q + zero).clamp_(spec.qmin, spec.qmax).sub_(zero)


def values_to_codes(values: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """int32 codes of element values from grid_round (zero: per-element zero points, integers only)."""
    if not spec.plain_int:
        return scaled.to_codes(values, spec)
    return (values if zero is None else values + zero).round().to(torch.int32)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    if spec.gguf_grid:
        return gguf_grid.quantize_codes(w, scale, zero, spec)
    if spec.plain_int:
        return integer.quantize_codes(w, scale, zero, spec)
    return scaled.quantize_codes(w, scale, spec)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """The float32 weight a quantized one stands for."""
    if spec.plain_int:
        return integer.dequantize(codes, scale, zero, spec)
    return scaled.dequantize(codes, scale, spec)


def fake_quant(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Q(w) dequantized again, in float32: what a quantized weight computes with."""
    if spec.gguf_grid:
        return quantize(w, spec).dequantize()
    if spec.plain_int:
        return integer.fake_quant(w, spec, clip)
    return scaled.fake_quant(w, spec, clip)


def quantize(w: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest quantization of a 2-D weight (rows = output features) in any format."""
    if w.dim() != 2:
        raise ValueError(f"quantization works on 2-D weights, got shape {tuple(w.shape)}")
    if spec.gguf_grid:
        return quantize_gguf_grid(w, spec)
    t = tensor_scale(w, spec)
    scale, zero = compute_qparams(w, spec, clip, t)
    return Quantized(quantize_codes(w, scale, zero, spec), scale, zero, spec, t)


def quantize_gguf_grid(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest onto a llama.cpp block grid searched with optional (K,) column importance; a K-quant's
    super-scales are the Quantized's tensor_scale (gguf_grid.qparams)."""
    scale, zero, supers = gguf_grid.qparams(w, spec, importance)
    return Quantized(gguf_grid.quantize_codes(w, scale, zero, spec), scale, zero, spec, supers)


def fake_quant_activation(x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Fake quantization of activations x (..., K): static with a calibrated per-tensor `scale`, or dynamic
    (scale None): per token for token granularity, per block of K for group granularity (MX, BFP, NVFP4,
    whose tensor scale then comes from x itself), per call for tensor granularity. Keeps x's dtype."""
    if spec.plain_int:
        return integer.fake_quant_activation(x, spec, scale)
    xf = x.float()
    if scale is not None:
        return scaled.grid_round(xf / scale, spec).mul_(scale).to(x.dtype)
    flat = xf.reshape(-1, xf.shape[-1])
    if spec.granularity == "token" or spec.granularity == "channel":
        s = scaled.scales_from_amax(flat.abs().amax(dim=-1, keepdim=True), spec)
        out = scaled.grid_round(flat / s, spec).mul_(s)
    else:
        out = scaled.fake_quant(flat, spec)
    return out.reshape(x.shape).to(x.dtype)


def activation_qparams(lo: float, hi: float, spec: QuantSpec) -> torch.Tensor:
    """Static per-tensor activation parameters from a calibrated range [lo, hi]: the scale (symmetric), or
    (scale, zero point) (asymmetric integers), as a float32 tensor."""
    if spec.plain_int:
        return integer.activation_qparams(lo, hi, spec)
    return scaled.scales_from_amax(torch.tensor(max(abs(lo), abs(hi))), spec)
