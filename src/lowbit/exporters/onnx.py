"""Export a lowbit folder as an ONNX decoder that onnxruntime and onnxruntime-genai run directly.

Why: onnxruntime-genai's builder re-quantizes a float model with its own RTN; this writes lowbit's own codes
(AWQ, GPTQ, rotation, any calibrated result) as MatMulNBits, exactly, with no builder in between.

The output folder (FORMATS.md 2.1): model.onnx (graph, onnx_graph.py) and model.onnx.data (every
initializer of 1 KiB or more, streamed as written: the protobuf never nears its 2 GB limit and the model is
never held whole in memory; onnxruntime maps the file), genai_config.json, the tokenizer files, and
lowbit_export.json (source, options, warnings). Quantized linears become MatMulNBits (onnx_tensors.py gives
the exact mapping), float linears MatMul; quantize_embedding=4 or 8 rounds the float embedding table to
nearest (asymmetric, blocks along the hidden axis) for GatherBlockQuantized, keeping a tied lm_head float.
Checked against onnxruntime 1.32 and onnxruntime-genai 0.18 (tests/test_onnx_export.py).

Refused with a LowbitError before anything is written (the layers' quantization as declared.CAPABILITIES["onnx"]
says, the architecture here): architectures other than Llama, Mistral, Qwen2 and
Qwen3; position-dependent RoPE (dynamic, longrope); widths MatMulNBits' CPU kernel lacks (2, 4 and 8 bits
only); float, MX, NVFP4 and block-floating-point elements; group sizes without a power-of-two factor >= 16;
quantized input activations or KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from .. import __version__
from ..errors import LowbitError
from ..model_files import read_json
from .onnx_graph import DecoderBuilder, DecoderShape, GraphOptions
from .onnx_tensors import ExternalData, matmul_block_size, quantize_table, rope_caches
from ..staging import check_output, staged
from .declared import check_layers
from .source import LowbitFolder

QK_NORM_ARCHS = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}  # model_type -> q/k norm
POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")
EMBEDDING_BITS = (4, 8)
MODEL_FILE = "model.onnx"


def check_onnx(model) -> list[str]:
    """Refuse (LowbitError) what this ONNX export cannot hold (the architecture here, the layers'
    quantization by declared.CAPABILITIES["onnx"]); return warnings for what it holds at a cost.
    `model` is a LowbitFolder or a PlannedModel (checked before calibration)."""
    config = model.config
    _check_architecture(config)
    check_layers("onnx", model)
    warnings = []
    for name, (spec, (_, k)) in model.modules.items():
        if spec.granularity != "group" and k % 16:
            warnings.append(f"{name}: per-{spec.granularity} scale on K={k} (no power-of-two factor >= 16) is one "
                            f"padded block of {matmul_block_size(spec, k)}")
    if "lm_head" not in model.modules:
        warnings.append("lm_head stays float (MatMul): on small models it dominates decode time; quantize with "
                        "exclude_layers=[] for a MatMulNBits lm_head")
    if model.online_rotations:  # a PlannedModel knows only that there will be some, not their sizes
        sizes = sorted({int(r["size"]) for r in model.online_rotations.values() if "size" in r})
        where = (f"{len(model.online_rotations)} linears ({'/'.join(map(str, sizes))} wide)" if sizes
                 else "each MLP's last linear")
        warnings.append(f"online rotation (r4) before {where} runs at every "
                        f"token: two small MatMuls each where the Hadamard splits as a Kronecker product, else a "
                        f"dense n^2 MatMul")
    return warnings


def _check_architecture(config: dict) -> None:
    model_type = config.get("model_type")
    if model_type not in QK_NORM_ARCHS:
        raise LowbitError(f"cannot export model_type {model_type!r} to ONNX: lowbit writes Llama, Mistral, Qwen2 and "
                          f"Qwen3 decoders; export to compressed-tensors instead")
    if config.get("hidden_act", "silu") != "silu":
        raise LowbitError(f"cannot export a {model_type} with hidden_act {config['hidden_act']!r} to ONNX: the graph "
                          f"has SiLU MLPs only; export to compressed-tensors instead")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in POSITION_DEPENDENT_ROPE:
        raise LowbitError(f"cannot export RoPE type {rope_type!r} to ONNX: its frequencies depend on the sequence "
                          f"length and the graph holds fixed cos/sin caches; export to compressed-tensors instead")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    if head_dim % 8:
        raise LowbitError(f"cannot export head_dim {head_dim} to ONNX: onnxruntime's GroupQueryAttention needs a "
                          f"multiple of 8; export to compressed-tensors instead")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise LowbitError("cannot export partial rotary embeddings to ONNX (GroupQueryAttention rotates whole "
                          "heads); export to compressed-tensors instead")


def decoder_shape(config: dict) -> DecoderShape:
    """The decoder's sizes from config.json, with GroupQueryAttention's window per layer."""
    heads = config["num_attention_heads"]
    layers = config["num_hidden_layers"]
    window = config.get("sliding_window")
    types = config.get("layer_types") or []
    if config["model_type"] == "mistral":
        windows = [window or -1] * layers
    else:  # Qwen2/3: a window only where layer_types says sliding_attention
        windows = [window if window and t == "sliding_attention" else -1 for t in types] or [-1] * layers
    return DecoderShape(layers=layers, hidden=config["hidden_size"], heads=heads,
                        kv_heads=config.get("num_key_value_heads") or heads,
                        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
                        vocab=config["vocab_size"], eps=float(config.get("rms_norm_eps", 1e-6)),
                        context=config.get("max_position_embeddings", 4096),
                        qk_norm=QK_NORM_ARCHS[config["model_type"]], windows=windows)


def export_onnx(src, out, overwrite: bool = False, accuracy_level: int = 0, quantize_embedding: int | None = None,
                embedding_block_size: int = 32) -> Path:
    """Write the lowbit folder `src` as an onnxruntime-genai folder `out` (staged: complete or absent).
    accuracy_level: MatMulNBits' lowest internal precision of the activations (0 unset, 1 fp32, 2 fp16,
    3 bf16, 4 int8: fastest on CPU). quantize_embedding: 4 or 8 for a GatherBlockQuantized embedding."""
    folder = src if isinstance(src, LowbitFolder) else LowbitFolder(Path(src))
    out = Path(out)
    check_output(out, overwrite, [folder.folder])
    if accuracy_level not in range(5):
        raise LowbitError(f"accuracy_level must be 0 to 4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got "
                          f"{accuracy_level}")
    warnings = check_onnx(folder)
    shape = decoder_shape(folder.config)
    _check_embedding(quantize_embedding, embedding_block_size, shape.hidden)
    hf_config = folder.hf_config()
    rope = rope_caches(hf_config, shape.context)
    if rope[0].shape[1] * 2 != shape.head_dim:
        raise LowbitError(f"cannot export to ONNX: RoPE covers {rope[0].shape[1] * 2} of {shape.head_dim} head "
                          f"dimensions (partial rotary); export to compressed-tensors instead")
    embedding = None
    if quantize_embedding:
        tensors, _ = quantize_table(folder.ckpt.get("model.embed_tokens.weight"), quantize_embedding,
                                    embedding_block_size)
        embedding = {"tensors": tensors, "bits": quantize_embedding, "block_size": embedding_block_size}
    options = GraphOptions(accuracy_level=accuracy_level, embedding=embedding)
    with staged(out, overwrite, [folder.folder]) as tmp:
        data = ExternalData(tmp / f"{MODEL_FILE}.data")
        try:
            model = DecoderBuilder(folder, shape, options, rope, data).build()
        finally:
            data.close()
        onnx.save_model(model, tmp / MODEL_FILE)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(folder, shape), indent=2))
        folder.copy_tokenizer(tmp)
        record = {"lowbit_version": __version__, "source": str(folder.folder), "onnx_version": onnx.__version__,
                  "scheme": folder.qconfig.get("scheme"), "accuracy_level": accuracy_level,
                  "quantize_embedding": quantize_embedding,
                  "embedding_block_size": embedding_block_size if quantize_embedding else None,
                  "warnings": warnings}
        (tmp / "lowbit_export.json").write_text(json.dumps(record, indent=2))
    return out


def _check_embedding(bits: int | None, block: int, hidden: int) -> None:
    if bits is None:
        return
    if bits not in EMBEDDING_BITS:
        raise LowbitError(f"quantize_embedding must be 4 or 8 (GatherBlockQuantized), got {bits}")
    if block < 16 or block & (block - 1):
        raise LowbitError(f"embedding_block_size must be a power of two >= 16 (GatherBlockQuantized), got {block}")
    if hidden * bits % 8:
        raise LowbitError(f"hidden size {hidden} does not fill whole bytes at {bits} bits; use 8-bit embeddings")


def _token_ids(folder: LowbitFolder) -> dict:
    """bos / eos / pad token ids: generation_config.json first (it carries chat models' stop tokens)."""
    ids = {k: folder.config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    path = folder.folder / "generation_config.json"
    if path.is_file():
        generation = read_json(path, "generation config")
        ids.update({k: generation[k] for k in ids if generation.get(k) is not None})
    if ids["pad_token_id"] is None:
        eos = ids["eos_token_id"]
        ids["pad_token_id"] = eos[0] if isinstance(eos, list) else eos
    return ids


def genai_config(folder: LowbitFolder, shape: DecoderShape) -> dict:
    """genai_config.json for the decoder (FORMATS.md 2.2). The KV buffers are shared between past and present
    (GroupQueryAttention writes in place), as the builder does on CPU."""
    arch = (folder.config.get("architectures") or [folder.config["model_type"]])[0]
    model_type = arch[:arch.find("For")].lower() if "For" in arch else arch.lower()
    decoder = {
        "filename": MODEL_FILE,
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "head_size": shape.head_dim, "hidden_size": shape.hidden, "num_attention_heads": shape.heads,
        "num_hidden_layers": shape.layers, "num_key_value_heads": shape.kv_heads,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
    }
    search = {"max_length": shape.context, "min_length": 0, "do_sample": False, "top_k": 50, "top_p": 1.0,
              "temperature": 1.0, "repetition_penalty": 1.0, "num_beams": 1, "num_return_sequences": 1,
              "early_stopping": True, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
              "past_present_share_buffer": True}
    return {"model": {"type": model_type, **_token_ids(folder), "context_length": shape.context,
                      "vocab_size": shape.vocab, "decoder": decoder}, "search": search}
