"""llama.cpp's legacy GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1) quantized from float weights by the weighted search of
formats/legacy_search, packed in gguf-py's layout.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..formats.legacy_search import BLOCK, LEGACY, legacy_grid
from .gguf_kquants import _f16_bytes, _pack

_TYPES = {T.Q4_0: "q4_0", T.Q4_1: "q4_1", T.Q5_0: "q5_0", T.Q5_1: "q5_1"}
LEGACY_TYPES = tuple(_TYPES)


def quantize_legacy(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, K // 32 * block_bytes) blocks of a float (N, K) weight, K a multiple of 32. importance:
    optional (K,) non-negative per-column weights; the search then minimises the importance-weighted error."""
    if qtype not in _TYPES:
        raise ValueError(f"quantize_legacy makes only {[t.name for t in LEGACY_TYPES]}, not {qtype!r}")
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"quantize_legacy needs a 2-D weight whose columns are a multiple of {BLOCK}, "
                         f"got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    affine, nmax = LEGACY[_TYPES[qtype]]
    d, m, q = legacy_grid(weight, _TYPES[qtype], importance)
    q = q.to(torch.int32)
    heads = [_f16_bytes(d)] + ([_f16_bytes(m)] if affine else [])
    if nmax in (16, 31):  # Q5_0 / Q5_1: qh, bit j = bit 4 of element j, little-endian uint32
        bits = ((q >> 4) & 1).to(torch.int64) << torch.arange(BLOCK, dtype=torch.int64)
        heads.append(bits.sum(-1).numpy().astype("<u4").view(np.uint8).reshape(-1, 4))
    return np.concatenate([*heads, _pack(q & 15, 16, 4)], axis=-1).reshape(rows, -1)


