"""Qronos (Zhang, Colbert et al. 2025, "Qronos: Correcting the Past by Shaping the Future in Post-Training
Quantization"): like GPTAQ, each linear's input is observed in the model being quantized (x~) and in the float
model (x), and the target is the float model's output W x. Qronos corrects the upstream's error by least squares
once, at the start, then spreads rounding errors forward as GPTQ does:

1. the first column (act-order) that best reproduces W x with the other columns as they are, rounded;
2. all the other columns re-solved by (damped) least squares to reproduce W x given that rounded column;
3. GPTQ over the remaining columns from there (the trailing rows of the inverse Hessian's Cholesky factor are
   those of the remaining columns' own, so step 3 is gptq_quantize with the first column already on the grid).

With x = x~ steps 1 and 2 are GPTQ's first step, and the result is GPTQ's. Damping is `damp` times H's largest
eigenvalue, added to the diagonal of H and of the cross-covariance alike. The paper's 1e-6 lets step 2 fit the
calibration windows: on the demo at 3 bits with 16 windows it gave perplexity 50.2 on held-out text against
34.9 with 1e-3 and 36.1 with 1e-1 (16.11 vs 17.38 on the calibration text's own evaluation windows), so lowbit's
default is 1e-3 (docs/BENCHMARKS.md). The grid (static groups) is computed from the weights after step 1.
"""

from __future__ import annotations

import torch

from ..formats import grid_round
from ..spec import QuantSpec
from .base import register
from .gptaq import GPTAQ
from .gptq import column_order, gptq_quantize, grid_params, prepared


def largest_eigenvalue(H: torch.Tensor, steps: int = 30) -> float:
    """The largest eigenvalue of a symmetric positive semi-definite matrix, by power iteration."""
    v = torch.ones(H.shape[0], dtype=H.dtype) / H.shape[0] ** 0.5
    for _ in range(steps):
        w = H @ v
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return 0.0
        v = w / norm
    return float(v @ H @ v)


def qronos_quantize(weight: torch.Tensor, H: torch.Tensor, G: torch.Tensor, spec: QuantSpec, block_size: int = 128,
                    damp: float = 1e-3, act_order: bool = True, clip: torch.Tensor | None = None):
    """Qronos of weight (N, K) with H = 2/n sum x~ x~^T and G = 2/n sum x x~^T (float model's input first).
    Returns the quantized weight and the damping used (in `damp`'s terms: raised when a factorisation failed)."""
    W0, H, _ = prepared(weight, H)
    N, K = W0.shape
    G = G.float()
    lam0 = damp * largest_eigenvalue(H)
    perm = column_order(H, act_order)
    first, rest = perm[0], perm[1:]
    W = W0.clone()
    # 1. the first column given the others, for the float model's output; then the grid and its rounded value
    W[:, first] = (W0 @ G[:, first] - W0[:, rest] @ H[rest, first]) / H[first, first]
    scale, zero, t = grid_params(W, spec, clip, H)
    g = first // spec.block_shape(N, K)[1]
    s = scale[:, g].expand(N) if scale.shape[0] == 1 else scale[:, g]
    z = None if zero is None else (zero[:, g].expand(N) if zero.shape[0] == 1 else zero[:, g])
    q0 = grid_round(W[:, first] / s, spec, z) * s
    # 2. the other columns given the rounded one (least squares, damped alike)
    lam = _least_squares(W, W0, H, G, q0, first, rest, lam0) if len(rest) else lam0
    W[:, first] = q0
    # 3. GPTQ from there on the same grid: the first column has no rounding error left to spread
    relative = max(lam / float(H.diagonal().mean().clamp_min(1e-12)), 1e-12)
    qt, used = gptq_quantize(W, H, spec, block_size, relative, act_order, qparams=(scale, zero, t))
    return qt, damp * (lam / lam0 if lam0 > 0 else 1.0) * (used / relative)


def _least_squares(W, W0, H, G, q0, first, rest, lam: float, tries: int = 6) -> float:
    """W[:, rest] <- the columns that best reproduce the float model's output (of the original weights W0) given
    column `first` = q0, under damping lam added to both H and G (raised tenfold while the factorisation
    fails). Returns the damping used."""
    eye = torch.eye(len(rest), dtype=H.dtype)
    base = W0 @ G[:, rest] - q0[:, None] * H[first, rest][None, :]
    for _ in range(tries):
        chol, info = torch.linalg.cholesky_ex(H[rest][:, rest] + lam * eye)
        if info == 0:
            W[:, rest] = torch.cholesky_solve((base + lam * W0[:, rest]).T, chol).T
            return lam
        lam *= 10
    raise torch.linalg.LinAlgError(f"Hessian not positive definite even with damping {lam / 10:g}")


@register
class Qronos(GPTAQ):
    """Qronos as a calibrated quantizer: GPTAQ's paired observation, Qronos's solve."""

    name = "qronos"
    LIMITS = {"block_size": (1, None), "damp": (1e-12, 1.0)}

    def __init__(self, block_size: int = 128, damp: float = 1e-3, act_order: bool = True, clip: bool = True):
        super().__init__(block_size, damp, act_order, clip)

    def args(self) -> dict:
        out = super().args()
        out.pop("alpha")
        return out

    def solver_args(self, acc) -> dict:
        return {"G": 2 * (acc.cross + acc.gram)}  # x x~^T = (x - x~) x~^T + x~ x~^T

    def solve(self, weight, H, spec: QuantSpec, clip, G=None):
        return qronos_quantize(weight, H, G, spec, self.block_size, self.damp, self.act_order, clip)
