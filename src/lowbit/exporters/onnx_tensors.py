"""The tensors of lowbit's ONNX export: MatMulNBits weights from lowbit's integer codes, a block-quantized
embedding table for GatherBlockQuantized, the RoPE caches (LongRoPE's two, chosen by an If), and the
external-data file the initializers are streamed into (layouts in FORMATS.md 1.1 and 1.3).

MatMulNBits computes Y = A @ W with W[k, n] = (q[n, k] - zp[n, k // block]) * scale[n, k // block], q packed
LSB-first along K per block, zp 2^(bits-1) when absent. A lowbit spec maps onto it exactly:
- codes: q = code - qmin, lowbit's stored form (native.py), whose packed rows already are B's bytes; a
  symmetric spec's implied zero point is then 2^(bits-1), the kernel's default, so no zero-point input; an
  asymmetric one gets its zero points packed the same way;
- per group of g: block = the largest power of two dividing g (g itself when g is a power of two) with each
  group's scale repeated over its blocks, so groups of 48 or 96 export too; a partial last group stays a
  partial last block, whose padding the kernel ignores (FORMATS.md 1.1);
- per channel / per tensor: the scale repeated over blocks of the largest power of two <= 256 dividing K,
  or, when K has no such divisor >= 16, one block of the next power of two >= K with the tail as padding
  (checked: the kernel ignores padding codes, even random ones). Fewer, longer blocks decode faster (eight
  K=1536, N=576 MatMulNBits on one token at accuracy level 4, one core: 0.30 ms in blocks of 128, 0.45 ms in
  blocks of 32).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from ..formats import compute_qparams, pack_rows, quantize_codes
from ..spec import QuantSpec

MATMUL_BITS = (2, 4, 8)  # what the CPU MatMulNBits kernel runs (FORMATS.md 1.1)
MIN_BLOCK = 16
MAX_REPEATED_BLOCK = 256  # per-channel / per-tensor scales are repeated over blocks of at most this length


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def matmul_block_size(spec: QuantSpec, in_features: int) -> int | None:
    """The MatMulNBits block length that expresses `spec` exactly on `in_features` columns, or None."""
    if spec.granularity == "group":
        block = spec.group_size & -spec.group_size  # largest power of two dividing the group size
        return block if block >= MIN_BLOCK else None
    block = min(in_features & -in_features, MAX_REPEATED_BLOCK)
    return block if block >= MIN_BLOCK else max(MIN_BLOCK, _next_pow2(in_features))


def _per_block(values: torch.Tensor, spec: QuantSpec, shape: tuple[int, int], block: int) -> torch.Tensor:
    """lowbit's per-block parameters (scales or zero points) repeated onto MatMulNBits' (N, k_blocks) grid."""
    rows, cols = shape
    k_blocks = math.ceil(cols / block)
    span = spec.group_size if spec.granularity == "group" else cols  # columns one lowbit parameter covers
    idx = torch.arange(k_blocks) * block // span
    return values[:, idx].expand(rows, k_blocks)


def matmul_nbits_tensors(stored: dict[str, torch.Tensor], spec: QuantSpec, shape: tuple[int, int],
                         block: int) -> dict[str, np.ndarray]:
    """B uint8 (N, k_blocks, block * bits / 8), scales float32 (N, k_blocks) and, for asymmetric specs,
    zero_points uint8 (N, ceil(k_blocks * bits / 8)) of one linear, from lowbit's packed tensors. lowbit's
    qweight rows already are code - qmin packed LSB-first along K with zero padding, i.e. MatMulNBits' B
    bytes: they only gain padding bytes up to whole blocks, and nothing is unpacked."""
    rows, cols = shape
    k_blocks = math.ceil(cols / block)
    blob = block * spec.bits // 8
    qweight = stored["qweight"]
    packed = torch.nn.functional.pad(qweight, (0, k_blocks * blob - qweight.shape[1]))
    out = {"B": packed.reshape(rows, k_blocks, blob).numpy(),
           "scales": _per_block(stored["scales"].float(), spec, shape, block).contiguous().numpy()}
    if not spec.symmetric:
        zero = _per_block(stored["qzeros"].to(torch.int32), spec, shape, block)  # zero point - qmin
        out["zero_points"] = pack_rows(zero.contiguous(), spec.bits).numpy()
    return out


def quantize_table(table: torch.Tensor, bits: int, block: int) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """RTN of an embedding table (V, D) in blocks of `block` along D (asymmetric, unsigned codes) as
    GatherBlockQuantized's uint8 layout: data (V, D * bits / 8) and zero points packed LSB-first along the last
    axis, scales float32 (V, ceil(D / block)). Also returns the dequantized table, for checks."""
    spec = QuantSpec(kind="int", bits=bits, signed=False, symmetric=False, granularity="group", group_size=block)
    w = table.float()
    scale, zero = compute_qparams(w, spec)
    codes = quantize_codes(w, scale, zero, spec)
    tensors = {"data": pack_rows(codes, bits).numpy(), "scales": scale.contiguous().numpy(),
               "zero_points": pack_rows(zero, bits).numpy()}
    cols = torch.arange(w.shape[1]) // block
    dequant = (codes - zero[:, cols]).float() * scale[:, cols]
    return tensors, dequant


def rope_caches(hf_config, length: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cache name ("default", or Gemma-3's layer types) -> cos and sin (length, rotary_dim / 2) float32 for
    positions 0..length-1, computed as the model's own rotary embedding does (inv_freq from transformers, so
    llama3 / linear / yarn scaling and partial rotary come out right; the attention scaling of yarn and
    LongRoPE multiplies both). LongRoPE: "default" with the short factors and "default.long" with the long ones
    (select_rope_cache chooses between them in the graph)."""
    import importlib

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    module = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hf_config.model_type]).__module__
    module = importlib.import_module(module)
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding"))
    rotary = cls(hf_config)
    kinds = {"default": ("inv_freq", "attention_scaling")} if hasattr(rotary, "inv_freq") else \
        {t: (f"{t}_inv_freq", f"{t}_attention_scaling") for t in rotary.layer_types}
    inv_freqs = {kind: (getattr(rotary, freq).float(), getattr(rotary, scaling))
                 for kind, (freq, scaling) in kinds.items()}
    if getattr(rotary, "rope_type", None) == "longrope":  # inv_freq holds the short factors' frequencies
        inv_freqs["default.long"] = (_longrope_inv_freq(hf_config), rotary.attention_scaling)
    caches = {}
    for kind, (inv_freq, scale) in inv_freqs.items():
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]
        caches[kind] = ((freqs.cos() * scale).numpy().astype(np.float32),
                        (freqs.sin() * scale).numpy().astype(np.float32))
    return caches


