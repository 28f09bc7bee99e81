"""Hadamard rotation (QuaRot, Ashkboos et al. 2024) as maths on weight tensors, shared by every front end.

R1 turns the residual stream h into h Q for an orthogonal Q (FORMATS.md 6.5): the norm weights are first
absorbed into the linears that read the stream, then readers get W Q (HF weight (out, in)), writers Q^T W,
embeddings E Q. R2 rotates each attention head's values by a head-size H (v_proj rows, o_proj columns).
R4 multiplies down_proj's input by a Hadamard H at run time and its weight by H offline. Outliers spread
over all channels, so low-bit weights and activations lose less. All products run in float64.
"""

from __future__ import annotations

import functools

import torch

from ..errors import LowbitError
from .base import GLOBAL_TRANSFORM, Algorithm, register
from .hadamard import Rotation


ROWS_PER_CHUNK = 4096  # float64 work on a big matrix (a 128k-token lm_head) goes a slice of rows at a time


def _by_rows(fn, tensor: torch.Tensor) -> torch.Tensor:
    """fn (float64 rows -> float64 rows) applied to `tensor` in row chunks, cast back to its dtype."""
    if tensor.dim() < 2 or tensor.shape[0] <= ROWS_PER_CHUNK:
        return fn(tensor.double()).to(tensor.dtype)
    return torch.cat([fn(part.double()).to(tensor.dtype) for part in tensor.split(ROWS_PER_CHUNK)])


def absorb_and_rotate_reader(weight: torch.Tensor, q: Rotation, gamma: torch.Tensor | None) -> torch.Tensor:
    """A stream reader's weight (out, D) -> (W diag(gamma)) Q: the norm's per-channel gain moves into the
    linear (so the norm can become plain and commute with Q), then the input side is rotated."""
    g = None if gamma is None else gamma.double()[None, :]
    return _by_rows(lambda w: q.right(w if g is None else w * g), weight)


def rotate_writer(weight: torch.Tensor, q: Rotation) -> torch.Tensor:
    """A stream writer's weight (D, in) -> Q^T W, so its output comes out rotated."""
    return q.right(weight.double().T).T.contiguous().to(weight.dtype)


def rotate_vector(vector: torch.Tensor, q: Rotation) -> torch.Tensor:
    """Row vectors on the stream (a writer's bias, the embeddings, a norm's bias) -> v Q."""
    return _by_rows(q.right, vector)


def rotate_input(weight: torch.Tensor, q: Rotation) -> torch.Tensor:
    """Any linear's weight (out, K) -> W Q: right for an input multiplied by Q at run time (R4)."""
    return _by_rows(q.right, weight)


def rotate_head_outputs(tensor: torch.Tensor, h: Rotation) -> torch.Tensor:
    """The rows of a value projection (weight (heads * d, in) or bias (heads * d,)) rotated head by head:
    each head's output v becomes v H (R2)."""
    d = h.n
    if tensor.dim() == 1:
        return h.right(tensor.double().reshape(-1, d)).reshape(-1).to(tensor.dtype)
    w = tensor.double().reshape(-1, d, tensor.shape[1]).transpose(1, 2)  # (heads, in, d)
    return h.right(w).transpose(1, 2).reshape(tensor.shape).contiguous().to(tensor.dtype)


def rotate_head_inputs(weight: torch.Tensor, h: Rotation) -> torch.Tensor:
    """The columns of an output projection (out, heads * d) rotated head by head, to read v H (R2)."""
    d = h.n
    return h.right(weight.double().reshape(weight.shape[0], -1, d)).reshape(weight.shape).to(weight.dtype)


def online_rotation_hook(q: Rotation):
    """A forward pre-hook multiplying a linear's input by Q at run time (R4), in the input's dtype."""

    def hook(module, args):
        x = args[0]
        return (q.right(x), *args[1:])

    return hook


@functools.lru_cache(maxsize=8)
def online_rotation(size: int) -> Rotation:
    """The R4 matrix of an input width: the plain normalised Hadamard (a seeded random orthogonal matrix where
    no Hadamard order fits), rebuilt from the width alone when a saved model is loaded."""
    return Rotation(size, seed=None)


@register
class Rotate(Algorithm):
    """The chain element `rotation`: R1 always; r2 (per-head values) and r4 (online Hadamard before down_proj)
    on request; seed picks the random signs (recorded in the recipe, so the result is reproducible)."""

    name = "rotation"
    role = "rotation"
    needs = frozenset({GLOBAL_TRANSFORM})

    def __init__(self, seed: int = 0, r2: bool = False, r4: bool = False):
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise LowbitError(f"rotation seed must be an integer, got {seed!r}")
        for key, value in (("r2", r2), ("r4", r4)):
            if not isinstance(value, bool):
                raise LowbitError(f"rotation option {key} must be true or false, got {value!r}")
        self.seed, self.r2, self.r4 = seed, r2, r4

    @property
    def rotates_online(self) -> bool:
        return self.r4

    def args(self) -> dict:
        return {"seed": self.seed, "r2": self.r2, "r4": self.r4}
