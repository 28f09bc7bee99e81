"""Perplexity of an ONNX decoder run by onnxruntime (CPU), by the same protocol and result as perplexity.py.

Works on any decoder with onnxruntime-genai's I/O names (FORMATS.md 2.3): lowbit's ONNX export and the
builder's own output alike. Each window runs from an empty past (zero-length past tensors shaped and typed
from the session's input metadata), with an all-ones attention mask and position_ids 0..seq_len-1 when the
graph takes them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..model_files import read_json, resolve_inside
from .perplexity import PerplexityResult, windowed_perplexity

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def onnx_model_path(path) -> Path:
    """model.onnx of a folder (the decoder genai_config.json names, else model.onnx), or the file itself."""
    path = Path(path)
    if path.is_file():
        return path
    name = genai_decoder(path).get("filename", "model.onnx")
    model = resolve_inside(path, name, f"{path / 'genai_config.json'}: the decoder's filename",
                           "name the decoder's .onnx file inside the folder")
    if not model.is_file():
        raise LowbitError(f"{path} has no {name}; give an ONNX model file or a folder holding one")
    return model


def genai_decoder(folder: Path) -> dict:
    """The decoder section of the folder's genai_config.json, {} without one."""
    config = Path(folder) / "genai_config.json"
    if not config.is_file():
        return {}
    decoder = read_json(config, "genai_config").get("model", {})
    decoder = decoder.get("decoder", {}) if isinstance(decoder, dict) else None
    if not isinstance(decoder, dict):
        raise LowbitError(f"{config} has no model.decoder object; restore the file (onnxruntime-genai's builder "
                          f"writes it)")
    return decoder


def _session(model: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def decoder_feeds(session, batch: np.ndarray, head_size: int | None) -> dict[str, np.ndarray]:
    """Inputs for one batch of windows from an empty past. A symbolic head dimension of the KV cache (the
    builder names it kv_cache_dim) is read from genai_config.json's head_size."""
    n, seq = batch.shape
    feeds = {"input_ids": batch, "attention_mask": np.ones((n, seq), dtype=np.int64)}
    for spec in session.get_inputs():
        if spec.name == "position_ids":
            feeds["position_ids"] = np.tile(np.arange(seq, dtype=np.int64), (n, 1))
        elif spec.name.startswith("past_key_values"):
            shape = list(spec.shape) if len(spec.shape) == 4 else [None] * 4
            heads, dim = shape[1], shape[3] if isinstance(shape[3], int) else head_size
            if spec.type not in _NUMPY_TYPES or not isinstance(heads, int) or not isinstance(dim, int):
                raise LowbitError(f"cannot feed {spec.name} ({spec.type}, shape {spec.shape}): expected a float "
                                  f"(batch, kv_heads, past, head_dim) KV cache input (head_dim from "
                                  f"genai_config.json when symbolic)")
            feeds[spec.name] = np.zeros((n, heads, 0, dim), dtype=_NUMPY_TYPES[spec.type])
        elif spec.name not in feeds:
            raise LowbitError(f"the ONNX model has an input {spec.name!r} this evaluation does not know how to feed; "
                              f"give a decoder with onnxruntime-genai's input names")
    return feeds


def onnx_perplexity(folder_or_model_path, windows: torch.Tensor, batch_size: int = 1, progress: bool = True,
                    threads: int | None = None) -> PerplexityResult:
    """Perplexity of an ONNX decoder (folder or model file) over token windows (n, seq_len) int64."""
    model = onnx_model_path(folder_or_model_path)
    session = _session(model, threads)
    head_size = genai_decoder(model.parent).get("head_size")

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        feeds = decoder_feeds(session, batch.numpy().astype(np.int64), head_size)
        return torch.from_numpy(session.run(["logits"], feeds)[0])

    return windowed_perplexity(logits_of, windows, batch_size, progress, "onnx perplexity")


def genai_perplexity(folder, windows: torch.Tensor, progress: bool = True) -> PerplexityResult:
    """Perplexity of an onnxruntime-genai folder run by onnxruntime-genai itself (its session options, KV cache
    handling and provider from genai_config.json): each window is appended as a prompt to a fresh generator
    and the prompt's logits read back, one window at a time."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise LowbitError("--runtime onnxruntime-genai needs the onnxruntime-genai package: "
                          "pip install onnxruntime-genai") from None
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise LowbitError(f"{folder} has no genai_config.json; onnxruntime-genai runs folders written by its builder "
                          f"or by lowbit (use the default runtime for a bare .onnx file)")
    model = og.Model(str(folder))

    def logits_of(batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for window in batch:
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(window) + 1)
            generator = og.Generator(model, params)
            generator.append_tokens(window.numpy().astype(np.int32))
            rows.append(torch.from_numpy(np.asarray(generator.get_output("logits")).copy())[0])
        return torch.stack(rows)

    return windowed_perplexity(logits_of, windows, 1, progress, "onnxruntime-genai perplexity")
