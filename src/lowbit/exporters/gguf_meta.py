"""llama.cpp's hyperparameter metadata (FORMATS.md 4.2) from a Hugging Face config: sizes, heads, norm epsilon,
RoPE base and scaling (linear and YaRN as keys; Llama 3.1's as a rope_freqs tensor of per-frequency divisors).
RoPE scalings GGUF has no form for are refused."""

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
    if kind not in ("default", "linear", "yarn", "llama3"):
        raise LowbitError(f"RoPE scaling {kind!r} has no GGUF form this export writes (default, linear, yarn, "
                          f"llama3); export to compressed-tensors instead")
    if kind == "llama3" and config.get("model_type") not in ("llama", "mistral"):
        raise LowbitError("llama3 RoPE scaling is written for llama models only; export to compressed-tensors")
    return float(theta), ({} if kind == "default" else {**scaling, "rope_type": kind})


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
