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
- "fisher": sum_j F_j (dW H dW^T)_jj, the output error of each output channel j weighted by F_j, the mean squared
  gradient of the next-token loss with respect to that channel (the diagonal empirical Fisher of the linear's
  output, output_fisher): a second-order estimate of what the quantization adds to the model's loss, in the same
  units for every linear, so that a channel the loss ignores costs nothing and one it hangs on costs much.
"""

from __future__ import annotations

import torch

from ..formats import fake_quant
from .base import Transform

MEASURES = ("fisher", "relative", "output", "weight")


class SensitivityProbe(Transform):
    """Records table[name] = [(candidate spec, error), ...]; candidates(name, weight) lists a linear's specs."""

    name = "sensitivity"

    def __init__(self, candidates, measure: str = "relative", fisher: dict | None = None):
        """fisher (measure "fisher"): linear name -> F, its output channels' mean squared loss gradient."""
        self.candidates, self.measure, self.fisher = candidates, measure, fisher or {}
        self.needs_gram = measure != "weight"
        self.table: dict[str, list] = {}

    def clip_ratios(self, names, weights, specs, stats) -> list:
        gram = stats.gram if self.measure != "weight" else None
        for name, w in zip(names, weights):
            signal = float((w.float() @ gram).mul_(w.float()).sum()) if self.measure == "relative" else 1.0
            rows = self._row_weights(name, w) if self.measure == "fisher" else None
            self.table[name] = [(spec, error(w, spec, gram, rows) / max(signal, 1e-30))
                                for spec in self.candidates(name, w)]
        return [None] * len(names)

    def _row_weights(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """A linear's Fisher weights; one the loss's gradient never reached (an expert no calibration token was
        routed to) gets the mean weight of all the others."""
        found = self.fisher.get(name)
        if found is None:
            known = [f.mean() for f in self.fisher.values()]
            return torch.full((w.shape[0],), float(sum(known) / len(known)) if known else 1.0)
        return found


def error(weight: torch.Tensor, spec, gram: torch.Tensor | None, row_weights: torch.Tensor | None = None) -> float:
    """The error a spec's round-to-nearest quantization causes: on the output (Gram matrix given; each output
    channel weighted by row_weights if given) or on the weight."""
    w = weight.float()
    dw = fake_quant(w, spec) - w
    if gram is None:
        return float(dw.pow(2).sum())
    rows = (dw @ gram.to(dw)).mul_(dw).sum(1)
    return float(rows.sum() if row_weights is None else rows.double() @ row_weights.to(rows.device).double())


def output_fisher(model, names, windows: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """name -> F (float64, on the host) for each named linear of a whole float model: F_j is the squared gradient
    of a window's mean next-token loss with respect to output channel j, summed over the window's tokens and
    averaged over the windows (one forward and backward pass per window; the weights get no gradient)."""
    fisher: dict[str, torch.Tensor] = {}

    def accumulate(name: str, grad: torch.Tensor) -> None:
        sq = grad.detach().reshape(-1, grad.shape[-1]).double().pow(2).sum(0).cpu()
        fisher[name] = fisher[name] + sq if name in fisher else sq

    def on_output(name: str):
        def hook(module, args, output):
            if output.requires_grad:
                output.register_hook(lambda grad: accumulate(name, grad))
        return hook

    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_hook(on_output(n)) for n in names if n in modules]
    hooks.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True)))
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():  # also when the caller runs under no_grad
            _backward_each(model, windows, device)
    finally:
        for h in hooks:
            h.remove()
        for p, flag in frozen:
            p.requires_grad_(flag)
    return {n: f / len(windows) for n, f in fisher.items()}


def _backward_each(model, windows: torch.Tensor, device) -> None:
    """One forward and backward pass of each window's mean next-token loss."""
    for window in windows:
        ids = window[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        torch.nn.functional.cross_entropy(logits, ids[0, 1:]).backward()


class ImportanceProbe(Transform):
    """Records, per linear, llama.cpp's importance-matrix entry: the sum over the calibration tokens of each input
    column's squared activation (the Gram matrix's diagonal times the token count) and the token count. Changes
    nothing (lowbit imatrix)."""

    name = "importance"
    needs_gram = True

    def __init__(self):
        self.sums: dict[str, tuple[torch.Tensor, int]] = {}

    def clip_ratios(self, names, weights, specs, stats) -> list:
        sums = stats.gram.diagonal().double().cpu() * stats.count
        for name in names:
            self.sums[name] = (sums, stats.count)
        return [None] * len(names)
