"""Opening and feeding the runtimes that run a decoder outside torch, in one place: onnxruntime (an ONNX
decoder's model file, its genai_config.json, an InferenceSession and the inputs of a window from an empty
past, a sliding-window KV cache given its window's capacity), onnxruntime-genai (a Model of a folder and a
greedy Generator over it) and llama.cpp (a Llama over a GGUF file).

A low module: it imports only lowbit.errors and lowbit.model_files, so the ONNX front end (onnx/) and the
measurements (eval/) both build on it. The optional packages (onnxruntime, onnxruntime_genai, llama_cpp) are
imported inside the functions that need them, and torch not at all, so a core install and speed's measuring
child load only what they use.
"""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path

import numpy as np

from .errors import LowbitError
from .model_files import read_json, resolve_inside

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_WINDOWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> {past input: window capacity}
GENAI_INSTALL = "--runtime onnxruntime-genai needs the onnxruntime-genai package: pip install onnxruntime-genai"


# -- ONNX decoder files -----------------------------------------------------------------------------------

def onnx_folder(path) -> Path:
    """The folder of an ONNX model: the path itself when it is a folder, else the model file's folder."""
    path = Path(str(path))
    return path if path.is_dir() else path.parent


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


def genai_context_length(folder: Path) -> int | None:
    """model.context_length of the folder's genai_config.json (the file must exist); None when it states none."""
    return json.loads((Path(folder) / "genai_config.json").read_text())["model"].get("context_length")


# -- onnxruntime ------------------------------------------------------------------------------------------

def decoder_session(model: Path, threads: int | None = None):
    """An onnxruntime InferenceSession of the decoder's model file on the CPU; `threads` intra-op threads
    (None: onnxruntime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    note_windows(session, model)
    return session


def sliding_windows(model) -> dict[str, int]:
    """past input name -> the capacity its KV cache must have: local_window_size for the past key and value of
    a GroupQueryAttention with sliding_window_cache=1 (the builder's bounded cache of a sliding-window layer,
    which onnxruntime refuses below the window). `model`: a ModelProto or a model file (read without its
    external data)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    windows = {}
    for node in model.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attributes.get("sliding_window_cache") and attributes.get("local_window_size", -1) > 0:
            windows.update({name: int(attributes["local_window_size"]) for name in node.input[3:5] if name})
    return windows


def note_windows(session, model) -> None:
    """Remember the sliding-window capacities of the session's model (a ModelProto or file) for decoder_feeds;
    decoder_session does it for the sessions it opens."""
    _WINDOWS[session] = sliding_windows(model)


def decoder_feeds(session, batch: np.ndarray, head_size: int | None) -> dict[str, np.ndarray]:
    """Inputs for one batch of windows from an empty past. A symbolic head dimension of the KV cache (the
    builder names it kv_cache_dim) is read from genai_config.json's head_size. A sliding-window cache (the
    builder's past_sliding_length inputs) gets a zeroed buffer of its sliding window's capacity, as
    onnxruntime-genai feeds it: the attention mask covers only the batch's own tokens (a past of length 0), so
    the zeros are never attended, and the present it returns is that ring buffer, filled."""
    n, seq = batch.shape
    feeds = {"input_ids": batch, "attention_mask": np.ones((n, seq), dtype=np.int64)}
    windows = _WINDOWS.get(session, {})
    for spec in session.get_inputs():
        if spec.name == "position_ids":
            feeds["position_ids"] = np.tile(np.arange(seq, dtype=np.int64), (n, 1))
        elif spec.name.startswith("past_key_values"):
            feeds[spec.name] = _empty_past(spec, n, head_size, windows.get(spec.name, 0))
        elif spec.name not in feeds:
            raise LowbitError(f"the ONNX model has an input {spec.name!r} this evaluation does not know how to feed; "
                              f"give a decoder with onnxruntime-genai's input names")
    return feeds


def _empty_past(spec, n: int, head_size: int | None, capacity: int = 0) -> np.ndarray:
    """An empty past key or value (n, kv_heads, capacity, head_dim) shaped and typed from the input's metadata:
    zero-length, or a zeroed buffer of `capacity` positions for a sliding-window cache."""
    shape = list(spec.shape) if len(spec.shape) == 4 else [None] * 4
    heads, dim = shape[1], shape[3] if isinstance(shape[3], int) else head_size
    if spec.type not in _NUMPY_TYPES or not isinstance(heads, int) or not isinstance(dim, int):
        raise LowbitError(f"cannot feed {spec.name} ({spec.type}, shape {spec.shape}): expected a float "
                          f"(batch, kv_heads, past, head_dim) KV cache input (head_dim from "
                          f"genai_config.json when symbolic)")
    return np.zeros((n, heads, capacity, dim), dtype=_NUMPY_TYPES[spec.type])


# -- onnxruntime-genai ------------------------------------------------------------------------------------

def _genai():
    """The onnxruntime_genai module, refused with the install command when it is missing."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise LowbitError(GENAI_INSTALL) from None
    return og


def open_genai_model(folder, threads: int | None = None,
                     bare_onnx_hint: str = "use the default runtime for a bare .onnx file"):
    """An onnxruntime-genai Model of a folder with genai_config.json: its provider and session options from
    that file, plus `threads` intra-op threads when given. Without the file, refused with `bare_onnx_hint`."""
    og = _genai()
    folder = Path(folder)
    if not (folder / "genai_config.json").is_file():
        raise LowbitError(f"{folder} has no genai_config.json; onnxruntime-genai runs folders written by its builder "
                          f"or by lowbit ({bare_onnx_hint})")
    if threads is None:
        return og.Model(str(folder))
    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def genai_generator(model, max_length: int, **search_options):
    """A fresh onnxruntime-genai Generator over `model` for sequences up to max_length tokens; the other
    search options (do_sample, min_length, ...) as onnxruntime-genai names them."""
    og = _genai()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, **search_options)
    return og.Generator(model, params)


def genai_version() -> str:
    """The installed onnxruntime-genai's version."""
    return _genai().__version__


# -- llama.cpp --------------------------------------------------------------------------------------------

def open_llama(path, n_ctx: int, n_threads: int | None = None, all_logits: bool = True):
    """A quiet llama_cpp.Llama over a GGUF file with a context (and batch) of n_ctx tokens and n_threads
    threads (None: every CPU this process may use). all_logits: the logits of every position, a whole window
    in one micro-batch (scoring); else the last position's only, llama.cpp's default micro-batch (generating)."""
    try:
        import llama_cpp
    except ImportError:
        raise LowbitError("running GGUF files needs llama-cpp-python: pip install llama-cpp-python") from None
    if not Path(path).is_file():
        raise LowbitError(f"GGUF file {path} not found; give the path of a .gguf file")
    threads = n_threads or len(os.sched_getaffinity(0))
    batches = {"n_batch": n_ctx, "n_ubatch": n_ctx} if all_logits else {"n_batch": n_ctx}
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=all_logits, n_threads=threads,
                               n_threads_batch=threads, verbose=False, **batches)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise LowbitError(f"llama.cpp cannot load {path} ({exc}); check that the file is a complete GGUF model "
                          f"of an architecture this llama.cpp supports") from None


def llama_version() -> str:
    """The installed llama-cpp-python's version."""
    import llama_cpp

    return llama_cpp.__version__


def is_onnx_model(path) -> bool:
    """An .onnx file, or a folder with genai_config.json or model.onnx (an export or a builder's output)."""
    path = Path(str(path))
    return path.suffix == ".onnx" and path.is_file() or path.is_dir() and (
        (path / "genai_config.json").is_file() or (path / "model.onnx").is_file())
