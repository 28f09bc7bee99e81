"""How each Hugging Face model type becomes one of llama.cpp's architectures (the one that llama-cpp-python 0.3.36
vendors): the architecture, how its tensors are named and arranged, the {arch}.* keys beyond gguf_meta's common
ones, and what llama.cpp would compute differently (refused before anything is written).

- llama, mistral, granite: llama.cpp's adjacent-pair RoPE, so q/k rows are permuted from HF's rotate-half order
  (an exact row move); mixtral is llama.cpp's "llama" with experts. granite adds its four multipliers
  (embedding, residual, attention, logits) as keys.
- qwen2, qwen3 (q/k norms per head), qwen3moe, phi3 (fused attn_qkv, ffn_up holding gate then up; partial rotary
  as the rope dimension count), olmo2 (post-attention / post-MLP norms, q/k norms over the whole projection):
  rotate-half RoPE in llama.cpp too (NEOX), so nothing moves.
- gemma, gemma2, gemma3 (text): every norm stored as 1 + w; gemma2 / gemma3 keep their sandwich norms
  (post_attention_norm, post_ffw_norm), gemma2 its soft-capping, both the sliding window and which layers use it;
  gemma3's local layers their own RoPE base (rope.freq_base_swa).
- experts (mixtral, qwen3moe): lowbit holds one linear per expert projection; llama.cpp holds each projection of
  all a layer's experts as one 3-D tensor (ffn_gate_exps / ffn_up_exps / ffn_down_exps, expert-major) of one
  type, and the router as ffn_gate_inp.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from ..errors import LowbitError

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class Arch:
    """How one HF model type becomes a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # HF rotate-half RoPE -> llama.cpp's adjacent-pair RoPE (LLAMA rope type)
    norm_plus_one: bool = False  # HF computes x * (1 + w) (Gemma); llama.cpp computes x * w
    separate_output: bool = True  # False: llama.cpp always reuses token_embd as the output (Gemma, Gemma-2)
    output_required: bool = False  # llama.cpp needs output.weight even when HF ties it (OLMo-2): written as a copy


ARCHS = {
    "llama": Arch(A.LLAMA, permute_qk=True), "mistral": Arch(A.LLAMA, permute_qk=True),
    "mixtral": Arch(A.LLAMA, permute_qk=True), "granite": Arch(A.GRANITE, permute_qk=True),
    "qwen2": Arch(A.QWEN2), "qwen3": Arch(A.QWEN3), "qwen3_moe": Arch(A.QWEN3MOE), "phi3": Arch(A.PHI3),
    "olmo2": Arch(A.OLMO2, output_required=True),
    "gemma": Arch(A.GEMMA, norm_plus_one=True, separate_output=False),
    "gemma2": Arch(A.GEMMA2, norm_plus_one=True, separate_output=False),
    "gemma3_text": Arch(A.GEMMA3, norm_plus_one=True),
}
SUPPORTED = "llama, mistral, mixtral, granite, qwen2, qwen3, qwen3_moe, phi3, olmo2, gemma, gemma2 and gemma3_text"

# one expert's projection, in lowbit's names and in the checkpoints' (Mixtral's w1 / w3 / w2)
_EXPERT = re.compile(r"^model\.layers\.(?P<bid>\d+)\.(?:mlp|block_sparse_moe)\.experts\.(?P<j>\d+)\."
                     r"(?P<proj>gate_proj|up_proj|down_proj|w1|w3|w2)(?:\.weight)?$")
