"""The files of a model folder, read safely: every name the folder's own files give (an ONNX tensor's external
data location, a safetensors index's shard names) and every file lowbit copies into an output must lie inside
the folder; transformers is never allowed to run the folder's own Python.

The trust root is the folder itself (symlinks resolved), or, for a folder inside the Hugging Face hub cache
(`.../models--org--name/snapshots/<rev>/...`, whose files are symlinks to `../../blobs/<hash>`), the repository
folder `models--org--name`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

from .errors import LowbitError

# the tokenizer and generation files a lowbit output carries from its source
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
# every file lowbit copies (or rewrites, or reads into an exported vocabulary) from a model folder into an output
CARRIED_FILES = ("config.json", "genai_config.json", "processor_config.json", "vocab.txt") + TOKENIZER_FILES


def trust_root(folder) -> Path:
    """The folder whose inside a model folder's files may resolve to (module docstring)."""
    real = Path(folder).resolve()
    for anc in (real, *real.parents):
        if anc.parent.name == "snapshots" and anc.parent.parent.name.startswith("models--"):
            return anc.parent.parent
    return real


def _outside(path: Path, root: Path) -> bool:
    return not path.resolve().is_relative_to(root)


def resolve_inside(folder, name, what: str, todo: str) -> Path:
    """folder / name, refusing a name that is not a relative path inside the folder (absolute, a '..' step, or
    resolving through a symlink to somewhere outside the trust root). `what` names the entry in the message,
    `todo` says what to do."""
    folder = Path(folder)
    if not isinstance(name, str) or not name.strip() or "\0" in name:
        raise LowbitError(f"{what} {name!r} is not a file name; {todo}")
    parts = PurePosixPath(name.replace("\\", "/"))
    if parts.is_absolute():
        raise LowbitError(f"{what} {name!r} is an absolute path, outside the model folder {folder}; {todo}")
    if ".." in parts.parts:
        raise LowbitError(f"{what} {name!r} steps out of the model folder {folder} with '..'; {todo}")
    path = folder / name
    if _outside(path, trust_root(folder)):
        raise LowbitError(f"{what} {name!r} resolves through a symlink to {path.resolve()}, outside the model "
                          f"folder {folder}; {todo}")
    return path


def check_carried(folder, names=CARRIED_FILES) -> list[str]:
    """The names among `names` present in folder, refusing any that is a symlink (or under a symlinked folder)
    resolving outside the trust root: lowbit copies these files into its outputs."""
    folder, root = Path(folder), trust_root(folder)
    present = []
    for name in names:
        path = folder / name
        if not (path.exists() or path.is_symlink()):
            continue
        if _outside(path, root):
            raise LowbitError(f"{path} is a symlink to {path.resolve()}, outside the model folder {folder}; lowbit "
                              f"copies {name} into its output only from inside the folder: copy the file into the "
                              f"folder")
        if path.is_file():
            present.append(name)
    return present


def copy_carried(src, dst, names=CARRIED_FILES) -> list[str]:
    """Copy the files `names` present in src into dst (checked by check_carried first); returns those copied."""
    import shutil

    present = check_carried(src, names)
    for name in present:
        shutil.copy2(Path(src) / name, Path(dst) / name)
    return present


# -- transformers, without the folder's code -------------------------------------------------------------

def custom_code_error(folder, what: str) -> LowbitError:
    import transformers

    return LowbitError(f"{folder} needs custom code to load its {what} (the Python files of the model folder, "
                       f"named by auto_map), which lowbit never runs; use a model of an architecture the installed "
                       f"transformers {transformers.__version__} supports natively")


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_custom_code(exc: Exception) -> bool:
    return "trust_remote_code" in str(exc) or "custom code" in str(exc)


def load_config(folder):
    """transformers' config of a model folder (trust_remote_code=False): a folder whose config needs its own
    Python is refused, as is one transformers cannot read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        if is_custom_code(exc):
            raise custom_code_error(folder, "config") from None
        raise LowbitError(f"cannot read the config in {folder} ({_first_line(exc)}); the architecture may be unknown "
                          f"to the installed transformers") from None


def load_tokenizer(folder, hint: str | None = None, **kwargs):
    """transformers' tokenizer of a model folder (trust_remote_code=False). A tokenizer that needs the folder's
    own Python is refused; any other failure is one line ending with `hint` (what to do)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **kwargs)
    except Exception as exc:
        if is_custom_code(exc):
            raise custom_code_error(folder, "tokenizer") from None
        hint = hint or "copy the tokenizer files (tokenizer.json, tokenizer_config.json) into the folder"
        raise LowbitError(f"cannot load the tokenizer from {folder} ({_first_line(exc)}); {hint}") from None


