"""Tensors of a GGUF file read one at a time, as Hugging Face parameters.

The file is memory-mapped by gguf-py's GGUFReader; `get` dequantizes one tensor (gguf-py's `dequantize`, in
float32) and applies transformers' own per-tensor processing (its legacy GGUF loader's name map and tensor
processor: Llama's q/k row order, Gemma's norm offset, ...), so each value equals what
`AutoModelForCausalLM.from_pretrained(gguf_file=...)` puts in the float32 model. Architectures whose loading
is not one tensor at a time (see `per_tensor_problem`) are converted to a folder instead (lowbit.hf.source).
Naming the tensors is slow in transformers, so the table is computed once, with the cache folder.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError

# ggml type names whose values a GGUF holds as plain floats of that width
HALF_TYPES = {"F16": torch.float16, "BF16": torch.bfloat16}


def gguf_width(reader) -> torch.dtype:
    """The source's float width: float16 / bfloat16 when every 2-D tensor (weight matrix) is stored in it,
    else float32 (a block-quantized tensor dequantizes exactly only in float32)."""
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    if len(kinds) == 1 and next(iter(kinds)) in HALF_TYPES:
        return HALF_TYPES[next(iter(kinds))]
    return torch.float32


def open_reader(path: Path):
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise LowbitError(f"reading GGUF files needs the gguf package ({exc}); pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise LowbitError(f"cannot read GGUF file {path} ({first}); check that it is a complete GGUF file") from None


def architecture(reader) -> str:
    from transformers.modeling_gguf_pytorch_utils import read_field

    return read_field(reader, "general.architecture")[0]


# Processors of transformers' legacy loader that combine or split tensors (MoE experts merged into one
# gate_up_proj, GPT-OSS experts split, GPT-2's output.weight stored under lm_head directly): not per tensor.
CROSS_TENSOR_PROCESSORS = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor",
                           "GPT2TensorProcessor")


def per_tensor_problem(reader, model) -> str | None:
    """Why transformers' load of this GGUF is not one tensor -> one parameter (None when it is): the
    architectures its newer loader (integrations.gguf) serves, processors that merge or split tensors, and
    models whose checkpoint conversion mapping has converters (which may fuse the loaded tensors)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS

    arch = architecture(reader)
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # older transformers: the legacy loader serves every architecture
        is_gguf_arch_supported = None
    if is_gguf_arch_supported is not None and is_gguf_arch_supported(arch):
        return f"transformers loads {arch!r} GGUF files through its conversion pipeline"
    processor = TENSOR_PROCESSORS.get(arch)
    if processor is not None and processor.__name__ in CROSS_TENSOR_PROCESSORS:
        return f"transformers' {processor.__name__} combines several GGUF tensors"
    if any(isinstance(c, WeightConverter) for c in get_model_conversion_mapping(model)):
        return f"{type(model).__name__} has weight converters that may combine tensors"
    return None


def meta_model(config):
    """transformers' causal LM for config, on the meta device (its parameter names, no memory)."""
    import warnings

    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def describe_tensors(path: Path, reader, model) -> dict:
    """What reading the file tensor by tensor needs, computed once when the cache folder is made (naming every
    tensor takes transformers seconds to minutes): the GGUF architecture, the config dict transformers' tensor
    processor is given, and each parameter's GGUF tensor as [gguf name, ggml type, byte offset, byte count,
    numpy dtype, numpy shape] (the view gguf-py's reader gives `dequantize`)."""
    import transformers.modeling_gguf_pytorch_utils as legacy

    arch = architecture(reader)
    gguf_config = legacy.load_gguf_checkpoint(str(path), return_tensors=False)["config"]
    mapping = legacy.get_gguf_hf_weights_map(model, _processor(arch, gguf_config))
    tensors = {mapping[t.name]: [t.name, int(t.tensor_type), int(t.data_offset), int(t.n_bytes), t.data.dtype.str,
                                 [int(n) for n in t.data.shape]]
               for t in reader.tensors if t.name in mapping}
    return {"architecture": arch, "processor_config": gguf_config, "tensors": tensors}


