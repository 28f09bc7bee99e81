"""The torch front end's job for the pipeline (pipeline.py): a checked model (Hugging Face folder, GGUF file,
the demo), its plan and chain, run block by block by the engine into lowbit's native folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import calib_windows, load_text, tokenize
from .engine import Engine
from .exporters.native import NativeSink, write_metadata
from .hf.model import LoadedModel
from .job import Job, JobResult
from .recipe import DEFAULT_CALIBRATION, Recipe


def calibration_windows(tokenizer, cal: dict) -> torch.Tensor:
    """The calibration windows of a recipe's calibration settings, tokenized by the model's tokenizer."""
    ids = tokenize(tokenizer, load_text(cal["dataset"], "calib"))
    return calib_windows(ids, cal["num_samples"], cal["seq_len"], cal["seed"])


@dataclass
class TorchJob(Job):
    source: str
    loaded: LoadedModel
    recipe: Recipe
    plan: dict
    chain: list
    tokenizer: object | None  # when the chain calibrates
    keep: bool  # keep the fake-quant model in memory
    progress: bool = True
    windows: torch.Tensor | None = None

    def describe(self) -> dict:
        return {"source_folder": str(self.loaded.folder), "scheme": self.recipe.scheme.name,
                "algorithms": [a.name for a in self.chain], "seed": self.recipe.calibration.get("seed", 0)}

    def prepare(self) -> torch.Tensor | None:
        if self.tokenizer is not None:
            self.windows = calibration_windows(self.tokenizer, self.recipe.calibration)
        return self.windows

    def quantize(self, folder: Path | None) -> JobResult:
        cal = self.recipe.calibration
        tied_lm_head = any(t.rpartition(".")[0] in self.plan and self.plan[t.rpartition(".")[0]].spec is not None
                           for t in self.loaded.layout.tied)  # before a rotation unties it
        sink = NativeSink(folder) if folder is not None else None
        engine = Engine(self.loaded, self.plan, self.chain, self.windows, sink, keep_in_memory=self.keep,
                        batch_size=cal.get("batch_size", 8), progress=self.progress,
                        propagate=cal.get("propagate", DEFAULT_CALIBRATION["propagate"]))
        report = engine.run()
        if folder is not None:
            sink.close()
            write_metadata(folder, self.loaded.folder, self.plan, self.recipe.to_dict(), self.loaded.source_dtype,
                           untie=tied_lm_head or bool(self.loaded.untied), input_specs=sink.input_specs,
                           output_specs=sink.output_specs, online_rotations=engine.online_rotations())
        fields = {"block_seconds": [round(s, 4) for s in report.block_seconds],
                  "capture_seconds": round(report.capture_seconds, 3),
                  "quantized_modules": sum(1 for lp in self.plan.values() if lp.spec is not None)}
        if report.rotation is not None:
            fields["rotation"] = report.rotation
        return JobResult(report.layers, report, fields)

    def source_size(self) -> int:
        return self.loaded.size_bytes()

    def output_size(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))

    def evaluation_target(self, folder: Path | None):
        return "torch", self.loaded.model, self.loaded.tokenizer()
