"""GGUF block bytes written straight from lowbit's stored codes and scales (FORMATS.md 4.4), with no rounding
of the weights themselves: the only loss is storing each block's scale (and Q4_1/Q5_1's minimum) as float16.

A block is 32 consecutive columns of one row. It maps exactly when every block lies inside one lowbit
scale group (group size a multiple of 32, or one scale per channel / tensor) and the codes fit the type:
- Q4_0 / Q5_0 / Q8_0 hold d * v with v = code - zero in [-8, 7] / [-16, 15] / [-128, 127]: symmetric
  integers of up to 4 / 5 / 8 bits (signed, or unsigned with the implied zero 2^(bits-1)), and asymmetric
  ones of up to 7 bits in Q8_0 (|code - zero| <= 127). d = lowbit's scale, which may be negative.
- Q4_1 / Q5_1 hold d * q + m with q in [0, 15] / [0, 31]: asymmetric integers of up to 4 / 5 bits,
  q = code - qmin, d = scale, m = -(zero - qmin) * scale.
- MXFP4 holds 2^(e - 127) * E2M1(q): lowbit's MXFP4 (E2M1 codes, E8M0 scales, groups of 32), byte for byte.
- Q2_K .. Q6_K hold lowbit's K-quant grids (spec.gguf_grid, formats/gguf_grid) of widths that are whole
  super-blocks: codes, sub-block scales and mins, and float16 super-scales, byte for byte; Q4_0 .. Q8_0 hold
  lowbit's legacy grids (float16 d, and m = -zero * d for Q4_1 / Q5_1) the same way.
Everything else is re-quantized from the dequantized weight (`requantize`): Q8_0 by gguf-py, the rest by lowbit.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import quantize as gguf_quantize

from ..formats import Quantized, gguf_grid
from .gguf_iq4nl import quantize_iq4_nl, quantize_iq4_xs
from .gguf_kquants import KQUANT_TYPES, pack_k, quantize_k
from .gguf_legacy import LEGACY_TYPES, quantize_legacy
from ..spec import QuantSpec

BLOCK = 32
OFFSET_TYPES = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 0}  # v + offset is the stored unsigned (or int8) value
MIN_TYPES = {T.Q4_1: 15, T.Q5_1: 31}  # d * q + m, q in [0, max]


def row_bytes(qtype: T, cols: int) -> int:
    """Bytes of one row of `cols` elements in a GGUF type."""
    block, size = GGML_QUANT_SIZES[qtype]
    return cols // block * size


def exact_type(spec: QuantSpec, cols: int) -> T | None:
    """The GGUF type that holds this spec's codes and scales without re-quantization, or None."""
    if spec.gguf_grid:
        return T[spec.gguf_grid.upper()] if cols % gguf_grid.width_multiple(spec.gguf_grid) == 0 else None
    block_cols = spec.block_shape(1, cols)[1]
    if cols % BLOCK or block_cols % BLOCK:
        return None
    if spec.kind == "float":
        mxfp4 = (spec.bits, spec.exponent_bits, spec.mantissa_bits, spec.scale_dtype) == (4, 2, 1, "e8m0")
        return T.MXFP4 if mxfp4 and not spec.fnuz and spec.group_size == BLOCK else None
    if spec.kind != "int" or (not spec.plain_int and not spec.symmetric):
        return None
    if spec.symmetric:
        return T.Q4_0 if spec.bits <= 4 else T.Q5_0 if spec.bits == 5 else T.Q8_0
    return T.Q4_1 if spec.bits <= 4 else T.Q5_1 if spec.bits == 5 else T.Q8_0 if spec.bits <= 7 else None


def fallback_type(spec: QuantSpec) -> T:
    """The type a spec with no exact GGUF type is re-quantized to: the same bit budget, rounded up."""
    if spec.bits <= 4:
        return T.Q4_0 if spec.symmetric else T.Q4_1
    if spec.bits == 5:
        return T.Q5_0 if spec.symmetric else T.Q5_1
    return T.Q8_0


