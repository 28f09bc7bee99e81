"""The weighted scale searches of llama.cpp's legacy GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, and Q8_0's symmetric
grid), vectorized over all 32-weight blocks at once (gguf-py's reference quantizer only rounds against the block's
extremes; this reimplements the idea of ggml-quants.c's quantize_row_q{4,5}_{0,1}_impl). exporters/gguf_legacy
packs the result; formats/gguf_grid makes these grids lowbit weight formats (w_q4_0 ...).

Each block of 32 consecutive columns of one row is fitted in three steps:
1. search a scale (symmetric: make_qx_quants over trial scales -(nmax + 0.1 i) / max, codes refined) or a
   scale and min (affine: make_qkx3_quants' trial sweep) minimising a weighted squared error;
2. candidates: gguf-py's own (d = max / -nmax, or d = (max - min) / nmax with m = min) and the searched one,
   each with d (and m) rounded to float16 as stored and every code recomputed as the nearest for those stored
   values; the candidate of lowest weighted error wins (ties keep gguf-py's);
3. two refits: the least-squares d (and m) for the winning codes, rounded to float16, codes recomputed, kept
   when the error drops.
Because gguf-py's scale is a candidate scored with optimal codes, the weighted error of every block is at most
that of gguf-py's blocks (with its stored float16 scale); with the default uniform weights that is the plain
squared error. Weights: with an importance vector (llama.cpp's imatrix, per-column mean squared activation)
importance[col] * sqrt(sigma2 + x^2), sigma2 = mean x^2 of the row, as llama.cpp; without one, uniform (on
Gaussian data with outliers llama.cpp's x^2-style weighting gave a higher plain error; see the tests).
"""

from __future__ import annotations

import torch

from .kquant_search import _IMPORTANCE_SEARCH, _half, _round_, _search_affine, _search_symmetric

BLOCK = 32
CHUNK = 4096  # blocks searched together
# grid -> (affine, nmax): symmetric codes l in -nmax..nmax-1 stored as l + nmax; affine codes 0..nmax
LEGACY = {"q4_0": (False, 8), "q4_1": (True, 15), "q5_0": (False, 16), "q5_1": (True, 31), "q8_0": (False, 128)}


def legacy_grid(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(d, m, stored codes) of every 32-column block (row-major) of a float (N, K) weight, K a multiple of 32:
    float16-representable float32 d and m (m zero when symmetric), codes 0..nmax (affine) or 0..2 nmax - 1."""
    affine, nmax = LEGACY[kind]
    x = weight.detach().to("cpu", torch.float32)
    w = search_weights(x, importance).reshape(-1, BLOCK)
    x = x.reshape(-1, BLOCK)
    parts = [_fit(x[i:i + CHUNK], w[i:i + CHUNK], affine, nmax) for i in range(0, len(x), CHUNK)]
    return tuple(torch.cat(found) for found in zip(*parts))


def search_weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-weight search weights (N, K): uniform without importance, else importance[col] * sqrt(sigma2 + x^2)
    with sigma2 the row's mean x^2 (llama.cpp's quantize_row_q4_0_impl and siblings)."""
    if importance is None:
        return torch.ones_like(x)
    imp = torch.as_tensor(importance).detach().to("cpu", torch.float32)
    if imp.shape != (x.shape[1],):
        raise ValueError(f"importance must have shape ({x.shape[1]},), got {tuple(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    sigma2 = x.square().mean(-1, keepdim=True)
    return imp * (sigma2 + x * x).sqrt()


def _fit(x: torch.Tensor, w: torch.Tensor, affine: bool, nmax: int) -> tuple[torch.Tensor, ...]:
    """(d, m, stored codes) of blocks x (B, 32): float16-representable float32 d and m (m zero when
    symmetric), codes 0..nmax (affine) or 0..2 nmax - 1 (symmetric)."""
    if affine:
        lo, hi = x.amin(-1), x.amax(-1)
        scale, the_min = _search_affine(x, w, nmax, *_IMPORTANCE_SEARCH)
        cands = [((hi - lo) / nmax, lo), (scale.float(), -the_min.float())]
        bounds = (0, nmax)
    else:
        top = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        scale = _search_symmetric(x, w, nmax)[0]
        zero = torch.zeros_like(top)
        cands = [(top / -nmax, zero), (scale.float(), zero)]
        bounds = (-nmax, nmax - 1)
    best = None
    for d, m in cands:
        best = _keep_better(best, _score(x, w, d, m, bounds))
    for _ in range(2):
        best = _keep_better(best, _score(x, w, *_refit(x, w, best[2], affine), bounds))
    d, m, codes, _ = best
    return d, m, (codes - bounds[0]).to(torch.uint8)


def _score(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, m: torch.Tensor, bounds: tuple) -> tuple:
    """(d, m) rounded to float16, the nearest codes in bounds for them, and the weighted squared error."""
    d, m = _half(d), _half(m)
    safe = torch.where(d == 0, 1.0, d)
    codes = _round_((x - m[:, None]) / safe[:, None]).clamp_(*bounds).mul_((d != 0)[:, None])
    err = (w * (codes * d[:, None] + m[:, None] - x).square()).sum(-1, dtype=torch.float64)
    return d, m, codes, err


def _keep_better(best: tuple | None, new: tuple) -> tuple:
    """Per block, the (d, m, codes, err) of `new` where its error is strictly lower than best's."""
    if best is None:
        return new
    take = new[3] < best[3]
    return tuple(torch.where(take[:, None] if a.dim() == 2 else take, a, b) for a, b in zip(new, best))


def _refit(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, affine: bool) -> tuple[torch.Tensor, ...]:
    """Weighted least-squares (d, m) for fixed codes (m = 0 when symmetric), float32; degenerate blocks give
    d = 0 (affine: m = weighted mean), which _score then rarely prefers."""
    x, w, l = x.double(), w.double(), codes.double()
    sw, sx, sl = w.sum(-1), (w * x).sum(-1), (w * l).sum(-1)
    sl2, sxl = (w * l * l).sum(-1), (w * x * l).sum(-1)
    if not affine:
        return (sxl / torch.where(sl2 > 0, sl2, 1.0)).float(), torch.zeros_like(sw, dtype=torch.float32)
    det = sw * sl2 - sl * sl
    ok = det > 1e-12 * sw * sl2
    safe = torch.where(ok, det, 1.0)
    d = torch.where(ok, (sw * sxl - sx * sl) / safe, 0.0)
    m = torch.where(ok, (sl2 * sx - sl * sxl) / safe, sx / torch.where(sw > 0, sw, 1.0))
    return d.float(), m.float()
