"""AWQ (Lin et al. 2023): per-input-channel scales that protect the weights seeing large activations, then a
per-group clipping search (FORMATS.md 6.2).

Works on tensors: the weights of the linears that read one input, and that input's statistics (InputStats).
Both searches minimise the *output* error of those linears over every calibration token, computed exactly
from the input's Gram matrix G = mean x x^T: mean_t ||(W - W_hat) x_t||^2 = sum_n d_n G d_n^T. AutoAWQ
measures the same quantity by re-running the module on a subset of tokens for every grid point; the Gram
form uses all tokens at a fraction of the cost (K x K per row instead of one forward per grid point).
"""

from __future__ import annotations

import torch

from ..formats import block_amax, fake_quant
from ..recipe import check_pattern, matches
from ..spec import QuantSpec
from .base import INPUT_STATS, Transform, register
from .stats import InputStats, output_error


def scaled_error(weights: list[torch.Tensor], specs: list[QuantSpec], gram: torch.Tensor,
                 s: torch.Tensor) -> float:
    """Output error (summed over all rows) of quantizing W diag(s) and undoing s: W_hat = Q(W s) / s."""
    total = 0.0
    for w, spec in zip(weights, specs):
        w = w.float()
        w_hat = fake_quant(w * s, spec) / s
        total += output_error(w_hat - w, gram).sum().item()
    return total


def search_scales(weights: list[torch.Tensor], specs: list[QuantSpec], stats: InputStats, grid: int = 20,
                  duo_scaling: bool = True) -> tuple[torch.Tensor, float, float]:
    """AWQ's grid search over alpha in {0, 1/grid, ..., (grid-1)/grid}: s = x_mean^a / w_mean^(1-a) (duo
    scaling; s = x_mean^a without it), normalised so that sqrt(max s * min s) = 1. The identity (no scaling)
    is a candidate too, so the result never has a larger output error than plain quantization.
    Returns (s, error with s, error without scaling)."""
    x_mean = stats.abs_mean
    gram = stats.gram
    base = scaled_error(weights, specs, gram, torch.ones_like(x_mean))
    if duo_scaling:  # mean over rows of |W| relative to its quantization block's largest magnitude
        rel = torch.cat([w.float().abs() / block_amax(w, spec).clamp_min(1e-6) for w, spec in zip(weights, specs)])
        w_mean = rel.mean(dim=0)
    best_s, best = torch.ones_like(x_mean), base
    for i in range(grid):
        alpha = i / grid
        s = x_mean.pow(alpha)
        if duo_scaling:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = scaled_error(weights, specs, gram, s)
        if err < best:
            best, best_s = err, s
    return best_s, best, base


def search_clip(weight: torch.Tensor, spec: QuantSpec, gram: torch.Tensor, grid: int = 20,
                max_shrink: float = 0.5) -> torch.Tensor:
    """AWQ's clipping search: for every quantization block, the range shrink factor in
    {1, 1 - 1/grid, ..., 1 - (ceil(max_shrink * grid) - 1)/grid} with the lowest output error of that block's
    own inputs (a block's error is d_b G_bb d_b^T over its columns b). Returns factors shaped like the
    scales (row blocks, column blocks); 1 means no clipping."""
    w = weight.float()
    rows, cols = w.shape
    br, bc = spec.block_shape(rows, cols)
    n_rb, n_cb = -(-rows // br), -(-cols // bc)
    best_err = torch.full((n_rb, n_cb), float("inf"))
    best = torch.ones(n_rb, n_cb)
    for i in range(max(1, int(round(max_shrink * grid)))):
        ratio = 1 - i / grid
        clip = torch.full((n_rb, n_cb), ratio)
        delta = fake_quant(w, spec, clip) - w
        err = torch.empty(rows, n_cb)
        for c in range(n_cb):
            sl = slice(c * bc, min((c + 1) * bc, cols))
            err[:, c] = output_error(delta[:, sl], gram[sl, sl])
        if br > 1:  # per-tensor: one block of all rows
            err = err.sum(dim=0, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, clip, best)
    return best


@register
class AWQ(Transform):
    """Activation-aware scaling of every group of linears that read one input, folded into the op that
    produces the input, then (optionally) a clipping search per linear."""

    name = "awq"
    needs = frozenset({INPUT_STATS})

    LIMITS = {"grid": (1, None), "clip_grid": (1, None), "max_shrink": (0.0, 0.99)}

    def __init__(self, grid: int = 20, duo_scaling: bool = True, clip: bool = True, clip_grid: int = 20,
                 max_shrink: float = 0.5, clip_skip: str = "", scale: bool = True):
        self.grid, self.duo_scaling, self.clip = int(grid), bool(duo_scaling), bool(clip)
        self.scale = bool(scale)  # False: the clipping search alone (ModelOpt's awq_clip)
        self.clip_grid, self.max_shrink = int(clip_grid), float(max_shrink)
        self.clip_skip = tuple(p for p in str(clip_skip).split("|") if p)
        for pattern in self.clip_skip:
            check_pattern(pattern)

    def args(self) -> dict:
        return {"grid": self.grid, "duo_scaling": self.duo_scaling, "clip": self.clip, "clip_grid": self.clip_grid,
                "max_shrink": self.max_shrink, "clip_skip": "|".join(self.clip_skip), "scale": self.scale}

    def channel_scales(self, names, weights, specs, stats: InputStats) -> torch.Tensor | None:
        if not self.scale:
            return None
        s, err, base = search_scales(weights, specs, stats, self.grid, self.duo_scaling)
        for n in names:
            self.notes[n] = f"awq output error x{err / base:.3f}" if base > 0 else "awq: no error to reduce"
        return s

    def clip_ratios(self, names, weights, specs, stats: InputStats) -> list[torch.Tensor | None]:
        if not self.clip:
            return [None] * len(names)
        return [None if any(matches(p, n) for p in self.clip_skip) else
                search_clip(w, spec, stats.gram, self.clip_grid, self.max_shrink)
                for n, w, spec in zip(names, weights, specs)]
