"""Fake quantization of a linear layer's input activations in a torch model (W8A8 and similar schemes):
a forward pre-hook that rounds the input to the activation spec, statically (a calibrated per-tensor scale)
or dynamically, so perplexity measures what a low-precision kernel would compute. The same for a linear's
output (a forward hook): the K and V projections under an FP8 KV cache. And the online rotation (R4) of a
linear's input, a forward pre-hook too, so a saved model runs as it was quantized."""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.hadamard import Rotation
from ..algorithms.rotation import online_rotation_hook
from ..formats import fake_quant_activation
from ..spec import QuantSpec

_HOOK_ATTR = "_lowbit_input_quant"
_OUT_HOOK_ATTR = "_lowbit_output_quant"
_ONLINE_ATTR = "_lowbit_online_rotation"


def attach_input_quant(module: nn.Module, spec: QuantSpec, params: torch.Tensor | None) -> None:
    """Quantize `module`'s input on every call (replacing an earlier hook); params: the static scale
    (symmetric) or (scale, zero point) (asymmetric), None for dynamic per-token quantization."""
    detach_input_quant(module)

    def hook(mod, args):
        return (fake_quant_activation(args[0], spec, params), *args[1:])

    setattr(module, _HOOK_ATTR, module.register_forward_pre_hook(hook))


def detach_input_quant(module: nn.Module) -> None:
    handle = getattr(module, _HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HOOK_ATTR)


def attach_output_quant(module: nn.Module, spec: QuantSpec, params: torch.Tensor | None) -> None:
    """Quantize `module`'s output on every call (KV cache: the K / V projections), replacing an earlier hook."""
    detach_output_quant(module)

    def hook(mod, args, output):
        return fake_quant_activation(output, spec, params)

    setattr(module, _OUT_HOOK_ATTR, module.register_forward_hook(hook))


def detach_output_quant(module: nn.Module) -> None:
    handle = getattr(module, _OUT_HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _OUT_HOOK_ATTR)


def detach_online_rotation(module: nn.Module) -> None:
    handle = getattr(module, _ONLINE_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _ONLINE_ATTR)


def attach_online_rotation(module: nn.Module, q: Rotation) -> None:
    """Multiply `module`'s input by q at run time (R4), replacing an earlier online rotation."""
    detach_online_rotation(module)
    setattr(module, _ONLINE_ATTR, module.register_forward_pre_hook(online_rotation_hook(q), prepend=True))
