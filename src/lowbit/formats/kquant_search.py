"""llama.cpp's K-quant grids (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) as tensor maths: the two-level scales a weight gets
and its codes on them, vectorised over all super-blocks at once (the algorithms of ggml-quants.c, reimplemented).
exporters/gguf_kquants packs them into GGUF blocks; formats/gguf_grid makes them a lowbit weight format, so GPTQ's
and RTN's codes land on the grid the GGUF file stores.

A super-block is 256 consecutive columns of one row, cut into sub-blocks of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K,
Q5_K) weights. Every type works in three steps, as llama.cpp does:
1. search each sub-block's scale (and, for the affine Q2_K / Q4_K / Q5_K, its min) minimising a weighted error
   (make_qkx2_quants / make_qkx3_quants; make_qx_quants / make_q3_quants for the symmetric Q3_K / Q6_K);
2. quantize those sub-block scales (and mins) to 4, 6 or 8 bit integers under float16 super-block scales
   (make_qp_quants; make_qx_quants for Q3_K; the int8 max rule of quantize_row_q6_K): kquant_grid;
3. recompute every weight's code with the quantized scales: grid_codes.
Without an importance vector the search uses the weighting of llama.cpp's quantize_row_*_ref; with one, that of
quantize_row_*_impl (importance * sqrt(sigma2 + x^2), Q6_K: importance alone). Departures from llama.cpp, none
visible in the format: step 2 of Q2_K..Q5_K always uses the least-squares make_qp_quants / make_qx_quants of the
*_impl functions (the *_ref ones round against the largest scale); the affine search adds a second sweep of its
trial scales (see _search_affine); with importance, the symmetric search ends with make_q3_quants' code
refinement. Against llama.cpp's own quantizer (ggml_quantize_chunk) on random weights, the relative RMS error
measured at most 0.3% above it, usually below (up to 6% below with importance).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KQUANT_NAMES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
SUPER = 256
EPS = 1e-15  # GROUP_MAX_EPS: a group whose largest |value| is below this is all zero
TIE = 1e-12  # relative margin by which a later trial must beat an earlier one (exact ties keep the earlier)
CHUNK = 1024  # super-blocks searched together: big enough to vectorize, small enough to stay in cache

# type -> (weights per sub-block, nmax); affine codes are 0..nmax, symmetric ones -nmax..nmax-1
_SHAPE = {"q2_k": (16, 3), "q3_k": (16, 4), "q4_k": (32, 15), "q5_k": (32, 31), "q6_k": (16, 32)}
# make_qkx2_quants arguments (rmin, rdelta, nstep, use_mad) of quantize_row_*_ref, and the make_qkx3_quants ones
# of quantize_row_*_impl (used when an importance vector is given)
_REF_SEARCH = {"q2_k": (-0.5, 0.1, 15, True), "q4_k": (-1.0, 0.1, 20, False), "q5_k": (-0.5, 0.1, 15, False)}
_IMPORTANCE_SEARCH = (-0.9, 0.05, 36, False)
_TRIALS = (0, *range(-9, 0), *range(1, 10))  # make_qx_quants' inverse scales -(nmax + 0.1 i) / max, in its order


def _importance(importance, rows: int, cols: int) -> torch.Tensor | None:
    """The (K,) importance vector checked and spread over the super-blocks (rows * K / 256, 256)."""
    if importance is None:
        return None
    imp = torch.as_tensor(importance).detach().to("cpu", torch.float32)
    if imp.shape != (cols,):
        raise ValueError(f"importance must have shape ({cols},), got {tuple(imp.shape)}")
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise ValueError("importance must be finite and non-negative")
    return imp.expand(rows, cols).reshape(-1, SUPER)


def _search_chunk(x: torch.Tensor, imp: torch.Tensor | None, qtype) -> tuple[torch.Tensor, ...]:
    """Step 1 for a chunk of super-blocks x (B, 256): per sub-block (scale, the_min, summed search weights) for
    Q2_K / Q4_K / Q5_K, (scale, summed search weights) for Q3_K / Q6_K."""
    sub, nmax = _SHAPE[qtype]
    w = _search_weights(x, qtype, imp).view(len(x), -1, sub)
    xs = x.view(len(x), -1, sub)
    if qtype in _REF_SEARCH:
        search = _REF_SEARCH[qtype] if imp is None else _IMPORTANCE_SEARCH
        return (*_search_affine(xs, w, nmax, *search), w.sum(-1))
    if imp is None:  # quantize_row_q3_K_ref: make_q3_quants (trial 0, refined); q6_K: make_qx_quants
        return _search_symmetric(xs, w, nmax, (0,) if qtype == "q3_k" else _TRIALS, qtype == "q3_k")[0], w.sum(-1)
    return _search_symmetric(xs, w, nmax)[0], w.sum(-1)


def _search_weights(x: torch.Tensor, qtype, imp: torch.Tensor | None) -> torch.Tensor:
    """Per-weight weights (B, 256) of the sub-block search. Without importance (quantize_row_*_ref): Q2_K |x|,
    Q3_K / Q6_K x^2, Q4_K / Q5_K rms(sub-block) + |x|. With it (quantize_row_*_impl): importance * sqrt(sigma2 +
    x^2), sigma2 = mean x^2 of the super-block (twice that for Q3_K / Q4_K / Q5_K); Q6_K: importance alone."""
    if imp is None:
        if qtype == "q2_k":
            return x.abs()
        if qtype in ("q3_k", "q6_k"):
            return x * x
        xs = x.view(len(x), -1, 32)
        return (xs.square().mean(-1, keepdim=True).sqrt() + xs.abs()).reshape(x.shape)
    if qtype == "q6_k":
        return imp
    sigma2 = x.square().mean(-1, keepdim=True) * (1.0 if qtype == "q2_k" else 2.0)
    return imp * (sigma2 + x * x).sqrt()


def _search_affine(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                   mad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qkx2_quants / make_qkx3_quants over the last axis: codes l = round(iscale * (x - min)) in 0..nmax,
    first for iscale = nmax / (max - min), min = min(x, 0), then for nstep + 1 trial iscales (rmin + rdelta * i
    + nmax) / (max - min), each refit by weighted least squares (scale, min <= 0) and kept when its weighted
    squared (mad: absolute) error is lower. As in llama.cpp, a kept trial's min is the offset of the later
    trials; a second sweep of the same trials, all offset by min(x, 0), may then improve the fit further.
    Returns (scale, the_min = -min >= 0), both float64."""
    top = x.amax(-1)
    lo = x.amin(-1).clamp(max=0)
    flat = top <= lo
    wx = w * x
    base = [t.double() for t in (w.sum(-1), wx.sum(-1), _dot(wx, x))]
    span = torch.where(flat, 1.0, top - lo)
    scale, mn = (span / nmax).double(), lo.double()
    best = _affine_error(x, w, _codes(x, mn, nmax / span, nmax), scale, mn, base, mad)
    sum_w, sum_x, _ = base
    for anchored in (False, True):
        for i in range(nstep + 1):
            offset = lo.double() if anchored else mn
            span = torch.where(flat, 1.0, top - offset.float())
            l = _codes(x, offset, (rmin + rdelta * i + nmax) / span, nmax)
            sums = _lsums(x, w, l)
            sum_l, sum_l2, sum_xl = sums
            det = sum_w * sum_l2 - sum_l * sum_l
            safe = torch.where(det > 0, det, 1.0)
            s = (sum_w * sum_xl - sum_x * sum_l) / safe
            m = (sum_l2 * sum_x - sum_l * sum_xl) / safe
            s = torch.where(m > 0, sum_xl / torch.where(sum_l2 > 0, sum_l2, 1.0), s)
            m = m.clamp(max=0)
            err = _affine_error(x, w, l, s, m, base, mad, sums)
            take = (det > 0) & (err < best)
            scale, mn, best = torch.where(take, s, scale), torch.where(take, m, mn), torch.where(take, err, best)
    return torch.where(flat, 0.0, scale), -mn


