"""The public Python API: quantize(), load(), evaluate(), inspect(). The CLI is a thin layer over these."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import pipeline
from .algorithms import parse_algo_args, parse_chain
from .arch import check_seq_len, describe, linear_modules, parameter_count
from .data import check_count, eval_windows, load_text, tokenize
from .engine import check_needs
from .memory import peak_rss_bytes
from .engine.placement import Placement, resolve_device, resolve_dtype
from .errors import LowbitError
from .parallel import Ranks, join, rank_device
from .model_files import check_carried, check_onnx_file, load_tokenizer, read_json
from .runtimes import is_onnx_model
from .eval.perplexity import perplexity
from .eval.streamed import all_blocks_params, hidden_bytes, largest_block_params, streamed_perplexity
from .hf.source import DEMO, demo_gguf
from .errors import log
from .pipeline import EVAL_DTYPE, RunOptions
from .torch_job import TorchJob
from .staging import check_output
from .exporters.source import PlannedModel
from .hf.model import LoadedModel, foreign_quantization, load_model, load_with_transformers, open_model, parse_dtype
from .recipe import (DEFAULT_CALIBRATION, DEFAULT_EXCLUDE, AlgoStep, Override, Recipe, format_plan, has_static_inputs, resolve_plan,
                     validate_plan)
from .arch.moe import EXPERT_PATTERN
from .spec import gguf_mix, parse_kv_cache_dtype, parse_scheme

RUNTIMES = ("torch", "llama.cpp", "onnxruntime-genai", "auto")  # torch: ONNX models run in onnxruntime


def make_recipe(scheme: str = "w_uint4_per_group_asym", group_size: int | None = None, algo: str = "rtn",
                exclude_layers=None, overrides=(), dataset: str = "pydoc", num_calib_data: int = 128,
                seq_len: int = 512, seed: int = 0, batch_size: int = 8, algo_args=None,
                propagate: str = DEFAULT_CALIBRATION["propagate"], kv_cache_dtype: str | None = None,
                moe_experts_scheme: str | None = None, target_bits: float | None = None,
                sensitivity: str = "fisher") -> Recipe:
    """A Recipe from the CLI-style arguments (exclude_layers None = the default, lm_head; algo_args a dict
    {algorithm: {option: value}} or 'NAME:KEY=VALUE' strings; moe_experts_scheme: the weight scheme of every
    MoE expert linear, Quark's --moe_experts_second_step_config, as an override; target_bits: mixed precision at
    that average of stored bits per weight, chosen by the `sensitivity` measure, mixed.py)."""
    options = algo_args if isinstance(algo_args, dict) else parse_algo_args(algo_args)
    chain = parse_chain(algo, options)
    return Recipe(
        scheme=parse_scheme(scheme, group_size),
        exclude=tuple(DEFAULT_EXCLUDE if exclude_layers is None else exclude_layers),
        overrides=tuple(o if isinstance(o, Override) else Override.parse(o) for o in overrides) + (
            (Override(EXPERT_PATTERN, (("scheme", parse_scheme(moe_experts_scheme).name),)),)
            if moe_experts_scheme else ()),
        algorithms=tuple(AlgoStep(a.name, tuple(a.args().items())) for a in chain),
        calibration={"dataset": dataset, "num_samples": num_calib_data, "seq_len": seq_len, "seed": seed,
                     "batch_size": batch_size, "propagate": propagate},
        kv_cache=parse_kv_cache_dtype(kv_cache_dtype),
        mixed={"target_bits": float(target_bits), "measure": sensitivity} if target_bits is not None else None,
    )


@dataclass
class QuantizeResult:
    output: Path | None
    summary: dict
    report: object  # the front end's report: engine.EngineReport, or onnx.quantize.OnnxReport for ONNX models
    model: torch.nn.Module | None = None  # the fake-quant model, when keep_in_memory
    plan: dict = field(default_factory=dict)


def plan_for(loaded: LoadedModel, recipe: Recipe):
    """The validated per-module plan of a recipe on a model."""
    plan = resolve_plan(recipe, linear_modules(loaded.model))
    validate_plan(plan, recipe.scheme)
    return plan


def quantize(model, output=None, *, recipe: Recipe | None = None, overwrite: bool = False,
             keep_in_memory: bool = False, evaluate_after: bool = False, eval_dataset: str | None = None,
             eval_seq_len: int | None = None, max_chunks: int | None = None, progress: bool = True,
             quiet: bool = False, export=None, export_options: dict | None = None, onnx_options=None,
             device: str | None = None, calib_dtype: str | None = None, offload_dir=None, resume: bool = False,
             **recipe_args) -> QuantizeResult:
    """Quantize a model source (HF folder, GGUF file or "demo") and write a lowbit folder to `output`, and,
    with export ("awq,gguf" or a list), each format beside it (OUT-awq/, OUT.gguf, ...).

    Everything is validated before any weight is read: the scheme, the chain, the output paths, the plan, and
    whether each export format can hold the result. export_options: {format: {option: value}}.
    An ONNX decoder (an .onnx file or its folder) is quantized by the ONNX front end into a new ONNX folder
    (onnx_options: lowbit.onnx.run.OnnxOptions).

    device: cpu, cuda, cuda:N or auto (default: a GPU when present); calib_dtype: the working precision (float32,
    bfloat16, float16; default float32 on the CPU, bfloat16 on a GPU); offload_dir: spill calibration activations
    there; resume: checkpoint after every block and continue an interrupted run of the same output.

    Started by torchrun as one of several processes (WORLD_SIZE > 1), it joins them (parallel.join): they share
    the calibration windows and the solves, and rank 0 alone writes `output` and its exports and evaluates.
    """
    t0 = time.perf_counter()
    ranks = join(device)  # first: any refusal below is then agreed between the processes (parallel.Ranks.agree)
    recipe = recipe or make_recipe(**recipe_args)
    if max_chunks is not None:
        check_count("--max-chunks", max_chunks)
    if eval_seq_len is not None:
        check_count("--seq-len", eval_seq_len, 2)
    if is_onnx_model(model):
        from .onnx.run import onnx_job

        if ranks.distributed:
            raise LowbitError("several processes (torchrun, --nproc) quantize Hugging Face and GGUF sources; an ONNX "
                              "model is calibrated in onnxruntime by one process: run it without them")
        if export:
            raise LowbitError("export= applies to Hugging Face / GGUF sources; an ONNX model is written as ONNX")
        if recipe.mixed and "achieved_bits" not in recipe.mixed:
            raise LowbitError("--target-bits applies to Hugging Face / GGUF sources for now; quantize the Hugging "
                              "Face model, or give an ONNX model --override options")
        torch_only = {"--device": device, "--calib-dtype": calib_dtype, "--offload-dir": offload_dir,
                      "--resume": resume or None}
        for flag, value in torch_only.items():
            if value is not None:
                raise LowbitError(f"{flag} applies to Hugging Face / GGUF sources; an ONNX model is calibrated in "
                                  f"onnxruntime (--calibration_eps chooses its execution providers)")
        job = onnx_job(model, output, recipe, onnx_options, overwrite, quiet, progress)
        summary, result = pipeline.run(job, recipe, _run_options(output, overwrite, progress, quiet, evaluate_after,
                                                                 eval_dataset, eval_seq_len, max_chunks), t0)
        return QuantizeResult(Path(output), summary, result.report)
    if onnx_options is not None:
        raise LowbitError(f"onnx_options apply to ONNX models only, and {model} is not one")
    if resume and (output is None or keep_in_memory):
        raise LowbitError("resume continues a run that writes an output folder (-o OUT); it cannot keep the model "
                          "in memory")
    placement = _placement(device, calib_dtype, offload_dir, ranks)
    if not ranks.is_writer:  # another rank writes, exports and evaluates; this one calibrates and solves its share
        output, export, evaluate_after, keep_in_memory, progress, quiet = None, None, False, False, False, True
    export_options = _mix_export_options(recipe, export_options)
    job, exports = _torch_job(model, output, recipe, overwrite, keep_in_memory or (evaluate_after and not resume),
                              progress, quiet, export, placement, export_options)
    job.resume = resume
    options = _run_options(output, overwrite, progress, quiet, evaluate_after, eval_dataset, eval_seq_len, max_chunks,
                           exports, export_options)
    options.resume = resume
    summary, result = pipeline.run(job, job.recipe, options, t0)
    model_out = job.loaded.model.eval() if keep_in_memory or evaluate_after else None
    return QuantizeResult(Path(output) if output is not None else None, summary, result.report, model_out, job.plan)


def _placement(device, calib_dtype, offload_dir, ranks: Ranks) -> Placement:
    """Where and in what precision the engine works (checked before anything else); with several processes,
    each on its own device."""
    where = rank_device(device, ranks.local_rank, ranks.size) if ranks.distributed else resolve_device(device)
    return Placement(where, resolve_dtype(calib_dtype, where),
                     Path(offload_dir).expanduser() if offload_dir is not None else None, ranks)


def _with_mix(recipe: Recipe, loaded: LoadedModel) -> Recipe:
    """gguf_q4_k_m ...: the recipe with each linear on the grid of its tensor in that llama.cpp file."""
    if not gguf_mix(recipe.scheme.name):
        return recipe
    from .gguf_mix import with_gguf_mix

    return with_gguf_mix(recipe, loaded.model.config.to_dict(), linear_modules(loaded.model))


def _mix_export_options(recipe: Recipe, export_options: dict | None) -> dict:
    """A gguf_* mix scheme's GGUF export is that mix unless --gguf-type says otherwise."""
    options = {k: dict(v) for k, v in (export_options or {}).items()}
    mix = gguf_mix(recipe.scheme.name)
    if mix is not None:
        options.setdefault("gguf", {}).setdefault("quant_type", mix)
    return options


