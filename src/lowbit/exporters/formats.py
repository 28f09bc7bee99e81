"""The export formats by name: each has a check (refuses, before any work, what the format cannot hold, and
returns warnings) and a writer from a lowbit folder. `quantize --export` runs the checks before calibration.
What each format holds layer by layer is declared in declared.CAPABILITIES (one check refuses for all of them);
a writer's own check adds only its model-level refusals and warnings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LowbitError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    is_file: bool  # writes one file (GGUF) rather than a folder
    check: Callable  # (LowbitFolder | PlannedModel) -> list[str] warnings, or raises LowbitError
    write: Callable  # (src folder, out path, overwrite=False, **format options) -> Path

    def default_output(self, native: Path) -> Path:
        """Where `quantize --export` writes this format beside the lowbit folder."""
        native = Path(native)
        return native.with_name(native.name + (".gguf" if self.is_file else f"-{self.name}"))


def _compressed_tensors():
    from .compressed_tensors import check_compressed_tensors, export_compressed_tensors
    return check_compressed_tensors, export_compressed_tensors


def _awq():
    from .hf_int import check_awq, export_awq
    return check_awq, export_awq


def _gptq():
    from .hf_int import check_gptq, export_gptq
    return check_gptq, export_gptq


def _gguf():
    from .gguf_float import check_gguf_any, export_gguf_any  # float types and float sources, else gguf.py
    return check_gguf_any, export_gguf_any


def _onnx():
    from .onnx import check_onnx, export_onnx
    return check_onnx, export_onnx


_LOADERS = {
    "compressed-tensors": ("vLLM, SGLang, transformers + compressed-tensors (int, FP8, NVFP4, MXFP4/6/8)", False,
                           _compressed_tensors),
    "awq": ("AutoAWQ GEMM layout (4-bit, one group size): onnxruntime-genai's builder, vLLM, transformers", False,
            _awq),
    "gptq": ("GPTQ v1 layout (2/4/8 bits, per-layer overrides): onnxruntime-genai's builder, vLLM, GPTQModel",
             False, _gptq),
    "gguf": ("llama.cpp GGUF file (Q4_0 / Q4_1 / Q8_0 from the stored codes where exact; F16 / BF16 / F32 of any "
             "model)", True, _gguf),
    "onnx": ("ONNX decoder with MatMulNBits + genai_config.json: onnxruntime, onnxruntime-genai", False, _onnx),
}
NAMES = tuple(_LOADERS)


def get_format(name: str) -> ExportFormat:
    if name not in _LOADERS:
        raise LowbitError(f"unknown export format {name!r}; choose one of {', '.join(NAMES)}")
    _, is_file, load = _LOADERS[name]
    check, write = load()
    return ExportFormat(name, is_file, check, write)


def parse_formats(spec) -> list[ExportFormat]:
    """Formats from 'awq,gguf' or a list of names, each once, in the order given."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    return [get_format(n) for n in dict.fromkeys(names)]


def help_text(name: str) -> str:
    """One line on what loads a format (without importing its writer)."""
    return _LOADERS[name][0]
