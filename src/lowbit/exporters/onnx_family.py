"""What the ONNX export writes per model family, read from config.json: the decoder's sizes and each family's
quirks (DecoderShape), and the refusals of what the graph cannot hold (check_architecture).

Families and how the graph holds them (onnx_decoder.py):
- Llama (llama3 RoPE scaling too: the scaled frequencies are in the cos/sin caches), Mistral, Qwen2, Qwen3
  (per-head q/k RMSNorm), Granite (embedding, residual and attention multipliers, logits divided);
- Phi-3 / Phi-4-mini: fused qkv_proj (one linear whose output is GroupQueryAttention's packed q|k|v) and
  gate_up_proj (split in two); partial rotary as cos/sin caches narrower than the head (GroupQueryAttention
  rotates the first 2 * cache width dimensions and passes the rest through); LongRoPE (Phi-3.5-mini,
  Phi-4-mini, Phi-3-*-128k) as two cache sets, the long one chosen by an If when past + current tokens exceed
  original_max_position_embeddings, as onnxruntime-genai's builder does (onnx_tensors.select_rope_cache);
- Gemma, Gemma-2, Gemma-3 (text): `1 + w` RMSNorm gains folded into the stored gains, the embedding times
  sqrt(hidden), tanh-GELU MLPs; Gemma-2/3 sandwich norms, sliding-window layers (GroupQueryAttention's
  local_window_size), attention logit soft-capping (its softcap attribute), final logit soft-capping, the
  query_pre_attn_scalar attention scale; Gemma-3 per-head q/k norms and a second cos/sin cache for its local
  layers (rope_local_base_freq);
- OLMo-2: no norm before attention / MLP, RMSNorm after each (before the residual add), q/k RMSNorm over the
  whole projection width.
- Mixtral, Qwen3-MoE: each sparse layer's router and experts as one QMoE (4-bit experts) or MoE node
  (onnx_moe.py); Qwen3-MoE's mlp_only_layers keep dense MLPs. Other mixture-of-experts models are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import LowbitError

# model_type -> (q/k norm: "" none, "head" per head, "full" over the projection; RMSNorm gain offset)
FAMILIES = {"llama": ("", 0.0), "mistral": ("", 0.0), "qwen2": ("", 0.0), "qwen3": ("head", 0.0),
            "phi3": ("", 0.0), "granite": ("", 0.0), "olmo2": ("full", 0.0), "gemma": ("", 1.0),
            "gemma2": ("", 1.0), "gemma3_text": ("head", 1.0), "mixtral": ("", 0.0), "qwen3_moe": ("head", 0.0)}
FAMILY_NAMES = ("Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, OLMo-2, Gemma, Gemma-2, Gemma-3 (text), Mixtral and "
                "Qwen3-MoE")
MOE_FAMILIES = ("mixtral", "qwen3_moe")  # experts as QMoE / MoE nodes (onnx_moe.py)
# the norms of a layer: (before attention, after attention, before the MLP, after the MLP); "" none
PRE_NORMS = ("input_layernorm", "", "post_attention_layernorm", "")
SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm")
POST_NORMS = ("", "post_attention_layernorm", "", "post_feedforward_layernorm")
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}
POSITION_DEPENDENT_ROPE = ("dynamic",)  # LongRoPE's two factor sets: two caches and an If (rope_original)
# onnxruntime-genai's model types; else the architecture's lower-cased prefix. 0.18 knows neither "mixtral" nor
# "qwen3moe": their decoders run as the dense family's (the experts are ops inside the graph)
GENAI_TYPES = {"gemma3_text": "gemma3_text", "olmo2": "olmo", "mixtral": "mistral", "qwen3_moe": "qwen3"}


@dataclass
class DecoderShape:
    """The sizes of the decoder and its family's quirks, read from its config."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    context: int
    qk_norm: str = ""  # "" none, "head": RMSNorm per head (Qwen3, Gemma-3), "full": over the projection (OLMo-2)
    windows: list[int] = field(default_factory=list)  # GroupQueryAttention local_window_size per layer (-1: none)
    norm_offset: float = 0.0  # added to every RMSNorm gain (Gemma's 1 + w)
    norms: tuple[str, str, str, str] = PRE_NORMS
    activation: str = "silu"  # silu | gelu_tanh | gelu
    embed_scale: float | None = None  # the embedding's multiplier (Gemma sqrt(hidden), Granite)
    residual_scale: float | None = None  # each block's output multiplier before the residual add (Granite)
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    softcap: float = 0.0  # attention logit soft-capping (Gemma-2)
    final_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma-2)
    logits_divisor: float | None = None  # logits divided by it (Granite)
    rope_layers: list[str] = field(default_factory=list)  # each layer's cos/sin cache (onnx_tensors.rope_caches)
    rope_original: int = 0  # LongRoPE: the long caches serve total sequence lengths above this (0: one cache set)


