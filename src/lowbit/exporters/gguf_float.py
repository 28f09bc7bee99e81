"""A float GGUF file (F16 / BF16 / F32) of any model lowbit reads: the input llama.cpp's own quantizer
(llama-quantize) takes, written from the same source lowbit quantizes.

Sources: a Hugging Face folder (safetensors), a GGUF file or `demo` (read through hf.source's cached folder: its
config, its tokenizer, each tensor dequantized exactly in float32 and put in Hugging Face's row order by
transformers' tensor processor), and a lowbit output folder (every quantized linear dequantized). Every 2-D
weight (linears, embedding, output) is written in the requested float type, 1-D norms and biases as float32,
as llama.cpp's converter does; the architecture handling is gguf.py's (llama's q/k row permutation, Gemma's
1 + w norms, tied output, Llama 3.1's and LongRoPE's rope factors, the tokenizer of the source's folder).

A K-quant mix (`--gguf-type q4_k_m`, ...) on a float source quantizes every 2-D weight to the mix's type for it
(gguf_mixes: llama-quantize's choices), from the float weights. Refused in one line before anything is written:
a single block type (q4_0, ...) on a float source (it forces the type of a lowbit folder's quantized linears),
a source quantized by another tool, a lowbit folder with online rotations (r4; its weights alone are not the
model), and everything gguf.py refuses for the architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import LowbitError
from ..model_files import read_json
from ..staging import staged
from .gguf import (ARCHS, NOT_EXPORTED, GGUFPlan, Tensor, _check_target, _expert_index, _float_tensor, _gguf_name,
                   _heads, _model_shape, _permute_rows, _write, check_gguf, export_gguf, finish_tensors,
                   get_arch, imatrix_entries)
from .gguf_blocks import requantize, row_bytes
from .gguf_meta import config_warnings, n_vocab, rope_tensors
from .gguf_mixes import MIXES, mix_types
from .gguf_vocab import read_vocab

_FT = gguf.LlamaFileType
FLOAT_TYPES = {"f16": T.F16, "bf16": T.BF16, "f32": T.F32}  # --gguf-type's float types
FLOAT_FILE_TYPES = {T.F16: _FT.MOSTLY_F16, T.BF16: _FT.MOSTLY_BF16, T.F32: _FT.ALL_F32}
TORCH_DTYPES = {T.F16: torch.float16, T.BF16: torch.bfloat16, T.F32: torch.float32}


@dataclass
class FloatSource:
    """Any model source as float tensors by Hugging Face name."""

    name: str  # general.name
    folder: Path  # config.json and the tokenizer files
    config: dict
    names: list[str]  # the tensors to write
    read: Callable[[str], torch.Tensor]  # a tensor in float (a quantized linear dequantized)
    paths: list[Path]  # what the export reads, which the output may not replace
    warnings: list[str] = field(default_factory=list)
    online_rotations: dict = field(default_factory=dict)


def check_gguf_any(model, quant_type: str | None = None) -> list[str]:
    """The gguf format's check (exporters.formats): a float type here, anything else gguf.check_gguf."""
    if quant_type is not None and str(quant_type).lower() in FLOAT_TYPES:
        return check_float_gguf(model, quant_type)
    return check_gguf(model, quant_type)


def export_gguf_any(src, out: Path, overwrite: bool = False, quant_type: str | None = None,
                    imatrix: str | Path | None = None) -> Path:
    """The gguf format's writer (exporters.formats): a float type, or a source that is no lowbit folder (a Hugging
    Face folder, a GGUF file, `demo`), here; a lowbit folder in its quantized types gguf.export_gguf."""
    if float_export(src, quant_type):
        return export_float_gguf(src, out, overwrite, quant_type, imatrix)
    return export_gguf(src, out, overwrite, quant_type, imatrix)


def is_lowbit_folder(src) -> bool:
    """Whether src is a folder whose config.json says lowbit quantized it."""
    config = Path(src) / "config.json"
    if not config.is_file():
        return False
    qconfig = read_json(config, "model config").get("quantization_config")
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == "lowbit"


def float_export(src, quant_type: str | None) -> bool:
    """Whether export_gguf writes src through this module (a float type, or a K-quant mix of a source that is no
    lowbit folder); refuses a source that is no lowbit folder with no type or a single block type."""
    kind = None if quant_type is None else str(quant_type).lower()
    if kind in FLOAT_TYPES:
        return True
    path = Path(str(src)).expanduser()
    if is_lowbit_folder(path) or (path.is_dir() and not (path / "config.json").is_file()):
        return False  # a lowbit folder, or a folder gguf.py refuses with its own reason
    if kind in MIXES:
        return True
    if kind is None:
        raise LowbitError(f"{src} is not a lowbit output folder; pass --gguf-type f16 (or bf16, f32) for a float "
                          f"GGUF of it, or a K-quant mix such as q4_k_m, or quantize it first with lowbit quantize")
    raise LowbitError(f"--gguf-type {kind} sets the type of a lowbit folder's quantized linears, and {src} is not a "
                      f"lowbit folder; run lowbit quantize first, or pass f16 (bf16, f32) or a K-quant mix such as "
                      f"q4_k_m")


