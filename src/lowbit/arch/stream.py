"""How a decoder block reads and writes the residual stream, found on the block itself by one probe forward
(no per-family table): the linears that read a normalised stream (and the norm in front of each), the
linears whose outputs are added back to it, and what kind of norm it is. A rotation of the stream is only
exact with this map right, so whoever applies one checks the block's output afterwards."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError

NORM_RULES = ("scale", "one_plus")  # y = n(x) * w (+ b)  |  y = n(x) * (1 + w) (Gemma)


@dataclass(frozen=True)
class StreamRoles:
    """Block-relative names: readers (linear -> the norm producing its input), the norms' rules, writers in
    execution order, and whether the norms subtract the mean (LayerNorm) rather than only rescale (RMSNorm)."""

    readers: dict[str, str]
    norm_rules: dict[str, str]
    writers: tuple[str, ...]
    subtracts_mean: bool


def norm_like(module: nn.Module, width: int) -> bool:
    """A module with a per-channel weight of the stream's width that is not a linear or an embedding."""
    w = getattr(module, "weight", None)
    return (not isinstance(module, (nn.Linear, nn.Embedding)) and isinstance(w, torch.Tensor) and w.dim() == 1
            and w.shape[0] == width)


@contextmanager
def _weights(module: nn.Module, weight: torch.Tensor | None = None, zero_bias: bool = False):
    """Temporarily give a norm another weight (and no bias)."""
    saved_w = module.weight.detach().clone()
    bias = getattr(module, "bias", None)
    saved_b = bias.detach().clone() if isinstance(bias, torch.Tensor) else None
    try:
        with torch.no_grad():
            if weight is not None:
                module.weight.copy_(weight)
            if zero_bias and saved_b is not None:
                module.bias.zero_()
        yield
    finally:
        with torch.no_grad():
            module.weight.copy_(saved_w)
            if saved_b is not None:
                module.bias.copy_(saved_b)


def norm_rule(module: nn.Module) -> str | None:
    """"scale" when the norm computes n(x) * w (+ b), "one_plus" for n(x) * (1 + w), None for anything else;
    decided by running it with its own weight, with w = 1 and with w = 0 on a random input."""
    w = module.weight.detach()
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(0), device="cpu").to(w.device, w.dtype)
    bias = getattr(module, "bias", None)
    beta = bias.detach() if isinstance(bias, torch.Tensor) else torch.zeros_like(w)
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 2e-2
    with torch.no_grad():
        own = module(x) - beta
        with _weights(module, torch.ones_like(w)):
            ones = module(x) - beta
        with _weights(module, torch.zeros_like(w)):
            zeros = module(x) - beta
    scale = own.abs().max().clamp_min(1e-12)
    if ((ones * w - own).abs().max() / scale) < tol:
        return "scale"
    if ((zeros * (1 + w) - own).abs().max() / scale) < tol:
        return "one_plus"
    return None


def identity_weight(rule: str, like: torch.Tensor) -> torch.Tensor:
    """The weight that makes a norm of this rule apply no gain."""
    return torch.ones_like(like) if rule == "scale" else torch.zeros_like(like)


def gain(rule: str, weight: torch.Tensor) -> torch.Tensor:
    """The per-channel gain a norm weight applies."""
    return weight if rule == "scale" else 1 + weight


def subtracts_mean(module: nn.Module, rule: str) -> bool:
    """Whether the norm ignores a constant added to every channel (LayerNorm) - then only a rotation that keeps
    the all-ones direction commutes with it."""
    w = module.weight.detach()
    x = torch.randn(4, w.shape[0], generator=torch.Generator().manual_seed(1), device="cpu").to(w.device, w.dtype)
    with torch.no_grad(), _weights(module, identity_weight(rule, w), zero_bias=True):
        a, b = module(x), module(x + 3.0)
    return bool(((a - b).abs().max() / a.abs().max().clamp_min(1e-12)) < 1e-3)


def find_stream_roles(block: nn.Module, run, width: int) -> StreamRoles:
    """Probe the block once (`run()` runs it on a fixed input) and classify its linears: a reader's input is
    the output of a norm of the stream's width; a writer has the stream's width as output and is no reader.
    Refused when a linear is never called by the probe (MoE experts) or a norm is of an unknown kind."""
    modules = dict(block.named_modules())
    called: list[str] = []
    inputs: dict[str, torch.Tensor] = {}
    norm_outputs: dict[str, torch.Tensor] = {}

    def linear_called(name, x):  # hooks must return None, or they replace the input / output
        called.append(name)
        inputs.setdefault(name, x)

    def norm_ran(name, out):
        norm_outputs.setdefault(name, out)

    hooks = []
    for name, m in modules.items():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a, n=name: linear_called(n, a[0])))
        elif name and norm_like(m, width):
            hooks.append(m.register_forward_hook(lambda mod, a, out, n=name: norm_ran(n, out)))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
    order = list(dict.fromkeys(called))
    missed = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in inputs]
    if missed:
        raise LowbitError(f"rotation cannot map {', '.join(missed[:3])}{' ...' if len(missed) > 3 else ''}: the "
                          f"probe forward never calls it (mixture-of-experts layers are not rotated yet); quantize "
                          f"without rotation")
    readers = {}
    for name in order:
        if modules[name].in_features != width:
            continue
        x = inputs[name]
        for norm, out in norm_outputs.items():
            if isinstance(out, torch.Tensor) and (out is x or (out.shape == x.shape and torch.equal(out, x))):
                readers[name] = norm
                break
    rules = {}
    for norm in dict.fromkeys(readers.values()):
        rules[norm] = norm_rule(modules[norm])
        if rules[norm] is None:
            raise LowbitError(f"rotation cannot absorb {norm} ({type(modules[norm]).__name__}): it is neither "
                              f"n(x) * w nor n(x) * (1 + w); quantize without rotation")
    writers = tuple(n for n in order if modules[n].out_features == width and n not in readers)
    means = {subtracts_mean(modules[n], r) for n, r in rules.items()}
    if len(means) > 1:
        raise LowbitError("rotation needs one kind of norm per block; this block mixes RMSNorm and LayerNorm")
    return StreamRoles(readers, rules, writers, means.pop() if means else False)
