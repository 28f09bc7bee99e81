"""Speed and size of a model: prefill and decode tokens per second (greedy, batch 1, KV cache), peak memory and
bytes on disk, measured in torch, onnxruntime-genai or llama.cpp.

The prompt is the first prompt_tokens tokens of the built-in evaluation text (pydoc), tokenized by the model's
own tokenizer, so every model reads the same text. The measurement runs in a fresh child process ("spawn"), so
the peak resident memory reported is that model's own, not what the caller had loaded before. This module
imports no torch at its top: a child measuring onnxruntime-genai or llama.cpp loads only what that runtime needs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from ..errors import LowbitError
from ..memory import peak_rss_bytes
from ..runtimes import (genai_context_length, genai_generator, genai_version, llama_version, onnx_folder,
                        onnx_model_path, open_genai_model, open_llama)

RUNTIMES = ("auto", "torch", "onnxruntime-genai", "llama.cpp")
PROMPT_TEXT = "pydoc"  # lowbit.data's built-in text, present on every machine
_PACKAGES = {"torch": ("torch", "torch"), "onnxruntime-genai": ("onnxruntime_genai", "onnxruntime-genai"),
             "llama.cpp": ("llama_cpp", "llama-cpp-python")}


def measure_speed(model, runtime: str = "auto", prompt_tokens: int = 512, new_tokens: int = 128, runs: int = 3,
                  warmup: int = 1, threads: int | None = None, progress: bool = True) -> dict:
    """Prefill and decode tokens/s (median, min, max over `runs` after `warmup` discarded runs), the child
    process's peak RSS and the weights' bytes on disk of any lowbit model source, as a JSON-able dict.

    runtime "auto": onnxruntime-genai for an ONNX folder with genai_config.json, torch otherwise. threads None:
    every CPU this process may use, the same number for every runtime."""
    _check_counts(prompt_tokens=prompt_tokens, new_tokens=new_tokens, runs=runs, warmup=warmup)
    if threads is not None and threads < 1:
        raise LowbitError(f"threads must be at least 1 (or None for every available CPU), got {threads}")
    runtime = resolve_runtime(model, runtime)
    target = runtime_target(model, runtime)
    if runtime == "onnxruntime-genai":
        from ..model_files import check_onnx_file

        check_onnx_file(onnx_model_path(target))  # external data inside the folder, present and whole
    prompt = prompt_ids(model, runtime, prompt_tokens)
    if runtime == "onnxruntime-genai":
        _check_genai_context(Path(target), prompt_tokens + new_tokens + 1)
    job = {"target": target, "runtime": runtime, "prompt": prompt, "new_tokens": new_tokens, "runs": runs,
           "warmup": warmup, "threads": threads or _available_cpus(), "progress": progress}
    child = run_in_child(_measure, job)
    return {
        "model": str(model), "runtime": runtime, "runtime_version": child["runtime_version"],
        "torch_version": _torch_version(), "threads": job["threads"],
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
        "prefill_tokens_per_s": spread([prompt_tokens / s for s in child["prefill_seconds"]]),
        "decode_tokens_per_s": spread([new_tokens / s for s in child["decode_seconds"]]),
        "load_seconds": round(child["load_seconds"], 3),
        "peak_rss_bytes": child["peak_rss_bytes"], "rss_before_load_bytes": child["rss_before_load_bytes"],
        "size_bytes": size_on_disk(model, runtime),
    }


# -- checks and inputs (parent process) -------------------------------------------------------------------

def _available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _check_counts(**counts: int) -> None:
    """Refuse counts that leave nothing to measure (warmup may be 0)."""
    for name, value in counts.items():
        least = 0 if name == "warmup" else 1
        if not isinstance(value, int) or value < least:
            raise LowbitError(f"{name} must be an integer of at least {least}, got {value!r}")


def resolve_runtime(model, runtime: str) -> str:
    """The runtime that will run the model ("auto" resolved), refused when it cannot run it or is missing."""
    from ..runtimes import is_onnx_model

    if runtime not in RUNTIMES:
        raise LowbitError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    onnx = is_onnx_model(model)
    if runtime == "auto":
        runtime = "onnxruntime-genai" if onnx else "torch"
    if runtime == "torch" and onnx:
        raise LowbitError(f"torch cannot run the ONNX model {model}; use runtime onnxruntime-genai (or auto)")
    if runtime == "onnxruntime-genai" and not onnx:
        raise LowbitError(f"onnxruntime-genai runs an ONNX folder with genai_config.json and {model} is not ONNX; "
                          f"use runtime torch (or auto)")
    if runtime == "llama.cpp" and not _is_gguf(model):
        raise LowbitError(f"llama.cpp runs a .gguf file (or demo) and {model} is not one; use runtime torch "
                          f"(or export a GGUF file first)")
    module, package = _PACKAGES[runtime]
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LowbitError(f"runtime {runtime} needs the {package} package: pip install {package}")
    return runtime


def _is_gguf(model) -> bool:
    from ..hf.source import DEMO

    path = Path(str(model))
    return str(model) == DEMO or path.suffix.lower() == ".gguf" and path.is_file()


def runtime_target(model, runtime: str) -> str:
    """What the runtime opens: a model source (torch), an ONNX folder with genai_config.json, a .gguf file."""
    if runtime == "onnxruntime-genai":
        folder = onnx_folder(model)
        if not (folder / "genai_config.json").is_file():
            raise LowbitError(f"{model} has no genai_config.json beside it, which onnxruntime-genai needs; export "
                              f"with `lowbit export --format onnx` or onnxruntime-genai's model builder")
        return str(folder)
    if runtime == "llama.cpp":
        from ..hf.source import DEMO, demo_gguf

        return str(demo_gguf() if str(model) == DEMO else Path(str(model)))
    return str(model)


def _tokenizer(model, runtime: str):
    """The model's tokenizer (transformers): from the ONNX folder, the GGUF file, or the model source."""
    from ..model_files import load_tokenizer

    if runtime in ("onnxruntime-genai", "llama.cpp"):
        target = Path(runtime_target(model, runtime))
        folder, extra = (target, {}) if target.is_dir() else (target.parent, {"gguf_file": target.name})
        return load_tokenizer(folder, hint="put the model's tokenizer files beside it", **extra)
    from ..hf.model import foreign_quantization, open_model

    if foreign_quantization(model):  # a compressed-tensors folder: its own tokenizer files
        return load_tokenizer(model)
    return open_model(model).tokenizer()


