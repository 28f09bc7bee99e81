"""A Hugging Face folder that holds its weights, for tools that read safetensors themselves (the peer quantizers
and lm-eval's HF backend in benchmarks/, onnxruntime-genai's builder). A folder source is that folder; a GGUF
source's cached folder holds no weights (hf.source), so they are written once beside it, tensor by tensor in
the source's float width (float32 for a block-quantized GGUF: the exact dequantized values)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..safetensors_io import StreamingWriter
from ..staging import claim, staged
from .checkpoint import open_checkpoint
from .source import gguf_source, resolve_source


def weights_folder(source) -> Path:
    """A folder with config.json, tokenizer files and model.safetensors for any model source."""
    folder = resolve_source(source)
    if gguf_source(folder) is None:
        return folder
    target = folder.with_name(folder.name + "-weights")
    if (target / "model.safetensors").is_file():
        return target
    with claim(target, wait=True):
        if not (target / "model.safetensors").is_file():
            with staged(target, overwrite=target.exists(), sources=[folder]) as tmp:
                _write(folder, tmp)
    return target


def _write(folder: Path, out: Path) -> None:
    ckpt = open_checkpoint(folder)
    for f in folder.iterdir():
        if f.is_file() and f.name != "lowbit_source.json":
            shutil.copy(f, out / f.name)
    writer = StreamingWriter(out / "model.safetensors", {"format": "pt"})
    for name in sorted(ckpt.keys()):
        writer.add(name, ckpt.get(name).contiguous())
    writer.close()
