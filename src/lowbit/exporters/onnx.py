"""Export a lowbit folder as an ONNX decoder that onnxruntime and onnxruntime-genai run directly.

Why: onnxruntime-genai's builder re-quantizes a float model with its own RTN; this writes lowbit's own codes
(AWQ, GPTQ, rotation, any calibrated result) as MatMulNBits, exactly, with no builder in between.

The output folder (FORMATS.md 2.1): model.onnx (graph: onnx_graph.py the linears, onnx_decoder.py the
decoder, onnx_family.py what each family needs) and model.onnx.data (every initializer of 1 KiB or more,
streamed as written: the protobuf never nears its 2 GB limit and the model is never held whole in memory;
onnxruntime maps the file), genai_config.json, the tokenizer files, and lowbit_export.json (source, options,
warnings). Quantized linears become MatMulNBits (onnx_tensors.py gives the exact mapping), float linears
MatMul; quantize_embedding=4 or 8 rounds the float embedding table to nearest (asymmetric, blocks along the
hidden axis) for GatherBlockQuantized, keeping a tied lm_head float. dtype float16 stores every float tensor
and runs every activation, the logits and the KV cache in float16 (MatMulNBits' scales included).
Checked against onnxruntime 1.32 and onnxruntime-genai 0.18 (tests/test_onnx_export.py,
tests/test_onnx_families.py).

Refused with a LowbitError before anything is written (the layers' quantization as declared.CAPABILITIES["onnx"]
says, the architecture as onnx_family.check_architecture): families other than those onnx_family.py lists
(mixture-of-experts: Mixtral and Qwen3-MoE, as QMoE / MoE nodes, onnx_moe.py); dynamic RoPE (LongRoPE is held:
two cos/sin caches and an If); bfloat16 (onnxruntime 1.32's CPU kernels have none for MatMulNBits, GroupQueryAttention, RotaryEmbedding,
MatMul, Add, Mul, Sigmoid, Tanh);
widths MatMulNBits' CPU kernel lacks (2, 4 and 8 bits only); float, MX, NVFP4 and block-floating-point
elements; group sizes without a power-of-two factor >= 16; quantized input activations or KV cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from .. import __version__
from ..errors import LowbitError
from ..model_files import read_json
from .onnx_decoder import DecoderBuilder
from .onnx_family import DecoderShape, check_architecture, decoder_shape, genai_type
from .onnx_graph import FLOAT_TYPES, GraphOptions
from .onnx_moe import moe_warnings
from .onnx_tensors import ExternalData, matmul_block_size, quantize_table, rope_caches
from ..staging import check_output, staged
from .declared import check_layers
from .source import LowbitFolder

EMBEDDING_BITS = (4, 8)
MODEL_FILE = "model.onnx"


def check_onnx(model, dtype: str = "float32") -> list[str]:
    """Refuse (LowbitError) what this ONNX export cannot hold (the architecture by onnx_family, the float type,
    the layers' quantization by declared.CAPABILITIES["onnx"]); return warnings for what it holds at a cost.
    `model` is a LowbitFolder or a PlannedModel (checked before calibration)."""
    _check_dtype(dtype)
    check_architecture(model.config)
    check_layers("onnx", model)
    warnings = moe_warnings(model)
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


def export_onnx(src, out, overwrite: bool = False, accuracy_level: int = 0, quantize_embedding: int | None = None,
                embedding_block_size: int = 32, dtype: str = "float32") -> Path:
    """Write the lowbit folder `src` as an onnxruntime-genai folder `out` (staged: complete or absent).
    accuracy_level: MatMulNBits' lowest internal precision of the activations (0 unset, 1 fp32, 2 fp16,
    3 bf16, 4 int8: fastest on CPU). quantize_embedding: 4 or 8 for a GatherBlockQuantized embedding.
    dtype: float32 or float16, of the activations, logits, KV cache and every float tensor (norms, tables,
    MatMulNBits scales)."""
    folder = src if isinstance(src, LowbitFolder) else LowbitFolder(Path(src))
    out = Path(out)
    check_output(out, overwrite, [folder.folder])
    if accuracy_level not in range(5):
        raise LowbitError(f"accuracy_level must be 0 to 4 (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8), got "
                          f"{accuracy_level}")
    warnings = check_onnx(folder, dtype)
    shape = decoder_shape(folder.config)
    _check_embedding(quantize_embedding, embedding_block_size, shape.hidden)
    rope = rope_caches(folder.hf_config(), shape.context)
    embedding = None
    if quantize_embedding:
        tensors, _ = quantize_table(folder.ckpt.get("model.embed_tokens.weight"), quantize_embedding,
                                    embedding_block_size)
        embedding = {"tensors": tensors, "bits": quantize_embedding, "block_size": embedding_block_size}
    options = GraphOptions(accuracy_level=accuracy_level, embedding=embedding, dtype=dtype)
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
                  "scheme": folder.qconfig.get("scheme"), "dtype": dtype, "accuracy_level": accuracy_level,
                  "quantize_embedding": quantize_embedding,
                  "embedding_block_size": embedding_block_size if quantize_embedding else None,
                  "warnings": warnings}
        (tmp / "lowbit_export.json").write_text(json.dumps(record, indent=2))
    return out


def _check_dtype(dtype: str) -> None:
    if dtype == "bfloat16":
        raise LowbitError("cannot export bfloat16 to ONNX: onnxruntime's CPU kernels have no bfloat16 MatMulNBits, "
                          "GroupQueryAttention, MatMul, Add or Mul (1.32); export float16 or float32")
    if dtype not in FLOAT_TYPES:
        raise LowbitError(f"ONNX dtype must be float32 or float16, got {dtype!r}")


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
    model_type = genai_type(folder.config)
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
