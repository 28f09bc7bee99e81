"""Lazy access to the tensors of a safetensors checkpoint (one file or sharded with an index)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from ..safetensors_io import SafetensorsFile


class LazyCheckpoint:
    """Reads tensors one at a time (one positioned read each); nothing is loaded or mapped up front."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise LowbitError(f"{index} is corrupt ({exc}); restore the file") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        self._handles = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise LowbitError(f"checkpoint shard {path} is missing; the model folder is incomplete")
            try:
                self._handles[name] = SafetensorsFile(path)
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                raise LowbitError(f"cannot read {path} ({exc}); the file is corrupt or truncated") from None
        if weight_map is None:
            weight_map = {k: n for n, h in self._handles.items() for k in h.keys()}
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self.weight_map[name]].get(name)
        except KeyError:
            raise LowbitError(f"tensor {name} is missing from the checkpoint in {self.folder}") from None
        except Exception as exc:
            raise LowbitError(f"cannot read tensor {name} from {self.folder} ({exc}); the file is corrupt") from None

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's floating-point weights (the first one found)."""
        for name in self.weight_map:
            code = self._handles[self.weight_map[name]].dtype(name)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(code)
            if dtype is not None:
                return dtype
        return torch.float32

    def size_bytes(self) -> int:
        return sum((self.folder / n).stat().st_size for n in self._handles)
