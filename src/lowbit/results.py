"""What a quantization run produces, for every front end: the report of one quantized layer (LayerReport),
the interface results are handed to (Sink), results as strict JSON, and the warnings a summary calls for.

JSON has no NaN or Infinity: Python's json module writes them as bare `NaN` / `Infinity`, which other readers
refuse. Every summary.json and every `--json` output goes through `to_json`, where a non-finite number becomes
null (the fields that can hold one say so in their own text, e.g. a perplexity that overflowed).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import warn

if TYPE_CHECKING:  # annotations only: reading a summary needs no torch
    import torch

    from .formats import Quantized


def finite(obj):
    """obj with every float that is NaN or infinite replaced by None (recursively through dicts, lists, tuples)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def to_json(obj, **kwargs) -> str:
    """Strict JSON text of obj (non-finite numbers as null; anything else unknown as its str)."""
    return json.dumps(finite(obj), allow_nan=False, default=str, **kwargs)


def write_json(path, obj) -> None:
    """Write obj as indented strict JSON, by temporary file and rename (never a half-written file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(to_json(obj, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def warn_fallbacks(layer_notes: dict[str, str], quantized: int, algorithm: str = "gptq") -> int:
    """Warn when a calibrated quantizer fell back to RTN (its notes end in ': RTN'); returns how many did."""
    fell = [name for name, note in layer_notes.items() if note.endswith(": RTN")]
    if fell:
        warn(f"{algorithm} quantized {len(fell)} of {quantized} linears by RTN, e.g. {fell[0]} "
             f"({layer_notes[fell[0]][:-5]}): no usable calibration input reached them (MoE experts the router "
             f"rarely picks, or too little calibration text); raise --num-calib-data or --seq-len (summary.json "
             f"layer_notes lists them)")
    return len(fell)


@dataclass
class LayerReport:
    name: str
    spec: str
    relative_error: float  # ||W - Q(W)|| / ||W||
    note: str = ""  # e.g. a calibrated quantizer's fallback to RTN


class Sink:
    """Where the engine sends results: float tensors and quantized linears, by name."""

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        pass

    def add_quantized(self, module_name: str, qt: Quantized, bias: torch.Tensor | None) -> None:
        pass

    def add_input_quant(self, module_name: str, spec, params: torch.Tensor | None) -> None:
        """A linear's input quantization: its spec and, when static, its calibrated parameters."""

    def add_output_quant(self, module_name: str, spec, params: torch.Tensor) -> None:
        """A linear's output quantization (KV cache): its spec and calibrated parameters."""

    def snapshot(self) -> dict:
        """Everything received so far made durable, and what restore() needs to continue from here (a resume
        checkpoint's share)."""
        return {}

    def restore(self, snapshot: dict) -> None:
        """Continue from a snapshot() taken by an earlier run's sink writing the same place."""