@contextmanager
def parse_once():
    """transformers parses a GGUF's metadata anew for its config, its tokenizer and its tensor processor (seconds
    each: the vocabulary), and builds gguf-py's tensor name map anew for every submodule when naming tensors
    (quadratic in the layers); inside this block each is done once per file (a copy is handed out). The results
    are the same; should transformers stop looking these up as module attributes, the block is only slower."""
    import copy
    import functools

    import gguf
    import transformers.modeling_gguf_pytorch_utils as legacy

    original_load, original_map = legacy.load_gguf_checkpoint, gguf.get_tensor_name_map
    parsed = {}

    def load(path, return_tensors=False, **kwargs):
        if return_tensors or kwargs:
            return original_load(path, return_tensors, **kwargs)
        if str(path) not in parsed:
            parsed[str(path)] = original_load(path, return_tensors=False)
        return copy.deepcopy(parsed[str(path)])

    legacy.load_gguf_checkpoint, gguf.get_tensor_name_map = load, functools.lru_cache(maxsize=None)(original_map)
    try:
        yield
    finally:
        legacy.load_gguf_checkpoint, gguf.get_tensor_name_map = original_load, original_map


def _processor(arch: str, gguf_config: dict):
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=gguf_config)


def dequantize_rows(data: np.ndarray, qtype, dequantize, chunk_bytes: int = 1 << 20) -> np.ndarray:
    """gguf-py's dequantize of a block-quantized tensor, ~1 MiB of blocks at a time into one float32 array
    (its own temporaries are several times the chunk, not the tensor: the demo's embedding, 113 MiB in float32,
    peaked ~3x that whole). Plain float types are returned as dequantize gives them."""
    if data.ndim < 2 or data.dtype != np.uint8:
        return dequantize(data, qtype)
    flat = data.reshape(-1, data.shape[-1])
    step = max(1, chunk_bytes // max(1, flat.shape[1]))
    first = dequantize(flat[:step], qtype)
    out = np.empty((flat.shape[0], first.shape[-1]), dtype=np.float32)
    out[:step] = first
    for start in range(step, flat.shape[0], step):
        out[start:start + step] = dequantize(flat[start:start + step], qtype)
    return out.reshape(*data.shape[:-1], first.shape[-1])


class GGUFCheckpoint:
    """The LazyCheckpoint interface over a GGUF file: parameter names of the transformers model, each tensor
    dequantized (gguf-py) and processed (transformers' tensor processor) when read. `folder` is the cached
    folder holding config.json, the tokenizer and `record` (lowbit_source.json: the file, its width and the
    table of `describe_tensors`)."""

    def __init__(self, record: dict, folder: Path):
        self.path, self.folder = Path(record["gguf"]), Path(folder)
        self._dtype = getattr(torch, record["dtype"])
        self._tensors = record["tensors"]
        self._mapping = {v[0]: k for k, v in self._tensors.items()}
        self._processor = _processor(record["architecture"], record["processor_config"])
        self.weight_map = {name: self.path.name for name in self._tensors}

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self):
        return self._tensors.keys()

    def get(self, name: str) -> torch.Tensor:
        from gguf import GGMLQuantizationType, dequantize

        if name not in self._tensors:
            raise LowbitError(f"tensor {name} is missing from {self.path}; the GGUF file does not hold it")
        gguf_name, kind, offset, nbytes, dtype, shape = self._tensors[name]
        try:
            data = self._read(offset, nbytes).view(np.dtype(dtype)).reshape(shape)
            weights = dequantize_rows(data, GGMLQuantizationType(kind), dequantize)
            result = self._processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self._mapping,
                                             parsed_parameters={"tensors": {}})
        except Exception as exc:
            raise LowbitError(f"cannot read tensor {gguf_name} from {self.path} ({exc}); the file is corrupt "
                              f"or of a type gguf-py cannot dequantize") from None
        w = result.weights
        if not (w.flags.writeable and w.flags.c_contiguous):  # a view of the mapped file: copied once
            w = np.array(w, order="C")
        return torch.from_numpy(w)

    def _read(self, offset: int, nbytes: int) -> np.ndarray:
        """One tensor's bytes by a positioned read into private memory, not a mapping of the file: mapped pages a
        tensor touched stay in the process's resident memory (+94 MiB of the demo's 94 MiB file, ~200 MiB peak
        with the dequantization's), read bytes go with the tensor."""
        buf = np.empty(nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(buf)) != nbytes:
                raise ValueError("the tensor is cut short")
        return buf

    def dtype(self) -> torch.dtype:
        return self._dtype

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def stored_as(self) -> str:
        """The GGML types of the file's matrices, most weights first (e.g. "GGUF Q4_K, Q6_K")."""
        from gguf import GGMLQuantizationType

        counts: dict[str, int] = {}
        for _, kind, _, _, _, shape in self._tensors.values():
            if len(shape) >= 2:
                name = GGMLQuantizationType(kind).name
                counts[name] = counts.get(name, 0) + int(np.prod(shape))
        return "GGUF " + ", ".join(sorted(counts, key=counts.get, reverse=True))
