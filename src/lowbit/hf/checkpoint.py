"""Lazy access to the tensors of a safetensors checkpoint (one file or sharded with an index), or of the GGUF
file a cached source folder names (lowbit.hf.gguf_checkpoint, same interface)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LowbitError
from ..model_files import read_json, resolve_inside
from ..safetensors_io import SafetensorsFile

SHARD_TODO = "name each shard by its plain file name inside the model folder (copy the file into the folder)"


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json: tensor name -> shard file name, every one checked."""
    weight_map = read_json(index, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise LowbitError(f"{index} has no weight_map object of tensor name -> shard file name; restore the file")
    for shard in set(weight_map.values()):
        tensor = next(k for k, v in weight_map.items() if v == shard)
        resolve_inside(index.parent, shard, f"{index}: weight_map shard of tensor {tensor!r}:", SHARD_TODO)
    return weight_map


class LazyCheckpoint:
    """Reads tensors one at a time (one positioned read each); nothing is loaded or mapped up front. Every
    shard's header is checked when opened, and an index's names must lie inside the folder and agree with the
    shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = _read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            weight_map = None
        self._handles = {}
        for name in files:
            path = resolve_inside(self.folder, name, "the weight file", SHARD_TODO)
            if not path.is_file():
                raise LowbitError(f"checkpoint shard {path} is missing; the model folder is incomplete")
            try:
                self._handles[name] = SafetensorsFile(path)
            except (ValueError, OSError) as exc:
                raise LowbitError(f"cannot read {path} ({exc}); the file is corrupt or truncated") from None
        if weight_map is None:
            weight_map = {k: n for n, h in self._handles.items() for k in h.keys()}
        for tensor, shard in weight_map.items():
            if tensor not in self._handles[shard].entries:
                raise LowbitError(f"{index} places tensor {tensor!r} in {shard!r}, which does not hold it; the index "
                                  f"does not match its shards: restore the folder")
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


def open_checkpoint(folder: Path):
    """The tensor reader of a model folder: the GGUF file its lowbit_source.json names (a cached GGUF source),
    else its safetensors."""
    from .source import gguf_source

    record = gguf_source(Path(folder))
    if record is not None:
        from .gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint(record, folder)
    return LazyCheckpoint(folder)