def _torch_job(model, output, recipe: Recipe, overwrite: bool, keep: bool, progress: bool, quiet: bool,
               export, placement: Placement, export_options: dict) -> tuple[TorchJob, list]:
    """The checked job of a torch source and the export formats asked for; everything refused here, before any
    output is claimed or any weight read."""
    chain = parse_chain([a.name for a in recipe.algorithms], {a.name: a.kwargs() for a in recipe.algorithms})
    check_needs(chain)
    sources = source_paths(model)
    if output is not None:
        check_output(Path(output), overwrite, sources)
    loaded = open_model(model, placement.dtype)
    check_carried(loaded.folder)  # the files the output copies lie inside the source folder
    if loaded.quantized:
        raise LowbitError(f"{loaded.folder} is already quantized by lowbit; give the float model")
    recipe = _with_mix(recipe, loaded)
    plan = plan_for(loaded, recipe)
    planned = planned_model(loaded, plan, chain)
    mixed = _mixed_precision(recipe, plan, planned, export, placement.ranks)
    calibrated = has_static_inputs(plan) or any(a.needs_calibration for a in chain) or mixed is not None
    tokenizer = None
    if calibrated:  # refusals about the windows and the tokenizer come before any output is claimed
        check_seq_len(recipe.calibration["seq_len"], loaded.model, "calibration")
        placement.ranks.check_windows(recipe.calibration["num_samples"])
        tokenizer = loaded.tokenizer()
    log(format_plan(plan), quiet)
    exports = _check_exports(export, output, overwrite, planned, quiet, sources + [loaded.folder], export_options)
    return TorchJob(str(model), loaded, recipe, plan, chain, tokenizer, keep, progress, placement,
                    sources=sources, mixed=mixed, quiet=quiet), exports


