"""Folders in other tools' packed integer layouts, read as float weights: AutoAWQ's GEMM layout and GPTQ (v1, and
GPTQModel's checkpoint_format "gptq_v2"), FORMATS.md 3.1 / 3.2. Each linear's qweight / qzeros / scales (/ g_idx)
is dequantized as the layout's consumers compute it, `(q - z) * s` per group, when `<name>.weight` is read; every
other tensor is read as stored. So `lowbit eval`, `generate`, `chat`, `inspect` and `export -f gguf --gguf-type`
take AutoAWQ and GPTQ folders (lowbit's exports or another tool's), and `quantize` can start from one.
"""

from __future__ import annotations

import torch

from ..errors import LowbitError
from ..formats.packing import AWQ_ORDER, unpack_int32

PACKED_METHODS = ("awq", "gptq")
_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def _layout(qconfig: dict, folder) -> tuple[str, int, int, bool]:
    """(method, bits, group size or -1, zeros stored minus one) of a quantization_config, refused in one line
    where this reader does not know the layout."""
    method = qconfig.get("quant_method")
    bits = qconfig.get("bits", qconfig.get("w_bit"))
    group = qconfig.get("group_size", qconfig.get("q_group_size"))
    if not isinstance(bits, int) or not isinstance(group, int) or group == 0 or group < -1:
        raise LowbitError(f"{folder}/config.json: quantization_config ({method}) has no whole bits and group_size; "
                          f"restore the file")
    if method == "awq":
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm" or bits != 4:
            raise LowbitError(f"{folder} is AutoAWQ {version} {bits}-bit; lowbit reads the 4-bit GEMM layout only")
        return method, bits, group, False
    checkpoint = str(qconfig.get("checkpoint_format", "gptq")).lower()
    if bits not in (2, 4, 8) or checkpoint not in ("gptq", "gptq_v2"):
        raise LowbitError(f"{folder} is GPTQ {bits}-bit ({checkpoint}); lowbit reads 2/4/8-bit gptq and gptq_v2 "
                          f"checkpoints")
    return method, bits, group, checkpoint == "gptq"


class PackedIntCheckpoint:
    """The LazyCheckpoint interface over an AutoAWQ / GPTQ folder: `<linear>.weight` for each packed linear (its
    parts hidden), the other tensors as stored."""

    def __init__(self, ckpt, qconfig: dict, folder):
        self.ckpt, self.folder = ckpt, folder
        self.method, self.bits, self.group, self.v1 = _layout(qconfig, folder)
        packed = [k[: -len(".qweight")] for k in ckpt.keys() if k.endswith(".qweight")]
        for name in packed:
            missing = [p for p in ("qzeros", "scales") if f"{name}.{p}" not in ckpt]
            if missing:
                raise LowbitError(f"{folder}: {name} has a qweight but no {missing[0]}; the folder is incomplete")
        self._packed = set(packed)
        self.weight_map = {k: v for k, v in ckpt.weight_map.items() if k.rsplit(".", 1)[-1] not in _PARTS}
        self.weight_map.update({f"{name}.weight": ckpt.weight_map[f"{name}.qweight"] for name in packed})

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self):
        return self.weight_map.keys()

    def get(self, name: str) -> torch.Tensor:
        linear = name[: -len(".weight")] if name.endswith(".weight") else None
        if linear not in self._packed:
            return self.ckpt.get(name)
        try:
            return self._dequantize(linear)
        except (RuntimeError, ValueError, IndexError) as exc:
            raise LowbitError(f"cannot dequantize {linear} of {self.folder} ({exc}); its qweight, qzeros and scales "
                              f"do not fit the {self.method} layout of config.json") from None

    def _dequantize(self, name: str) -> torch.Tensor:
        """The float weight (out, in) of one packed linear, in float32."""
        q, z, s = (self.ckpt.get(f"{name}.{p}") for p in ("qweight", "qzeros", "scales"))
        s = s.float()
        mask = (1 << self.bits) - 1
        if self.method == "awq":
            q, z = unpack_int32(q, 4, AWQ_ORDER), unpack_int32(z, 4, AWQ_ORDER)  # (in, out), (groups, out)
        else:
            q = unpack_int32(q.T.contiguous(), self.bits).T  # packed along in: (in, out)
            z = unpack_int32(z, self.bits)[:, : s.shape[1]]
            z = (z + 1) & mask if self.v1 else z  # v1 stores zero - 1
        rows = q.shape[0]
        if f"{name}.g_idx" in self.ckpt:
            index = self.ckpt.get(f"{name}.g_idx").long()
        else:
            index = torch.arange(rows) // (rows if self.group == -1 else self.group)
        w = (q.float() - z[index].float()) * s[index]
        return w.T.contiguous()

    def dtype(self) -> torch.dtype:
        return self.ckpt.dtype()

    def size_bytes(self) -> int:
        return self.ckpt.size_bytes()

    def stored_as(self) -> str:
        """What the folder stores, for the evaluation line."""
        layout = "AutoAWQ GEMM" if self.method == "awq" else "GPTQ" + ("" if self.v1 else " v2")
        group = "per channel" if self.group == -1 else f"group {self.group}"
        return f"{layout} {self.bits}-bit, {group}"
