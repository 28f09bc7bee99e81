"""Incremental safetensors shards, shared by every writer (output folders themselves: lowbit.staging)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..safetensors_io import StreamingWriter


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

    def snapshot(self) -> dict:
        """Everything written so far, on disk, and what restore() needs to continue from here."""
        return {"shards": [shard.snapshot() for shard in self.shards], "total": self.total}

    def restore(self, snapshot: dict) -> None:
        """Continue from a snapshot of an earlier writer into the same folder: shards started after it are
        deleted, the others cut back to where it was taken."""
        kept = {s["file"] for s in snapshot["shards"]}
        for spool in self.folder.glob("shard-*.tmp.spool"):
            if spool.name[:-len(".spool")] not in kept:
                spool.unlink()
        self.shards = [StreamingWriter.reopen(self.folder, s, self.metadata) for s in snapshot["shards"]]
        self.names = {name for shard in self.shards for name in shard.header}
        self.total = snapshot["total"]

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
