"""Export a lowbit folder to the compressed-tensors layout (quant_method "compressed-tensors").

Why: vLLM, SGLang and transformers (with the `compressed-tensors` package) load this layout directly, so a
model quantized by lowbit runs there without re-quantization. The export moves the stored codes and scales
as they are; nothing is re-rounded, so the consumer dequantizes to lowbit's weights (exactly, or to within
the float rounding noted below). Checked against compressed-tensors 0.20.0.

Per quantized linear `p` (weight (N, K)), by lowbit spec:
- integers with float32 scales, symmetric or not, per tensor / channel / group -> "pack-quantized":
  `p.weight_packed` int32 (N, ceil(K * b / 32)): the values in the signed range plus 2^(b-1), as one
  LSB-first bit stream per row cut into little-endian 32-bit words (lowbit's qweight bit stream is the same
  stream); `p.weight_scale` float32 ((1,), (N, 1) or (N, K / g)); `p.weight_shape` int64 [N, K];
  asymmetric: `p.weight_zero_point`, the zero point in the signed range, packed the same way along N
  (int32 (ceil(N * b / 32), groups)), or int8 (1,) per tensor. W = (q - zp) * scale, as in lowbit.
- FP8 E4M3FN with float32 scales -> "float-quantized": `p.weight` float8_e4m3fn (N, K), `p.weight_scale`
  float32; static per-tensor FP8 input activations add `p.input_scale` float32 (1,) (x ~ fp8(x / s) * s).
- NVFP4 (E2M1, group 16, FP8 block scales, tensor scale t) -> "nvfp4-pack-quantized": `p.weight_packed`
  uint8 (N, K / 2) (element 2i in the low nibble), `p.weight_scale` float8_e4m3fn (N, K / 16), and
  `p.weight_global_scale` float32 (1,) = 1 / t, because the decoder divides by it. The decoder works in
  bfloat16, so its weights equal lowbit's rounded to bfloat16 (scale / (1 / t) vs scale * t differs by one
  float32 rounding at most).
- MXFP4 (E2M1), MXFP6 (E2M3) and MXFP8 (E4M3), group 32, E8M0 scales -> "mxfp4-pack-quantized",
  "mxfp6-pack-quantized" (4 codes in 3 bytes, LSB-first) and "mxfp8-quantized" (`p.weight` float8): scale
  bytes stored as lowbit's (the decoder computes 2^(byte - 127)); exact.
- a static per-tensor FP8 KV cache (the k_proj / v_proj outputs) -> `kv_cache_scheme` with `k_scale` and
  `v_scale` on the attention module. compressed-tensors and vLLM quantize the keys after RoPE, lowbit before
  it, so the keys round slightly differently (values are the same).
Refused with a LowbitError before anything is written (as declared.CAPABILITIES["compressed-tensors"] says):
block floating point (MX6, MX9, BFP16), MXINT8, E5M2 / FNUZ / E3M2 elements, a group size that does not divide in_features (compressed-tensors has no
partial last group), other input-activation schemes (integer, dynamic, MX, NVFP4), other scale layouts
and an online rotation (r4). A model rotated offline (R1, R2) exports like any other: the rotation lives in
its weights.

Loading with transformers on CPU (compressed-tensors 0.20): the NVFP4 and MX decoders return bfloat16
weights, so a float32 model needs CompressedTensorsConfig(dequantize=True) or dtype=torch.bfloat16; packed
asymmetric zero points (per group / channel) load only with dequantize=True, because the default path sizes
them unpacked. Both layouts are what compressed-tensors' own compressors write.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch.moe import checkpoint_name
from ..formats import pack_rows
from ..hf.checkpoint import LazyCheckpoint
from ..model_files import copy_carried
from ..spec import QuantSpec
from ..formats.packed import stored_names, unpack_linear
from ..model_files import TOKENIZER_FILES
from .declared import check_layers
from ..staging import check_output, staged
from .output import ShardWriter
from .source import LowbitFolder

PACK_QUANTIZED = "pack-quantized"
FLOAT_QUANTIZED = "float-quantized"
NVFP4 = "nvfp4-pack-quantized"
MXFP4 = "mxfp4-pack-quantized"
MXFP6 = "mxfp6-pack-quantized"
MXFP8 = "mxfp8-quantized"
MX_FORMATS = {4: MXFP4, 6: MXFP6, 8: MXFP8}  # E8M0-scaled float elements by width

FP8_STATIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


@dataclass
class LinearExport:
    """How one quantized linear is exported: its compressed-tensors format and QuantizationArgs."""

    name: str
    spec: QuantSpec
    shape: tuple[int, int]
    format: str
    weights: dict
    inputs: dict | None = None

    def scheme_key(self) -> str:
        return json.dumps([self.format, self.weights, self.inputs], sort_keys=True)


def export_compressed_tensors(src: Path, out: Path, overwrite: bool = False) -> Path:
    """Write the lowbit folder `src` as a compressed-tensors folder `out`; every check runs before writing."""
    src, out = Path(src), Path(out)
    folder = LowbitFolder(src)
    config = dict(folder.config)
    check_output(out, overwrite, [src])
    check_compressed_tensors(folder)
    linears = _plan_linears(folder)
    kv_scales = _plan_kv_cache(folder.outputs)
    with staged(out, overwrite, [src]) as tmp:
        writer = ShardWriter(tmp)
        _write_tensors(writer, folder.ckpt, linears, kv_scales, folder.config.get("model_type"))
        writer.close()
        config["quantization_config"] = _quantization_config(linears, folder.qconfig, bool(kv_scales),
                                                             folder.config.get("model_type"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        copy_carried(src, tmp, TOKENIZER_FILES)
    return out


def check_compressed_tensors(model) -> list[str]:
    """Refuse (LowbitError) what compressed-tensors cannot hold (declared.CAPABILITIES["compressed-tensors"]),
    from a LowbitFolder or a PlannedModel; warns that transformers cannot load mixture-of-experts ones."""
    check_layers("compressed-tensors", model)
    if any(re.search(r"\.experts\.\d+\.", name) for name in model.modules):
        return ["transformers (5.25) cannot load compressed-tensors mixture-of-experts checkpoints (it fuses the "
                "experts and cannot convert packed ones); vLLM and SGLang load this per-expert layout"]
    return []


# -- planning (of a model check_compressed_tensors has passed) -----------------------------------------

def _plan_linears(folder: LowbitFolder) -> list[LinearExport]:
    """The compressed-tensors format and QuantizationArgs of every quantized linear."""
    plans = []
    for name, (spec, shape) in folder.modules.items():
        plan = _plan_weight(name, spec, tuple(shape))
        if name in folder.inputs:
            plan.inputs = dict(FP8_STATIC)  # static per-tensor FP8 inputs, the only ones held
        plans.append(plan)
    return plans


def _plan_weight(name: str, spec: QuantSpec, shape: tuple[int, int]) -> LinearExport:
    """The format and QuantizationArgs of one linear's weight."""
    if spec.kind == "int":
        args = {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric, **_strategy(spec),
                "dynamic": False}
        return LinearExport(name, spec, shape, PACK_QUANTIZED, args)
    if spec.scale_dtype == "e8m0":
        args = {**_float_args(spec, spec.bits), "scale_dtype": "torch.uint8"}
        return LinearExport(name, spec, shape, MX_FORMATS[spec.bits], args)
    if spec.scale_dtype == "fp8_e4m3":
        args = {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": 16,
                "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}
        return LinearExport(name, spec, shape, NVFP4, args)
    return LinearExport(name, spec, shape, FLOAT_QUANTIZED, _float_args(spec, 8))


def _plan_kv_cache(outputs: dict[str, QuantSpec]) -> dict[str, tuple[str, str]]:
    """{attention module: (k_proj, v_proj)} for the (static per-tensor FP8) KV cache; {} when there is none."""
    attention: dict[str, dict[str, str]] = {}
    for name in outputs:
        parent, _, leaf = name.rpartition(".")
        attention.setdefault(parent, {})[leaf] = name
    return {parent: (p["k_proj"], p["v_proj"]) for parent, p in attention.items()}


def _strategy(spec: QuantSpec) -> dict:
    if spec.granularity == "group":
        return {"strategy": "group", "group_size": spec.group_size}
    return {"strategy": spec.granularity, "group_size": None}


def _float_args(spec: QuantSpec, bits: int) -> dict:
    return {"num_bits": bits, "type": "float", "symmetric": True, **_strategy(spec), "dynamic": False}


# -- writing ------------------------------------------------------------------------------------------

def _write_tensors(writer: ShardWriter, ckpt: LazyCheckpoint, linears: list[LinearExport],
                   kv_scales: dict[str, tuple[str, str]], model_type: str | None = None) -> None:
    """Every float tensor as stored, each quantized linear converted, and the KV-cache scales (Mixtral's experts
    and router under Mixtral's checkpoint names, arch.moe.checkpoint_name)."""
    def add(name: str, tensor: torch.Tensor) -> None:
        writer.add(checkpoint_name(name, model_type), tensor)

    replaced = {f"{lin.name}.{n}" for lin in linears for n in [*stored_names(lin.spec), "input_scale"]}
    replaced |= {f"{p}.output_scale" for pair in kv_scales.values() for p in pair}
    for name in ckpt.keys():
        if name not in replaced:
            add(name, ckpt.get(name))
    for lin in linears:
        stored = {n: ckpt.get(f"{lin.name}.{n}") for n in stored_names(lin.spec)}
        for suffix, tensor in convert_linear(lin, stored).items():
            add(f"{lin.name}.{suffix}", tensor)
        if lin.inputs is not None:
            add(f"{lin.name}.input_scale", ckpt.get(f"{lin.name}.input_scale").float().reshape(1))
    for attention, (k_proj, v_proj) in kv_scales.items():
        add(f"{attention}.k_scale", ckpt.get(f"{k_proj}.output_scale").float().reshape(1))
        add(f"{attention}.v_scale", ckpt.get(f"{v_proj}.output_scale").float().reshape(1))


def convert_linear(lin: LinearExport, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """compressed-tensors tensors (names without the module prefix) of one lowbit packed linear."""
    qt = unpack_linear(stored, lin.spec, lin.shape)
    if lin.format == PACK_QUANTIZED:
        return _pack_quantized(qt, lin.shape)
    if lin.format == NVFP4:
        return {"weight_packed": pack_rows(qt.codes, 4), "weight_scale": stored["scales"],
                "weight_global_scale": (1.0 / stored["tensor_scale"].float()).reshape(1)}
    if lin.format in (MXFP4, MXFP6):
        return {"weight_packed": pack_rows(qt.codes, lin.spec.bits), "weight_scale": stored["scales"]}
    weight = qt.codes.to(torch.uint8).view(torch.float8_e4m3fn)
    if lin.format == MXFP8:
        return {"weight": weight, "weight_scale": stored["scales"]}
    return {"weight": weight, "weight_scale": _scale_shape(qt.scale.float(), lin.spec)}


def _pack_quantized(qt, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """pack-quantized tensors: values and zero points in the signed range, offset by 2^(b-1) and packed."""
    spec = qt.spec
    bits = spec.bits
    offset = 1 << (bits - 1)
    unsigned_shift = 0 if spec.signed else offset  # lowbit's unsigned codes are the signed values + 2^(b-1)
    out = {"weight_packed": pack_int32_rows(qt.codes - unsigned_shift + offset, bits),
           "weight_scale": _scale_shape(qt.scale.float(), spec),
           "weight_shape": torch.tensor(shape, dtype=torch.int64)}
    if not spec.symmetric:
        zero = qt.zero.to(torch.int32) - unsigned_shift
        if spec.granularity == "tensor":
            out["weight_zero_point"] = zero.reshape(1).to(torch.int8)
        else:
            out["weight_zero_point"] = pack_int32_rows((zero + offset).T, bits).T.contiguous()
    return out


def _scale_shape(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """compressed-tensors' scale shape: (1,) per tensor, (N, 1) per channel, (N, groups) per group."""
    return scale.reshape(1) if spec.granularity == "tensor" else scale.contiguous()


def pack_int32_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes (rows, cols) as one LSB-first bit stream per row in ceil(cols * bits / 32) int32 words
    (bit i of a word is bit 32w + i of the stream), as compressed-tensors' pack_to_int32 lays them out."""
    words = math.ceil(codes.shape[1] * bits / 32)
    stream = pack_rows(codes, bits)[:, :4 * words]  # pack_rows pads each row with zero bits only
    stream = torch.nn.functional.pad(stream, (0, 4 * words - stream.shape[1])).to(torch.int64)
    weights = torch.tensor([1 << 0, 1 << 8, 1 << 16, 1 << 24], dtype=torch.int64)
    unsigned = (stream.reshape(codes.shape[0], words, 4) * weights).sum(dim=-1)
    return torch.where(unsigned >= 1 << 31, unsigned - (1 << 32), unsigned).to(torch.int32)


def _quantization_config(linears: list[LinearExport], qconfig: dict, kv_cache: bool,
                         model_type: str | None = None) -> dict:
    """config.json's quantization_config: one config group per distinct scheme, targeting modules by name."""
    groups: dict[str, dict] = {}
    for lin in linears:
        key = lin.scheme_key()
        if key not in groups:
            groups[key] = {"targets": [], "weights": lin.weights, "input_activations": lin.inputs,
                           "output_activations": None, "format": lin.format}
        groups[key]["targets"].append(checkpoint_name(lin.name, model_type))
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "ignore": list(qconfig.get("ignore", [])),
        "kv_cache_scheme": dict(FP8_STATIC) if kv_cache else None,
    }