def prompt_ids(model, runtime: str, prompt_tokens: int) -> list[int]:
    """The first prompt_tokens token ids of the built-in text, by the model's tokenizer."""
    from ..data import load_text, tokenize

    ids = tokenize(_tokenizer(model, runtime), load_text(PROMPT_TEXT, "eval"))
    if ids.numel() < prompt_tokens:
        raise LowbitError(f"the built-in prompt text has {ids.numel()} tokens with this tokenizer, fewer than "
                          f"prompt_tokens={prompt_tokens}; ask for at most {ids.numel()} prompt tokens")
    return ids[:prompt_tokens].tolist()


def _check_genai_context(folder: Path, length: int) -> None:
    """onnxruntime-genai refuses a sequence longer than the model's context_length: say so before starting."""
    context = genai_context_length(folder)
    if context is not None and length > context:
        raise LowbitError(f"prompt_tokens + new_tokens + 1 = {length} exceeds the model's context length "
                          f"({context}); ask for fewer tokens")


def size_on_disk(model, runtime: str = "torch") -> int:
    """Bytes of the weight files the runtime reads: a .gguf file, an ONNX model with its external data, or a
    folder's *.safetensors (demo: its shipped .gguf, which both llama.cpp and lowbit's torch path read)."""
    from ..runtimes import is_onnx_model
    from ..hf.source import DEMO, demo_gguf

    if str(model) == DEMO:
        if runtime == "llama.cpp":
            return demo_gguf().stat().st_size
        from ..hf.model import open_model

        return open_model(DEMO).size_bytes()
    path = Path(str(model))
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path.stat().st_size
    if is_onnx_model(path):
        return onnx_size(onnx_model_path(path))
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def onnx_size(model_file: Path) -> int:
    """An .onnx file's bytes plus those of the external data files its tensors name."""
    try:
        import onnx
    except ImportError:  # no onnx package: count the builder's / exporter's usual companion file
        names = {f"{model_file.name}.data"}
    else:
        proto = onnx.load(str(model_file), load_external_data=False)
        names = _external_files(proto.graph, onnx.TensorProto.EXTERNAL)
    files = [model_file.parent / n for n in names]
    return model_file.stat().st_size + sum(f.stat().st_size for f in files if f.is_file())


