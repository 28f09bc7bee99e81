"""Replay: once a stage's single linear L is quantized, later passes over the block need not recompute the
submodule M whose whole result is L's output (Llama's self_attn for o_proj, its mlp for down_proj): L applied
to its cached inputs gives the same result. stages.find_replays decides which M qualify.

For the pass, M is swapped in its parent for a stand-in module (Replayed) and put back afterwards. A forward
hook cannot do this (hooks run around a forward, never instead of it), and patching M's `forward` tied the
engine to the argument names transformers passes (they changed between releases); the stand-in accepts any
arguments and ignores them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn


class Replayed(nn.Module):
    """Stands in for a module during a pass: returns its final linear applied to that linear's cached input of
    the current calibration chunk, shaped like the module's own result (a tensor, or a tuple padded with None).
    Attribute reads the caller makes of the module (its config, a flag) reach the original."""

    def __init__(self, original: nn.Module, linear: nn.Module, cache: list, length: int | None,
                 chunk: Callable[[], int]):
        super().__init__()
        object.__setattr__(self, "_original", original)  # not registered: the block's modules stay as they were
        object.__setattr__(self, "_linear", linear)
        self._cache, self._length, self._chunk = cache, length, chunk

    def forward(self, *args, **kwargs):
        y = self._linear(self._cache[self._chunk()])
        return y if self._length is None else (y,) + (None,) * (self._length - 1)

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "_original"), name)


@contextmanager
def replaying(block: nn.Module, replays: dict[str, tuple], chunk: Callable[[], int]):
    """While active, each module named in `replays` ({module name: (its final linear, that linear's inputs per
    chunk, the module's tuple length or None)}) is replaced in `block` by a Replayed stand-in."""
    swapped = []
    for name, (linear, cache, length) in replays.items():
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        original = parent._modules[child]
        parent._modules[child] = Replayed(original, linear, cache, length, chunk)
        swapped.append((parent, child, original))
    try:
        yield
    finally:
        for parent, child, original in swapped:
            parent._modules[child] = original


def cached_input(x: torch.Tensor) -> torch.Tensor:
    """A stage input kept for replay: a view is copied, so the cache does not pin its (larger) base tensor."""
    return x if x._base is None else x.clone()