def _codes(x: torch.Tensor, mn: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    """round(iscale * (x - mn)) clamped to 0..nmax, mn and iscale one value per group."""
    return _round_((x - mn.float()[..., None]).mul_(iscale[..., None])).clamp_(0, nmax)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum a * b over the last axis, without the (…, n) product."""
    return torch.einsum("...n,...n->...", a, b)


def _lsums(x: torch.Tensor, w: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(sum w l, sum w l^2, sum w l x) over the last axis, as float64."""
    wl = w * l
    return wl.sum(-1).double(), _dot(wl, l).double(), _dot(wl, x).double()


def _affine_error(x: torch.Tensor, w: torch.Tensor, l: torch.Tensor, s: torch.Tensor, m: torch.Tensor, base: list,
                  mad: bool, sums: tuple | None = None) -> torch.Tensor:
    """sum w |s l + m - x| (mad) or sum w (s l + m - x)^2, the latter expanded into sums (float64)."""
    if mad:
        diff = (l * s.float()[..., None]).add_(m.float()[..., None]).sub_(x).abs_()
        return _dot(diff, w).double()
    sum_w, sum_x, sum_x2 = base
    sum_l, sum_l2, sum_xl = sums if sums is not None else _lsums(x, w, l)
    return s * s * sum_l2 + 2 * s * m * sum_l - 2 * s * sum_xl + m * m * sum_w - 2 * m * sum_x + sum_x2


def _search_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, trials: tuple = _TRIALS,
                      refine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants (rmse_type 1, weights w) over the last axis of float32 x: for iscale = -(nmax + 0.1 i) /
    max, i in trials (max: the value of largest magnitude), codes round(iscale * x) in -nmax..nmax-1 and their
    weighted least-squares scale; keeps the best fit, then (refine) improves its codes as make_q3_quants does.
    Returns (scale, signed codes), float64; 0 when max < EPS."""
    top = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
    zero = top.abs() < EPS
    top = torch.where(zero, 1.0, top)
    best = iscale = None
    x64, w64 = x.double(), w.double()
    for i in trials:
        trial = -(nmax + 0.1 * i) / top
        l = _round_(x * trial[..., None]).clamp_(-nmax, nmax - 1).double()
        wl = w64 * l
        sumlx, suml2 = _dot(wl, x64), _dot(wl, l)
        if best is None:
            best, iscale = sumlx * sumlx / torch.where(suml2 > 0, suml2, 1.0), trial
            continue
        take = (suml2 > 0) & (sumlx * sumlx > best * suml2 * (1 + TIE))
        best = torch.where(take, sumlx * sumlx / torch.where(suml2 > 0, suml2, 1.0), best)
        iscale = torch.where(take, trial, iscale)
    codes = _round_(x * iscale[..., None]).clamp_(-nmax, nmax - 1).double().mul_(~zero[..., None])
    if refine:
        codes = _refine_codes(x64, w64, codes, -nmax, nmax - 1)
    suml2 = _dot(w64 * codes, codes)
    return _dot(w64 * x64, codes) / torch.where(suml2 > 0, suml2, 1.0), codes


def _quantize_scales(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants: non-negative (B, S) sub-block scales (or mins) as codes 0..nmax times one super-scale:
    the best of nine inverse scales (nmax + 0.1 i) / max, i in -4..4, by weighted error (weights w = the
    sub-blocks' summed search weights), then coordinate-descent code updates and the least-squares super-scale.
    Returns (super-scale (B,), codes (B, S)), float64; all zero when max < EPS."""
    x, w = x.double(), w.double()
    top = x.amax(-1, keepdim=True)
    zero = top[..., 0] < EPS
    top = torch.where(top < EPS, 1.0, top)
    iscale = nmax / top
    best = (w * (x - _qp_codes(x, iscale, nmax) / iscale) ** 2).sum(-1, keepdim=True)
    for i in (-4, -3, -2, -1, 1, 2, 3, 4):
        trial = (0.1 * i + nmax) / top
        err = (w * (x - _qp_codes(x, trial, nmax) / trial) ** 2).sum(-1, keepdim=True)
        iscale, best = torch.where(err < best, trial, iscale), torch.minimum(err, best)
    codes = _refine_codes(x, w, _qp_codes(x, iscale, nmax), 0, nmax)
    suml2 = (w * codes * codes).sum(-1)
    scale = (w * x * codes).sum(-1) / torch.where(suml2 > 0, suml2, 1.0)
    return torch.where(zero, 0.0, scale), torch.where(zero[..., None], 0.0, codes)


def _qp_codes(x: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    """round(iscale * x) clamped to 0..nmax."""
    return _round_(x * iscale).clamp_(0, nmax)


def _refine_codes(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, lo: int, hi: int,
                  iters: int = 5) -> torch.Tensor:
    """The code refinement of make_qp_quants / make_q3_quants over the last axis (float64): up to `iters` sweeps
    moving each code to round(x_i * sl2 / slx), the least-squares code for the other codes' scale, clamped to
    lo..hi, when that raises sumlx^2 / suml2, i.e. lowers the weighted error at the least-squares scale."""
    sumlx, suml2 = _dot(w * x, codes), _dot(w * codes, codes)
    x, w, codes = (t.movedim(-1, 0).clone(memory_format=torch.contiguous_format) for t in (x, w, codes))
    for _ in range(iters):
        changed = False
        for i in range(len(x)):
            xi, wi, li = x[i], w[i], codes[i]
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx != 0) & (sl2 > 0)
            new = _round_(xi * sl2 / torch.where(ok, slx, 1.0)).clamp_(lo, hi)
            nlx, nl2 = slx + wi * xi * new, sl2 + wi * new * new
            take = ok & (new != li) & (nlx * nlx * suml2 > sumlx * sumlx * nl2 * (1 + TIE))
            codes[i] = torch.where(take, new, li)
            sumlx, suml2 = torch.where(take, nlx, sumlx), torch.where(take, nl2, suml2)
            changed = changed or bool(take.any())
        if not changed:
            break
    return codes.movedim(0, -1)


def _int8_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_row_q6_K's scale rule: the sub-block scale of largest magnitude becomes -128, d = f16(-max / 128),
    sc = min(127, round(-128 / max * scale)). Returns (d as stored, float32 (B,); sc (B, 16)); zero blocks all 0."""
    idx = scale.abs().argmax(-1, keepdim=True)
    top = scale.gather(-1, idx)
    zero = top.abs() < EPS
    iscale = -128.0 / torch.where(zero, 1.0, top)
    sc = torch.where(zero, 0.0, _round_(iscale * scale).clamp_(-128, 127))
    d = _half(torch.where(zero, 0.0, 1.0 / iscale)[..., 0])
    return d, sc


def _round_(t: torch.Tensor) -> torch.Tensor:
    """t rounded in place, half to even, by llama.cpp's nearest_int trick (adding and removing 1.5 * 2^23, or
    2^52 for float64): exact below 2^22 (2^51), and callers clamp larger values. torch.round is avoided because
    it is slow on small tensors when OpenMP threads compete for busy cores."""
    magic = 12582912.0 if t.dtype == torch.float32 else 6755399441055744.0
    return t.add_(magic).sub_(magic)


def _half(t: torch.Tensor) -> torch.Tensor:
    """float values rounded to float16 (how llama.cpp stores d / dmin), back as float32."""
    return t.to(torch.float32).to(torch.float16).to(torch.float32)



@dataclass
class KGrid:
    """The quantized two-level scales of B super-blocks: float16-exact super-scales d (B,) (and dmin for the
    affine types) and integer sub-block scales ls (B, S) (and mins lm), as float tensors. A weight's value is
    d * ls_j * q - dmin * lm_j (affine, q in 0..nmax) or d * ls_j * q (symmetric, q in -nmax..nmax-1)."""

    d: torch.Tensor
    ls: torch.Tensor
    dmin: torch.Tensor | None = None
    lm: torch.Tensor | None = None

    def steps(self) -> torch.Tensor:
        """(B, S) effective sub-block scales d * ls, float32."""
        return (self.d[:, None] * self.ls).float()

    def offsets(self) -> torch.Tensor | None:
        """(B, S) effective sub-block offsets dmin * lm (the value of code 0 is minus this), float32."""
        return None if self.dmin is None else (self.dmin[:, None] * self.lm).float()


def shape_of(kind: str) -> tuple[int, int]:
    """(weights per sub-block, nmax) of a K-quant: affine codes are 0..nmax, symmetric ones -nmax..nmax-1."""
    return _SHAPE[kind]


def is_affine(kind: str) -> bool:
    return kind in _REF_SEARCH


def kquant_grid(weight: torch.Tensor, kind: str, importance: torch.Tensor | None = None) -> KGrid:
    """Steps 1 and 2 for a float (N, K) weight, K a multiple of 256: the grid of its N * K / 256 super-blocks
    (row-major). importance: optional (K,) non-negative per-column weights (llama.cpp's importance matrix)."""
    rows, cols = weight.shape
    x = weight.detach().to("cpu", torch.float32).reshape(-1, SUPER)
    imp = _importance(importance, rows, cols)
    parts = [_search_chunk(x[i:i + CHUNK], None if imp is None else imp[i:i + CHUNK], kind)
             for i in range(0, len(x), CHUNK)]
    stats = [torch.cat(found) for found in zip(*parts)]
    if is_affine(kind):
        scale, the_min, sw = stats
        smax = 15 if kind == "q2_k" else 63
        d, ls = _quantize_scales(scale, sw, smax)
        dmin, lm = _quantize_scales(the_min, sw, smax)
        return KGrid(_half(d), ls, _half(dmin), lm)
    scale, sw = stats
    if kind == "q3_k":
        d, sc = _search_symmetric(scale.float(), sw, 32, refine=False)
        return KGrid(_half(d), sc)
    return KGrid(*_int8_scales(scale))


def grid_codes(x: torch.Tensor, kind: str, grid: KGrid) -> torch.Tensor:
    """Step 3: each weight's code, round((x + offset) / step) in 0..nmax (affine) or round(x / step) in
    -nmax..nmax-1 (symmetric), 0 where the step is 0; x (B, 256), int32 (B, 256)."""
    sub, nmax = _SHAPE[kind]
    xs = x.reshape(len(x), -1, sub)
    step = grid.steps()[..., None]
    if is_affine(kind):
        q = _round_((xs + grid.offsets()[..., None]).div_(torch.where(step > 0, step, 1.0))).clamp_(0, nmax)
        return q.mul_(step > 0).reshape(len(x), SUPER).to(torch.int32)
    q = _round_(xs / torch.where(step != 0, step, 1.0)).clamp_(-nmax, nmax - 1)
    return q.mul_(step != 0).reshape(len(x), SUPER).to(torch.int32)