def _longrope_inv_freq(hf_config) -> torch.Tensor:
    """LongRoPE's frequencies with the long factors, as transformers computes them past the original context."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original = hf_config.rope_parameters["original_max_position_embeddings"]
    return ROPE_INIT_FUNCTIONS["longrope"](hf_config, "cpu", seq_len=original + 1)[0].float()


def select_rope_cache(g, total: str, original: int, short: tuple[str, str], long: tuple[str, str]) -> tuple[str, str]:
    """LongRoPE's (cos, sin) caches chosen at run time as onnxruntime-genai's builder chooses them: an If on the
    total sequence length (past + current tokens, int32) > original (original_max_position_embeddings) passing
    the long caches' initializers through, else the short ones'. g: the graph being built (onnx_graph.Graph)."""
    path = "/model/rotemb_caches_subgraph"
    condition = g.op("Greater", [total, g.const("rope_original_context", np.array(original, dtype=np.int32))],
                     f"{path}/Greater")

    def branch(name: str, caches: tuple[str, str]) -> onnx.GraphProto:
        outs = [f"{path}/{name}/{c}" for c in caches]
        nodes = [onnx.helper.make_node("Identity", [c], [o], name=f"{o}/Identity") for c, o in zip(caches, outs)]
        return onnx.helper.make_graph(nodes, f"{name}_rotemb_caches", [],
                                      [onnx.helper.make_tensor_value_info(o, g.float_type, None) for o in outs])
    cos, sin = g.op("If", [condition], f"{path}/If", ["cos_cache", "sin_cache"],
                    then_branch=branch("long", long), else_branch=branch("short", short))
    return cos, sin


def kronecker_split(rotation, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(L, R) with x Q = vec(L^T X R) for X = x reshaped (n / m, m), when the online rotation Q is a Kronecker
    product (every Hadamard lowbit builds is); None otherwise. Applying Q so costs n * (n / m + m) multiply-adds
    instead of n^2 (1536 wide: 0.02 ms instead of 0.2 ms per token on one core). Q is read through
    rotation.right() only, never formed, and the split is checked on random vectors before it is used."""
    divisors = sorted((m for m in range(2, n // 2 + 1) if n % m == 0), key=lambda m: abs(m - math.sqrt(n)))
    probe = torch.randn(4, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = rotation.right(probe)
    for m in divisors[:8]:
        rows = rotation.right(_unit_rows(torch.arange(m), n))  # Q[:m, :]
        if rows[0, 0] == 0:
            continue
        right = rows[:, :m] / rows[0, 0]
        left = rotation.right(_unit_rows(torch.arange(0, n, m), n))[:, ::m]  # Q[i m, j m]
        got = (left.T @ probe.reshape(4, n // m, m) @ right).reshape(4, n)
        if torch.allclose(got, reference, atol=1e-9):
            return left.numpy(), right.numpy()
    return None


def _unit_rows(indices: torch.Tensor, n: int) -> torch.Tensor:
    """Rows `indices` of the n x n identity (float64), without forming it."""
    rows = torch.zeros(len(indices), n, dtype=torch.float64)
    rows[torch.arange(len(indices)), indices] = 1
    return rows


class ExternalData:
    """Initializers streamed into one external-data file as they are made, so the model is never held whole
    in memory and the protobuf stays far under its 2 GB limit; tensors under INLINE bytes stay in the
    protobuf. Offsets are aligned to ALIGN so onnxruntime can map the file."""

    INLINE = 1024
    ALIGN = 4096

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array)
        if array.nbytes < self.INLINE:
            return numpy_helper.from_array(array, name)
        pad = -self.offset % self.ALIGN
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(array.tobytes())
        proto = TensorProto(name=name, dims=list(array.shape),
                            data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            proto.external_data.add(key=key, value=str(value))
        proto.data_location = TensorProto.EXTERNAL
        self.offset += array.nbytes
        return proto

    def close(self) -> None:
        self.file.close()
