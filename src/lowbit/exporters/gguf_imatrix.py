"""llama.cpp's importance matrix files (the GGUF format `llama-imatrix` writes and `llama-quantize --imatrix`
reads): per quantized tensor, `NAME.in_sum2` (float32, one row of in_features per matrix: the sum over the
calibration tokens of each input column's squared activation) and `NAME.counts` (float32, the tokens summed per
matrix), with `general.type = imatrix`, `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size`.
NAME is the GGUF tensor name (blk.3.ffn_down.weight). The importance of a column is in_sum2 / counts, its mean
squared activation, which weights the K-quant and IQ4_NL scale searches (gguf_kquants, gguf_iq4nl).
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import LowbitError

SUMS, COUNTS = ".in_sum2", ".counts"


def read_imatrix(path) -> dict[str, torch.Tensor]:
    """GGUF tensor name -> importance (in_features,) float32: the mean squared activation per input column
    (averaged over the matrices of a stacked expert tensor)."""
    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise LowbitError(f"{path} is not a GGUF imatrix file ({exc}); give the .gguf llama-imatrix writes (a legacy "
                          f".dat converts with: llama-imatrix --in-file FILE.dat -o FILE.gguf)") from None
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in reader.tensors}
    sums = {n[: -len(SUMS)]: v for n, v in tensors.items() if n.endswith(SUMS)}
    if not sums:
        raise LowbitError(f"{path} holds no '*{SUMS}' tensors: not an importance matrix from llama-imatrix or lowbit")
    out = {}
    for name, values in sums.items():
        counts = tensors.get(name + COUNTS, np.ones(1)).reshape(-1)
        rows = values.reshape(len(counts), -1) / np.maximum(counts, 1.0)[:, None]
        out[name] = torch.from_numpy(rows.mean(0)).float()
    return out


def write_imatrix(path, entries: dict[str, tuple[torch.Tensor, float]], dataset: str, chunks: int,
                  chunk_size: int) -> Path:
    """Write entries (GGUF tensor name -> (sum over tokens of x^2 per column, token count)) as llama.cpp's
    imatrix GGUF."""
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch="imatrix")
    try:
        writer.add_type(gguf.GGUFType.IMATRIX)
        writer.add_array(gguf.Keys.IMatrix.DATASETS, [dataset])
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(chunks))
        writer.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(chunk_size))
        for name in sorted(entries):
            sums, count = entries[name]
            writer.add_tensor(name + SUMS, sums.detach().double().cpu().numpy().astype(np.float32)[None, :])
            writer.add_tensor(name + COUNTS, np.array([[float(count)]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return path
