"""llama.cpp's K-quant mixes (`--gguf-type q4_k_m`, ..., and iq4_xs): the GGUF type of each tensor, chosen the way
llama.cpp's quantizer does (llama_tensor_get_type in src/llama-quant.cpp, for the K-quant file types), so that a
lowbit file and one from `llama-quantize` hold the same types and sizes and differ only in their codes.

- Every quantized tensor starts at the mix's base type (Q2_K, Q3_K, Q4_K, Q5_K or Q6_K).
- The output tensor (or, when the output reuses the embedding, the embedding) gets Q6_K; Q8_0 when its rows are
  not whole super-blocks.
- attn_v, ffn_down and attn_output get more bits by the mix's rules; "use more bits" layers are the first and
  last eighth and every third layer between (use_more_bits).
- A tensor whose rows are not a multiple of 256 (SmolLM2's 576, Gemma-3-270M's 640 columns) falls back:
  Q2_K / Q3_K -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when not even 32 divides the row. (The
  llama.cpp that llama-cpp-python 0.3.36 vendors falls back from Q2_K / Q3_K to Q4_0; lowbit re-quantizes to
  IQ4_NL, the same 4.5 bits per weight on a non-uniform grid, and writes GPTQ's exact Q4_0 codes where it has them.)
Left as llama.cpp's quantizer leaves them: 1-D tensors (norms, biases) stay float32.
Not reproduced: the rules for models llama.cpp recognises as 70B (attn_v raised to Q5_K) and for Falcon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as T

from ..errors import LowbitError

SUPER = 256


@dataclass(frozen=True)
class Mix:
    base: T
    file_type: gguf.LlamaFileType


F = gguf.LlamaFileType
MIXES = {
    "q2_k": Mix(T.Q2_K, F.MOSTLY_Q2_K), "q3_k_s": Mix(T.Q3_K, F.MOSTLY_Q3_K_S),
    "q3_k_m": Mix(T.Q3_K, F.MOSTLY_Q3_K_M), "q3_k_l": Mix(T.Q3_K, F.MOSTLY_Q3_K_L),
    "q4_k_s": Mix(T.Q4_K, F.MOSTLY_Q4_K_S), "q4_k_m": Mix(T.Q4_K, F.MOSTLY_Q4_K_M),
    "q5_k_s": Mix(T.Q5_K, F.MOSTLY_Q5_K_S), "q5_k_m": Mix(T.Q5_K, F.MOSTLY_Q5_K_M),
    "q6_k": Mix(T.Q6_K, F.MOSTLY_Q6_K), "iq4_xs": Mix(T.IQ4_XS, F.MOSTLY_IQ4_XS),
}
FALLBACK = {T.Q2_K: T.IQ4_NL, T.Q3_K: T.IQ4_NL, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    n_gqa: int  # attention heads per key/value head
    n_expert: int = 0
    tied_output: bool = True  # no separate output tensor: the embedding takes the output's type


def mix_types(mix_name: str, tensors: dict[str, int], shape: ModelShape, imatrix: bool = False) -> dict[str, T]:
    """GGUF name -> type for every quantized 2-D tensor (tensors: GGUF name -> row length), by the mix's rules
    and the fallbacks for rows that are not whole super-blocks; imatrix: an importance matrix is used (IQ4_XS then
    keeps the first eighth of ffn_down at its base type, as llama.cpp does)."""
    mix = MIXES.get(mix_name)
    if mix is None:
        raise LowbitError(f"unknown K-quant mix {mix_name!r}; use one of {', '.join(MIXES)}")
    out = {}
    for name, cols in tensors.items():
        qtype = _output_type(mix, cols) if _is_output(name, shape) else \
            _iq4_xs_rule(name, shape, imatrix) if mix_name == "iq4_xs" else _rule(mix_name, mix.base, name, shape)
        out[name] = fallback(qtype, cols)
    return out


def fallback(qtype: T, cols: int) -> T:
    """llama.cpp's type for a row length the K-type cannot hold (its blocks are 256 wide)."""
    if qtype in FALLBACK and cols % SUPER:
        qtype = FALLBACK[qtype]
    return T.F16 if cols % gguf.GGML_QUANT_SIZES[qtype][0] else qtype


def _is_output(name: str, shape: ModelShape) -> bool:
    return name == "output.weight" or (shape.tied_output and name == "token_embd.weight")


def _output_type(mix: Mix, cols: int) -> T:
    return T.Q8_0 if cols % SUPER else T.Q6_K


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _rule(mix: str, base: T, name: str, shape: ModelShape) -> T:
    i, n = _layer(name), shape.n_layers
    if "attn_v.weight" in name:
        return _attn_v(mix, base, i, n, shape)
    if "attn_k.weight" in name:
        return T.Q8_0 if shape.n_expert == 8 else base
    if "ffn_down" in name:
        return _ffn_down(mix, base, i, n)
    if "attn_output.weight" in name:
        return _attn_output(mix, base, shape)
    if "attn_qkv.weight" in name:
        return {"q3_k_m": T.Q4_K, "q3_k_l": T.Q4_K, "q4_k_m": T.Q5_K, "q5_k_m": T.Q6_K}.get(mix, base)
    return base


def _iq4_xs_rule(name: str, shape: ModelShape, imatrix: bool) -> T:
    """IQ4_XS files: attn_v Q5_K with 4 or more heads per KV head; ffn_down Q5_K in the first eighth of the
    layers when no importance matrix is used; attn_output Q5_K with 8 experts."""
    i, n = _layer(name), shape.n_layers
    if "attn_v.weight" in name:
        return T.Q8_0 if shape.n_expert == 8 else T.Q5_K if shape.n_gqa >= 4 else T.IQ4_XS
    if "attn_k.weight" in name and shape.n_expert == 8:
        return T.Q8_0
    if "ffn_down" in name and i < n // 8 and not imatrix:
        return T.Q5_K
    if "attn_output.weight" in name and shape.n_expert == 8:
        return T.Q5_K
    return T.IQ4_XS


def _attn_v(mix: str, base: T, i: int, n: int, shape: ModelShape) -> T:
    if shape.n_expert == 8:
        return T.Q8_0
    if mix == "q2_k":
        return T.Q4_K if shape.n_gqa >= 4 else T.Q3_K
    if mix == "q3_k_m":
        return T.Q5_K if i < 2 else T.Q4_K
    if mix == "q3_k_l":
        return T.Q5_K
    if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return T.Q6_K
    if mix == "q4_k_s" and i < 4:
        return T.Q5_K
    return base


def _ffn_down(mix: str, base: T, i: int, n: int) -> T:
    if mix == "q2_k":
        return T.Q3_K
    if mix == "q3_k_m":
        return T.Q5_K if i < n // 16 else T.Q4_K
    if mix == "q3_k_l":
        return T.Q5_K
    if mix in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
        return T.Q6_K
    if mix == "q4_k_s" and i < n // 8:
        return T.Q5_K
    return base


def _attn_output(mix: str, base: T, shape: ModelShape) -> T:
    if shape.n_expert == 8:
        return T.Q5_K if mix in ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m") else base
    return {"q2_k": T.Q3_K, "q3_k_m": T.Q4_K, "q3_k_l": T.Q5_K}.get(mix, base)
