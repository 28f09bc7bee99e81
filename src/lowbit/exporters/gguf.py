"""Export a lowbit folder as one GGUF file for llama.cpp (FORMATS.md 4).

Why: llama.cpp (and Ollama, LM Studio, llama-cpp-python) runs GGUF files on CPUs and laptops. Where the
scheme maps exactly (gguf_blocks: integer codes of up to 4 / 5 / 8 bits with one scale per group of a
multiple of 32 columns, per channel or per tensor -> Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0; MXFP4 -> MXFP4) the
stored codes move as they are and the only loss is storing each block's scale (and Q4_1's minimum) as
float16 (relative error <= 2^-11). Anything else (groups of 16, 8-bit asymmetric, FP8, NVFP4, ...) is
re-quantized from lowbit's dequantized weights (gguf_blocks.requantize), with a warning (check_gguf returns it; the file
keeps it under lowbit.warnings). `quant_type` forces one type for every quantized linear, K-quants (Q2_K ...
Q6_K, gguf_kquants) and IQ4_NL (gguf_iq4nl) included, or names one of llama.cpp's K-quant mixes (gguf_mixes:
per-tensor types as llama-quantize chooses them, the float embedding / output quantized as well). lowbit's
K-quant grids (schemes w_q2_k .. w_q6_k and the mixes gguf_q4_k_m ..., formats/gguf_grid) move exactly; where a mix
says IQ4_NL and lowbit holds exact Q4_0 codes (the same size), the codes are kept.

Architectures (gguf_archs): llama, mistral, mixtral and granite (q/k rows permuted from HF's rotate-half RoPE to
llama.cpp's adjacent pairs, an exact row move), qwen2, qwen3, qwen3moe, phi3 and olmo2 (nothing moves), gemma,
gemma2 and gemma3 (norms stored as 1 + w); experts stacked into one 3-D tensor per layer and projection, of one
type. Float tensors keep their stored dtype (norms float32), so llama.cpp computes with lowbit's weights. Refused
before anything is written: other architectures and what llama.cpp would compute otherwise (gguf_archs), online
rotations (r4), quantized activations or KV cache, in_features not a multiple of 32, unsupported RoPE scaling
(gguf_meta), and tokenizers llama.cpp cannot take (gguf_vocab).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .. import __version__
from ..errors import LowbitError
from ..spec import QuantSpec
from .gguf_blocks import exact_type, fallback_type, pack_exact, requantize, row_bytes
from .gguf_imatrix import read_imatrix
from .gguf_mixes import MIXES, ModelShape, fallback, mix_types
from .gguf_archs import ARCHS, Arch, expert_member, get_arch  # noqa: F401 (ARCHS, Arch: gguf_float's)
from .gguf_meta import add_hparams, config_warnings, n_vocab, rope_tensors
from .gguf_vocab import GGUFVocab, read_vocab
from ..staging import check_output, staged
from .declared import check_layers
from .source import LowbitFolder, PlannedModel

QUANT_TYPES = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1, "q8_0": T.Q8_0, "mxfp4": T.MXFP4,
               "q2_k": T.Q2_K, "q3_k": T.Q3_K, "q4_k": T.Q4_K, "q5_k": T.Q5_K, "q6_k": T.Q6_K, "iq4_nl": T.IQ4_NL,
               "iq4_xs": T.IQ4_XS}
GGUF_TYPES = sorted({*QUANT_TYPES, *MIXES})  # what --gguf-type takes: one type, or one of llama.cpp's mixes
_FT = gguf.LlamaFileType
FILE_TYPES = {T.Q4_0: _FT.MOSTLY_Q4_0, T.Q4_1: _FT.MOSTLY_Q4_1, T.Q5_0: _FT.MOSTLY_Q5_0, T.Q5_1: _FT.MOSTLY_Q5_1,
              T.Q8_0: _FT.MOSTLY_Q8_0, T.MXFP4: _FT.MOSTLY_MXFP4_MOE, T.Q2_K: _FT.MOSTLY_Q2_K,
              T.Q3_K: _FT.MOSTLY_Q3_K_S, T.Q4_K: _FT.MOSTLY_Q4_K_S, T.Q5_K: _FT.MOSTLY_Q5_K_S,
              T.Q6_K: _FT.MOSTLY_Q6_K, T.IQ4_NL: _FT.MOSTLY_IQ4_NL, T.IQ4_XS: _FT.MOSTLY_IQ4_XS, T.F16: _FT.MOSTLY_F16}
NOT_EXPORTED = re.compile(r"rotary_emb\.inv_freq$")  # buffers some checkpoints carry; llama.cpp computes them


@dataclass
class LinearGGUF:
    """One quantized linear's GGUF tensor: its type, whether lowbit's codes move exactly, its q/k heads."""

    name: str
    gguf_name: str
    spec: QuantSpec
    shape: tuple[int, int]
    qtype: T
    exact: bool
    heads: int | None


@dataclass
class GGUFPlan:
    arch: Arch
    config: dict
    names: gguf.TensorNameMap
    linears: list[LinearGGUF]
    warnings: list[str] = field(default_factory=list)
    mix: str | None = None  # one of llama.cpp's K-quant mixes (gguf_mixes.MIXES)
    float_types: dict[str, T] = field(default_factory=dict)  # 2-D float tensors the mix quantizes too
    importance: dict[str, torch.Tensor] = field(default_factory=dict)  # GGUF name -> imatrix column weights
    file_type: gguf.LlamaFileType | None = None  # general.file_type when set (a float GGUF: gguf_float)


def check_gguf(model: LowbitFolder | PlannedModel, quant_type: str | None = None) -> list[str]:
    """Refuse (LowbitError) what a GGUF file cannot hold; return a warning per group of layers that will be
    re-quantized (and, for a folder, about its tokenizer)."""
    plan = plan_gguf(model, quant_type)
    if isinstance(model, LowbitFolder):
        return plan.warnings + read_vocab(model.folder, n_vocab(plan.config)).warnings
    return plan.warnings


def export_gguf(src: Path, out: Path, overwrite: bool = False, quant_type: str | None = None,
                imatrix: str | Path | None = None) -> Path:
    """Write the lowbit folder `src` as the GGUF file `out`; every check runs before writing, the file is
    written beside `out` and renamed into place only when complete. Warnings are check_gguf's to show.
    imatrix: llama.cpp's importance matrix file (gguf_imatrix), weighting the re-quantized K-quant and IQ4_NL
    tensors' scale searches."""
    folder = LowbitFolder(src)
    out = Path(out)
    _check_target(out, overwrite, folder.folder)
    plan = plan_gguf(folder, quant_type, imatrix is not None)
    if imatrix is not None:
        plan.importance = _importance(read_imatrix(imatrix), plan, imatrix)
    vocab = read_vocab(folder.folder, n_vocab(plan.config))
    tensors = _tensors(folder, plan)
    plan.warnings += vocab.warnings  # the caller shows check_gguf's; the file keeps them as lowbit.warnings
    with staged(out, overwrite, [folder.folder], is_file=True) as tmp:
        _write(tmp, folder, plan, vocab, tensors)
    return out


