"""Tiny random models of the common families for the family x path matrix (issue #25): hidden 96 (four heads
of 24: onnxruntime's fused rotary in GroupQueryAttention needs a multiple of 16, so lowbit's ONNX export rotates
them with a RotaryEmbedding node first; rows a multiple of 32 as GGUF blocks need),
MLP 160, two layers, each family's own quirks switched on (tied embeddings and llama3 RoPE scaling, fused
projections and partial rotary, `1 + w` norms, sandwich norms, sliding windows, query-key norms, soft-capping,
Granite's multipliers, experts)."""

from __future__ import annotations

HIDDEN = 96
COMMON = dict(hidden_size=HIDDEN, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def family_configs(vocab: int) -> dict:
    """family name -> a transformers config of a tiny model of it."""
    import transformers as tf

    c = dict(COMMON, vocab_size=vocab)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    return {
        "llama": tf.LlamaConfig(**c, tie_word_embeddings=False),
        "llama3.2": tf.LlamaConfig(**c, tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE)),
        "mistral": tf.MistralConfig(**c, sliding_window=None),
        "qwen2": tf.Qwen2Config(**c, tie_word_embeddings=False),
        "qwen3": tf.Qwen3Config(**c, head_dim=24, tie_word_embeddings=True),
        "qwen3_moe": tf.Qwen3MoeConfig(**c, head_dim=24, **moe, decoder_sparse_step=1, mlp_only_layers=[]),
        "mixtral": tf.MixtralConfig(**{**c, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2),
        "phi3": tf.Phi3Config(**c, tie_word_embeddings=False),
        "phi4_mini": tf.Phi3Config(**c, partial_rotary_factor=0.75, tie_word_embeddings=True),
        "gemma": tf.GemmaConfig(**c, head_dim=24),
        "gemma2": tf.Gemma2Config(**c, head_dim=24, sliding_window=64, query_pre_attn_scalar=24),
        "gemma3": tf.Gemma3TextConfig(**c, head_dim=24, sliding_window=64, query_pre_attn_scalar=24),
        "granite": tf.GraniteConfig(**c, embedding_multiplier=12.0, residual_multiplier=0.22,
                                    attention_multiplier=0.0416, logits_scaling=8.0, tie_word_embeddings=True),
        "olmo2": tf.Olmo2Config(**c, tie_word_embeddings=False),
    }


FAMILIES = ["llama", "llama3.2", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "phi3", "phi4_mini", "gemma",
            "gemma2", "gemma3", "granite", "olmo2"]


def make_family(name: str, folder, tokenizer_dir, seed: int = 0):
    """Save a tiny random model of family `name` (with the test tokenizer) to folder; norms and biases random
    too, so an export that drops one shows."""
    from transformers import AutoTokenizer

    from .conftest import save_random_model

    config = family_configs(len(AutoTokenizer.from_pretrained(tokenizer_dir)))[name]
    return save_random_model(config, folder, tokenizer_dir, seed=seed, randomize_1d=True)
