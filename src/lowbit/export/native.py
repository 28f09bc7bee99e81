"""lowbit's native checkpoint: a Hugging Face folder whose quantized linears are stored packed.

Per quantized linear `p` (weight of shape (N, K)):
- `p.qweight`  uint8 (N, ceil(K * bits / 8) rounded to whole packing runs): codes minus qmin (so always
  unsigned), packed LSB-first along K per row (formats.packing);
- `p.scales`   float32 (row blocks, column blocks): (N, ceil(K / group)) per group, (N, 1) per channel,
  (1, 1) per tensor;
- `p.qzeros`   uint8, same shape as the scales, zero point minus qmin: asymmetric specs only (a symmetric
  spec's zero point is implied: 0 signed, 2^(bits-1) unsigned);
- `p.bias` unchanged when the layer has one;
- `p.input_scale` float32, for a static input-activation spec: the scale (symmetric) or (scale, zero point).
config.json carries quantization_config = {quant_method: "lowbit", format_version, modules: {p: QuantSpec},
inputs: {p: QuantSpec of its input activations}}.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..engine import Sink
from ..formats import IntQuantized, dequantize, pack_rows, unpack_rows
from ..recipe import LayerPlan
from ..spec import QuantSpec
from .output import ShardWriter

FORMAT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")


class NativeSink(Sink):
    """Receives the engine's results and writes them as packed safetensors shards."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 << 30):
        self.writer = ShardWriter(folder, max_shard_bytes, metadata={"lowbit_format_version": str(FORMAT_VERSION)})
        self.input_specs: dict[str, QuantSpec] = {}

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.writer.add(name, tensor)

    def add_quantized(self, module_name: str, qt: IntQuantized, bias: torch.Tensor | None) -> None:
        for name, tensor in pack_linear(qt).items():
            self.writer.add(f"{module_name}.{name}", tensor)
        if bias is not None:
            self.writer.add(f"{module_name}.bias", bias)

    def add_input_quant(self, module_name: str, spec: QuantSpec, params: torch.Tensor | None) -> None:
        self.input_specs[module_name] = spec
        if params is not None:
            self.writer.add(f"{module_name}.input_scale", params.float().reshape(-1))

    def close(self) -> list[str]:
        return self.writer.close()


def pack_linear(qt: IntQuantized) -> dict[str, torch.Tensor]:
    spec = qt.spec
    out = {"qweight": pack_rows(qt.codes - spec.qmin, spec.bits), "scales": qt.scale.float().contiguous()}
    if not spec.symmetric:
        out["qzeros"] = (qt.zero - spec.qmin).to(torch.uint8)
    return out


def unpack_linear(tensors: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int]) -> IntQuantized:
    codes = unpack_rows(tensors["qweight"], spec.bits, shape[1]) + spec.qmin
    scale = tensors["scales"].float()
    if spec.symmetric:
        zero = None if spec.signed else torch.full(scale.shape, 1 << (spec.bits - 1), dtype=torch.int32)
    else:
        zero = tensors["qzeros"].to(torch.int32) + spec.qmin
    return IntQuantized(codes, scale, zero, spec)


def read_linear(ckpt, module_name: str, spec: QuantSpec, shape: tuple[int, int]) -> torch.Tensor:
    """The dequantized float32 weight (N, K) of a packed linear in a lowbit checkpoint."""
    names = ["qweight", "scales"] + ([] if spec.symmetric else ["qzeros"])
    qt = unpack_linear({n: ckpt.get(f"{module_name}.{n}") for n in names}, spec, shape)
    return dequantize(qt.codes, qt.scale, qt.zero, spec)


def quantization_config(plan: dict[str, LayerPlan], recipe_dict: dict, dtype: torch.dtype,
                        input_specs: dict[str, QuantSpec] | None = None) -> dict:
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
    }


def write_metadata(folder: Path, source_folder: Path, plan: dict[str, LayerPlan], recipe_dict: dict,
                   dtype: torch.dtype, untie: bool, input_specs: dict[str, QuantSpec] | None = None) -> None:
    """config.json with the quantization_config, plus the source's tokenizer and generation files."""
    config = json.loads((Path(source_folder) / "config.json").read_text())
    config["quantization_config"] = quantization_config(plan, recipe_dict, dtype, input_specs)
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        src = Path(source_folder) / name
        if src.is_file():
            shutil.copy2(src, Path(folder) / name)