# -- planning ------------------------------------------------------------------------------------------

def plan_gguf(model: LowbitFolder | PlannedModel, quant_type: str | None = None, imatrix: bool = False) -> GGUFPlan:
    """Every quantized linear's GGUF type, refusing the first thing llama.cpp cannot run (imatrix: an importance
    matrix will be used, which changes an iq4_xs mix)."""
    config = model.config
    arch = get_arch(config)
    check_layers("gguf", model)  # r4, activations, KV cache, widths (declared.CAPABILITIES["gguf"])
    mix = str(quant_type).lower() if quant_type is not None and str(quant_type).lower() in MIXES else None
    forced = None if mix else _forced_type(quant_type)
    rope_tensors(config)  # refuses unsupported RoPE scaling (and LongRoPE factors that do not fit) now
    names = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    plan = GGUFPlan(arch, config, names, [], config_warnings(config), mix)
    gguf_names = {name: _gguf_name(names, f"{name}.weight", arch) for name in model.modules}
    mixed = _mix_plan(plan, model, gguf_names, imatrix) if mix else {}
    for name, (spec, (rows, cols)) in model.modules.items():
        gguf_name = gguf_names[name]
        exact = exact_type(spec, cols)
        qtype = mixed[gguf_name] if mix else fallback(forced, cols) if forced is not None else \
            exact if exact is not None else fallback_type(spec)
        if qtype == T.IQ4_NL and exact == T.Q4_0:  # the same 4.5 bits: calibrated codes beat re-quantizing
            qtype = exact
        plan.linears.append(LinearGGUF(name, gguf_name, spec, (rows, cols), qtype, qtype == exact,
                                       _heads(name, config) if arch.permute_qk else None))
    _one_type_per_stack(plan.linears)
    requantized: Counter = Counter()
    for lin in plan.linears:
        exact = exact_type(lin.spec, lin.shape[1])
        if lin.qtype != exact:
            requantized[(lin.spec.short_name, lin.qtype.name, exact.name if exact else None)] += 1
    for (short, qtype, exact), n in requantized.items():
        why = f"forced by quant_type (their exact type is {exact})" if exact else "they have no exact GGUF type"
        plan.warnings.append(f"{n} linear{'s' if n > 1 else ''} ({short}) re-quantized from lowbit's dequantized "
                             f"weights to {qtype}: {why}")
    return plan


