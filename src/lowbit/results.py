"""Results as strict JSON, and the warnings a run's summary calls for.

JSON has no NaN or Infinity: Python's json module writes them as bare `NaN` / `Infinity`, which other readers
refuse. Every summary.json and every `--json` output goes through `to_json`, where a non-finite number becomes
null (the fields that can hold one say so in their own text, e.g. a perplexity that overflowed).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .errors import warn


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
