"""llama.cpp's block grids as a lowbit weight format (spec.gguf_grid: the K-quants q2_k .. q6_k, and the legacy
q4_0, q4_1, q5_0, q5_1, q8_0 that K-quant files fall back to): RTN, GPTQ and the algorithms built on them put
their codes on the grid a GGUF block stores, so the export moves them exactly (FORMATS.md 4.4).

A legacy grid is formats/legacy_search's weighted search: per block of 32 a float16 scale d (and min m), so each
block is a group with scale d and (affine) a float zero point -m / d; a zero d becomes the smallest normal float16.

The grid of a (N, K) weight (K a multiple of 256) is formats/kquant_search's: per super-block of 256 columns
float16 scales d (and dmin), per sub-block integer scales ls (and mins lm). In lowbit's integer terms each
sub-block is a group with scale s = d * ls and a float zero point z = dmin * lm / s, so every dequantizer that
computes (q - z) * s reads it; `tensor_scale` of the Quantized holds (N, K / 256, 2) = (d, dmin) per super-block,
from which the export recovers the integers ls = s / d, lm = z * s / dmin exactly. Two departures from
llama.cpp's own grid keep every sub-block expressible that way, and neither can raise the error (the codes are
re-rounded to the nearest value and code 0 stays available): a zero sub-block scale becomes 1, and a zero
super-scale the smallest normal float16.
"""

from __future__ import annotations

import torch

from ..spec import KQUANT_SUPER, QuantSpec
from .kquant_search import KGrid, is_affine, kquant_grid
from .legacy_search import BLOCK, LEGACY, legacy_grid

_F16_TINY = 2.0 ** -14


def width_multiple(kind: str) -> int:
    """The widths a grid holds are multiples of this: 32 (legacy blocks) or 256 (K-quant super-blocks)."""
    return BLOCK if kind in LEGACY else KQUANT_SUPER


def qparams(w: torch.Tensor, spec: QuantSpec, importance: torch.Tensor | None = None) -> tuple:
    """(scale (N, K / g), float zero point (N, K / g) or None, K-quant super-scales (N, K / 256, 2) or None) of
    w's grid; importance: optional (K,) column weights of the search (the input's mean square: llama.cpp's
    imatrix)."""
    rows, cols = w.shape
    kind = spec.gguf_grid
    if cols % width_multiple(kind):
        raise ValueError(f"the {kind} grid needs a width that is a multiple of {width_multiple(kind)}, got {cols}")
    if kind in LEGACY:
        d, m, _ = legacy_grid(w.float(), kind, importance)
        d = torch.where(d == 0, _F16_TINY, d).reshape(rows, -1)
        return d, (-m.reshape(rows, -1) / d if LEGACY[kind][0] else None), None
    grid = expressible(kquant_grid(w.float(), kind, importance))
    return to_qparams(grid, rows, kind)


def expressible(grid: KGrid) -> KGrid:
    """The grid with every sub-block step non-zero (see the module docstring)."""
    d = torch.where(grid.d == 0, _F16_TINY, grid.d)
    ls = torch.where(grid.ls == 0, 1.0, grid.ls.double()).to(grid.ls.dtype)
    return KGrid(d, ls, grid.dmin, grid.lm)


def to_qparams(grid: KGrid, rows: int, kind: str) -> tuple:
    scale = grid.steps().reshape(rows, -1)
    supers = torch.stack([grid.d.float(), torch.zeros_like(grid.d.float()) if grid.dmin is None
                          else grid.dmin.float()], dim=-1).reshape(rows, -1, 2)
    if not is_affine(kind):
        return scale, None, supers
    return scale, grid.offsets().reshape(rows, -1) / scale, supers


def to_grid(scale: torch.Tensor, zero: torch.Tensor | None, supers: torch.Tensor, spec: QuantSpec) -> KGrid:
    """The integer grid back from a Quantized's scale, zero point and super-scales (the export's inverse of
    to_qparams): exact, as s = d * ls is a float32 product of a float16 and a small integer."""
    per = KQUANT_SUPER // spec.group_size
    d, dmin = supers[..., 0].reshape(-1).double(), supers[..., 1].reshape(-1).double()
    s = scale.double().reshape(-1, per)
    ls = torch.round(s / d[:, None])
    if zero is None:
        return KGrid(d.float(), ls)
    offset = s * zero.double().reshape(-1, per)
    lm = torch.where(dmin[:, None] > 0, torch.round(offset / torch.where(dmin > 0, dmin, 1.0)[:, None]), 0.0)
    return KGrid(d.float(), ls, dmin.float(), lm)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, spec: QuantSpec) -> torch.Tensor:
    """int32 codes round(w / s + z) clamped to the spec's range, one (scale, zero) per group of columns."""
    rows, cols = w.shape
    x = w.float().reshape(rows, -1, spec.group_size) / scale[..., None]
    if zero is not None:
        x = x + zero[..., None]
    return torch.round(x).clamp_(spec.qmin, spec.qmax).reshape(rows, cols).to(torch.int32)


def grid_round(x: torch.Tensor, spec: QuantSpec, zero: torch.Tensor | None) -> torch.Tensor:
    """Values relative to the (float) zero point nearest x (already divided by the scale)."""
    if zero is None:
        return torch.round(x).clamp_(spec.qmin, spec.qmax)
    return torch.round(x + zero).clamp_(spec.qmin, spec.qmax).sub_(zero)
