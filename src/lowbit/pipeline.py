"""One quantization pipeline for every front end: torch models (torch_job.TorchJob), ONNX weight-only
(onnx/run.WeightOnlyJob) and ONNX static INT8 (onnx/static_int8.StaticInt8Job).

A front end checks everything it can before any work (its sources, the recipe, the plan, the output paths)
and hands the pipeline a Job (job.py): what differs between front ends. The pipeline does the rest the same way for
all of them:

    claim every output (a lock beside each) -> stage the output folder -> job.prepare() (calibration windows)
    -> job.quantize(staged folder) -> recipe.yaml -> summary (timings, peak memory, sizes, per-layer errors
    and notes, warnings) -> optional evaluation of the result -> summary.json -> rename into place -> exports

Timing is measured here only (prepare = from the call to the end of job.prepare(); quantize = job.quantize();
the job may name phases inside it), and so is peak memory (memory.peak_rss_bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .memory import peak_rss_bytes
from .recipe import Recipe
from .job import Job, JobResult
from .results import warn_fallbacks, write_json
from .staging import claim, staged

EVAL_DTYPE = torch.float32  # perplexity is computed in float32 unless asked otherwise


@dataclass
class RunOptions:
    """How a run is carried out, as opposed to what it computes (the recipe)."""
    output: Path | None
    overwrite: bool = False
    progress: bool = True
    quiet: bool = False
    evaluate_after: bool = False
    eval_dataset: str | None = None
    eval_seq_len: int | None = None
    max_chunks: int | None = None
    exports: list = field(default_factory=list)  # exporters.formats.ExportFormat, written beside the output
    export_options: dict = field(default_factory=dict)  # {format: {option: value}}
    resume: bool = False  # the staged output keeps a checkpoint; an interrupted run's is continued


def run(job: Job, recipe: Recipe, options: RunOptions, t0: float) -> tuple[dict, JobResult]:
    """Run a checked job to its output folder; returns (summary, the job's result)."""
    outputs = ([options.output] if options.output is not None else []) + \
        [form.default_output(options.output) for form in options.exports]
    with contextlib.ExitStack() as claims:  # every output held from here on: a second run is refused now
        for path in outputs:
            claims.enter_context(claim(path, resume=options.resume))
        staging = staged(Path(options.output), options.overwrite, resume=options.resume) \
            if options.output is not None else contextlib.nullcontext(None)
        with staging as folder:
            summary, result = _run_staged(job, recipe, options, t0, folder)
        if options.exports:
            _write_exports(options, summary)
    return summary, result


def _run_staged(job: Job, recipe: Recipe, options: RunOptions, t0: float, folder: Path | None):
    windows = job.prepare()
    t_prepared = time.perf_counter()
    result = job.quantize(folder)
    t_quantized = time.perf_counter()
    summary = {"lowbit_version": __version__, "source": job.source, **job.describe(),
               "python": platform.python_version(), "torch_version": torch.__version__}
    if windows is not None:
        summary["calibration_sha256"] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    recipe = getattr(job, "recipe", None) or recipe  # as run: a mixed-precision choice is made inside the job
    if folder is not None:
        recipe.save(folder / "recipe.yaml")
    summary.update(_measures(job, result, folder, t0, t_prepared, t_quantized))
    summary.update(result.fields)
    warn_fallbacks(summary["layer_notes"], summary["quantized_modules"], summary["algorithms"][-1])
    if options.evaluate_after:
        seq_len = options.eval_seq_len or recipe.calibration["seq_len"]
        summary["perplexity"] = evaluate_result(job.evaluation_target(folder), options.eval_dataset or "pydoc",
                                                seq_len, options.max_chunks, options.progress)
    if folder is not None:
        write_json(folder / "summary.json", summary)
    return summary, result


def _measures(job: Job, result: JobResult, folder, t0: float, t_prepared: float, t_quantized: float) -> dict:
    """Timings, peak memory, sizes and per-layer errors: the same fields, measured the same way, for every job."""
    out = {
        "seconds": {"prepare": round(t_prepared - t0, 3), **{k: round(v, 3) for k, v in result.phases.items()},
                    "quantize": round(t_quantized - t_prepared, 3), "total": round(time.perf_counter() - t0, 3)},
        "peak_rss_bytes": peak_rss_bytes(),
        "source_size_bytes": job.source_size(),
        "quantized_modules": len(result.layers),
        "layer_notes": {r.name: r.note for r in result.layers if r.note},
    }
    if result.errors_measured:
        out["layer_errors"] = {r.name: round(r.relative_error, 6) for r in result.layers}
        if result.layers:
            out["mean_layer_error"] = round(sum(r.relative_error for r in result.layers) / len(result.layers), 6)
    if folder is not None:
        out["output_size_bytes"] = job.output_size(folder)
    return out


def evaluate_result(target, dataset: str, seq_len: int, max_chunks: int | None, progress: bool) -> dict:
    """Perplexity of a just-quantized model: the in-memory fake-quant torch model, in float32 like
    api.evaluate (weights already rounded to the source dtype, so the figure equals evaluating the written
    folder), the written folder streamed block by block ("torch-folder", a resumed run, which never held the
    earlier blocks), or the written ONNX folder in onnxruntime."""
    from .data import eval_windows, load_text, tokenize

    kind, model, tokenizer = target
    windows = eval_windows(tokenize(tokenizer, load_text(dataset, "eval")), seq_len, max_chunks)
    if kind == "onnx":
        from .eval.onnx_perplexity import onnx_perplexity

        return onnx_perplexity(model, windows, progress=progress).to_dict()
    if kind == "torch-folder":  # a resumed run: the written folder, one block in memory at a time
        from .eval.streamed import streamed_perplexity
        from .hf.model import open_model

        return streamed_perplexity(open_model(model, EVAL_DTYPE), windows, progress=progress).to_dict()
    from .eval.perplexity import perplexity

    return perplexity(model.to(EVAL_DTYPE).eval(), windows, progress=progress).to_dict()


def _write_exports(options: RunOptions, summary: dict) -> None:
    """Each export format from the renamed output folder, recorded in its summary.json."""
    for form in options.exports:
        path = form.write(Path(options.output), form.default_output(options.output), options.overwrite,
                          **options.export_options.get(form.name, {}))
        summary.setdefault("exports", {})[form.name] = str(path)
    write_json(Path(options.output) / "summary.json", summary)
