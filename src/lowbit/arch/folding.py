"""Where per-input-channel scales fold (AWQ, SmoothQuant): for each group of linears that read one input, the
op producing that input, found on the block itself rather than from a per-family table.

Candidates are the modules whose output *is* the input (norms: y = n(x) * w [+ b], or Gemma's
y = n(x) * (1 + w)) and the earlier linears with as many outputs as the group has inputs (v_proj -> o_proj,
up_proj -> down_proj, OPT's fc1 -> fc2 through ReLU). A candidate is accepted only when dividing its output
by random per-channel scales and multiplying the group's input columns by them leaves the block's output
unchanged, so a wrong guess (a gate through SiLU, a norm that also feeds the residual) can never be folded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RULES = ("linear", "scale", "one_plus")


@dataclass(frozen=True)
class Fold:
    """Divide `module`'s output by s per channel: rule "linear" (rows of weight and bias), "scale" (a norm's
    weight and bias) or "one_plus" (a norm computing x * (1 + w): w <- (1 + w) / s - 1, bias / s)."""

    module: str
    rule: str


def divide_output(module: nn.Module, rule: str, s: torch.Tensor) -> None:
    """Make `module` compute its old output divided by s (per output channel), in float64 then cast back."""
    w = module.weight
    s64 = s.double()
    with torch.no_grad():
        if rule == "linear":
            w.copy_((w.double() / s64[:, None]).to(w.dtype))
        elif rule == "scale":
            w.copy_((w.double() / s64).to(w.dtype))
        elif rule == "one_plus":
            w.copy_(((1 + w.double()) / s64 - 1).to(w.dtype))
        else:
            raise ValueError(f"unknown fold rule {rule!r}")
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.copy_((bias.double() / s64).to(bias.dtype))


def multiply_inputs(linear: nn.Module, s: torch.Tensor) -> None:
    """Multiply a linear's input columns by s: with its input divided by s it computes the same."""
    w = linear.weight
    with torch.no_grad():
        w.copy_((w.double() * s.double()[None, :]).to(w.dtype))


def _norm_like(module: nn.Module, channels: int) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() == 1 and w.shape[0] == channels


def find_folds(block: nn.Module, stages: list[tuple[str, ...]], run, seed: int = 0) -> dict[tuple[str, ...], Fold | None]:
    """For each stage (block-relative names of linears reading one input, in execution order) the Fold that
    scales its input, or None. `run()` runs the block on a small fixed input and returns its output."""
    modules = dict(block.named_modules())
    stage_inputs: dict[tuple[str, ...], torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    hooks = []
    for st in stages:
        hooks.append(modules[st[0]].register_forward_pre_hook(
            lambda m, a, st=st: stage_inputs.setdefault(st, a[0])))
    for name, module in modules.items():
        if name and not isinstance(module, nn.Linear) and getattr(module, "weight", None) is not None:
            hooks.append(module.register_forward_hook(lambda m, a, out, n=name: outputs.setdefault(n, out)))
    try:
        with torch.no_grad():
            reference = run()
    finally:
        for h in hooks:
            h.remove()
    tolerance = 1e-3 if reference.dtype == torch.float32 or reference.dtype == torch.float64 else 3e-2
    generator = torch.Generator().manual_seed(seed)
    folds: dict[tuple[str, ...], Fold | None] = {}
    for idx, st in enumerate(stages):
        x = stage_inputs.get(st)
        folds[st] = None
        if x is None:
            continue
        channels = x.shape[-1]
        candidates = [(n, rule) for n, out in outputs.items()
                      if isinstance(out, torch.Tensor) and _norm_like(modules[n], channels)
                      and (out is x or (out.shape == x.shape and torch.equal(out, x)))
                      for rule in ("scale", "one_plus")]
        candidates += [(n, "linear") for earlier in stages[:idx] for n in earlier
                       if getattr(modules[n], "out_features", None) == channels]
        for name, rule in candidates:
            # drawn on the CPU (a seeded CPU generator), then where the block works
            s = torch.empty(channels, device="cpu").uniform_(0.5, 2.0, generator=generator).to(x.device)
            if _output_unchanged(modules, name, rule, st, s, run, reference, tolerance):
                folds[st] = Fold(name, rule)
                break
    return folds


def _output_unchanged(modules, producer: str, rule: str, consumers, s, run, reference, tolerance) -> bool:
    """Whether folding s into producer/consumers keeps the block's output (parameters restored after)."""
    touched = [modules[producer], *(modules[c] for c in consumers)]
    saved = [{k: p.detach().clone() for k, p in m.named_parameters(recurse=False)} for m in touched]
    try:
        divide_output(modules[producer], rule, s)
        for c in consumers:
            multiply_inputs(modules[c], s)
        with torch.no_grad():
            out = run()
        scale = reference.abs().max().clamp_min(1e-12)
        return bool(((out - reference).abs().max() / scale) < tolerance)
    finally:
        with torch.no_grad():
            for m, params in zip(touched, saved):
                for k, v in params.items():
                    getattr(m, k).copy_(v)