def check_architecture(config: dict) -> None:
    """Refuse (LowbitError) a model whose architecture the ONNX graph cannot hold."""
    model_type = config.get("model_type")
    if (config.get("num_local_experts") or config.get("num_experts")) and (
            model_type not in MOE_FAMILIES or _activation(config) != "silu"):
        raise LowbitError(f"cannot export the mixture-of-experts {model_type!r} to ONNX: lowbit's graph holds "
                          f"Mixtral's and Qwen3-MoE's SiLU experts only; export to compressed-tensors or gguf "
                          f"instead")
    if model_type not in FAMILIES:
        raise LowbitError(f"cannot export model_type {model_type!r} to ONNX: lowbit writes {FAMILY_NAMES} "
                          f"decoders; export to compressed-tensors instead")
    act = _activation(config)
    if act not in ACTIVATIONS:
        raise LowbitError(f"cannot export a {model_type} with hidden_act {act!r} to ONNX: the graph has SiLU and "
                          f"GELU MLPs only; export to compressed-tensors instead")
    for rope in _rope_parameters(config):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type in POSITION_DEPENDENT_ROPE:
            raise LowbitError(f"cannot export RoPE type {rope_type!r} to ONNX: its frequencies depend on the "
                              f"sequence length and the graph holds fixed cos/sin caches; export to "
                              f"compressed-tensors instead")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 8:
        raise LowbitError(f"cannot export head_dim {head_dim} to ONNX: onnxruntime's GroupQueryAttention needs a "
                          f"multiple of 8; export to compressed-tensors instead")


def _activation(config: dict) -> str:
    """The MLP activation as transformers reads it: Gemma-2/3 from hidden_activation; Gemma's legacy "gelu"
    means the tanh approximation (GemmaConfig rewrites it so)."""
    model_type = config.get("model_type")
    if model_type in ("gemma2", "gemma3_text"):
        return config.get("hidden_activation") or "gelu_pytorch_tanh"
    act = config.get("hidden_act") or "silu"
    return "gelu_pytorch_tanh" if model_type == "gemma" and act == "gelu" else act


def _rope_parameters(config: dict) -> list[dict]:
    """Every RoPE parameter set of the config (Gemma-3 keeps one per layer type)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    nested = [v for v in rope.values() if isinstance(v, dict)]
    return nested or [rope]


def _windows(config: dict, layers: int, types: list[str]) -> list[int]:
    window = config.get("sliding_window")
    if config["model_type"] in ("mistral", "mixtral", "phi3"):
        return [window or -1] * layers
    # Qwen2/3, Gemma-2/3: a window only where layer_types says sliding_attention
    return [window if window and t == "sliding_attention" else -1 for t in types] or [-1] * layers


def decoder_shape(config: dict) -> DecoderShape:
    """The decoder's sizes and family quirks from config.json (checked by check_architecture first)."""
    model_type = config["model_type"]
    heads, layers, hidden = config["num_attention_heads"], config["num_hidden_layers"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    types = list(config.get("layer_types") or [])
    qk_norm, offset = FAMILIES[model_type]
    gemma = model_type.startswith("gemma")
    scalar = config.get("query_pre_attn_scalar")
    shape = DecoderShape(
        layers=layers, hidden=hidden, heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim, vocab=config["vocab_size"], eps=float(config.get("rms_norm_eps", 1e-6)),
        context=config.get("max_position_embeddings", 4096), qk_norm=qk_norm,
        windows=_windows(config, layers, types), norm_offset=offset,
        norms=SANDWICH_NORMS if model_type in ("gemma2", "gemma3_text") else
        POST_NORMS if model_type == "olmo2" else PRE_NORMS,
        activation=ACTIVATIONS[_activation(config)],
        embed_scale=hidden ** 0.5 if gemma else config.get("embedding_multiplier"),
        residual_scale=config.get("residual_multiplier"),
        attn_scale=config.get("attention_multiplier") or (scalar ** -0.5 if gemma and scalar else None),
        softcap=float(config.get("attn_logit_softcapping") or 0.0),
        final_softcap=config.get("final_logit_softcapping"), logits_divisor=config.get("logits_scaling"))
    nested = any(isinstance(v, dict) for v in (config.get("rope_parameters") or {}).values())
    shape.rope_layers = types if nested else ["default"] * layers  # Gemma-3: a cache per layer type
    rope = _rope_parameters(config)[0]
    kind = rope.get("rope_type", rope.get("type"))
    if not nested and (kind == "longrope" or model_type == "phi3" and kind in ("su", "yarn")):  # as Phi3Config
        shape.rope_original = int(rope.get("original_max_position_embeddings")
                                  or config.get("original_max_position_embeddings") or shape.context)
    return shape


def genai_type(config: dict) -> str:
    """onnxruntime-genai's model type (genai_config.json model.type) for the family."""
    if config["model_type"] in GENAI_TYPES:
        return GENAI_TYPES[config["model_type"]]
    arch = (config.get("architectures") or [config["model_type"]])[0]
    return arch[:arch.find("For")].lower() if "For" in arch else arch.lower()