_PROJ = {"gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "w1": gguf.MODEL_TENSOR.FFN_GATE_EXP,
         "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP, "w3": gguf.MODEL_TENSOR.FFN_UP_EXP,
         "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP, "w2": gguf.MODEL_TENSOR.FFN_DOWN_EXP}


def get_arch(config: dict) -> Arch:
    """The architecture of a config, refusing (one line, before any work) what llama.cpp would compute otherwise."""
    model_type = config.get("model_type")
    arch = ARCHS.get(model_type)
    if arch is None:
        raise LowbitError(f"GGUF export supports {SUPPORTED} models, not {model_type!r}; export to "
                          f"compressed-tensors instead")
    _check(config, str(model_type))
    return arch


def _refuse(model_type: str, why: str) -> None:
    raise LowbitError(f"cannot export a {model_type} to GGUF: {why}; export to compressed-tensors instead")


def _check(c: dict, model_type: str) -> None:
    heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    if model_type in ("gemma2", "gemma3_text"):
        scalar = c.get("query_pre_attn_scalar") or head_dim
        llama_cpp = c["hidden_size"] / heads if c["num_hidden_layers"] in (46, 62) else head_dim
        if float(scalar) != float(llama_cpp):
            _refuse(model_type, f"llama.cpp scales queries by 1/sqrt({llama_cpp:g}) for this size, the model by "
                                f"1/sqrt(query_pre_attn_scalar = {scalar})")
    if model_type == "gemma3_text" and c.get("attn_logit_softcapping"):
        _refuse(model_type, "llama.cpp's gemma3 has no attention logit soft-capping")
    if model_type == "qwen3_moe":
        if not c.get("norm_topk_prob"):
            _refuse(model_type, "llama.cpp's qwen3moe always renormalises the top-k routing weights, and this model "
                                "has norm_topk_prob false")
        if c.get("mlp_only_layers") or (c.get("decoder_sparse_step") or 1) != 1:
            _refuse(model_type, "llama.cpp's qwen3moe has experts in every layer, and this model has dense layers")
    if model_type in ("phi3", "olmo2", "granite") and head_dim * heads != c["hidden_size"]:
        _refuse(model_type, f"llama.cpp's {model_type} takes head_dim = hidden_size / heads, not {head_dim}")


def expert_member(name: str, arch: Arch) -> tuple[str, int] | None:
    """(GGUF name of the stacked tensor, expert index) of one expert's projection (HF name, with or without
    .weight), else None; refuses experts the architecture has no stacked tensor for."""
    m = _EXPERT.match(name)
    if m is None:
        return None
    kind = _PROJ[m["proj"]]
    if kind not in gguf.MODEL_TENSORS[arch.gguf_arch]:
        raise LowbitError(f"{name} is an expert, which llama.cpp's {gguf.MODEL_ARCH_NAMES[arch.gguf_arch]} "
                          f"architecture has no place for; export to compressed-tensors instead")
    return f"{gguf.TENSOR_NAMES[kind].format(bid=int(m['bid']))}.weight", int(m["j"])


def add_arch_hparams(writer: gguf.GGUFWriter, c: dict) -> None:
    """The {arch}.* keys of one model type beyond gguf_meta's common ones."""
    model_type = c.get("model_type")
    experts = int(c.get("num_local_experts") or c.get("num_experts") or 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(int(c["num_experts_per_tok"]))
        if c.get("moe_intermediate_size"):
            writer.add_expert_feed_forward_length(int(c["moe_intermediate_size"]))
    if model_type == "granite":
        for key, add in (("attention_multiplier", writer.add_attention_scale),
                         ("embedding_multiplier", writer.add_embedding_scale),
                         ("residual_multiplier", writer.add_residual_scale), ("logits_scaling", writer.add_logit_scale)):
            if c.get(key) is not None:
                add(float(c[key]))
    if c.get("attn_logit_softcapping"):
        writer.add_attn_logit_softcapping(float(c["attn_logit_softcapping"]))
    if c.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
    if model_type in ("gemma2", "gemma3_text") and c.get("sliding_window"):
        writer.add_sliding_window(int(c["sliding_window"]))
        if c.get("layer_types"):
            writer.add_sliding_window_pattern([t == "sliding_attention" for t in c["layer_types"]])
    if model_type == "gemma3_text":
        local = (c.get("rope_parameters") or {}).get("sliding_attention") or {}
        writer.add_rope_freq_base_swa(float(local.get("rope_theta") or c.get("rope_local_base_freq") or 10000.0))

