"""lowbit's native checkpoint: a Hugging Face folder whose quantized linears are stored packed.

Per quantized linear `p` (weight of shape (N, K)):
- `p.qweight`  uint8 (N, ceil(K * bits / 8) rounded to whole packing runs): integer codes minus qmin (so
  always unsigned) or minifloat bit patterns, packed LSB-first along K per row (formats.packing);
- `p.scales`   (row blocks, column blocks): (N, ceil(K / group)) per group, (N, 1) per channel, (1, 1) per
  tensor. float32 for float32 scales; uint8 E8M0 bytes (shared exponent + 127) for MX / MXINT8 / BFP
  specs, whose effective scale is 2^(byte - 127) / 2^(bits - 2) for integer elements; float8_e4m3fn block
  scales for two-level specs, with `p.tensor_scale` float32 (1,), effective scale = block scale x tensor scale;
- `p.shifts`   uint8, MX6/MX9 only: one microexponent bit per sub-block, packed LSB-first per row (the
  scales then hold one exponent per group);
- `p.qzeros`   uint8, same shape as the scales, zero point minus qmin: asymmetric specs only (a symmetric
  spec's zero point is implied: 0 signed, 2^(bits-1) unsigned);
- `p.bias` unchanged when the layer has one;
- `p.input_scale` float32, for a static input-activation spec: the scale (symmetric) or (scale, zero point).
config.json carries quantization_config = {quant_method: "lowbit", format_version, modules: {p: QuantSpec},
inputs: {p: QuantSpec of its input activations}}.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..engine import Sink
from ..formats import Quantized, dequantize, pack_rows, unpack_rows
from ..formats.minifloat import E4M3FN
from ..formats.scaled import fraction_bits
from ..model_files import TOKENIZER_FILES, check_carried, copy_carried, read_json
from ..recipe import LayerPlan
from ..spec import QuantSpec
from .output import ShardWriter

FORMAT_VERSION = 1


class NativeSink(Sink):
    """Receives the engine's results and writes them as packed safetensors shards."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30):
        self.writer = ShardWriter(folder, max_shard_bytes, metadata={"lowbit_format_version": str(FORMAT_VERSION)})
        self.input_specs: dict[str, QuantSpec] = {}
        self.output_specs: dict[str, QuantSpec] = {}

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def add_quantized(self, module_name: str, qt: Quantized, bias: torch.Tensor | None) -> None:
        for name, tensor in pack_linear(qt).items():
            self.writer.add(f"{module_name}.{name}", tensor)
        if bias is not None:
            self.writer.add(f"{module_name}.bias", bias)

    def add_input_quant(self, module_name: str, spec: QuantSpec, params: torch.Tensor | None) -> None:
        self.input_specs[module_name] = spec
        if params is not None:
            self.writer.add(f"{module_name}.input_scale", params.float().reshape(-1))

    def add_output_quant(self, module_name: str, spec: QuantSpec, params: torch.Tensor) -> None:
        self.output_specs[module_name] = spec
        self.writer.add(f"{module_name}.output_scale", params.float().reshape(-1))

    def close(self) -> list[str]:
        return self.writer.close()


def _code_offset(spec: QuantSpec) -> int:
    return 0 if spec.kind == "float" else spec.qmin


