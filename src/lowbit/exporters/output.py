"""Safe output folders and incremental safetensors shards, shared by every writer.

An output is built in a hidden temporary folder beside the target and renamed into place only when
complete, so a failure never leaves a half-written folder and never touches an existing one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch

from ..errors import LowbitError
from ..safetensors_io import StreamingWriter


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists (unless overwrite) or cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists; choose another path or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LowbitError(f"output {out} is a file; give a folder path")
    _check_parent(out.resolve().parent, out)


def _check_parent(parent: Path, out: Path) -> None:
    """The folder an output goes into exists (created if need be) and is writable."""
    if parent.exists() and not parent.is_dir():
        raise LowbitError(f"cannot write {out}: {parent} is a file, not a folder; choose another output path")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise LowbitError(f"cannot create the output's parent folder {parent} ({exc.strerror}); "
                              f"choose a writable path") from None
    if not os.access(parent, os.W_OK):
        raise LowbitError(f"cannot write to {parent}; choose a writable output path")


def check_output_file(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output file that exists (unless overwrite), is a folder, or cannot be written."""
    out = Path(out)
    if out.is_dir():
        raise LowbitError(f"output {out} is a folder; give a file path")
    if out.exists() and not overwrite:
        raise LowbitError(f"output {out} already exists; choose another path or pass --overwrite")
    _check_parent(out.resolve().parent, out)


@contextlib.contextmanager
def staged_file(out: Path, overwrite: bool = False):
    """Yield a temporary file path beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output_file(out, overwrite)
    tmp = out.resolve().parent / f".{out.name}.lowbit-tmp-{os.getpid()}"
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False):
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = Path(out)
    check_output(out, overwrite)
    tmp = out.resolve().parent / f".{out.name}.lowbit-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
    except OSError as exc:
        raise LowbitError(f"cannot write beside {out} ({exc.strerror}); choose a writable output path") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.resolve().parent / f".{out.name}.lowbit-old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ShardWriter:
    """Streams tensors into safetensors shards of at most max_shard_bytes; close() names them as transformers
    does (model.safetensors, or model-0000i-of-0000n.safetensors plus an index)."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30, metadata: dict | None = None):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[StreamingWriter] = []
        self.names: set[str] = set()
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if not self.shards or (self.shards[-1].offset and self.shards[-1].offset + size > self.max):
            self.shards.append(StreamingWriter(self.folder / f"shard-{len(self.shards):05d}.tmp", self.metadata))
        self.shards[-1].add(name, tensor)
        self.names.add(name)
        self.total += size

    def close(self) -> list[str]:
        if not self.shards:
            self.shards.append(StreamingWriter(self.folder / "shard-00000.tmp", self.metadata))
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, name in zip(self.shards, names):
            shard.close()
            os.replace(shard.path, self.folder / name)
        if n > 1:
            index = {"metadata": {"total_size": self.total},
                     "weight_map": {t: names[i] for i, shard in enumerate(self.shards) for t in shard.header}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names
