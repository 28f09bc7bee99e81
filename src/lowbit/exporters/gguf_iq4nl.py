"""IQ4_NL: blocks of 32 weights, a float16 scale d and 4-bit indices into a fixed non-uniform grid of 16 values
(gguf.quants.IQ4_NL.kvalues), value = d * kvalues[q]; lowbit's fallback for Q2_K / Q3_K tensors whose rows are
not whole 256-wide super-blocks (gguf_mixes.FALLBACK). IQ4_XS: the same grid in super-blocks of 256, each
sub-block of 32 with a 6-bit signed scale (-32..31) under one float16 scale, 4.25 bits per weight
(quantize_row_iq4_xs_impl: each sub-block's scale searched as IQ4_NL's, then d = -(the scale of largest
magnitude) / 32, the sub-block scales rounded to multiples of d and the codes re-chosen). gguf-py dequantizes
both but quantizes neither.

The scale search follows llama.cpp's quantize_row_iq4_nl_impl: start from d = max / -kvalues[0] (the largest
magnitude onto the grid's end), try the largest magnitude onto the grid's positive end (lowbit's addition), and
try the inverse scales (kvalues[0] + t) / max for t in -STEPS..STEPS, take each
try's nearest grid indices and its weighted least-squares scale sum(w q x) / sum(w q^2), keep the try with the
largest sum(w q x)^2 / sum(w q^2) (the least weighted error). Weights: importance[col] * sqrt(sigma2 + x^2) with
an importance matrix (sigma2: twice the mean x^2 of the block, or of the super-block for IQ4_XS), x^2 without one.
Against llama.cpp's ggml_quantize_chunk on random weights the error ratio is 0.998-1.003 without importance and
0.978 with it (tests/test_gguf_kmix.py).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.quants import IQ4_NL

BLOCK = 32
SUPER = 256
STEPS = 7
GRID = torch.tensor(IQ4_NL.kvalues, dtype=torch.float32)
_MIDPOINTS = (GRID[1:] + GRID[:-1]) / 2


def quantize_iq4_nl(weight: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, K / 32 * 18) IQ4_NL blocks of a float (N, K) weight (K a multiple of 32)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"IQ4_NL needs rows that are whole blocks of {BLOCK}, not {cols}")
    x = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    return _pack(*_search(x, _weights(weight.float(), importance, BLOCK).reshape(x.shape)))


def quantize_iq4_xs(weight: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, K / 256 * 136) IQ4_XS blocks of a float (N, K) weight (K a multiple of 256)."""
    rows, cols = weight.shape
    if cols % SUPER:
        raise ValueError(f"IQ4_XS needs rows that are whole super-blocks of {SUPER}, not {cols}")
    x = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    sub, _ = _search(x, _weights(weight.float(), importance, SUPER).reshape(x.shape))
    sub = sub.reshape(rows, cols // SUPER, SUPER // BLOCK)
    top = sub.gather(-1, sub.abs().argmax(-1, keepdim=True))  # the sub-block scale of largest magnitude
    d = (-top / 32).to(torch.float16).float()
    ls = torch.round(sub / torch.where(d == 0, torch.ones_like(d), d)).clamp_(-32, 31).mul_(d != 0)
    step = (d * ls).reshape(rows, cols // BLOCK, 1)
    q = _nearest(x / torch.where(step == 0, torch.ones_like(step), step)).mul_(step != 0)
    u = (ls + 32).to(torch.int64)  # stored 0..63: low nibbles two per byte, top 2 bits of all eight in a uint16
    low = ((u[..., 0::2] & 15) | ((u[..., 1::2] & 15) << 4)).to(torch.uint8).numpy()
    high = ((u >> 4) << (2 * torch.arange(SUPER // BLOCK))).sum(-1).numpy().astype("<u2").view(np.uint8)
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).reshape(rows, cols // SUPER, -1).numpy()
    half = d.numpy().astype("<f2").view(np.uint8)
    return np.concatenate([half, high.reshape(rows, -1, 2), low, nibbles], axis=-1).reshape(rows, -1)


def _search(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of 32 (x: (N, blocks, 32)): the weighted least-squares scale (N, blocks, 1) of the best of the
    inverse scales tried, and its grid indices."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    best_q = _nearest(x * (-GRID[0] / safe))  # llama.cpp's first try: the peak onto the grid's positive end
    best_d, best_score = _fit(x, w, best_q)
    # llama.cpp's tries map the peak near the grid's negative end; the peak on its positive end (GRID[-1]) is tried
    # as well, so that weights already on the grid with that orientation come back exactly
    for target in [GRID[-1]] + [GRID[0] + t for t in range(-STEPS, STEPS + 1)]:
        q = _nearest(x * (target / safe))
        d, score = _fit(x, w, q)
        better = score > best_score
        best_q = torch.where(better, q, best_q)
        best_d, best_score = torch.where(better, d, best_d), torch.where(better, score, best_score)
    return torch.where(peak == 0, torch.zeros_like(best_d), best_d), best_q


def _weights(x: torch.Tensor, importance: torch.Tensor | None, span: int | None = None) -> torch.Tensor:
    """Search weights: x^2, or with importance importance * sqrt(sigma2 + x^2), sigma2 twice the mean x^2 of the
    block of `span` (32 for IQ4_NL, 256 for IQ4_XS, as quantize_row_iq4_nl_impl), or of the row."""
    if importance is None:
        return x * x
    if span is None:
        sigma2 = (x * x).mean(-1, keepdim=True)
    else:
        sigma2 = (2 * (x * x).reshape(x.shape[0], -1, span).mean(-1, keepdim=True)).expand(-1, -1, span)
        sigma2 = sigma2.reshape(x.shape)
    return importance.float()[None, :] * (sigma2 + x * x).sqrt()


def _nearest(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid value."""
    return torch.bucketize(scaled, _MIDPOINTS)


def _fit(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the weighted least-squares scale of these indices, the error reduction it achieves) per block."""
    v = GRID[q]
    sumqx = (w * v * x).sum(-1, keepdim=True)
    sumq2 = (w * v * v).sum(-1, keepdim=True)
    ok = sumq2 > 0
    d = torch.where(ok, sumqx / torch.where(ok, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumq2))
    return d, torch.where(ok, d * sumqx, torch.full_like(d, -1.0))


def _pack(d: torch.Tensor, q: torch.Tensor) -> np.ndarray:
    rows, nb = q.shape[:2]
    half = d.squeeze(-1).numpy().astype("<f2").view(np.uint8).reshape(rows, nb, 2)
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8).numpy()
    return np.concatenate([half, nibbles], axis=-1).reshape(rows, -1)