def _mixed_precision(recipe: Recipe, plan: dict, planned: PlannedModel, export, ranks):
    """The mixed-precision choice to make before quantizing (--target-bits), checked now: an integer weight-only
    scheme, one process, candidates every requested export can hold, a target they can reach. None when not
    asked, or when the recipe already holds a choice."""
    from .mixed import MixedPrecision, budget_range, candidate_specs, check_base

    asked = recipe.mixed
    if not asked or "achieved_bits" in asked:
        return None
    if ranks.distributed:
        raise LowbitError("--target-bits measures sensitivity in one process; run it without --nproc / torchrun")
    check_base(recipe.scheme.weight, recipe.scheme.input)
    allowed = _exportable(candidate_specs(recipe.scheme.weight), planned, export)
    lo, hi = budget_range(plan, allowed)
    target = asked["target_bits"]
    if not lo <= target <= hi:
        raise LowbitError(f"--target-bits {target:g} is outside what the candidate formats can store on this model"
                          f"{' and export' if export else ''}: {lo:.3f} to {hi:.3f} bits per weight (scales and zero "
                          f"points included)")
    return MixedPrecision(target, asked.get("measure", "relative"), allowed)


def _exportable(specs: list, planned: PlannedModel, export) -> dict[str, list]:
    """Each quantized linear's candidate specs that divide its input width into whole groups and that every
    requested export format can hold for it."""
    from .mixed import candidates_for

    forms = []
    if export:
        from .exporters.formats import parse_formats

        forms = parse_formats(export)
    allowed, verdicts = {}, {}
    for name, (_, shape) in planned.modules.items():
        allowed[name] = []
        for spec in candidates_for(specs, shape[1]):
            key = (spec, shape, name.rpartition(".")[2])  # the formats decide by format, shape and role
            if key not in verdicts:
                verdicts[key] = _holds(forms, dataclasses.replace(planned, modules={name: (spec, shape)}))
            if verdicts[key]:
                allowed[name].append(spec)
    return allowed