def check_float_gguf(model, quant_type: str | None = None) -> list[str]:
    """Refuse (LowbitError) what the export of `model` (a source path, or a PlannedModel / LowbitFolder) cannot
    write, and return its warnings."""
    if isinstance(model, (str, Path)):
        source = open_source(model)
        plan = _plan(source, quant_type).plan
        return plan.warnings + read_vocab(source.folder, n_vocab(plan.config)).warnings
    config = model.config
    _check_model(config, getattr(model, "online_rotations", None), str(config.get("model_type")))
    return config_warnings(config) + _dropped(model)


def export_float_gguf(src, out: Path, overwrite: bool = False, quant_type: str | None = "f16",
                      imatrix: str | Path | None = None) -> Path:
    """Write the model source `src` as the GGUF file `out` in a float type (f16, bf16, f32) or a K-quant mix;
    every check runs before writing, the file is written beside `out` and renamed into place when complete."""
    out = Path(out)
    first = Path(str(src)).expanduser()
    _check_target(out, overwrite, first)
    source = open_source(src)
    _check_target(out, overwrite, source.paths[0])
    fplan = _plan(source, quant_type, imatrix is not None)
    plan = fplan.plan
    if imatrix is not None and plan.mix is None:
        raise LowbitError("--imatrix weights the scale searches of quantized types; a float GGUF has none: drop it")
    importance = _importance(imatrix, fplan) if imatrix is not None else {}
    vocab = read_vocab(source.folder, n_vocab(plan.config))
    tensors = _tensors(source, fplan, importance)
    plan.warnings += vocab.warnings
    with staged(out, overwrite, source.paths, is_file=True) as tmp:
        _write(tmp, SimpleNamespace(folder=Path(source.name)), plan, vocab, tensors)
    return out


# -- sources ---------------------------------------------------------------------------------------------

def open_source(src) -> FloatSource:
    """A lowbit folder, a Hugging Face folder, a GGUF file or `demo`, as float tensors."""
    from ..hf.checkpoint import open_checkpoint
    from ..hf.source import DEMO, demo_gguf, resolve_source

    if is_lowbit_folder(Path(str(src)).expanduser()):
        return _lowbit_source(Path(str(src)).expanduser())
    folder = resolve_source(src)
    config = read_json(folder / "config.json", "model config")
    qconfig = config.get("quantization_config")
    if qconfig:
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else qconfig
        raise LowbitError(f"{src} holds weights quantized by {method!r}; a float GGUF needs float weights: give the "
                          f"float model it came from")
    ckpt = open_checkpoint(folder)
    path = demo_gguf() if str(src) == DEMO else Path(str(src)).expanduser()  # the folder, or the GGUF file
    names = [n for n in ckpt.keys() if not (n == "lm_head.weight" and config.get("tie_word_embeddings"))]
    return FloatSource(path.stem if path.is_file() else folder.name, folder, config, names, ckpt.get,
                       [path, folder] if path.is_file() else [folder])


def _lowbit_source(path: Path) -> FloatSource:
    """A lowbit folder: its float tensors as stored, its quantized linears dequantized."""
    from .source import LowbitFolder

    folder = LowbitFolder(path)
    weights = {f"{name}.weight": name for name in folder.modules}

    def read(name: str) -> torch.Tensor:
        return folder.weight(weights[name]) if name in weights else folder.ckpt.get(name)

    return FloatSource(path.name, path, folder.config, [*folder.float_tensor_names(), *weights], read, [path],
                       _dropped(folder), folder.online_rotations)


def _dropped(model) -> list[str]:
    """The warning for a lowbit model's quantized activations or KV cache, which a float GGUF does not keep."""
    layers = len(getattr(model, "inputs", {}) or {}) + len(getattr(model, "outputs", {}) or {})
    return [f"{layers} quantized activation or KV-cache entries are not kept: the float GGUF computes them in "
            f"float"] if layers else []


# -- plan and tensors ------------------------------------------------------------------------------------