def pack_exact(qt: Quantized, qtype: T) -> np.ndarray:
    """uint8 (N, row_bytes) GGUF blocks of a quantized weight whose spec maps exactly to qtype."""
    spec = qt.spec
    rows, cols = qt.shape
    if qtype in KQUANT_TYPES:
        return pack_k(qt.codes, qtype, gguf_grid.to_grid(qt.scale, qt.zero, qt.tensor_scale, spec), rows)
    nb = cols // BLOCK
    scale = _per_block(qt.scale.float(), spec, rows, cols)
    codes = qt.codes.to(torch.int64).reshape(rows, nb, BLOCK)
    if qtype == T.MXFP4:
        exps = torch.log2(scale).round().to(torch.int64) + 127
        return _concat([_u8(exps)], _nibbles(codes), rows)
    if qt.zero is None:
        zero = torch.zeros(rows, nb, dtype=torch.int64)
    else:  # a legacy grid's zero point is a float (-m / d); an integer scheme's an integer
        zero = _per_block(qt.zero.double() if spec.gguf_grid else qt.zero.to(torch.int64), spec, rows, cols)
    if qtype in MIN_TYPES:
        q = codes - spec.qmin
        heads = [_f16(scale), _f16(-(zero - spec.qmin).double() * scale.double())]
        top = MIN_TYPES[qtype]
    else:
        q = codes - zero[..., None] + OFFSET_TYPES[qtype]
        heads = [_f16(scale)]
        top = 15 if qtype == T.Q4_0 else 31 if qtype == T.Q5_0 else 127
    low = -128 if qtype == T.Q8_0 else 0
    if q.min() < low or q.max() > top:
        raise ValueError(f"{spec.short_name} codes do not fit {qtype.name}")
    if qtype == T.Q8_0:
        return _concat(heads, q.to(torch.int8).numpy().view(np.uint8), rows)
    if qtype in (T.Q5_0, T.Q5_1):
        bit4 = ((q >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)
        heads.append(bit4.sum(-1).to(torch.int64).numpy().astype("<u4").view(np.uint8).reshape(rows, nb, 4))
    return _concat(heads, _nibbles(q & 15), rows)


def requantize(weight: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> np.ndarray:
    """uint8 (N, row_bytes) blocks of a float weight: K-quants and IQ4_NL by lowbit's own quantizers (weighted by
    the importance matrix's column weights when given), so are Q4_0 / Q4_1 / Q5_0 / Q5_1 (a weighted search,
    gguf_legacy); Q8_0 by gguf-py's reference quantizer."""
    if qtype in KQUANT_TYPES or qtype in LEGACY_TYPES or qtype in (T.IQ4_NL, T.IQ4_XS):
        search = quantize_legacy if qtype in LEGACY_TYPES else quantize_k if qtype in KQUANT_TYPES else \
            (lambda w, _, imp: (quantize_iq4_nl if qtype == T.IQ4_NL else quantize_iq4_xs)(w, imp))
        with _one_thread():
            return _by_row_chunks(lambda rows: search(rows, qtype, importance), weight.float())
    if qtype == T.F16:
        return weight.to(torch.float16).numpy().view(np.uint8)
    return gguf_quantize(np.ascontiguousarray(weight.float().numpy()), qtype)


def _by_row_chunks(quantize_rows, weight: torch.Tensor) -> np.ndarray:
    """quantize_rows over row chunks in a thread per core (rows are quantized independently; torch's element-wise
    steps release the GIL), the blocks stacked back in row order."""
    workers = min(os.cpu_count() or 1, max(1, weight.shape[0] // 64))
    if workers == 1:
        return quantize_rows(weight)
    with ThreadPoolExecutor(workers) as pool:
        return np.concatenate(list(pool.map(quantize_rows, weight.chunk(workers))))


@contextlib.contextmanager
def _one_thread():
    """The searches are many small element-wise steps: torch's intra-op threads gain little on them and, on a
    busy machine, cost far more than they gain (a 576 x 1536 Q4_K tensor: 13 s on 2 threads beside other jobs,
    0.23 s on one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _per_block(values: torch.Tensor, spec: QuantSpec, rows: int, cols: int) -> torch.Tensor:
    """A per-group parameter (row blocks, column blocks) spread to one value per 32-column block (N, K/32)."""
    block_rows, block_cols = spec.block_shape(rows, cols)
    col_index = torch.arange(cols // BLOCK) * BLOCK // block_cols
    row_index = torch.arange(rows) // block_rows
    return values[row_index][:, col_index]


def _f16(values: torch.Tensor) -> np.ndarray:
    """(N, nb) float values as little-endian float16 bytes (N, nb, 2)."""
    half = values.double().numpy().astype("<f2")
    return half.view(np.uint8).reshape(*half.shape, 2)


def _u8(values: torch.Tensor) -> np.ndarray:
    return values.to(torch.uint8).numpy()[..., None]


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """(N, nb, 32) 4-bit values as 16 bytes per block: element j < 16 low nibble of byte j, j >= 16 high."""
    packed = q[..., :16] | (q[..., 16:] << 4)
    return packed.to(torch.uint8).numpy()


def _concat(heads: list[np.ndarray], body: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([*heads, body], axis=-1).reshape(rows, -1)
