"""Bit packing of unsigned integer codes into bytes, LSB-first along each row.

Element j of a row sits at bit offset j * bits of the row's bit stream (byte j*bits // 8). For 4 bits this
puts even elements in the low nibble, as MatMulNBits does. Works for any width from 1 to 8: codes are
gathered in runs of lcm(bits, 8) / bits, combined into one integer and split into lcm(bits, 8) / 8 bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _unit(bits: int) -> tuple[int, int]:
    span = bits * 8 // math.gcd(bits, 8)
    return span // bits, span // 8  # codes per run, bytes per run


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of `cols` codes takes (the last run zero-padded)."""
    per, nbytes = _unit(bits)
    return -(-cols // per) * nbytes


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (rows, cols), each < 2^bits, into uint8 (rows, packed_row_bytes(cols, bits))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1 to 8 bits, got {bits}")
    if codes.numel() and (int(codes.max()) >> bits or int(codes.min()) < 0):
        raise ValueError(f"a code does not fit in {bits} unsigned bits")
    per, nbytes = _unit(bits)
    if nbytes == 1:  # 1, 2, 4, 8 bits: whole codes per byte, cheap uint8 arithmetic
        arr = codes.to(torch.uint8)
        rows, cols = arr.shape
        pad = -cols % per
        if pad:
            arr = torch.nn.functional.pad(arr, (0, pad))
        runs = arr.reshape(rows, -1, per)
        out = runs[..., 0].clone()
        for j in range(1, per):
            out |= runs[..., j] << (j * bits)
        return out
    arr = codes.cpu().numpy().astype(np.uint64)
    rows, cols = arr.shape
    pad = -cols % per
    if pad:
        arr = np.pad(arr, ((0, 0), (0, pad)))
    runs = arr.reshape(rows, -1, per)
    shifts = (np.arange(per, dtype=np.uint64) * np.uint64(bits))
    words = np.bitwise_or.reduce(runs << shifts, axis=-1)  # (rows, n_runs) uint64, < 2^(8*nbytes)
    # C order whatever the input's layout (a transposed tensor's words come out column-major): the byte view needs it
    out = np.ascontiguousarray(words.astype("<u8")).view(np.uint8).reshape(rows, -1, 8)[:, :, :nbytes]
    return torch.from_numpy(np.ascontiguousarray(out.reshape(rows, -1)))


def unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of pack_rows: uint8 (rows, bytes) to int32 codes (rows, cols)."""
    per, nbytes = _unit(bits)
    arr = packed.cpu().numpy().astype(np.uint8)
    rows = arr.shape[0]
    runs = arr.reshape(rows, -1, nbytes)
    padded = np.zeros((rows, runs.shape[1], 8), dtype=np.uint8)
    padded[:, :, :nbytes] = runs
    words = padded.view("<u8")  # (rows, n_runs, 1)
    shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
    codes = (words >> shifts) & np.uint64((1 << bits) - 1)  # (rows, n_runs, per)
    return torch.from_numpy(codes.reshape(rows, -1)[:, :cols].astype(np.int32))


# -- int32 words, as the AutoAWQ and GPTQ layouts pack codes (FORMATS.md 3.1 / 3.2) ----------------------

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # slot i of a packed AWQ word holds column 8c + AWQ_ORDER[i]


def pack_int32(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Pack unsigned values (rows, cols) along cols, 32/bits per int32 word, LSB-first; `order[i]` names the
    column (within a word's run) that slot i holds (AWQ's interleave), sequential when None."""
    per = 32 // bits
    rows, cols = values.shape
    if cols % per:
        raise ValueError(f"{cols} columns do not fill whole {per}-value words")
    runs = values.to(torch.int64).reshape(rows, cols // per, per)
    order = order or tuple(range(per))
    word = torch.zeros(rows, cols // per, dtype=torch.int64)
    for slot, col in enumerate(order):
        word |= runs[..., col] << (bits * slot)
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int32(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """Inverse of pack_int32: int32 (rows, words) to int32 values (rows, words * 32/bits)."""
    per = 32 // bits
    order = order or tuple(range(per))
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(*words.shape, per, dtype=torch.int32)
    for slot, col in enumerate(order):
        out[..., col] = ((unsigned >> (bits * slot)) & ((1 << bits) - 1)).to(torch.int32)
    return out.reshape(words.shape[0], -1)
