"""Statistics of the weight MatMuls' inputs, gathered by running the ONNX decoder itself in onnxruntime.

The inputs to observe become extra graph outputs of an in-memory copy of the model (its weights still read
from the original external-data file), each calibration window runs from an empty past, and every fetched
activation is folded into that input's InputStats (algorithms/stats.py, the same statistics the torch path
hands to AWQ, GPTQ and SmoothQuant) and dropped. Only the statistics stay: when they would exceed
`memory_budget` bytes (Gram matrices of wide inputs on large models), the inputs are split into several
groups, one pass over the windows each.
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import torch
from tqdm import tqdm

from ..algorithms.stats import InputStats
from ..errors import LowbitError
from ..runtimes import decoder_feeds, genai_decoder, note_windows
from .graph import OnnxDecoder

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider", "openvino": "OpenVINOExecutionProvider"}


def providers_for(names: str) -> list[str]:
    """onnxruntime providers for comma-separated execution-provider names (cpu, cuda, dml, ...), with CPU
    last as the fallback; refused, with the installed ones, when onnxruntime lacks one."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    out = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        provider = PROVIDERS.get(name.lower().replace("executionprovider", ""), name)
        if provider not in available:
            raise LowbitError(f"execution provider {name!r} is not in this onnxruntime build (available: "
                              f"{', '.join(available)}); install the matching onnxruntime package or use "
                              f"--calibration-eps cpu")
        out.append(provider)
    return [p for p in out if p != PROVIDERS["cpu"]] + [PROVIDERS["cpu"]]


def session_with_outputs(decoder: OnnxDecoder, outputs: list[str], providers: list[str], threads: int | None = None,
                         config: dict[str, str] | None = None):
    """An onnxruntime session of the decoder that also returns the tensors `outputs`; the weights are read from
    the model's own folder, nothing is written. `config`: extra session config entries."""
    import onnxruntime as ort

    model = onnx.ModelProto()
    model.CopyFrom(decoder.model)
    present = {o.name for o in model.graph.output}
    for name in outputs:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(decoder.folder))
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    note_windows(session, model)
    return session


def _stats_bytes(columns: int, gram: bool) -> int:
    return columns * columns * 4 * gram + columns * 12


def plan_passes(units: list[dict[str, int]], gram: bool, memory_budget: int) -> list[list[int]]:
    """Consecutive units (one decoder layer's observed inputs: name -> channels) packed into passes whose
    statistics fit the budget; a unit is never split (its scales fold across its groups)."""
    passes, current, used = [], [], 0
    for i, unit in enumerate(units):
        need = sum(_stats_bytes(k, gram) for k in unit.values())
        if current and used + need > memory_budget:
            passes.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    return passes + ([current] if current else [])


def gather_stats(decoder: OnnxDecoder, units: list[dict[str, int]], windows: torch.Tensor, consume,
                 gram: bool = True, providers: list[str] | None = None, memory_budget: int = 4 << 30,
                 progress: bool = True) -> None:
    """InputStats of each unit's tensors (name -> channel count) over the calibration windows (n, seq_len),
    handed pass by pass to `consume(unit indices, {name: InputStats})` and then dropped."""
    head_size = genai_decoder(decoder.folder).get("head_size")
    providers = providers or ["CPUExecutionProvider"]
    passes = plan_passes(units, gram, memory_budget)
    for k, indices in enumerate(passes):
        columns = {name: c for i in indices for name, c in units[i].items()}
        names = list(columns)
        session = session_with_outputs(decoder, names, providers)
        stats = {n: InputStats(columns[n], gram=gram) for n in names}
        desc = "calibrating" + (f" (pass {k + 1}/{len(passes)})" if len(passes) > 1 else "")
        for window in tqdm(windows, desc=desc, unit="window", file=sys.stderr, disable=not progress,
                           dynamic_ncols=True):
            feeds = decoder_feeds(session, window[None].numpy().astype(np.int64), head_size)
            for name, value in zip(names, session.run(names, feeds)):
                if value.shape[-1] != columns[name]:
                    raise LowbitError(f"calibration: {name} has {value.shape[-1]} channels, expected "
                                      f"{columns[name]}; the graph is not a plain decoder this version reads")
                stats[name].add(torch.from_numpy(value))
        del session
        consume(indices, stats)


def calibration_windows(decoder: OnnxDecoder, recipe) -> torch.Tensor:
    """lowbit's calibration windows (the recipe's dataset, calib split) tokenized by the model's tokenizer."""
    from ..data import calib_windows, load_text, tokenize
    from ..model_files import load_tokenizer

    tokenizer = load_tokenizer(decoder.folder, hint=f"calibration needs the tokenizer beside {decoder.path}: copy "
                                                    f"tokenizer.json and tokenizer_config.json into {decoder.folder}")
    cal = recipe.calibration
    return calib_windows(tokenize(tokenizer, load_text(cal["dataset"], "calib")), cal["num_samples"],
                         cal["seq_len"], cal["seed"])