def _holds(forms: list, planned: PlannedModel) -> bool:
    try:
        for form in forms:
            form.check(planned)
    except LowbitError:
        return False
    return True


def _run_options(output, overwrite, progress, quiet, evaluate_after, eval_dataset, eval_seq_len, max_chunks,
                 exports=(), export_options=None) -> RunOptions:
    return RunOptions(Path(output) if output is not None else None, overwrite, progress, quiet, evaluate_after,
                      eval_dataset, eval_seq_len, max_chunks, list(exports), export_options or {})


def source_paths(model) -> list[Path]:
    """The files and folders a model source consists of, which no output may replace, enter or contain."""
    if str(model) == DEMO:
        return [demo_gguf()]
    path = Path(str(model)).expanduser()
    if is_onnx_model(path) and path.is_file():
        return [path.parent]  # its external data and tokenizer live beside it
    return [path] if path.exists() else []


def _check_exports(export, output, overwrite: bool, planned, quiet: bool, sources, options: dict) -> list:
    """The export formats asked for, each checked against the plan (with its options: the GGUF type and
    imatrix) and its output path before any work."""
    if not export:
        return []
    from .exporters.formats import parse_formats

    if output is None:
        raise LowbitError("--export needs an output folder (-o OUT): the exports are written beside it")
    formats = parse_formats(export)
    for form in formats:
        gguf_options = options.get("gguf", {}) if form.name == "gguf" else {}
        quant_type = gguf_options.get("quant_type")
        onnx_dtype = options.get("onnx", {}).get("dtype") if form.name == "onnx" else None
        checked = form.check(planned, quant_type) if quant_type else form.check(planned, onnx_dtype) \
            if onnx_dtype else form.check(planned)
        for warning in checked:
            log(f"warning ({form.name}): {warning}", quiet)
        if gguf_options.get("imatrix") is not None:  # a wrong imatrix is refused now, not after quantizing
            from .exporters.gguf import check_imatrix

            for warning in check_imatrix(planned, quant_type, gguf_options["imatrix"]):
                log(f"warning ({form.name}): {warning}", quiet)
        check_output(form.default_output(output), overwrite, sources, is_file=form.is_file)
    return formats