def _one_type_per_stack(linears: list[LinearGGUF]) -> None:
    """The experts of one stacked tensor (ffn_*_exps) share its one type: the most common of theirs; an expert
    whose exact type differs is re-quantized."""
    stacks: dict[str, list[LinearGGUF]] = {}
    for lin in linears:
        stacks.setdefault(lin.gguf_name, []).append(lin)
    for members in stacks.values():
        qtype = Counter(lin.qtype for lin in members).most_common(1)[0][0]
        for lin in members:
            lin.qtype = qtype
            lin.exact = exact_type(lin.spec, lin.shape[1]) == qtype


def gguf_tensor_names(config: dict, names: list[str]) -> dict[str, str]:
    """HF linear name -> GGUF tensor name (model.layers.3.mlp.down_proj -> blk.3.ffn_down.weight; every expert's
    down_proj of layer 3 -> blk.3.ffn_down_exps.weight), refusing architectures and tensors llama.cpp has no
    place for."""
    arch = get_arch(config)
    table = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    return {name: _gguf_name(table, f"{name}.weight", arch) for name in names}


def _mix_plan(plan: GGUFPlan, model: LowbitFolder | PlannedModel, gguf_names: dict[str, str],
              imatrix: bool = False) -> dict[str, T]:
    """The mix's type for every quantized linear (GGUF name -> type), and in plan.float_types for the float
    embedding and output, which llama.cpp's quantizer quantizes as well."""
    config = plan.config
    shape = _model_shape(config, plan.arch)
    hidden = config["hidden_size"]
    tensors = {gguf_names[n]: cols for n, (_, (_, cols)) in model.modules.items()}
    floats = {"token_embd.weight": hidden} if "token_embd.weight" not in tensors else {}
    if not shape.tied_output and "output.weight" not in tensors:
        floats["output.weight"] = hidden
    types = mix_types(plan.mix, {**tensors, **floats}, shape, imatrix)
    plan.float_types = {n: types[n] for n in floats}
    return types


def check_imatrix(model: LowbitFolder | PlannedModel, quant_type: str | None, path) -> list[str]:
    """Refuse (LowbitError) an imatrix file that is not one, or that was computed for another model, before any
    work (`quantize --export gguf --imatrix`); returns its warnings."""
    plan = plan_gguf(model, quant_type, True)
    before = len(plan.warnings)
    _importance(read_imatrix(path), plan, path)
    return plan.warnings[before:]


def _model_shape(config: dict, arch: Arch) -> ModelShape:
    heads = config["num_attention_heads"]
    return ModelShape(config["num_hidden_layers"], heads // (config.get("num_key_value_heads") or heads),
                      int(config.get("num_local_experts") or config.get("num_experts") or 0),
                      tied_output=bool(config.get("tie_word_embeddings")) or not arch.separate_output)


