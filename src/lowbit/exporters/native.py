"""lowbit's native checkpoint: a Hugging Face folder whose quantized linears are stored packed
(formats/packed.py says how), written by NativeSink as the engine hands over results, with config.json's
quantization_config = {quant_method: "lowbit", format_version, modules: {p: QuantSpec}, inputs: {p: QuantSpec
of its input activations}, outputs, online_rotations}, the recipe and the source's tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..formats import Quantized
from ..formats.packed import FORMAT_VERSION, pack_linear
from ..model_files import TOKENIZER_FILES, check_carried, copy_carried, read_json
from ..recipe import LayerPlan
from ..results import Sink
from ..spec import QuantSpec
from .output import ShardWriter


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

    def snapshot(self) -> dict:
        """Everything received so far, on disk, and what restore() needs (a resume checkpoint's share)."""
        return {"writer": self.writer.snapshot(),
                "input_specs": {n: s.to_dict() for n, s in self.input_specs.items()},
                "output_specs": {n: s.to_dict() for n, s in self.output_specs.items()}}

    def restore(self, snapshot: dict) -> None:
        self.writer.restore(snapshot["writer"])
        self.input_specs = {n: QuantSpec.from_dict(d) for n, d in snapshot["input_specs"].items()}
        self.output_specs = {n: QuantSpec.from_dict(d) for n, d in snapshot["output_specs"].items()}

    def close(self) -> list[str]:
        return self.writer.close()


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


def compare_folders(a: Path, b: Path) -> dict:
    """How two lowbit folders of the same model and plan differ: quantized codes (each linear's qweight unpacked,
    counting the code slots of its packed rows) and every other tensor (largest absolute difference). For
    checking that two ways of computing one result agree (several processes against one)."""
    from safetensors import safe_open

    from ..formats.packing import _unit, unpack_rows

    specs = {n: QuantSpec.from_dict(d) for n, d in
             read_json(Path(a) / "config.json")["quantization_config"]["modules"].items()}
    out = {"codes": 0, "codes_differing": 0, "tensors": 0, "tensors_differing": 0, "max_abs_difference": 0.0}
    for shard in sorted(Path(a).glob("*.safetensors")):
        with safe_open(shard, "pt") as fa, safe_open(Path(b) / shard.name, "pt") as fb:
            for name in fa.keys():
                x, y = fa.get_tensor(name), fb.get_tensor(name)
                module, _, kind = name.rpartition(".")
                if kind == "qweight" and module in specs:
                    bits = specs[module].bits
                    cols = x.shape[1] // _unit(bits)[1] * _unit(bits)[0]
                    cx, cy = unpack_rows(x, bits, cols), unpack_rows(y, bits, cols)
                    out["codes"] += cx.numel()
                    out["codes_differing"] += int((cx != cy).sum())
                    continue
                out["tensors"] += 1
                if not torch.equal(x, y):
                    out["tensors_differing"] += 1
                    out["max_abs_difference"] = max(out["max_abs_difference"],
                                                    float((x.double() - y.double()).abs().max()))
    return out
