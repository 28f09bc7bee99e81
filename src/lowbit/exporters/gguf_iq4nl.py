"""IQ4_NL: blocks of 32 weights, a float16 scale d and 4-bit indices into a fixed non-uniform grid of 16 values
(gguf.quants.IQ4_NL.kvalues), value = d * kvalues[q]. llama.cpp's fallback for Q2_K / Q3_K tensors whose rows
are not whole 256-wide super-blocks (gguf_mixes.FALLBACK); gguf-py dequantizes it but cannot quantize it.

The scale search follows llama.cpp's quantize_row_iq4_nl_impl: start from d = max / -kvalues[0] (the largest
magnitude onto the grid's end), try the inverse scales (kvalues[0] + t) / max for t in -STEPS..STEPS, take each
try's nearest grid indices and its weighted least-squares scale sum(w q x) / sum(w q^2), keep the try with the
largest sum(w q x)^2 / sum(w q^2) (the least weighted error). Weights: importance[col] * sqrt(sigma2 + x^2) with
an importance matrix (sigma2: the row's mean x^2), x^2 without one.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.quants import IQ4_NL

BLOCK = 32
STEPS = 7
GRID = torch.tensor(IQ4_NL.kvalues, dtype=torch.float32)
_MIDPOINTS = (GRID[1:] + GRID[:-1]) / 2


def quantize_iq4_nl(weight: torch.Tensor, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, K / 32 * 18) IQ4_NL blocks of a float (N, K) weight (K a multiple of 32)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"IQ4_NL needs rows that are whole blocks of {BLOCK}, not {cols}")
    x = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    w = _weights(weight.float(), importance).reshape(x.shape)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # the signed value of largest magnitude
    safe = torch.where(peak == 0, torch.ones_like(peak), peak)
    best_q = _nearest(x * (GRID[0] / safe))
    best_d, best_score = _fit(x, w, best_q)
    for t in range(-STEPS, STEPS + 1):
        q = _nearest(x * ((GRID[0] + t) / safe))
        d, score = _fit(x, w, q)
        better = score > best_score
        best_q = torch.where(better, q, best_q)
        best_d, best_score = torch.where(better, d, best_d), torch.where(better, score, best_score)
    best_d = torch.where(peak == 0, torch.zeros_like(best_d), best_d)
    return _pack(best_d, best_q)


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    if importance is None:
        return x * x
    sigma2 = (x * x).mean(-1, keepdim=True)
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
