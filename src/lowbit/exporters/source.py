"""A lowbit output folder opened for export: its config, each quantized linear's codes and scales, and the
float tensors, read lazily. Every export format reads through this one class, so none re-parses the layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import Quantized
from ..hf.checkpoint import LazyCheckpoint
from ..model_files import check_carried, copy_carried, read_json
from ..spec import QuantSpec
from ..formats.packed import FORMAT_VERSION, stored_names, unpack_linear
from ..model_files import TOKENIZER_FILES


def read_lowbit_config(src: Path) -> dict:
    """config.json of a lowbit output folder, refusing anything else with the reason."""
    src = Path(src)
    path = src / "config.json"
    if not path.is_file():
        raise LowbitError(f"{src} has no config.json; give a folder written by lowbit quantize")
    check_carried(src)  # config.json and the tokenizer files an export copies lie inside the folder
    config = read_json(path, "model config")
    qconfig = config.get("quantization_config") or {}
    if not isinstance(qconfig, dict) or qconfig.get("quant_method") != "lowbit":
        method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
        raise LowbitError(f"{src} is not a lowbit output (quant_method {method!r}); "
                          f"give a folder written by lowbit quantize")
    if qconfig.get("format_version", 0) > FORMAT_VERSION:
        raise LowbitError(f"{src} uses lowbit format version {qconfig['format_version']}, newer than this lowbit "
                          f"reads ({FORMAT_VERSION}); upgrade lowbit")
    return config


@dataclass
class PlannedModel:
    """What an export checks before any work: the same attributes as LowbitFolder, taken from a quantization
    plan, so `quantize --export` refuses a format that cannot hold the scheme before calibration."""

    config: dict
    modules: dict[str, tuple[QuantSpec, tuple[int, int]]]
    inputs: dict[str, QuantSpec] = field(default_factory=dict)
    outputs: dict[str, QuantSpec] = field(default_factory=dict)
    online_rotations: dict = field(default_factory=dict)


class LowbitFolder:
    """The quantized linears (name -> (spec, (N, K))) and tensors of a lowbit output folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = read_lowbit_config(self.folder)
        self.qconfig = self.config["quantization_config"]
        self.modules: dict[str, tuple[QuantSpec, tuple[int, int]]] = {
            name: (QuantSpec.from_dict(spec), tuple(self.qconfig["shapes"][name]))
            for name, spec in self.qconfig.get("modules", {}).items()}
        self.inputs = {n: QuantSpec.from_dict(s) for n, s in (self.qconfig.get("inputs") or {}).items()}
        self.outputs = {n: QuantSpec.from_dict(s) for n, s in (self.qconfig.get("outputs") or {}).items()}
        self.online_rotations: dict = dict(self.qconfig.get("online_rotations") or {})
        self.ckpt = LazyCheckpoint(self.folder)

    def quantized(self, name: str) -> Quantized:
        """The stored codes (int32 (N, K), in the spec's range), effective scales and zero points of a linear."""
        spec, shape = self.modules[name]
        return unpack_linear({n: self.ckpt.get(f"{name}.{n}") for n in stored_names(spec)}, spec, shape)

    def stored(self, name: str) -> dict[str, torch.Tensor]:
        """The packed tensors of a quantized linear as lowbit stores them (qweight, scales, ...)."""
        spec, _ = self.modules[name]
        return {n: self.ckpt.get(f"{name}.{n}") for n in stored_names(spec)}

    def weight(self, name: str) -> torch.Tensor:
        """A linear's weight as float32 (N, K): dequantized when quantized, else as stored."""
        if name in self.modules:
            return self.quantized(name).dequantize(torch.float32)
        return self.ckpt.get(f"{name}.weight").float()

    def quantized_tensor_names(self) -> set[str]:
        """Checkpoint names that belong to quantized linears (their packed weight, scales, activation scales)."""
        names = set()
        for name, (spec, _) in self.modules.items():
            names.update(f"{name}.{n}" for n in [*stored_names(spec), "input_scale", "output_scale"])
        names.update(f"{n}.output_scale" for n in self.outputs)
        return names

    def float_tensor_names(self) -> list[str]:
        """Every checkpoint tensor that is not part of a quantized linear (norms, embeddings, biases, ...)."""
        skip = self.quantized_tensor_names()
        return [n for n in self.ckpt.keys() if n not in skip]

    def copy_tokenizer(self, dst: Path) -> None:
        copy_carried(self.folder, dst, TOKENIZER_FILES)

    def hf_config(self):
        """The transformers config of the model (quantization_config removed)."""
        from transformers import AutoConfig

        plain = {k: v for k, v in self.config.items() if k != "quantization_config"}
        model_type = plain.pop("model_type", None)
        if not model_type:
            raise LowbitError(f"{self.folder}/config.json has no model_type; restore the file")
        try:
            return AutoConfig.for_model(model_type, **plain)
        except ValueError as exc:
            raise LowbitError(f"{self.folder}/config.json has model_type {model_type!r}, which the installed "
                              f"transformers does not know ({str(exc).splitlines()[0]}); restore the file") from None