def _external_files(graph, external: int) -> set[str]:
    """The external data locations named by a graph's tensors (initializers, constants, subgraphs)."""
    tensors, names = list(graph.initializer), set()
    for node in graph.node:
        for attr in node.attribute:
            tensors += [attr.t] if attr.HasField("t") else list(attr.tensors)
            for sub in ([attr.g] if attr.HasField("g") else list(attr.graphs)):
                names |= _external_files(sub, external)
    for tensor in tensors:
        if tensor.data_location == external:
            names |= {e.value for e in tensor.external_data if e.key == "location"}
    return names


def _torch_version() -> str:
    import torch  # already imported by the tokenization

    return torch.__version__


def spread(values: list[float]) -> dict:
    """Median, min, max and every value (rounded to 0.01)."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2), "all": [round(v, 2) for v in values]}


def run_in_child(function, job: dict) -> dict:
    """function(job) in a fresh spawned process; its exceptions (LowbitError included) are raised here."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(function, job).result()
        except BrokenProcessPool:
            raise LowbitError("the measuring process died before it finished (out of memory?); try a smaller "
                              "model or fewer prompt_tokens + new_tokens") from None


# -- the measurement (child process) ----------------------------------------------------------------------

def _measure(job: dict) -> dict:
    """Open the model in its runtime, then time warmup + runs generations of the prompt; warmups discarded."""
    from tqdm import tqdm

    before = peak_rss_bytes()
    t0 = time.perf_counter()
    generate, version = _OPENERS[job["runtime"]](job["target"], job["threads"], len(job["prompt"]) + job["new_tokens"])
    load_seconds = time.perf_counter() - t0
    prefill, decode = [], []
    total = job["warmup"] + job["runs"]
    for i in tqdm(range(total), desc=f"bench ({job['runtime']})", disable=not job["progress"], file=sys.stderr):
        p, d = generate(job["prompt"], job["new_tokens"])
        if i >= job["warmup"]:
            prefill.append(p)
            decode.append(d)
    return {"prefill_seconds": prefill, "decode_seconds": decode, "load_seconds": load_seconds,
            "runtime_version": version, "rss_before_load_bytes": before, "peak_rss_bytes": peak_rss_bytes()}


def _open_torch(source: str, threads: int, length: int):
    """Greedy generation in torch with the KV cache, batch 1, the model as lowbit.api.load gives it."""
    import inspect

    import torch

    from ..hf.model import load_model as load

    torch.set_num_threads(threads)
    model, _ = load(source)
    # only the last position's logits, as a generator needs (transformers >= 4.45)
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}

    def generate(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(torch.tensor([prompt]), use_cache=True, **keep)
            token = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(new_tokens):
                out = model(token, past_key_values=out.past_key_values, use_cache=True, **keep)
                token = out.logits[:, -1:].argmax(-1)
            return t1 - t0, time.perf_counter() - t1

    return generate, torch.__version__


def _open_genai(folder: str, threads: int, length: int):
    """Greedy generation in onnxruntime-genai, its session options from genai_config.json plus the threads."""
    import numpy as np

    model = open_genai_model(folder, threads)

    def generate(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        # min_length = max_length: EOS is masked until the end, so every run generates all new_tokens
        length = len(prompt) + new_tokens + 1
        generator = genai_generator(model, length, do_sample=False, min_length=length)
        tokens = np.asarray(prompt, dtype=np.int32)
        t0 = time.perf_counter()
        generator.append_tokens(tokens)  # the prompt's forward pass
        generator.generate_next_token()  # picks the first token from the prompt's logits (no forward pass)
        t1 = time.perf_counter()
        for _ in range(new_tokens):  # each call: one token's forward pass, then its pick
            generator.generate_next_token()
        return t1 - t0, time.perf_counter() - t1

    return generate, genai_version()


def _open_llama_cpp(path: str, threads: int, length: int):
    """Greedy generation in llama.cpp (llama-cpp-python), logits of the last position only."""
    llm = open_llama(path, length + 1, threads, all_logits=False)

    def generate(prompt: list[int], new_tokens: int) -> tuple[float, float]:
        llm.reset()  # the KV cache starts empty
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(temp=0.0)  # temp 0: greedy
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([token])
            token = llm.sample(temp=0.0)
        return t1 - t0, time.perf_counter() - t1

    return generate, llama_version()


_OPENERS = {"torch": _open_torch, "onnxruntime-genai": _open_genai, "llama.cpp": _open_llama_cpp}
