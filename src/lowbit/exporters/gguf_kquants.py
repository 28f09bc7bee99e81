"""llama.cpp's K-quant GGUF blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): the grids of formats/kquant_search packed
in the byte layouts gguf-py's dequantizers (gguf/quants.py) and llama.cpp read. quantize_k makes them from float
weights (search, grid, codes); pack_k packs codes a lowbit K-quant spec already holds (GPTQ's, RTN's), exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..formats.kquant_search import SUPER, KGrid, grid_codes, is_affine, kquant_grid, shape_of

KQUANT_TYPES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def quantize_k(weight: torch.Tensor, qtype, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, K // 256 * block_bytes) blocks of a float (N, K) weight, K a multiple of 256. importance: optional
    (K,) non-negative per-column weights (llama.cpp's importance matrix: mean squared input activation per
    column); when given, the scale/min search minimises the importance-weighted squared error the way llama.cpp's
    quantize_row_*_impl does with quant_weights; without it, the weighting of llama.cpp's quantize_row_*_ref."""
    if qtype not in KQUANT_TYPES:
        raise ValueError(f"quantize_k makes only the K-quant types {[t.name for t in KQUANT_TYPES]}, not {qtype!r}")
    if weight.dim() != 2 or weight.shape[1] % SUPER:
        raise ValueError(f"quantize_k needs a 2-D weight whose columns are a multiple of {SUPER}, "
                         f"got shape {tuple(weight.shape)}")
    kind = qtype.name.lower()
    grid = kquant_grid(weight, kind, importance)
    x = weight.detach().to("cpu", torch.float32).reshape(-1, SUPER)
    return pack_k(grid_codes(x, kind, grid), qtype, grid, weight.shape[0])


def pack_k(codes: torch.Tensor, qtype, grid: KGrid, rows: int) -> np.ndarray:
    """(rows, K // 256 * block_bytes) uint8 blocks of signed / unsigned codes (B, 256) on `grid` (B super-blocks,
    row-major)."""
    kind = qtype.name.lower()
    nmax = shape_of(kind)[1]
    q = codes.reshape(-1, SUPER).to(torch.int32)
    d = grid.d.float()
    if is_affine(kind):
        ls, lm, dmin = grid.ls.to(torch.int32), grid.lm.to(torch.int32), grid.dmin.float()
        if qtype == T.Q2_K:
            blocks = [_u8(ls | (lm << 4)), _pack(q, 32, 2), _f16_bytes(d), _f16_bytes(dmin)]
        else:
            head = [_f16_bytes(d), _f16_bytes(dmin), _scales_k4(ls, lm)]
            body = [_pack(q, 32, 4)] if qtype == T.Q4_K else [_pack(q >> 4, 32, 1), _pack(q & 15, 32, 4)]
            blocks = [*head, *body]
    else:
        q, sc = q + nmax, grid.ls.to(torch.int32)
        if qtype == T.Q3_K:
            blocks = [_pack(q >> 2, 32, 1), _pack(q & 3, 32, 2), _scales_k3(sc + 32), _f16_bytes(d)]
        else:
            blocks = [_pack(q & 15, 64, 4), _pack(q >> 4, 32, 2), sc.to(torch.int8).numpy().view(np.uint8),
                      _f16_bytes(d)]
    return np.concatenate(blocks, axis=-1).reshape(rows, -1)


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    """(B,) values as little-endian float16 bytes (B, 2)."""
    return t.to(torch.float32).numpy().astype("<f2").view(np.uint8).reshape(-1, 2)


def _u8(t: torch.Tensor) -> np.ndarray:
    """Small non-negative integers as a numpy uint8 array."""
    return t.to(torch.uint8).numpy()


def _pack(q: torch.Tensor, group: int, bits: int) -> np.ndarray:
    """(B, 256) codes of `bits` bits packed 8 // bits to a byte: in each run of 8 // bits * group codes, code
    s * group + l goes to bits [s * bits, (s + 1) * bits) of byte l. This one rule is every K-quant bit plane."""
    per = 8 // bits
    q = q.reshape(len(q), -1, per, group)
    shifts = (torch.arange(per, dtype=torch.int32) * bits).view(1, 1, per, 1)
    return _u8((q << shifts).sum(2).reshape(len(q), -1))


def _scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> np.ndarray:
    """Q4_K / Q5_K scales[12] of eight 6-bit scales and mins (get_scale_min_k4): bytes 0-3 scales 0-3 plus the
    top 2 bits of scales 4-7, bytes 4-7 mins 0-3 plus the top 2 bits of mins 4-7, bytes 8-11 the low nibbles of
    scales 4-7 (low) and mins 4-7 (high)."""
    head = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    tail = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return _u8(torch.cat([head, mid, tail], dim=1))


def _scales_k3(u: torch.Tensor) -> np.ndarray:
    """Q3_K scales[12] of sixteen 6-bit stored scales u = sc + 32: byte j < 8 holds the low nibbles of u_j
    (low) and u_{j+8} (high); byte 8 + j holds the top 2 bits of u_{j + 4s} at bits 2s, s = 0..3."""
    low = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    high = ((u.view(-1, 4, 4) >> 4) << (2 * torch.arange(4, dtype=torch.int32)).view(1, 4, 1)).sum(1)
    return _u8(torch.cat([low, high], dim=1))