def _check_model(config: dict, online_rotations, model_type: str) -> None:
    get_arch(config)  # refuses architectures (and models) llama.cpp would compute otherwise
    if online_rotations:
        layer = next(iter(online_rotations))
        raise LowbitError(f"cannot write a float GGUF of this model: {layer} multiplies its input by a Hadamard "
                          f"matrix at run time (rotation r4), which GGUF cannot express; quantize with --algo-arg "
                          f"rotation:r4=false")
    rope_tensors(config)  # refuses unsupported RoPE scaling (and LongRoPE factors that do not fit)


@dataclass
class FloatPlan:
    """gguf.py's plan (architecture, config, warnings, the mix and its types in float_types, the file type), the
    GGUF name of each source tensor, the float type of the 2-D ones and (for a mix) the shape of each 2-D one."""

    plan: GGUFPlan
    gguf_names: dict[str, str]
    float_type: T
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def widths(self) -> dict[str, int]:
        return {name: shape[1] for name, shape in self.shapes.items()}


def _plan(source: FloatSource, quant_type: str | None, imatrix: bool = False) -> FloatPlan:
    """The GGUF names of the source's tensors, and for a K-quant mix each 2-D tensor's type (in float_types)."""
    config = source.config
    kind = "f16" if quant_type is None else str(quant_type).lower()
    _check_model(config, source.online_rotations, str(config.get("model_type")))
    if kind not in FLOAT_TYPES and kind not in MIXES:
        raise LowbitError(f"unknown GGUF type {quant_type!r} for a float export; use f16, bf16, f32 or one of "
                          f"{', '.join(MIXES)}")
    arch = ARCHS[config["model_type"]]
    names = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    plan = GGUFPlan(arch, config, names, [], config_warnings(config) + source.warnings)
    gguf_names = {n: _gguf_name(names, n, arch) for n in source.names if not NOT_EXPORTED.search(n)}
    if kind in FLOAT_TYPES:
        plan.file_type = FLOAT_FILE_TYPES[FLOAT_TYPES[kind]]
        return FloatPlan(plan, gguf_names, FLOAT_TYPES[kind])
    plan.mix = kind
    shapes = {g: tuple(source.read(n).shape) for n, g in gguf_names.items()}  # read once here, once to write
    fplan = FloatPlan(plan, gguf_names, T.F32, {g: s for g, s in shapes.items() if len(s) == 2})
    shape = dataclasses.replace(_model_shape(config, arch), tied_output="output.weight" not in fplan.shapes)
    plan.float_types = mix_types(kind, fplan.widths, shape, imatrix)
    return fplan  # 1-D tensors stay float32


def _tensors(source: FloatSource, fplan: FloatPlan, importance: dict) -> list[Tensor]:
    """Every tensor of the file in llama.cpp's usual order: 2-D weights in the float type (or the mix's type),
    1-D ones in float32."""
    plan = fplan.plan
    view = SimpleNamespace(ckpt=SimpleNamespace(get=_cast(source.read, TORCH_DTYPES[fplan.float_type])))
    out = []
    for name, gguf_name in fplan.gguf_names.items():
        qtype = plan.float_types.get(gguf_name)
        out.append(_float_tensor(view, plan, name, gguf_name) if qtype is None else
                   _quantized(source, fplan, name, gguf_name, qtype, importance.get(gguf_name)))
    return finish_tensors(out, plan)  # experts stacked, rope_freqs, a tied output the architecture needs


def _cast(read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> Callable[[str], torch.Tensor]:
    """read, with 2-D tensors in dtype (_float_tensor writes those in their dtype, 1-D ones in float32)."""
    def get(name: str) -> torch.Tensor:
        t = read(name)
        return t.to(dtype) if t.dim() > 1 else t
    return get


def _quantized(source: FloatSource, fplan: FloatPlan, name: str, gguf_name: str, qtype: T,
               importance: torch.Tensor | None) -> Tensor:
    """A 2-D weight quantized to the mix's type from its float values, q/k rows permuted after."""
    plan = fplan.plan
    rows, cols = fplan.shapes[gguf_name]
    heads = _heads(name.rsplit(".", 1)[0], plan.config) if plan.arch.permute_qk else None

    def make() -> np.ndarray:
        data = requantize(source.read(name).float(), qtype, importance)
        return _permute_rows(data, heads) if heads else data

    return Tensor(gguf_name, (rows, row_bytes(qtype, cols)), np.uint8, qtype, make, _expert_index(name, plan.arch))


def _importance(path, fplan: FloatPlan) -> dict[str, torch.Tensor]:
    """The imatrix entries of the quantized tensors, checked against their widths (gguf.imatrix_entries)."""
    from .gguf_imatrix import read_imatrix

    return imatrix_entries(read_imatrix(path), fplan.widths, list(fplan.plan.float_types), path)[0]