def linear_mix_types(config: dict, mix: str, linears: dict[str, int]) -> dict[str, T]:
    """The type llama.cpp's quantizer gives each linear (HF name -> width) in a file of `mix`, as the export of
    that mix chooses it; refuses architectures GGUF has no place for."""
    arch = get_arch(config)
    names = gguf_tensor_names(config, list(linears))
    types = mix_types(mix, {names[n]: cols for n, cols in linears.items()}, _model_shape(config, arch))
    return {n: types[names[n]] for n in linears}


def _importance(table: dict[str, torch.Tensor], plan: GGUFPlan, path) -> dict:
    """The imatrix entries of the tensors this file re-quantizes with a weighted search (imatrix_entries); a
    re-quantized tensor the file has no entry for is quantized without (a warning says how many)."""
    widths = {lin.gguf_name: lin.shape[1] for lin in plan.linears}
    widths.update({n: plan.config["hidden_size"] for n in plan.float_types})
    needed = [lin.gguf_name for lin in plan.linears if not lin.exact] + list(plan.float_types)
    used, missing = imatrix_entries(table, widths, needed, path)
    if missing:
        plan.warnings.append(f"{missing} re-quantized tensors have no entry in the imatrix {path}; they are "
                             f"quantized without importance weights")
    return used


def imatrix_entries(table: dict[str, torch.Tensor], widths: dict[str, int], needed: list[str],
                    path) -> tuple[dict[str, torch.Tensor], int]:
    """The entries of the `needed` tensors, with every entry for this model's tensors (GGUF name -> width)
    checked against its width, and how many needed tensors have none (the embedding, a lookup table llama-imatrix
    never records, not counted). An imatrix with no entry for any of the model's tensors is another model's."""
    for name, cols in widths.items():
        found = table.get(name)
        if found is not None and found.numel() != cols:
            raise LowbitError(f"the imatrix {path} has {found.numel()} columns for {name}, which has {cols}: it "
                              f"was computed for another model")
    if not any(name in table for name in widths):
        raise LowbitError(f"the imatrix {path} has no entry for any tensor of this model (names like "
                          f"{next(iter(widths), 'blk.0.attn_q.weight')}); it was computed for another model")
    used = {name: table[name] for name in needed if name in table}
    missing = sum(name not in table and name != "token_embd.weight" for name in needed)
    return used, missing


def _gguf_name(names: gguf.TensorNameMap, name: str, arch: Arch) -> str:
    """The GGUF name of an HF tensor (an expert's: its layer's stacked tensor), refusing tensors llama.cpp's
    architecture has no place for."""
    expert = expert_member(name, arch)
    if expert is not None:
        return expert[0]
    gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
    arch_name = gguf.MODEL_ARCH_NAMES[arch.gguf_arch]
    if name.startswith("lm_head.") and not arch.separate_output:
        raise LowbitError(f"{name} is a separate output layer, but llama.cpp's {arch_name} architecture always "
                          f"reuses the embedding; requantize with lm_head excluded (the default)")
    if gguf_name is None:
        raise LowbitError(f"{name} has no counterpart in llama.cpp's {arch_name} architecture; "
                          f"export to compressed-tensors instead")
    return gguf_name


def _forced_type(quant_type: str | None) -> T | None:
    if quant_type is None:
        return None
    qtype = QUANT_TYPES.get(str(quant_type).lower())
    if qtype is None:
        raise LowbitError(f"unknown GGUF quant type {quant_type!r}; use one of {', '.join(GGUF_TYPES)}")
    return qtype


