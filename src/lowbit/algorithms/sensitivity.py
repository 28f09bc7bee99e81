"""Sensitivity of each linear to its quantization format, measured on calibration inputs (for mixed precision,
mixed.py). A transform that changes nothing: for each group of linears reading one input it receives the input's
statistics (the Gram matrix H = mean x x^T) and records, for every candidate spec of each linear, the error its
round-to-nearest quantization causes.

Measures (MEASURES):
- "output": tr(dW H dW^T), the mean squared error of the linear's output over the calibration tokens (dW = Q(W) -
  W): what the layer's quantization does to what it computes, on the data it will see.
- "relative": tr(dW H dW^T) / tr(W H W^T), the output error relative to the output itself (a noise-to-signal
  ratio): every linear counts alike whatever the scale of its output, which grows along the residual stream.
- "weight": ||dW||^2, the squared weight error alone (no data: every input channel counts alike).
"""

from __future__ import annotations

import torch

from ..formats import fake_quant
from .base import Transform

MEASURES = ("relative", "output", "weight")


class SensitivityProbe(Transform):
    """Records table[name] = [(candidate spec, error), ...]; candidates(name, weight) lists a linear's specs."""

    name = "sensitivity"

    def __init__(self, candidates, measure: str = "relative"):
        self.candidates, self.measure = candidates, measure
        self.needs_gram = measure != "weight"
        self.table: dict[str, list] = {}

    def clip_ratios(self, names, weights, specs, stats) -> list:
        gram = stats.gram if self.measure != "weight" else None
        for name, w in zip(names, weights):
            signal = float((w.float() @ gram).mul_(w.float()).sum()) if self.measure == "relative" else 1.0
            self.table[name] = [(spec, error(w, spec, gram) / max(signal, 1e-30)) for spec in self.candidates(name, w)]
        return [None] * len(names)


def error(weight: torch.Tensor, spec, gram: torch.Tensor | None) -> float:
    """The error a spec's round-to-nearest quantization causes: on the output (Gram matrix given) or the weight."""
    w = weight.float()
    dw = fake_quant(w, spec) - w
    if gram is None:
        return float(dw.pow(2).sum())
    return float((dw @ gram.to(dw)).mul_(dw).sum())
