"""Statistics of a linear layer's input, accumulated over calibration chunks: what AWQ, GPTQ and SmoothQuant
need to know about the activations, and nothing else (so the torch and ONNX paths can feed them alike)."""

from __future__ import annotations

import torch

# Fewer calibration tokens than this (a rarely routed MoE expert) and a linear is not calibrated: its
# transforms leave it unscaled and GPTQ falls back to RTN, each with a note in the summary.
MIN_CALIBRATION_TOKENS = 16


class InputStats:
    """Running statistics of the rows x_t (tokens) of an input with `columns` channels:
    gram = mean_t x_t x_t^T (float32; only when `gram=True`), abs_mean = mean_t |x_t|, abs_max = max_t |x_t|
    (only when `channel_stats=True`: GPTQ needs the Gram alone, and they cost passes over every token)."""

    def __init__(self, columns: int, gram: bool = True, channel_stats: bool = True):
        self._gram = torch.zeros(columns, columns, dtype=torch.float32) if gram else None
        self._upper_only = False  # whether _gram's blocks below the diagonal are still to be mirrored
        self.abs_sum = torch.zeros(columns, dtype=torch.float64) if channel_stats else None
        self.abs_max = torch.zeros(columns, dtype=torch.float32) if channel_stats else None
        self.count = 0

    @property
    def gram(self) -> torch.Tensor | None:
        """The full symmetric mean outer product (its lower blocks rewritten from the upper ones once per read
        after an add)."""
        if self._upper_only:
            self._gram = torch.triu(self._gram) + torch.triu(self._gram, 1).T
            self._upper_only = False
        return self._gram

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        if self.abs_sum is not None:
            a = x.abs()
            self.abs_sum += a.sum(0, dtype=torch.float64)
            torch.maximum(self.abs_max, a.amax(0), out=self.abs_max)
        if self._gram is not None:
            self._add_upper_gram(x, n)
        self.count += n

    def _add_upper_gram(self, x: torch.Tensor, n: int, panels: int = 4) -> None:
        """Fold x^T x into the running mean, computing only the blocks on and above the diagonal (a symmetric
        product: ~0.6x the time of the full one; benchmarks/gptq_lower_bound.py). `gram` mirrors them."""
        g = self._gram  # its lower blocks may be stale: `gram` rewrites them from the upper ones
        g.mul_(self.count / (self.count + n))
        columns = x.shape[1]
        width = -(-columns // panels)
        for i in range(0, columns, width):
            g[i:i + width, i:].addmm_(x[:, i:i + width].T, x[:, i:], alpha=1.0 / (self.count + n))
        self._upper_only = True

    def combine(self, sum_, max_) -> None:
        """Merge the statistics other processes gathered on their share of the tokens into these: `sum_` and
        `max_` reduce a list of tensors in place across processes (parallel.Ranks). Every process must call it
        for the same statistics in the same order, whether or not it saw any token."""
        count = torch.tensor([float(self.count)], dtype=torch.float64)
        sum_([count])
        gram = self.gram  # the full matrix (its lower blocks mirrored)
        if gram is not None:
            gram.mul_(self.count)  # the mean times its count: a sum, which adds across processes
            sum_([gram])
            gram.div_(max(float(count), 1.0))
        if self.abs_sum is not None:
            sum_([self.abs_sum])
            max_([self.abs_max])
        self.count = int(count)

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
        if self.abs_sum is not None:
            self.abs_sum /= s.double()
            self.abs_max /= s
        if self._gram is not None:
            self._gram /= s[:, None] * s[None, :]  # the mirrored and the pending blocks alike


class PairedStats(InputStats):
    """Statistics of an input seen in two models at once, chunk by chunk: x~ in the model being quantized (its
    upstream already quantized) and x in the float model (asymmetric calibration, GPTAQ). The Gram matrix is
    x~'s; `cross` = mean_t (x_t - x~_t) x~_t^T (K x K, float32)."""

    def __init__(self, columns: int):
        super().__init__(columns, gram=True, channel_stats=False)
        self.cross = torch.zeros(columns, columns, dtype=torch.float32)

    def add_pair(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """A chunk of x~ and the same tokens' x."""
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        delta = target.reshape(-1, target.shape[-1]).float() - x
        self.cross.mul_(self.count / (self.count + n)).addmm_(delta.T, x, alpha=1.0 / (self.count + n))
        self.add(x)

    def combine(self, sum_, max_) -> None:
        self.cross.mul_(self.count)
        sum_([self.cross])
        super().combine(sum_, max_)
        self.cross.div_(max(self.count, 1))


class HessianAccumulator(InputStats):
    """GPTQ's statistics: the Gram matrix alone."""

    def __init__(self, columns: int):
        super().__init__(columns, gram=True, channel_stats=False)


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Mean squared output error per row caused by a weight change delta (N, K) on inputs with Gram matrix
    `gram` (K, K): mean_t ((delta x_t)^2) = delta_n gram delta_n^T, exact and without the tokens."""
    return ((delta @ gram) * delta).sum(dim=1)
