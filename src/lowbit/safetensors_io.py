"""Streaming safetensors I/O: read one tensor with a plain file read, write tensors as they come.

The safetensors library memory-maps whole files; pages a quantizer touches then stay resident for as long
as the file is open, so a block-by-block run would still end up holding the whole model. Reading each
tensor with one positioned read and writing tensors to a spool file as they arrive keeps memory to what
is in use. The layout is the safetensors one: u64 header length, JSON header (dtype, shape,
data_offsets), then the raw little-endian data.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 << 20


def _check_entry(name: str, entry) -> tuple[int, int]:
    """(begin, end) of one header entry, refusing (ValueError) anything but a well-formed tensor whose byte range
    holds exactly shape x dtype."""
    if not isinstance(entry, dict):
        raise ValueError(f"tensor {name!r}: its header entry is a {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r}: dtype {dtype!r} is not one lowbit reads ({', '.join(_DTYPES)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end")
    need = _DTYPES[dtype].itemsize
    for d in shape:
        need *= d
    if offsets[1] - offsets[0] != need:
        raise ValueError(f"tensor {name!r}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but shape "
                         f"{shape} of {dtype} needs {need}")
    return offsets[0], offsets[1]


def _check_layout(header: dict, data_size: int) -> None:
    """Every entry well formed, inside the data area, and no two overlapping."""
    spans = sorted((*_check_entry(name, entry), name) for name, entry in header.items())
    last_end, last_name = 0, None
    for begin, end, name in spans:
        if end > data_size:
            raise ValueError(f"file is truncated: tensor {name!r} needs data bytes {begin}..{end}, the file holds "
                             f"{data_size}")
        if begin < last_end:
            raise ValueError(f"tensors {last_name!r} and {name!r} overlap (data bytes {begin}..{last_end})")
        if end > begin:
            last_end, last_name = end, name


class SafetensorsFile:
    """The header of a safetensors file, checked whole when opened, and positioned reads of its tensors.
    A malformed file raises ValueError saying what is wrong."""

    def __init__(self, path: Path):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise ValueError("header length is beyond the end of the file")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"the header is not valid JSON ({exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict):
            raise ValueError(f"the header's __metadata__ is a {type(metadata).__name__}, not an object")
        self.metadata = metadata
        self.data_start = 8 + n
        _check_layout(header, size - self.data_start)
        self.entries = header

    def keys(self):
        return self.entries.keys()

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        buf = np.empty(end - begin, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            if f.readinto(memoryview(buf)) != end - begin:
                raise ValueError(f"tensor {name} is cut short")
        return torch.from_numpy(buf).view(dtype).reshape(entry["shape"])


class StreamingWriter:
    """Writes one safetensors file: tensor data is appended to a spool file as it arrives; close() writes the
    header and copies the spool behind it."""

    def __init__(self, path: Path, metadata: dict | None = None):
        self.path = Path(path)
        self.spool_path = self.path.with_name(self.path.name + ".spool")
        self.spool = open(self.spool_path, "wb")
        self.header: dict = {}
        self.offset = 0
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}

    def add(self, name: str, tensor: torch.Tensor) -> int:
        if name in self.header:
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise ValueError(f"cannot store dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        if nbytes:  # written straight from the tensor's memory, no copy
            self.spool.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self.header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                             "data_offsets": [self.offset, self.offset + nbytes]}
        self.offset += nbytes
        return nbytes

    def snapshot(self) -> dict:
        """What reopen() needs to continue this file from here: the data so far is flushed to disk first."""
        self.spool.flush()
        os.fsync(self.spool.fileno())
        return {"file": self.path.name, "offset": self.offset, "header": self.header}

    @classmethod
    def reopen(cls, folder: Path, snapshot: dict, metadata: dict | None = None) -> "StreamingWriter":
        """The writer of a snapshot, its spool cut back to the snapshot's end (what was written after it is
        dropped)."""
        writer = cls.__new__(cls)
        writer.path = Path(folder) / snapshot["file"]
        writer.spool_path = writer.path.with_name(writer.path.name + ".spool")
        writer.spool = open(writer.spool_path, "r+b")
        writer.spool.truncate(snapshot["offset"])
        writer.spool.seek(snapshot["offset"])
        writer.header, writer.offset = dict(snapshot["header"]), snapshot["offset"]
        writer.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        return writer

    def close(self) -> None:
        self.spool.close()
        header = dict(self.header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.path, "wb") as out, open(self.spool_path, "rb") as spool:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(spool, out, 16 << 20)
        os.remove(self.spool_path)
