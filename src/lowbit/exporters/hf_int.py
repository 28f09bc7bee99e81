"""Integer Hugging Face checkpoints that other tools load: AutoAWQ "GEMM" and GPTQ (v1) layouts.

Why: onnxruntime-genai's model builder (`-p int4`), vLLM, transformers and llama.cpp's converters take these
layouts as pre-quantized input; writing them lets a lowbit AWQ/GPTQ result reach those runtimes as it is.
The stored integer codes and zero points move unchanged; only the scales are stored as float16 (both formats
say so), which is the one rounding (relative 2^-11 of a scale at most). Float tensors are copied as stored.

AutoAWQ GEMM (per linear, weight (N, K), group G; FORMATS.md 3.1):
  qweight int32 (K, N/8): 8 four-bit codes along N per word, word c slot i = column 8c + ORDER[i];
  qzeros  int32 (K/G, N/8), same packing; scales float16 (K/G, N). 4 bits, one group size for every layer.
GPTQ v1 (FORMATS.md 3.2): qweight int32 (K*b/32, N) packed along K; qzeros int32 (K/G, N*b/32) packed along
  N holding zero - 1 (the v1 offset; checkpoint_format "gptq"); scales float16 (K/G, N); g_idx int32 (K,)
  = k // G. Bits 2, 4, 8; per channel is group_size -1; other layers' bits / group sizes go in "dynamic".
Unsigned codes are stored: a signed spec's codes are shifted by 2^(b-1), with the same zero point (exact).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from ..arch.moe import checkpoint_name
from ..formats import Quantized
from ..formats.packing import AWQ_ORDER, pack_int32, unpack_int32  # noqa: F401 - re-exported
from ..spec import QuantSpec
from ..staging import check_output, staged
from .declared import check_layers
from .output import ShardWriter
from .source import LowbitFolder



def unsigned_codes(qt: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [0, 2^b - 1] and zero points per group (N, groups), the dequantized weight unchanged."""
    spec = qt.spec
    offset = 1 << (spec.bits - 1) if spec.signed else 0
    if qt.zero is not None:
        zero = qt.zero.to(torch.int32) + offset
    else:  # symmetric: 2^(b-1) either way (signed codes shifted by it, unsigned ones centred on it)
        zero = torch.full((qt.codes.shape[0], qt.scale.shape[1]), 1 << (spec.bits - 1), dtype=torch.int32)
    return qt.codes.to(torch.int32) + offset, zero.expand(qt.codes.shape[0], -1)


# -- what each layout can hold ------------------------------------------------------------------------

def _group(spec: QuantSpec) -> int:
    """The group size along K, or -1 for one group per row (channel / tensor)."""
    return spec.group_size if spec.granularity == "group" else -1


def check_awq(model) -> list[str]:
    """Refuse (LowbitError) what AutoAWQ's GEMM layout cannot hold (declared.CAPABILITIES["awq"]); no warnings."""
    check_layers("awq", model)
    return []


def check_gptq(model) -> list[str]:
    """Refuse (LowbitError) what the GPTQ v1 layout (as AutoGPTQ / GPTQModel / the builder read it) cannot hold
    (declared.CAPABILITIES["gptq"]); no warnings."""
    check_layers("gptq", model)
    return []


# -- conversion ---------------------------------------------------------------------------------------

def awq_tensors(qt: Quantized) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales of one linear in the AutoAWQ GEMM layout."""
    codes, zero = unsigned_codes(qt)
    return {"qweight": pack_int32(codes.T.contiguous(), 4, AWQ_ORDER),
            "qzeros": pack_int32(zero.T.contiguous(), 4, AWQ_ORDER),
            "scales": qt.scale.T.to(torch.float16).contiguous()}


def gptq_tensors(qt: Quantized) -> dict[str, torch.Tensor]:
    """qweight, qzeros (v1: zero - 1), scales, g_idx of one linear in the GPTQ layout."""
    bits = qt.spec.bits
    codes, zero = unsigned_codes(qt)
    n, k = codes.shape
    group = qt.spec.group_size if qt.spec.granularity == "group" else k
    scale = qt.scale.float().expand(n, zero.shape[1])
    stored_zero = (zero - 1) & ((1 << bits) - 1)
    return {"qweight": pack_int32(codes, bits).T.contiguous(),
            "qzeros": pack_int32(stored_zero.T.contiguous(), bits),
            "scales": scale.T.to(torch.float16).contiguous(),
            "g_idx": (torch.arange(k, dtype=torch.int32) // group)}


def _awq_config(folder: LowbitFolder) -> dict:
    spec = next(iter(folder.modules.values()))[0]
    return {"quant_method": "awq", "bits": 4, "group_size": spec.group_size, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": list(folder.qconfig.get("ignore", [])) or None}


def _gptq_config(folder: LowbitFolder) -> dict:
    """The GPTQ quantization_config: the most common (bits, group, sym) globally, the rest in "dynamic"."""
    def key(spec):
        return spec.bits, _group(spec), spec.symmetric

    counts = Counter(key(spec) for spec, _ in folder.modules.values())
    bits, group, sym = counts.most_common(1)[0][0]
    dynamic = {}
    for name, (spec, _) in folder.modules.items():
        b, g, _ = key(spec)
        if (b, g) != (bits, group):
            name = checkpoint_name(name, folder.config.get("model_type"))
            dynamic[f"+:{re.escape(name)}(\\.|$)"] = {"bits": b, "group_size": g}
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": False,
            "static_groups": False, "true_sequential": True, "damp_percent": 0.01, "checkpoint_format": "gptq",
            "dynamic": dynamic or None, "modules_to_not_convert": list(folder.qconfig.get("ignore", [])) or None}


LAYOUTS = {"awq": (check_awq, awq_tensors, _awq_config), "gptq": (check_gptq, gptq_tensors, _gptq_config)}


def export_awq(src: Path, out: Path, overwrite: bool = False) -> Path:
    """The lowbit folder `src` as an AutoAWQ GEMM folder `out`."""
    return export_hf_int(src, out, "awq", overwrite)


def export_gptq(src: Path, out: Path, overwrite: bool = False) -> Path:
    """The lowbit folder `src` as a GPTQ (v1) folder `out`."""
    return export_hf_int(src, out, "gptq", overwrite)


def export_hf_int(src: Path, out: Path, fmt: str, overwrite: bool = False) -> Path:
    """Write the lowbit folder `src` as an AutoAWQ ("awq") or GPTQ ("gptq") folder `out`, checked first."""
    check, convert, make_config = LAYOUTS[fmt]
    src, out = Path(src), Path(out)
    folder = LowbitFolder(src)
    check_output(out, overwrite, [src])
    check(folder)
    with staged(out, overwrite, [src]) as tmp:
        writer = ShardWriter(tmp)
        model_type = folder.config.get("model_type")
        for name in folder.float_tensor_names():
            writer.add(checkpoint_name(name, model_type), folder.ckpt.get(name))
        for name in folder.modules:
            for suffix, tensor in convert(folder.quantized(name)).items():
                writer.add(f"{checkpoint_name(name, model_type)}.{suffix}", tensor)
        writer.close()
        config = {k: v for k, v in folder.config.items() if k != "quantization_config"}
        config["quantization_config"] = make_config(folder)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        folder.copy_tokenizer(tmp)
    return out
