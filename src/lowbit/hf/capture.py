"""Capturing a decoder block's inputs: run the model up to its first block and keep what that block receives
(hidden states and keyword arguments such as position embeddings and masks), minus any KV cache."""

from __future__ import annotations

import inspect

import torch
from torch import nn

# keyword arguments of a decoder block that carry a KV cache: dropped, so replays never append to a cache
CACHE_KWARGS = ("past_key_value", "past_key_values", "use_cache", "layer_past")


class StopForward(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


def capture_block_inputs(model: nn.Module, block: nn.Module, batches,
                         place=lambda t: t.cpu()) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, block kwargs) for each batch of token ids, taken at `block`'s entry and put where
    `place` says (the engine's Placement.activations); the forward stops there, so only what runs before the
    block needs weights."""
    captured = []
    accepted = set(inspect.signature(block.forward).parameters)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS and (k in accepted or "kwargs" in accepted)}
        captured.append((place(hidden.detach()), kept))
        raise StopForward

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except StopForward:
                    pass
    finally:
        handle.remove()
    return captured


def first_window(inputs):
    """The first calibration window alone (hidden states and batch-shaped kwargs cut to one row): enough for
    probes, 1/batch of their cost."""
    hidden, kwargs = inputs[0]
    rows = hidden.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows and rows > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(x) for x in v)
        return v

    return [(hidden[:1], {k: cut(v) for k, v in kwargs.items()})]
