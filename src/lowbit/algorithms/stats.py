"""Statistics of a linear layer's input, accumulated over calibration chunks: what AWQ, GPTQ and SmoothQuant
need to know about the activations, and nothing else (so the torch and ONNX paths can feed them alike)."""

from __future__ import annotations

import torch


class InputStats:
    """Running statistics of the rows x_t (tokens) of an input with `columns` channels:
    gram = mean_t x_t x_t^T (float32; only when `gram=True`), abs_mean = mean_t |x_t|, abs_max = max_t |x_t|."""

    def __init__(self, columns: int, gram: bool = True):
        self.gram = torch.zeros(columns, columns, dtype=torch.float32) if gram else None
        self.abs_sum = torch.zeros(columns, dtype=torch.float64)
        self.abs_max = torch.zeros(columns, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        a = x.abs()
        self.abs_sum += a.sum(0, dtype=torch.float64)
        torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        if self.gram is not None:
            self.gram.mul_(self.count / (self.count + n))
            self.gram.addmm_(x.T, x, alpha=1.0 / (self.count + n))
        self.count += n

    @property
    def abs_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def H(self) -> torch.Tensor:
        """GPTQ's Hessian of the squared output error, 2/n * sum x x^T."""
        return 2 * self.gram

    def divide_channels(self, s: torch.Tensor) -> None:
        """The statistics of x / s (per channel), after a scale s was folded into the op producing x."""
        s = s.float()
        self.abs_sum /= s.double()
        self.abs_max /= s
        if self.gram is not None:
            self.gram /= s[:, None] * s[None, :]


HessianAccumulator = InputStats  # GPTQ's name for it


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Mean squared output error per row caused by a weight change delta (N, K) on inputs with Gram matrix
    `gram` (K, K): mean_t ((delta x_t)^2) = delta_n gram delta_n^T, exact and without the tokens."""
    return ((delta @ gram) * delta).sum(dim=1)