def load(path, dtype: torch.dtype | str | None = None) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) for any source: a float HF folder, a GGUF file, `demo`, or a lowbit output
    (its packed linears dequantized, rounded to the source dtype, into ordinary nn.Linear weights).
    dtype None or "auto" keeps the stored dtype."""
    return load_model(path, dtype)


def evaluate(model, dataset: str = "pydoc", seq_len: int = 512, max_chunks: int | None = None,
             batch_size: int = 4, progress: bool = True, dtype: torch.dtype | str | None = EVAL_DTYPE,
             runtime: str = "torch", stream: bool | None = None, offload_dir: str | Path | None = None) -> dict:
    """Perplexity (standard protocol) of a model source, with its size and parameter count. Computed in
    float32 by default whatever the stored dtype, so copies of the same weights give the same figure;
    dtype "auto" computes in the stored dtype. ONNX models (a file or a folder) run in onnxruntime, or with
    runtime "onnxruntime-genai" in onnxruntime-genai; runtime "llama.cpp" runs a .gguf file in llama.cpp itself
    instead of dequantizing it for torch. A torch model is streamed one decoder block at a time (the same
    figure, eval.streamed) with stream True, or with None when its weights in the eval dtype do not fit in the
    memory available (memory.fits_in_memory); the hidden states held between blocks then go to a temporary
    folder under offload_dir when given."""
    check_count("--seq-len", seq_len, 2)
    check_count("--batch-size", batch_size)
    if max_chunks is not None:
        check_count("--max-chunks", max_chunks)
    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if runtime == "auto":
        runtime = auto_runtime(model, torch_only=stream or offload_dir is not None or dtype not in (EVAL_DTYPE,
                                                                                                     "float32"))
    if runtime == "llama.cpp" and str(model) == DEMO:
        model = demo_gguf()
    if runtime == "onnxruntime-genai" and not is_onnx_model(model):
        raise LowbitError(f"--runtime onnxruntime-genai runs an ONNX folder with genai_config.json; {model} is not one")
    _check_stream_options(model, runtime, stream, offload_dir)
    if is_onnx_model(model) or runtime == "llama.cpp":
        return _evaluate_in_runtime(Path(str(model)), runtime, dataset, seq_len, max_chunks, progress)
    if foreign_quantization(model):
        return _evaluate_foreign(Path(model), dataset, seq_len, max_chunks, batch_size, progress, dtype)
    loaded = open_model(model, parse_dtype(dtype))
    check_seq_len(seq_len, loaded.model, "evaluation")
    ids = tokenize(loaded.tokenizer(), load_text(dataset, "eval"))
    windows = eval_windows(ids, seq_len, max_chunks)
    info = describe(loaded.model)
    streamed = _choose_stream(loaded, windows, batch_size, stream, offload_dir)
    t0 = time.perf_counter()
    if streamed:
        load_s = 0.0  # weights are read block by block inside the measured run
        result = streamed_perplexity(loaded, windows, batch_size, progress, offload_dir).to_dict()
    else:
        net = loaded.load_all()
        load_s = time.perf_counter() - t0
        result = perplexity(net, windows, batch_size, progress).to_dict()
    result.update({
        "model": str(model), "dataset": dataset, "size_bytes": loaded.size_bytes(),
        "parameters": info["parameters"], "quantized": bool(loaded.quantized),
        "scheme": (loaded.quantization_config or {}).get("scheme"), "load_seconds": round(load_s, 3),
        "dtype": str(loaded.dtype).replace("torch.", ""), "streamed": streamed, "peak_rss_bytes": peak_rss_bytes(),
    })
    if hasattr(loaded.ckpt, "stored_as"):  # a GGUF file, an AutoAWQ / GPTQ folder: what it stores, dequantized here
        result["stored_as"] = loaded.ckpt.stored_as()
    return result


def auto_runtime(model, torch_only: bool = False) -> str:
    """Where `lowbit eval` runs a model by default: a GGUF file (and `demo`) in llama.cpp, the runtime it is made
    for, when llama-cpp-python is installed and no torch-only option (`torch_only`: --dtype, --stream,
    --offload-dir) is given; otherwise, and for every other model, "torch" (ONNX models: onnxruntime). A GGUF
    measured in torch is said so, once, on stderr."""
    import importlib.util

    path = str(model)
    if path != DEMO and not path.lower().endswith(".gguf"):
        return "torch"
    if not torch_only and importlib.util.find_spec("llama_cpp") is not None:
        return "llama.cpp"
    why = "a torch-only option is given" if torch_only else "llama-cpp-python is not installed"
    log(f"note: {path} is measured with its weights dequantized in torch, not in llama.cpp ({why}); llama.cpp's "
        f"own figure differs slightly (pip install llama-cpp-python, or --runtime llama.cpp)")
    return "torch"


def _check_stream_options(model, runtime: str, stream: bool | None, offload_dir) -> None:
    """A stream is lowbit's own torch evaluation: refused, when asked for, of a model another runtime (ONNX,
    llama.cpp) or transformers (compressed-tensors) runs; offload_dir is an existing folder, for a stream."""
    if stream and (is_onnx_model(model) or runtime == "llama.cpp" or foreign_quantization(model)):
        other = "onnxruntime" if is_onnx_model(model) else runtime if runtime == "llama.cpp" else "transformers"
        raise LowbitError(f"--stream evaluates a torch model one block at a time; {model} runs in {other}, which "
                          f"holds it whole: leave out --stream")
    if offload_dir is not None and stream is False:
        raise LowbitError("--offload-dir keeps a stream's hidden states on disk; it does nothing with --no-stream")
    if offload_dir is not None and not Path(offload_dir).is_dir():
        raise LowbitError(f"--offload-dir {offload_dir} is not an existing folder")


def _choose_stream(loaded: LoadedModel, windows: torch.Tensor, batch_size: int, stream: bool | None,
                   offload_dir) -> bool:
    """Whether to stream: as asked, or (stream None) when the weights in the eval dtype do not fit in the
    memory available. A stream whose hidden states do not fit either, with no offload_dir, is refused."""
    from .memory import available_bytes, fits_in_memory, needed_bytes

    itemsize = torch.finfo(loaded.dtype).bits // 8
    weights = parameter_count(loaded.model) * itemsize
    vocab = getattr(loaded.model.config.get_text_config(), "vocab_size", 0) or 0
    logits = min(batch_size, windows.shape[0]) * windows.shape[1] * vocab * 4 * 2  # logits and their float copy
    if stream is None:
        stream = not fits_in_memory(weights, logits)
    if stream and offload_dir is None:
        held, room = hidden_bytes(loaded, windows), available_bytes()
        blocks = [largest_block_params(loaded), parameter_count(loaded.model) - all_blocks_params(loaded)]
        need = needed_bytes(max(blocks) * itemsize, held + logits)  # a block, or embedding + lm_head at the end
        if room is not None and need > room:
            raise LowbitError(f"a streamed evaluation needs {need / 2**30:.2f} GiB, {held / 2**30:.2f} GiB of it the "
                              f"hidden states of every window held between blocks, and {room / 2**30:.2f} GiB of "
                              f"memory is available; give --offload-dir FOLDER to keep them on disk, or fewer "
                              f"--max-chunks")
    return bool(stream)


def _evaluate_foreign(folder: Path, dataset: str, seq_len: int, max_chunks, batch_size: int, progress: bool,
                      dtype) -> dict:
    """Perplexity of a compressed-tensors folder (e.g. lowbit's export) loaded by transformers itself."""
    t0 = time.perf_counter()
    net, tokenizer = load_with_transformers(folder, parse_dtype(dtype))
    load_s = time.perf_counter() - t0
    windows = eval_windows(tokenize(tokenizer, load_text(dataset, "eval")), seq_len, max_chunks)
    result = perplexity(net, windows, batch_size, progress).to_dict()
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    result.update({"model": str(folder), "dataset": dataset, "runtime": "transformers",
                   "size_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
                   "parameters": describe(net)["parameters"], "quantized": True,
                   "scheme": qconfig.get("quant_method"), "load_seconds": round(load_s, 3),
                   "dtype": str(next(net.parameters()).dtype).replace("torch.", "")})
    return result


def _evaluate_in_runtime(path: Path, runtime: str, dataset: str, seq_len: int, max_chunks, progress) -> dict:
    """Perplexity of an ONNX model in onnxruntime, or of a GGUF file in llama.cpp, on lowbit's token windows."""
    if runtime != "llama.cpp":
        from .eval.onnx_perplexity import genai_perplexity, onnx_perplexity
        from .runtimes import onnx_folder, onnx_model_path

        check_onnx_file(onnx_model_path(path))  # external data inside the folder, present and whole
        folder = onnx_folder(path)
        tokenizer = load_tokenizer(folder, hint="put the model's tokenizer files beside model.onnx")
        windows = eval_windows(tokenize(tokenizer, load_text(dataset, "eval")), seq_len, max_chunks)
        if runtime == "onnxruntime-genai":
            result = genai_perplexity(folder, windows, progress=progress).to_dict()
        else:
            result = onnx_perplexity(path, windows, progress=progress).to_dict()
            runtime = "onnxruntime"
        size = sum(p.stat().st_size for p in folder.glob("*.onnx*"))
    else:
        from .eval.llama_cpp import gguf_perplexity

        if path.suffix.lower() != ".gguf" or not path.is_file():
            raise LowbitError(f"--runtime llama.cpp runs a .gguf file; {path} is not one")
        windows = eval_windows(tokenize(open_model(path).tokenizer(), load_text(dataset, "eval")), seq_len,
                               max_chunks)
        result = gguf_perplexity(path, windows, progress=progress).to_dict()
        size = path.stat().st_size
    result.update({"model": str(path), "dataset": dataset, "runtime": runtime, "size_bytes": size,
                   "parameters": None, "quantized": None, "scheme": None, "dtype": None})
    return result


def inspect(model, recipe: Recipe | None = None) -> dict:
    """Architecture, blocks, linear shapes and, with a recipe, what each linear would get."""
    loaded = open_model(model)
    info = describe(loaded.model)
    info["folder"] = str(loaded.folder)
    info["size_bytes"] = loaded.size_bytes()
    if loaded.quantization_config:
        info["quantization"] = {k: loaded.quantization_config[k] for k in ("scheme", "algorithms", "ignore")}
    linears = linear_modules(loaded.model)
    info["linears"] = {n: list(s) for n, s in linears.items()}
    if recipe is not None:
        plan = plan_for(loaded, _with_mix(recipe, loaded))
        info["plan"] = {n: (lp.spec.short_name if lp.spec else "float") for n, lp in plan.items()}
        info["plan_table"] = format_plan(plan)
    return info


def export(model, output, fmt: str = "compressed-tensors", overwrite: bool = False, quiet: bool = False,
           **options) -> Path:
    """Re-export a lowbit output folder in another layout without re-quantizing (the stored codes and scales
    move as they are, except where a format warns that it re-quantizes). Formats: lowbit.exporters.formats.NAMES;
    options go to the format's writer (gguf: quant_type; onnx: accuracy_level, quantize_embedding). gguf with
    quant_type f16 / bf16 / f32 (or a K-quant mix) also takes any model source: exporters.gguf_float."""
    from .exporters.formats import get_format
    from .exporters.source import LowbitFolder

    form = get_format(fmt)
    check_output(Path(output), overwrite, [Path(model)], is_file=form.is_file)
    if form.name == "gguf":
        from .exporters.gguf_float import check_float_gguf, float_export

        if float_export(model, options.get("quant_type")):  # a float GGUF, or any source that is no lowbit folder
            for warning in check_float_gguf(model, options.get("quant_type")):
                log(f"warning: {warning}", quiet)
            return form.write(model, Path(output), overwrite, **options)
    for warning in form.check(LowbitFolder(Path(model))):
        log(f"warning: {warning}", quiet)
    return form.write(Path(model), Path(output), overwrite, **options)


def planned_model(loaded: LoadedModel, plan: dict, chain) -> PlannedModel:
    """What the quantized model will be, for export checks before calibration."""
    r4 = any(a.name == "rotation" and a.args().get("r4") for a in chain)
    return PlannedModel(
        config=read_json(loaded.folder / "config.json", "model config"),
        modules={n: (lp.spec, lp.shape) for n, lp in plan.items() if lp.spec is not None},
        inputs={n: lp.input_spec for n, lp in plan.items() if lp.spec is not None and lp.input_spec is not None},
        outputs={n: lp.output_spec for n, lp in plan.items() if lp.spec is not None and lp.output_spec is not None},
        online_rotations={"each MLP's last linear": {}} if r4 else {})
