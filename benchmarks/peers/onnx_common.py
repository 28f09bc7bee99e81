"""Shared by the ONNX peer runners: command line, calibration feeds, output folder, timing and the JSON line.

A runner is `python onnx_TOOL.py --model FOLDER --data DATA.npz --algo NAME --block 128 --out OUT [--symmetric]`,
run with the python of the tool's own virtual environment, so this file imports only numpy, the standard
library and (lazily) onnxruntime / onnx, which every such environment has.

- FOLDER is an onnxruntime-genai folder (model.onnx + model.onnx.data + genai_config.json + tokenizer files),
  e.g. the builder's fp32 CPU export. DATA.npz holds "calib", int64 (n, seq_len) token windows, built once
  with lowbit's own data functions so every tool calibrates on the same tokens.
- OUT becomes an onnxruntime-genai folder again: the quantized model.onnx + model.onnx.data plus FOLDER's
  other files (genai_config.json, tokenizer), ready for lowbit's ONNX perplexity evaluator.
- The runner prints exactly one JSON line on stdout:
  {"tool", "algo", "block", "symmetric", "quantize_seconds", "peak_rss_mib", "out", "error"}.
  quantize_seconds times the tool's quantization call only (its calibration included; loading and saving
  not); peak_rss_mib is the process's resident-memory high-water mark during that call (the loaded model
  included), or of the child process for tools run as a subprocess. On failure "error" is the exception's
  last line and the exit code stays 0, so the benchmark keeps the row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import sys
import time
import traceback
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

MODEL_FILES = ("model.onnx", "model.onnx.data")
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def parse_args(tool: str, algos: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=f"{tool}: INT4 weight-only quantization of an ONNX decoder")
    ap.add_argument("--model", required=True, help="onnxruntime-genai folder with the float model.onnx")
    ap.add_argument("--data", required=True, help=".npz with calib int64 (n, seq_len) token windows")
    ap.add_argument("--algo", required=True, choices=algos)
    ap.add_argument("--block", type=int, default=128, help="quantization block (group) size along the input")
    ap.add_argument("--out", required=True, help="output folder (an onnxruntime-genai folder)")
    ap.add_argument("--symmetric", action="store_true", help="symmetric int4 (no zero point)")
    return ap.parse_args()


def genai_decoder(folder) -> dict:
    """The decoder section of the folder's genai_config.json ({} without one)."""
    config = Path(folder) / "genai_config.json"
    return json.loads(config.read_text())["model"]["decoder"] if config.is_file() else {}


def input_specs(model_path) -> list[tuple[str, str, list]]:
    """(name, type, shape) of every graph input, read from an onnxruntime session's metadata."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    return [(i.name, i.type, list(i.shape)) for i in session.get_inputs()]


def prefill_feeds(specs, window: np.ndarray, head_size: int | None) -> dict[str, np.ndarray]:
    """Inputs for one (1, seq_len) window from an empty past: all-ones mask, zero-length KV cache."""
    seq = window.shape[-1]
    feeds = {"input_ids": window.reshape(1, seq).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}
    for name, type_, shape in specs:
        if name == "position_ids":
            feeds[name] = np.arange(seq, dtype=np.int64).reshape(1, seq)
        elif name.startswith("past_key_values"):
            heads, dim = shape[1], shape[3] if isinstance(shape[3], int) else head_size
            if type_ not in _NUMPY_TYPES or not isinstance(heads, int) or not isinstance(dim, int):
                raise ValueError(f"cannot feed {name} ({type_}, shape {shape}): expected a float (batch, kv_heads, "
                                 f"past, head_dim) cache; give genai_config.json a decoder head_size")
            feeds[name] = np.zeros((1, heads, 0, dim), dtype=_NUMPY_TYPES[type_])
        elif name not in feeds:
            raise ValueError(f"the model has an input {name!r} this runner does not know how to feed")
    return feeds


def _reader_base():
    try:
        from onnxruntime.quantization import CalibrationDataReader

        return CalibrationDataReader
    except ImportError:  # onnxruntime without its quantization tools: a plain iterator is enough
        return object


class CalibReader(_reader_base()):
    """CalibrationDataReader-style feeds, one calibration window each: get_next() returns the next feed dict
    (None when exhausted), rewind() starts over; it also iterates and has a length."""

    def __init__(self, folder, windows: np.ndarray):
        self.specs = input_specs(Path(folder) / "model.onnx")
        self.head_size = genai_decoder(folder).get("head_size")
        self.windows = windows
        self.rewind()

    def get_next(self):
        if self.index >= len(self.windows):
            return None
        self.index += 1
        return prefill_feeds(self.specs, self.windows[self.index - 1], self.head_size)

    def rewind(self):
        self.index = 0

    def __iter__(self):
        self.rewind()
        return self

    def __next__(self):
        feeds = self.get_next()
        if feeds is None:
            raise StopIteration
        return feeds

    def __len__(self):
        return len(self.windows)


def load_calib(path) -> np.ndarray:
    return np.load(path)["calib"].astype(np.int64)


def copy_folder_files(src, out) -> None:
    """Copy everything of the float folder but the model itself (genai_config.json, tokenizer) into out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in Path(src).iterdir():
        if item.is_file() and item.name not in MODEL_FILES:
            shutil.copy2(item, out / item.name)


def save_model(model, out) -> None:
    """Save an onnx ModelProto as out/model.onnx with every weight in out/model.onnx.data."""
    import onnx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:  # onnx appends to an existing data file: start clean
        (out / name).unlink(missing_ok=True)
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)


def _hwm_kib() -> int | None:
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


class Measure:
    """`with measure:` around the tool's quantization call: wall seconds and the RSS high-water mark inside
    it (the kernel's peak is reset on entry where /proc/self/clear_refs allows it)."""

    def __init__(self):
        self.seconds = self.peak_mib = None

    def __enter__(self):
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = round(time.perf_counter() - self.start, 2)
        kib = _hwm_kib() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # tools run as a subprocess
        self.peak_mib = round(max(kib, children) / 1024, 1)
        return False


def run(tool: str, algos: list[str], main) -> None:
    """Parse the command line, call main(args, measure) (which quantizes inside `with measure:` and writes
    args.out), then print the one JSON line. main may return a dict of field overrides (e.g. symmetric)."""
    args = parse_args(tool, algos)
    measure = Measure()
    row = {"tool": tool, "algo": args.algo, "block": args.block, "symmetric": args.symmetric,
           "quantize_seconds": None, "peak_rss_mib": None, "out": str(Path(args.out).resolve()), "error": None}
    try:
        with contextlib.redirect_stdout(sys.stderr):  # tools print progress: keep stdout for the JSON line
            row.update(main(args, measure) or {})
    except BaseException as exc:  # noqa: BLE001 - any failure becomes the row's error
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        lines = [line for line in traceback.format_exception_only(type(exc), exc)[-1].strip().splitlines() if line]
        row["error"] = lines[-1] if lines else type(exc).__name__
    row["quantize_seconds"], row["peak_rss_mib"] = measure.seconds, measure.peak_mib
    print(json.dumps(row), flush=True)