def _heads(name: str, config: dict) -> int | None:
    """The head count whose rows the q/k permutation moves (None for other linears)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "q_proj":
        return config["num_attention_heads"]
    if leaf == "k_proj":
        return config.get("num_key_value_heads") or config["num_attention_heads"]
    return None


# -- tensors ---------------------------------------------------------------------------------------------

@dataclass
class Tensor:
    """One GGUF tensor: what its info says, and how to make its data (called once, while writing)."""

    name: str
    shape: tuple[int, ...]
    dtype: type
    raw: T | None
    make: Callable[[], np.ndarray]
    expert: int = -1  # an expert's index in its stacked tensor (ffn_*_exps), else -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def _tensors(folder: LowbitFolder, plan: GGUFPlan) -> list[Tensor]:
    """Every tensor of the file, named and sized, in llama.cpp's usual order (experts stacked); refuses unknown
    tensors."""
    out = []
    for name in folder.float_tensor_names():
        if NOT_EXPORTED.search(name):
            continue
        gguf_name = _gguf_name(plan.names, name, plan.arch)
        qtype = plan.float_types.get(gguf_name)
        out.append(_float_tensor(folder, plan, name, gguf_name) if qtype is None else
                   _requantized_float(folder, plan, name, gguf_name, qtype))
    for lin in plan.linears:
        shape = (lin.shape[0], row_bytes(lin.qtype, lin.shape[1]))
        out.append(Tensor(lin.gguf_name, shape, np.uint8, lin.qtype,
                          lambda lin=lin: _linear_bytes(folder, lin, plan.importance.get(lin.gguf_name)),
                          _expert_index(lin.name, plan.arch)))
    return finish_tensors(out, plan)


def finish_tensors(tensors: list[Tensor], plan: GGUFPlan) -> list[Tensor]:
    """The file's tensors in llama.cpp's usual order: experts stacked, RoPE factors added, and a copy of
    the embedding as the output where the architecture needs one and the model ties them."""
    out = _stacked(tensors)
    for name, factors in rope_tensors(plan.config).items():  # Llama 3.1's rope_freqs, Phi-3's LongRoPE factors
        out.append(Tensor(name, factors.shape, np.float32, None, lambda factors=factors: factors))
    names = {t.name: t for t in out}
    if plan.arch.output_required and "output.weight" not in names:
        out.append(dataclasses.replace(names["token_embd.weight"], name="output.weight"))
    return sorted(out, key=_order)


def _expert_index(name: str, arch: Arch) -> int:
    member = expert_member(name, arch)
    return -1 if member is None else member[1]


def _stacked(tensors: list[Tensor]) -> list[Tensor]:
    """One 3-D tensor (experts, rows, row) per layer's expert projection, expert 0 first, of one type."""
    groups: dict[str, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.name, []).append(t)
    out = []
    for name, group in groups.items():
        if len(group) == 1 and group[0].expert < 0:
            out.append(group[0])
            continue
        group.sort(key=lambda t: t.expert)
        first = group[0]
        if [t.expert for t in group] != list(range(len(group))) or \
                any((t.shape, t.dtype, t.raw) != (first.shape, first.dtype, first.raw) for t in group):
            raise LowbitError(f"the tensors that go to {name} are not one expert each of one shape and type "
                              f"(experts {[t.expert for t in group]}); export to compressed-tensors instead")
        out.append(Tensor(name, (len(group), *first.shape), first.dtype, first.raw,
                          lambda group=group: np.stack([t.make() for t in group])))
    return out


def _float_tensor(folder: LowbitFolder, plan: GGUFPlan, name: str, gguf_name: str) -> Tensor:
    """A float tensor in its stored dtype (float32, float16 or bfloat16; 1-D norms and biases as float32,
    Gemma's norms as 1 + w), q/k rows permuted like the quantized ones."""
    stored = folder.ckpt.get(name)  # read once here for its shape and dtype
    heads = _heads(name.rsplit(".", 1)[0], plan.config) if plan.arch.permute_qk else None
    plus_one = plan.arch.norm_plus_one and name.endswith("norm.weight")
    dtype = stored.dtype if stored.dim() > 1 and stored.dtype in (torch.float16, torch.bfloat16) else torch.float32
    shape = tuple(stored.shape)
    del stored

    def make() -> np.ndarray:
        t = folder.ckpt.get(name)
        t = (t.float() + 1 if plus_one else t.to(dtype)).contiguous()
        data = t.view(torch.int16).numpy().view(np.uint8) if dtype == torch.bfloat16 else t.numpy()
        return _permute_rows(data, heads) if heads else data

    if dtype == torch.bfloat16:  # numpy has no bfloat16: written as raw bytes, 2 per element
        return Tensor(gguf_name, (*shape[:-1], shape[-1] * 2), np.uint8, T.BF16, make, _expert_index(name, plan.arch))
    return Tensor(gguf_name, shape, np.float16 if dtype == torch.float16 else np.float32, None, make,
                  _expert_index(name, plan.arch))


