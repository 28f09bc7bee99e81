"""SmoothQuant (Xiao et al. 2022): move activation outliers into the weights with per-input-channel scales
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded into the op that produces X (FORMATS.md 6.4), so that
8-bit activations lose less. Works on tensors: the weights of the linears that share an input and that
input's per-channel maxima."""

from __future__ import annotations

import torch

from .base import INPUT_STATS, Transform, register
from .stats import InputStats


def smooth_scales(weights: list[torch.Tensor], stats: InputStats, alpha: float = 0.5) -> torch.Tensor:
    """s_j = max_t |x_tj|^alpha / max_n |W_nj|^(1-alpha), over all linears reading x; clamped to >= 1e-5."""
    w_max = torch.cat([w.float().abs() for w in weights]).amax(dim=0).clamp_min(1e-5)
    x_max = stats.abs_max.clamp_min(1e-5)
    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@register
class SmoothQuant(Transform):
    name = "smoothquant"
    needs = frozenset({INPUT_STATS})
    needs_gram = False

    def __init__(self, alpha: float = 0.5):
        self.alpha = float(alpha)
        if not 0 <= self.alpha <= 1:
            from ..errors import LowbitError

            raise LowbitError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")

    def args(self) -> dict:
        return {"alpha": self.alpha}

    def channel_scales(self, names, weights, specs, stats: InputStats) -> torch.Tensor:
        return smooth_scales(weights, stats, self.alpha)
