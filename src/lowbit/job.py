"""What a front end hands the quantization pipeline (pipeline.py): a Job, the parts of a run that differ
between torch and ONNX models, and the JobResult its quantize step returns. Kept low (no engine, no front end)
so every front end can implement it without importing the pipeline above it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .results import LayerReport


@dataclass
class JobResult:
    """What a job's quantize step produced."""
    layers: list[LayerReport]
    report: object  # the front end's own report (EngineReport, OnnxReport), returned to the caller
    fields: dict = field(default_factory=dict)  # summary fields only this front end has
    phases: dict = field(default_factory=dict)  # seconds of named phases inside the quantize step
    errors_measured: bool = True  # whether layers carry real weight errors (static INT8 leaves it to onnxruntime)


class Job:
    """What a front end supplies: the parts of a run that differ between torch and ONNX models."""

    source: str  # as the user named it

    def describe(self) -> dict:
        """Summary fields known before any work (scheme, algorithms, ...)."""
        return {}

    def prepare(self) -> torch.Tensor | None:
        """Read what quantization needs before it starts; returns the calibration windows, if any."""
        return None

    def quantize(self, folder: Path | None) -> JobResult:
        """Quantize and write the model into `folder` (the staged output; None: keep it in memory only)."""
        raise NotImplementedError

    def source_size(self) -> int:
        return 0

    def output_size(self, folder: Path) -> int:
        return 0

    def evaluation_target(self, folder: Path | None):
        """("torch", model, tokenizer), ("torch-folder", folder, tokenizer) or ("onnx", folder, tokenizer): what
        `--eval` measures."""
        raise NotImplementedError
