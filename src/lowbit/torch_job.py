"""The torch front end's job for the pipeline (pipeline.py): a checked model (Hugging Face folder, GGUF file,
the demo), its plan and chain, run block by block by the engine into lowbit's native folder."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .data import calib_windows, load_text, tokenize
from .engine import Engine
from .engine.placement import Placement
from .engine.resume import Checkpoint
from .exporters.native import NativeSink, write_metadata
from .hf.model import LoadedModel
from .job import Job, JobResult
from .recipe import DEFAULT_CALIBRATION, Recipe, format_plan


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
    placement: Placement = field(default_factory=Placement)
    resume: bool = False  # checkpoint after every block; continue the staged folder's checkpoint if any
    sources: list = field(default_factory=list)  # the source's files and folders (the resume fingerprint)
    windows: torch.Tensor | None = None
    resumed_at: int = 0
    mixed: object | None = None  # mixed.MixedPrecision: per-linear formats to choose before quantizing
    quiet: bool = False

    def describe(self) -> dict:
        return {"source_folder": str(self.loaded.folder), "scheme": self.recipe.scheme.name,
                "algorithms": [a.name for a in self.chain], "seed": self.recipe.calibration.get("seed", 0),
                **self.placement.describe()}

    def prepare(self) -> torch.Tensor | None:
        if self.tokenizer is not None:
            self.windows = calibration_windows(self.tokenizer, self.recipe.calibration)
        return self.windows

    def quantize(self, folder: Path | None) -> JobResult:
        cal = self.recipe.calibration
        tied_lm_head = any(t.rpartition(".")[0] in self.plan and self.plan[t.rpartition(".")[0]].spec is not None
                           for t in self.loaded.layout.tied)  # before a rotation unties it
        ranks = self.placement.ranks
        ranks.ready()  # every rank's setup succeeded (before the first collective)
        if self.mixed is not None:
            self._choose_formats(cal)
        sink = NativeSink(folder) if folder is not None else None  # rank 0's alone: the other ranks write nothing
        shared = ranks.same(folder) if self.resume else folder  # the checkpoint lives in rank 0's staging folder
        checkpoint = Checkpoint(shared, self.fingerprint()) if self.resume and shared is not None else None
        engine = Engine(self.loaded, self.plan, self.chain, self.windows, sink, keep_in_memory=self.keep,
                        batch_size=cal.get("batch_size", 8), progress=self.progress,
                        propagate=cal.get("propagate", DEFAULT_CALIBRATION["propagate"]),
                        placement=self.placement, checkpoint=checkpoint)
        try:
            report = engine.run()
        finally:
            self.placement.cleanup()
        self.resumed_at = engine.resumed_at
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
        if self.resume:
            fields["resumed_at_block"] = engine.resumed_at
        if report.ranks is not None:
            fields["per_rank"] = report.ranks
        if self.recipe.mixed:
            fields["mixed_precision"] = self.recipe.mixed
        return JobResult(report.layers, report, fields)

    def _choose_formats(self, cal: dict) -> None:
        """--target-bits: each linear's format from its measured sensitivity (mixed.py), printed, and recorded in
        the recipe as exact-name overrides."""
        plan, overrides, record = self.mixed.choose(self.loaded, self.plan, self.windows, self.placement,
                                                    cal.get("batch_size", 8), self.quiet)
        self.plan, self.mixed = plan, None
        self.recipe = dataclasses.replace(self.recipe, overrides=self.recipe.overrides + overrides,
                                          mixed={**self.recipe.mixed, **record})
        if not self.quiet:
            print(f"{format_plan(plan)}\nmixed precision: {record['achieved_bits']:.3f} bits per weight on average "
                  f"(target {record['target_bits']:g}, scales and zero points included; sensitivity: "
                  f"{record['measure']} error)", file=sys.stderr, flush=True)

    def source_size(self) -> int:
        return self.loaded.size_bytes()

    def output_size(self, folder: Path) -> int:
        return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))

    def evaluation_target(self, folder: Path | None):
        if self.resume:  # a resumed run never held the earlier blocks: measure what was written
            return "torch-folder", folder, self.loaded.tokenizer()
        return "torch", self.loaded.model, self.loaded.tokenizer()

    def fingerprint(self) -> dict:
        """What the output depends on, for resume.Checkpoint: a checkpoint of another run is refused."""
        def digest(data) -> str:
            return hashlib.sha256(data if isinstance(data, bytes) else json.dumps(data, sort_keys=True).encode()
                                  ).hexdigest()[:16]

        files = []
        for path in map(Path, self.sources):
            for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if f.is_file():
                    st = f.stat()
                    files.append([str(f), st.st_size, st.st_mtime_ns])
        return {"source": digest(files), "recipe": digest(self.recipe.to_dict()),
                "calibration": digest(self.windows.numpy().tobytes()) if self.windows is not None else None,
                "precision": f"{self.placement.device.type}/{self.placement.dtype}", "lowbit": __version__,
                "ranks": self.placement.ranks.size,
                "torch": torch.__version__}