# -- ONNX external data ----------------------------------------------------------------------------------

def _tensors(graph):
    """Every TensorProto of a graph: initializers, node attributes, and those of subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _attribute_tensors(node)


def _attribute_tensors(node):
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _tensors(sub)


def _nbytes(tensor) -> int | None:
    """Bytes a tensor's data takes (sub-byte types packed), None for types without a fixed size."""
    import numpy as np
    from onnx import TensorProto, helper

    if tensor.data_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    bits = {TensorProto.INT4: 4, TensorProto.UINT4: 4, getattr(TensorProto, "FLOAT4E2M1", -1): 4}.get(tensor.data_type)
    if bits is None:
        try:
            bits = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize * 8
        except (KeyError, TypeError, ValueError):
            return None
    return (math.prod(tensor.dims) * bits + 7) // 8


def external_span(tensor, model_path) -> tuple[Path, int, int]:
    """(file, offset, length) of a tensor stored as external data, every part checked: the location inside the
    model's folder, offset and length non-negative integers, length matching the shape, and the file present
    and long enough. Refuses with one line naming the tensor and the location."""
    model_path = Path(model_path)
    folder = model_path.parent
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location")
    what = f"ONNX tensor {tensor.name!r} of {model_path}: external data location"
    path = resolve_inside(folder, location, what, "keep external data files inside the model's folder and name them "
                                                  "relative to it (onnx and onnxruntime refuse such models too)")
    try:
        offset, length = int(info.get("offset", 0)), (int(info["length"]) if "length" in info else None)
    except ValueError:
        raise LowbitError(f"{what} {location!r}: offset {info.get('offset')!r} / length {info.get('length')!r} are "
                          f"not integers; the model file is corrupt") from None
    need = _nbytes(tensor)
    length = need if length is None else length
    if offset < 0 or length is None or length < 0 or (need is not None and length != need):
        raise LowbitError(f"{what} {location!r}: offset {offset} / length {length} do not fit its shape "
                          f"{list(tensor.dims)} ({need} bytes); the model file is corrupt")
    if not path.is_file():
        raise LowbitError(f"ONNX external data file {path} (tensor {tensor.name!r}) is missing; copy the model's "
                          f"data file beside {model_path.name}")
    size = path.stat().st_size
    if offset + length > size:
        raise LowbitError(f"ONNX external data file {path} is truncated: tensor {tensor.name!r} needs bytes "
                          f"{offset}..{offset + length} but the file has {size}; copy the complete file again")
    return path, offset, length


def check_external_data(model, model_path) -> None:
    """Check every external-data reference of an ONNX ModelProto (loaded without its data) read from
    model_path: refused before any work when a location escapes the folder or a file is missing or short."""
    from onnx import TensorProto

    tensors = list(_tensors(model.graph))
    tensors += [t for f in model.functions for n in f.node for t in _attribute_tensors(n)]
    for tensor in tensors:
        if tensor.data_location == TensorProto.EXTERNAL:
            external_span(tensor, model_path)


def check_onnx_file(model_path) -> None:
    """check_external_data for an .onnx file on disk (read without its weights)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:
        raise LowbitError(f"{model_path} is not a readable ONNX model ({_first_line(exc)}); give the model.onnx of "
                          f"a decoder (onnxruntime-genai builder or optimum export)") from None
    check_external_data(model, model_path)


def read_json(path, what: str = "file") -> dict:
    """A JSON object from a model folder's file, refusing invalid JSON or a value that is not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LowbitError(f"{path} is not valid JSON ({exc}); restore the file") from None
    if not isinstance(value, dict):
        raise LowbitError(f"{path} holds a JSON {type(value).__name__}, not the object a {what} is; restore the file")
    return value


def check_finite(name: str, tensor, folder) -> None:
    """Refuse a weight holding NaN or infinite values, naming it: quantizing it would fail obscurely or write a
    model that computes NaN."""
    import torch

    tensor = torch.as_tensor(tensor)
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return  # a NaN or Inf anywhere makes the sum non-finite; torch.isfinite(tensor) would hold 5 bytes a value
    bad = sum(int((~torch.isfinite(chunk)).sum()) for chunk in tensor.reshape(-1).split(1 << 22))
    if bad:  # else the sum only overflowed
        raise LowbitError(f"{name} in {folder} holds {bad} NaN or infinite value(s) of {tensor.numel()}; the "
                          f"checkpoint is damaged (or was saved after training diverged): restore a healthy copy")