def _exponents(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Shared exponents (int32) of power-of-two effective scales."""
    _, exp = torch.frexp(scale.float())
    return exp - 1 + fraction_bits(spec)


def pack_linear(qt: Quantized) -> dict[str, torch.Tensor]:
    spec = qt.spec
    out = {"qweight": pack_rows(qt.codes - _code_offset(spec), spec.bits)}
    if spec.scale_dtype == "float32":
        out["scales"] = qt.scale.float().contiguous()
    elif spec.scale_dtype == "fp8_e4m3":
        out["scales"] = E4M3FN.round(qt.scale.float() / qt.tensor_scale).to(torch.float8_e4m3fn)
        out["tensor_scale"] = qt.tensor_scale.float().reshape(1)
    elif spec.subblock_size:  # step 2^(E - shift - frac) per sub-block: E per group, shift bits per sub-block
        step_exp = _exponents(qt.scale, spec)
        per = spec.group_size // spec.subblock_size
        padded = torch.nn.functional.pad(step_exp, (0, -step_exp.shape[1] % per), value=-1 << 20)
        shared = padded.reshape(step_exp.shape[0], -1, per).amax(dim=-1)
        out["scales"] = (shared + 127).to(torch.uint8)
        out["shifts"] = pack_rows(shared.repeat_interleave(per, dim=1)[:, :step_exp.shape[1]] - step_exp, 1)
    else:
        out["scales"] = (_exponents(qt.scale, spec) + 127).to(torch.uint8)
    if spec.plain_int and not spec.symmetric:
        out["qzeros"] = (qt.zero - spec.qmin).to(torch.uint8)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> Quantized:
    codes = unpack_rows(tensors["qweight"], spec.bits, shape[1]) + _code_offset(spec)
    stored = tensors["scales"]
    t = None
    if spec.scale_dtype == "float32":
        scale = stored.float()
    elif spec.scale_dtype == "fp8_e4m3":
        t = tensors["tensor_scale"].float().reshape(())
        scale = stored.float() * t
    else:
        exps = stored.to(torch.int32) - 127 - fraction_bits(spec)
        if spec.subblock_size:
            n_sub = -(-shape[1] // spec.subblock_size)
            per = spec.group_size // spec.subblock_size
            exps = exps.repeat_interleave(per, dim=1)[:, :n_sub] - unpack_rows(tensors["shifts"], 1, n_sub)
        scale = torch.ldexp(torch.ones(exps.shape), exps)
    if not spec.plain_int or spec.symmetric:
        zero = None if not spec.plain_int or spec.signed else \
            torch.full(scale.shape, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        zero = tensors["qzeros"].to(torch.int32) + spec.qmin
    return Quantized(codes, scale, zero, spec, t)


def stored_names(spec: QuantSpec) -> list[str]:
    """The tensors a packed linear of this spec has (besides its bias)."""
    names = ["qweight", "scales"]
    if spec.scale_dtype == "fp8_e4m3":
        names.append("tensor_scale")
    if spec.subblock_size:
        names.append("shifts")
    if spec.plain_int and not spec.symmetric:
        names.append("qzeros")
    return names


def read_linear(ckpt, module_name: str, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """The dequantized float32 weight (N, K) of a packed linear in a lowbit checkpoint."""
    qt = unpack_linear({n: ckpt.get(f"{module_name}.{n}") for n in stored_names(spec)}, spec, shape)
    return dequantize(qt.codes, qt.scale, qt.zero, spec)


def quantization_config(plan: dict[str, LayerPlan], recipe_dict: dict, dtype: torch.dtype,
                        input_specs: dict[str, QuantSpec] | None = None,
                        output_specs: dict[str, QuantSpec] | None = None,
                        online_rotations: dict[str, dict] | None = None) -> dict:
    quantized = {n: lp for n, lp in plan.items() if lp.spec is not None}
    return {
        "quant_method": "lowbit",
        "format": "lowbit-packed",
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "scheme": recipe_dict["scheme"]["name"],
        "dtype": str(dtype).replace("torch.", ""),  # of the float tensors and of dequantized weights
        "algorithms": recipe_dict["algorithms"],
        "ignore": sorted(n for n, lp in plan.items() if lp.spec is None),
        "modules": {n: lp.spec.to_dict() for n, lp in quantized.items()},
        "shapes": {n: list(lp.shape) for n, lp in quantized.items()},
        "inputs": {n: spec.to_dict() for n, spec in (input_specs or {}).items()},
        "outputs": {n: spec.to_dict() for n, spec in (output_specs or {}).items()},
        # linears whose input is multiplied at run time by the normalised Hadamard of its width (rotation r4)
        "online_rotations": dict(online_rotations or {}),
    }


def write_metadata(folder: Path, source_folder: Path, plan: dict[str, LayerPlan], recipe_dict: dict,
                   dtype: torch.dtype, untie: bool, input_specs: dict[str, QuantSpec] | None = None,
                   output_specs: dict[str, QuantSpec] | None = None,
                   online_rotations: dict[str, dict] | None = None) -> None:
    """config.json with the quantization_config, plus the source's tokenizer and generation files."""
    check_carried(source_folder)  # config.json and the tokenizer files lie inside the source folder
    config = read_json(Path(source_folder) / "config.json", "model config")
    config["quantization_config"] = quantization_config(plan, recipe_dict, dtype, input_specs, output_specs,
                                                       online_rotations)
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
    copy_carried(source_folder, folder, TOKENIZER_FILES)