def _requantized_float(folder: LowbitFolder, plan: GGUFPlan, name: str, gguf_name: str, qtype: T) -> Tensor:
    """A float embedding or output quantized to the mix's type, as llama.cpp's quantizer does."""
    rows, cols = folder.ckpt.get(name).shape
    return Tensor(gguf_name, (rows, row_bytes(qtype, cols)), np.uint8, qtype,
                  lambda: requantize(folder.ckpt.get(name).float(), qtype, plan.importance.get(gguf_name)),
                  _expert_index(name, plan.arch))


def _linear_bytes(folder: LowbitFolder, lin: LinearGGUF, importance: torch.Tensor | None) -> np.ndarray:
    data = pack_exact(folder.quantized(lin.name), lin.qtype) if lin.exact else \
        requantize(folder.weight(lin.name), lin.qtype, importance)
    return _permute_rows(data, lin.heads) if lin.heads else data


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: within each head, new row 2i is old row i, new row 2i+1 old row i + hd/2."""
    return np.ascontiguousarray(rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
                                .swapaxes(1, 2).reshape(rows.shape))


def _order(tensor: Tensor):
    m = re.match(r"blk\.(\d+)\.", tensor.name)
    return (1, int(m.group(1)), tensor.name) if m else (2 if tensor.name.startswith("output") else 0, 0, tensor.name)


# -- writing ---------------------------------------------------------------------------------------------

def _write(path: Path, folder: LowbitFolder, plan: GGUFPlan, vocab: GGUFVocab, tensors: list[Tensor]) -> None:
    """Header, metadata and tensor infos first (sizes are known from the plan), then each tensor's data made
    and written in turn, so only one tensor is in memory at a time."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[plan.arch.gguf_arch])
    try:
        _add_general(writer, plan, _model_name(folder.folder.name, vocab))
        add_hparams(writer, plan.config)
        vocab.add_to(writer)
        for t in tensors:
            writer.add_tensor_info(t.name, t.shape, np.dtype(t.dtype), t.nbytes, raw_dtype=t.raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            data = t.make()
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.name}: made {data.nbytes} bytes, planned {t.nbytes}")
            writer.write_tensor_data(data)
    finally:
        writer.close()


def _model_name(name: str, vocab: GGUFVocab) -> str:
    """general.name. llama.cpp takes a name containing "phi3" / "phi-3" for Phi-3's vocabulary and looks up its
    special tokens by text, failing to load a file whose vocabulary lacks one: such a name is written without the
    dash or digit run that matches."""
    phi3 = re.compile(r"phi-?3", re.IGNORECASE)
    if phi3.search(name) and not {"</s>", "<unk>", "<s>", "<|endoftext|>"} <= set(vocab.tokens):
        return phi3.sub(lambda m: m.group(0)[:3] + "_" + m.group(0)[-1], name)
    return name


def _add_general(writer: gguf.GGUFWriter, plan: GGUFPlan, name: str) -> None:
    """general.*: the name, lowbit as quantizer (with its warnings), and the file type of most weights."""
    counts = Counter()
    for lin in plan.linears:
        counts[lin.qtype] += lin.shape[0] * lin.shape[1]
    writer.add_name(name)
    writer.add_type("model")
    writer.add_quantized_by(f"lowbit {__version__}")
    if plan.warnings:
        writer.add_array("lowbit.warnings", plan.warnings)
    file_type = plan.file_type if plan.file_type is not None else MIXES[plan.mix].file_type if plan.mix else \
        FILE_TYPES.get(counts.most_common(1)[0][0], _FT.GUESSED) if counts else _FT.ALL_F32
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _check_target(out: Path, overwrite: bool, src: Path) -> None:
    """Refuse, before any work, an output that is not a .gguf file path or that exists (unless overwrite)."""
    if out.suffix.lower() != ".gguf":
        raise LowbitError(f"the GGUF output {out} must be a file path ending in .gguf")
    check_output(out, overwrite, [src], is_file=True)
