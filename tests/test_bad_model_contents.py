"""Issue #19, model files whose contents are wrong: corrupt safetensors headers, missing or short ONNX
external data, models that are not causal LMs (BERT-like encoders, encoder-decoders), and compressed-tensors
folders whose tensors transformers does not take. Each is refused by the command users run with one error line
naming the file or the model, before any work, changing no file and creating no output."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from .refusals import assert_refused, run_cli

RTN = ["--scheme", "w_uint4_per_group_asym", "--group-size", "32", "--no-progress"]
EVAL = ["--seq-len", "16", "--max-chunks", "1", "--no-progress"]
NORMS = ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight")


def commands(src, out):
    return {"quantize": ["quantize", src, "-o", out, *RTN], "eval": ["eval", src, *EVAL], "inspect": ["inspect", src]}


@pytest.fixture
def out(tmp_path):
    return tmp_path / "new" / "out"


@pytest.fixture
def llama(tiny_models, tmp_path):
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))


# -- safetensors headers ------------------------------------------------------------------------------------

def rewrite(path: Path, change) -> None:
    """Rewrite a safetensors file through change(header dict, data bytes) -> (header or raw bytes, data)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = change(json.loads(raw[8:8 + n]), raw[8 + n:])
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def entry(key: str, **fields):
    """A change that sets fields of one header entry (None deletes the field)."""
    def change(header, data):
        header[key] = {**header[key], **fields}
        header[key] = {k: v for k, v in header[key].items() if v is not None}
        return header, data
    return change


def overlap(header, data):
    header[NORMS[1]]["data_offsets"] = header[NORMS[0]]["data_offsets"]
    return header, data


