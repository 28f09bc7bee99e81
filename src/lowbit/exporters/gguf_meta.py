"""llama.cpp's hyperparameter metadata (FORMATS.md 4.2) from a Hugging Face config: sizes, heads, norm epsilon,
RoPE base and scaling (linear and YaRN as keys; Llama 3.1's as a rope_freqs tensor of per-frequency divisors;
Phi-3's LongRoPE as rope_factors_long / rope_factors_short tensors with its attention factor and original context
as keys). RoPE scalings GGUF has no form for are refused.

LongRoPE: transformers divides each frequency by the short factors while the sequence (the largest position + 1)
is at most original_max_position_embeddings, by the long ones beyond, and multiplies cos / sin by
sqrt(1 + ln(max / original) / ln(original)) either way. llama.cpp chooses by the context it is opened with
(n_ctx per sequence > rope.scaling.original_context_length: long factors for every token), not by the sequence:
a context of at most the original length computes what transformers does, a longer one does so only for sequences
longer than the original length."""

from __future__ import annotations

import math

import gguf
import numpy as np

from ..errors import LowbitError
from .gguf_archs import add_arch_hparams


def add_hparams(writer: gguf.GGUFWriter, c: dict) -> None:
    """The {arch}.* keys llama.cpp reads (gguf_archs.add_arch_hparams: those of one model type)."""
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(c.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(c.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(n_vocab(c))
    writer.add_rope_dimension_count(int(head_dim * partial_rotary(c)))
    if head_dim != c["hidden_size"] // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, scaling = rope(c)
    writer.add_rope_freq_base(theta)
    if scaling.get("rope_type") in ("linear", "yarn"):
        yarn = scaling["rope_type"] == "yarn"
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN if yarn else gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        if yarn:
            writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings")
                                                     or c["max_position_embeddings"] / scaling["factor"]))
    if scaling.get("rope_type") == "longrope":  # no scaling type: llama.cpp's default, no frequency scale
        writer.add_rope_scaling_attn_factors(longrope_attn_factor(c, scaling))
        writer.add_rope_scaling_orig_ctx_len(longrope_original(c, scaling))
    add_arch_hparams(writer, c)


def partial_rotary(config: dict) -> float:
    """The fraction of each head RoPE rotates (Phi-4-mini: 0.75); llama.cpp's rope dimension count."""
    params = config.get("rope_parameters") or {}
    return float(config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)


def rope(config: dict) -> tuple[float, dict]:
    """(rope theta, rope scaling parameters or {}), refusing scalings llama.cpp's GGUF cannot express."""
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)  # Gemma-3: the global layers' (local ones: rope.freq_base_swa)
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if config.get("model_type") == "phi3" and kind in ("su", "yarn"):  # Phi3Config reads both as longrope
        kind = "longrope"
    if kind not in ("default", "linear", "yarn", "llama3", "longrope"):
        raise LowbitError(f"RoPE scaling {kind!r} has no GGUF form this export writes (default, linear, yarn, "
                          f"llama3, longrope); export to compressed-tensors instead")
    if kind == "llama3" and config.get("model_type") not in ("llama", "mistral"):
        raise LowbitError("llama3 RoPE scaling is written for llama models only; export to compressed-tensors")
    if kind == "longrope" and config.get("model_type") != "phi3":
        raise LowbitError("longrope RoPE scaling is written for phi3 models only (llama.cpp's rope_factors_long / "
                          "rope_factors_short); export to compressed-tensors")
    return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


def rope_tensors(config: dict) -> dict[str, np.ndarray]:
    """The RoPE factor tensors of the file (float32): Llama 3.1's rope_freqs, Phi-3's LongRoPE rope_factors_long
    and rope_factors_short (one of each for all layers, rotary_dim / 2 each); {} for other scalings."""
    theta, scaling = rope(config)
    if scaling.get("rope_type") == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config, theta, scaling)}
    if scaling.get("rope_type") != "longrope":
        return {}
    longrope_original(config, scaling)  # refused now if missing
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    half = int(head_dim * partial_rotary(config)) // 2
    out = {}
    for kind in ("long", "short"):
        factors = np.asarray(scaling.get(f"{kind}_factor") or [], dtype=np.float32)
        if factors.shape != (half,):
            raise LowbitError(f"longrope {kind}_factor has {factors.size} entries, not rotary_dim / 2 = {half}; the "
                              f"config is not one transformers runs")
        out[f"rope_factors_{kind}.weight"] = factors
    return out


def longrope_original(config: dict, scaling: dict) -> int:
    """The context LongRoPE's short factors serve (original_max_position_embeddings)."""
    original = scaling.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    if not original:
        raise LowbitError("longrope RoPE scaling without original_max_position_embeddings; the config is not one "
                          "transformers runs")
    return int(original)


def longrope_attn_factor(config: dict, scaling: dict) -> float:
    """LongRoPE's cos / sin multiplier as transformers computes it (_compute_longrope_parameters): attention_factor
    if given, else sqrt(1 + ln(factor) / ln(original)) with factor = max / original context unless given."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = longrope_original(config, scaling)
    factor = scaling.get("factor") or config["max_position_embeddings"] / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def llama3_rope_factors(config: dict, theta: float, scaling: dict) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE divisors as llama.cpp's rope_freqs tensor (head_dim / 2 float32)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = scaling["factor"], scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < old_context / high, 1.0, np.where(wavelen > old_context / low, factor, divisor))
    return divisor.astype(np.float32)


def config_warnings(config: dict) -> list[str]:
    """What llama.cpp computes differently from transformers for this config."""
    window = config.get("sliding_window")
    model_type = config.get("model_type")
    use = model_type == "phi3" or config.get("use_sliding_window", model_type in ("mistral", "mixtral"))
    if model_type not in ("gemma2", "gemma3_text") and use and window and \
            window < config.get("max_position_embeddings", 0):
        return [f"the model attends over a sliding window of {window} tokens, which llama.cpp's "
                f"{config['model_type']} architecture ignores: outputs differ past {window} tokens of context"]
    return []


def n_vocab(config: dict) -> int:
    return int(config["vocab_size"])