CORRUPT = {
    "not JSON": (lambda h, d: (b"{not json", d), "not valid JSON"),
    "a JSON list": (lambda h, d: ([1, 2], d), "header is a JSON list, not an object"),
    "entry not an object": (lambda h, d: ({**h, NORMS[0]: 5}, d), "header entry is a int, not an object"),
    "no dtype": (entry(NORMS[0], dtype=None), r"dtype None is not one lowbit reads"),
    "unknown dtype": (entry(NORMS[0], dtype="F9"), r"dtype 'F9' is not one lowbit reads"),
    "shape not a list": (entry(NORMS[0], shape="80"), r"shape '80' is not a list"),
    "negative shape": (entry(NORMS[0], shape=[-80]), "shape .* non-negative integers"),
    "offsets malformed": (entry(NORMS[0], data_offsets=[0]), r"data_offsets \[0\] are not \[begin, end\]"),
    "offsets reversed": (entry(NORMS[0], data_offsets=[320, 0]), "0 <= begin <= end"),
    "size mismatch": (entry(NORMS[0], shape=[81]), "hold 320 bytes but shape .81. of F32 needs 324"),
    "overlap": (overlap, "overlap"),
    "truncated": (lambda h, d: (h, d[:len(d) // 2]), "truncated"),
    "metadata not an object": (lambda h, d: ({**h, "__metadata__": [1]}, d), "__metadata__ is a list"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
@pytest.mark.parametrize("command", ["quantize", "inspect"])
def test_corrupt_safetensors(case, command, llama, out, capsys):
    change, problem = CORRUPT[case]
    rewrite(llama / "model.safetensors", change)
    assert_refused(commands(llama, out)[command], capsys, rf"model\.safetensors .*{problem}",
                   unchanged=[llama], absent=[out, out.parent])


def test_corrupt_safetensors_in_eval_and_export(tiny_models, lowbit_out, llama, tmp_path, out, capsys):
    rewrite(llama / "model.safetensors", CORRUPT["unknown dtype"][0])
    assert_refused(["eval", llama, *EVAL], capsys, r"model\.safetensors .*'F9'", unchanged=[llama])
    src = Path(shutil.copytree(lowbit_out(tiny_models["llama"], "w_int4_per_group_sym", group_size=16),
                               tmp_path / "q"))
    rewrite(src / "model.safetensors", CORRUPT["size mismatch"][0])
    for fmt in ("compressed-tensors", "gguf", "onnx"):
        assert_refused(["export", src, "-o", out, "-f", fmt], capsys, r"model\.safetensors .*needs 324",
                       unchanged=[src], absent=[out, out.parent])


# -- ONNX external data ------------------------------------------------------------------------------------

@pytest.fixture
def onnx_dir(onnx_tiny, tmp_path):
    return Path(shutil.copytree(onnx_tiny["gqa"][1], tmp_path / "onnx"))


@pytest.mark.parametrize("command", ["quantize", "eval", "bench"])
def test_onnx_data_missing(command, onnx_dir, out, capsys):
    (onnx_dir / "model.onnx.data").unlink()
    argv = commands(onnx_dir, out).get(command) or ["bench", onnx_dir, "--runs", "1", "--no-progress"]
    assert_refused(argv, capsys, r"model\.onnx\.data \(tensor '.*'\) is missing", unchanged=[onnx_dir],
                   absent=[out, out.parent])


@pytest.mark.parametrize("command", ["quantize", "eval", "bench"])
def test_onnx_data_truncated(command, onnx_dir, out, capsys):
    data = onnx_dir / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-100])
    argv = commands(onnx_dir, out).get(command) or ["bench", onnx_dir, "--runs", "1", "--no-progress"]
    assert_refused(argv, capsys, r"model\.onnx\.data is truncated: tensor '.*' needs bytes \d+\.\.\d+ but the file",
                   unchanged=[onnx_dir], absent=[out, out.parent])


def test_onnx_data_length_does_not_fit_the_shape(onnx_dir, out, capsys):
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    next(e for e in tensor.external_data if e.key == "length").value = "12"
    onnx.save(model, str(onnx_dir / "model.onnx"))
    assert_refused(commands(onnx_dir, out)["quantize"], capsys, rf"'{tensor.name}'.*length 12 do not fit its shape",
                   unchanged=[onnx_dir], absent=[out, out.parent])


def test_onnx_genai_config_not_an_object(onnx_dir, out, capsys):
    (onnx_dir / "genai_config.json").write_text("[]")
    for command in ("quantize", "eval"):
        assert_refused(commands(onnx_dir, out)[command], capsys, r"genai_config\.json holds a JSON list",
                       unchanged=[onnx_dir], absent=[out, out.parent])


# -- not a causal language model ---------------------------------------------------------------------------

def _config(kind: str):
    import transformers as tf

    small = dict(vocab_size=400, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48)
    seq2seq = dict(vocab_size=400, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=48)
    return {"bert": lambda: tf.BertConfig(**small), "roberta": lambda: tf.RobertaConfig(**small),
            "electra": lambda: tf.ElectraConfig(**small), "big_bird": lambda: tf.BigBirdConfig(**small),
            "bart": lambda: tf.BartConfig(**seq2seq), "mbart": lambda: tf.MBartConfig(**seq2seq),
            "t5": lambda: tf.T5Config(vocab_size=400, d_model=32, num_layers=1, num_heads=2, d_ff=48),
            "bert_decoder": lambda: tf.BertConfig(**small, is_decoder=True),
            "gpt_neox": lambda: tf.GPTNeoXConfig(**small),
            "gemma3_multimodal": lambda: tf.Gemma3Config(
                text_config=dict(**small, head_dim=16),
                vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14))}[kind]()


@pytest.mark.parametrize("kind", ["bert", "roberta", "electra", "big_bird", "bart", "mbart", "t5"])
@pytest.mark.parametrize("command", ["quantize", "eval", "inspect"])
def test_not_a_causal_lm(kind, command, llama, out, capsys):
    (llama / "config.json").write_text(_config(kind).to_json_string())
    assert_refused(commands(llama, out)[command], capsys, r"not a causal language model|has no causal LM",
                   unchanged=[llama], absent=[out, out.parent])


@pytest.mark.parametrize("kind", ["bert_decoder", "gpt_neox", "gemma3_multimodal"])
def test_decoders_pass_the_causal_check(kind, tmp_path):
    """A BERT configured as a decoder, GPT-NeoX (is_decoder False in its config) and Gemma-3 with its
    bidirectional vision tower are causal LMs."""
    import torch

    from lowbit.hf.model import build_skeleton

    _config(kind).save_pretrained(tmp_path)
    assert build_skeleton(tmp_path, torch.float32) is not None


def test_every_tiny_architecture_still_loads(tiny_models, tiny_moe, capsys):
    for folder in [*tiny_models.values(), *tiny_moe.values()]:
        code, _, err = run_cli(["inspect", folder], capsys)
        assert code == 0, err


# -- compressed-tensors folders loaded by transformers -----------------------------------------------------

def _exported(lowbit_out, tiny_models, tmp_path, scheme: str, **kwargs) -> Path:
    from lowbit.api import export

    pytest.importorskip("compressed_tensors")
    return export(lowbit_out(tiny_models["llama"], scheme, **kwargs), tmp_path / "ct", "compressed-tensors",
                  quiet=True)


def _edit_tensors(path: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.update({"model.layers.0.mlp.extra.weight": t["model.norm.weight"].clone()}), "1 unused tensor"),
    (lambda t: t.pop("model.norm.weight"), "1 missing tensor"),
], ids=["unused", "missing"])
def test_compressed_tensors_folder_that_does_not_match_its_config(edit, match, tiny_models, lowbit_out, tmp_path,
                                                                    capsys):
    ct = _exported(lowbit_out, tiny_models, tmp_path, "w_fp8")
    _edit_tensors(ct / "model.safetensors", edit)
    assert_refused(["eval", ct, *EVAL], capsys, rf"does not match its config\.json: {match}", unchanged=[ct])


def test_compressed_tensors_kv_cache_scales_unused_warn(tiny_models, lowbit_out, tmp_path, capsys):
    """transformers 5.24+ with compressed-tensors 0.20.1 leaves k_scale / v_scale unused: one warning line,
    and the static FP8 input scales still apply (the score equals the lowbit folder's without its KV cache)."""
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    ct = _exported(lowbit_out, tiny_models, tmp_path, "w_fp8_a_fp8", kv_cache_dtype="fp8")
    code, _, err = run_cli(["eval", ct, *EVAL], capsys)
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert code == 0, err
    attention = LlamaAttention(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1), 0)
    if is_cached_attention_module(attention):
        assert warnings == [], err
    else:
        assert len(warnings) == 1 and "KV-cache scales" in warnings[0] and "without KV-cache quantization" in err


def test_compressed_tensors_input_scales_apply(tiny_models, lowbit_out, tmp_path):
    """A W8A8 FP8 export scores exactly as its lowbit folder (transformers' decompressed mode would drop the
    input scales)."""
    from lowbit.api import evaluate

    src = lowbit_out(tiny_models["llama"], "w_fp8_a_fp8")
    ct = _exported(lowbit_out, tiny_models, tmp_path, "w_fp8_a_fp8")
    ours, theirs = (evaluate(m, seq_len=32, max_chunks=2, progress=False)["perplexity"] for m in (src, ct))
    assert theirs == pytest.approx(ours, rel=1e-6)
