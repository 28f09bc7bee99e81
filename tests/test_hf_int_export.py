"""AutoAWQ GEMM and GPTQ v1 exports: golden packing values from FORMATS.md, decoding back to lowbit's own
weights, refusals before writing, and the real consumer: onnxruntime-genai's model builder turns each export
into an int4 ONNX model whose onnxruntime logits equal lowbit's fake-quant logits."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lowbit.api import export, load, quantize
from lowbit.errors import LowbitError
from lowbit.exporters.hf_int import AWQ_ORDER, pack_int32, unpack_int32

from .conftest import save_random_model

IDS = np.random.default_rng(0).integers(3, 390, (1, 24)).astype(np.int64)


def _tiny_llama(folder, tokenizer_dir, tied: bool):
    """A tiny llama whose widths (64, 128; kv 32) are whole groups of 32 and whole int32 words."""
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2,
                         tie_word_embeddings=tied)
    return save_random_model(config, folder, tokenizer_dir)


@pytest.fixture(scope="module")
def llama64(tmp_path_factory, tokenizer_dir):
    return _tiny_llama(tmp_path_factory.mktemp("llama64"), tokenizer_dir, tied=False)


@pytest.fixture(scope="module")
def llama64_tied(tmp_path_factory, tokenizer_dir):
    """The same with lm_head tied to the embedding (as SmolLM2): lowbit keeps both float, tied."""
    return _tiny_llama(tmp_path_factory.mktemp("llama64t"), tokenizer_dir, tied=True)


@pytest.fixture(scope="module")
def quantized(llama64, tmp_path_factory):
    cache = {}

    def make(scheme, **kwargs):
        key = (scheme, tuple(sorted(kwargs.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("q") / scheme
            quantize(llama64, out, scheme=scheme, progress=False, quiet=True, **kwargs)
            cache[key] = out
        return cache[key]

    return make


def test_awq_interleave_golden():
    """Columns 0..7 holding 1..8: slot i holds column ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7 (FORMATS.md 3.1)."""
    word = pack_int32(torch.arange(1, 9).reshape(1, 8), 4, AWQ_ORDER)
    assert word.item() == np.int32(np.uint32(0x86427531))
    assert unpack_int32(word, 4, AWQ_ORDER).tolist() == [[1, 2, 3, 4, 5, 6, 7, 8]]
    assert pack_int32(torch.arange(1, 9).reshape(1, 8), 4).item() == np.int32(np.uint32(0x87654321))


def _awq_weight(t: dict, name: str, group: int) -> torch.Tensor:
    q = unpack_int32(t[f"{name}.qweight"], 4, AWQ_ORDER).float()
    z = unpack_int32(t[f"{name}.qzeros"], 4, AWQ_ORDER).float().repeat_interleave(group, 0)
    return ((q - z) * t[f"{name}.scales"].float().repeat_interleave(group, 0)).T


def _gptq_weight(t: dict, name: str, bits: int) -> torch.Tensor:
    q = unpack_int32(t[f"{name}.qweight"].T.contiguous(), bits).T.float()  # (K, N)
    z = ((unpack_int32(t[f"{name}.qzeros"], bits) + 1) & ((1 << bits) - 1)).float()  # v1: stored zero - 1
    g = t[f"{name}.g_idx"].long()
    return ((q - z[g]) * t[f"{name}.scales"].float()[g]).T


@pytest.mark.parametrize("scheme,kwargs", [("w_uint4_per_group_asym", {"group_size": 32}),
                                           ("w_int4_per_group_sym", {"group_size": 16})])
def test_awq_decodes_to_lowbit_weights(scheme, kwargs, quantized, tmp_path):
    src = quantized(scheme, **kwargs)
    out = export(src, tmp_path / "awq", "awq", quiet=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": kwargs["group_size"], "zero_point": True,
                      "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    t = load_file(str(out / "model.safetensors"))
    model, _ = load(src)
    for name, module in model.named_modules():
        if f"{name}.qweight" in t:
            w = _awq_weight(t, name, kwargs["group_size"])
            assert t[f"{name}.scales"].dtype == torch.float16
            torch.testing.assert_close(w, module.weight.float(), rtol=0, atol=2e-3 * module.weight.abs().max())
    assert "lm_head.weight" in t and "lm_head.qweight" not in t


@pytest.mark.parametrize("scheme,kwargs,bits", [("w_uint4_per_group_asym", {"group_size": 32}, 4),
                                                ("w_int4_per_group_sym", {"group_size": 32}, 4),
                                                ("w_int8_per_channel_sym", {}, 8),
                                                ("w_uint2_per_group_asym", {"group_size": 16}, 2)])
def test_gptq_decodes_to_lowbit_weights(scheme, kwargs, bits, quantized, tmp_path):
    src = quantized(scheme, **kwargs)
    out = export(src, tmp_path / "gptq", "gptq", quiet=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["bits"], config["checkpoint_format"], config["desc_act"]) == \
        ("gptq", bits, "gptq", False)
    assert config["group_size"] == kwargs.get("group_size", -1)
    t = load_file(str(out / "model.safetensors"))
    if scheme == "w_int4_per_group_sym":  # symmetric v1 checkpoints store 7 in every zero nibble
        assert (t["model.layers.0.mlp.up_proj.qzeros"] == np.int32(np.uint32(0x77777777))).all()
    model, _ = load(src)
    for name, module in model.named_modules():
        if f"{name}.qweight" in t:
            w = _gptq_weight(t, name, bits)
            torch.testing.assert_close(w, module.weight.float(), rtol=0, atol=2e-3 * module.weight.abs().max())


def test_gptq_per_layer_overrides_go_to_dynamic(quantized, tmp_path):
    src = quantized("w_uint4_per_group_asym", group_size=32, overrides=("*down_proj:bits=8",))
    out = export(src, tmp_path / "gptq", "gptq", quiet=True)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (config["bits"], config["group_size"]) == (4, 32)
    assert sorted(config["dynamic"]) == [r"+:model\.layers\.0\.mlp\.down_proj(\.|$)",
                                         r"+:model\.layers\.1\.mlp\.down_proj(\.|$)"]
    assert all(v == {"bits": 8, "group_size": 32} for v in config["dynamic"].values())
    t = load_file(str(out / "model.safetensors"))
    model, _ = load(src)
    w = _gptq_weight(t, "model.layers.1.mlp.down_proj", 8)
    ref = model.get_submodule("model.layers.1.mlp.down_proj").weight.float()
    torch.testing.assert_close(w, ref, rtol=0, atol=2e-3 * ref.abs().max())


REFUSALS = [
    ("awq", "w_mxfp4", {}, "compressed-tensors"),
    ("awq", "w_int8_per_channel_sym", {}, "gptq"),
    ("awq", "w_uint4_per_channel_asym", {}, "per-group scales only; export to .*gptq"),
    ("awq", "w_uint4_per_group_asym", {"group_size": 48}, "group size that divides"),
    ("gptq", "w_int3_per_group_sym", {"group_size": 16}, "compressed-tensors"),
    ("gptq", "w_fp8", {}, "compressed-tensors"),
]


@pytest.mark.parametrize("fmt,scheme,kwargs,hint", REFUSALS, ids=[f"{r[0]}-{r[1]}" for r in REFUSALS])
def test_refusals_write_nothing(fmt, scheme, kwargs, hint, quantized, tmp_path):
    src = quantized(scheme, **kwargs)
    with pytest.raises(LowbitError, match=hint):
        export(src, tmp_path / "out", fmt, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_quantize_refuses_export_before_calibration(llama64, tmp_path):
    """An export the scheme cannot reach stops quantize before any calibration, and writes nothing."""
    with pytest.raises(LowbitError, match="AutoAWQ"):
        quantize(llama64, tmp_path / "q", scheme="w_mxfp4", algo="gptq", export="awq", progress=False, quiet=True)
    with pytest.raises(LowbitError, match="rotation r4"):
        quantize(llama64, tmp_path / "q", scheme="w_uint4_per_group_asym", group_size=32, algo="rotation",
                 algo_args={"rotation": {"r4": True}}, export="gptq", progress=False, quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_quantize_with_export_writes_beside(llama64, tmp_path):
    result = quantize(llama64, tmp_path / "q", scheme="w_uint4_per_group_asym", group_size=32, export="awq,gptq",
                      progress=False, quiet=True)
    assert result.summary["exports"] == {"awq": str(tmp_path / "q-awq"), "gptq": str(tmp_path / "q-gptq")}
    assert json.loads((tmp_path / "q" / "summary.json").read_text())["exports"] == result.summary["exports"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "q-awq", "q-gptq"]


def _ort_logits(folder, ids: np.ndarray) -> np.ndarray:
    """Logits of a builder-made ONNX decoder for one prompt from an empty KV cache."""
    import onnxruntime as ort

    head = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feeds[i.name] = np.arange(ids.shape[1])[None]
        else:  # past key / value: batch, heads, 0 past tokens, head size
            shape = [ids.shape[0] if d == "batch_size" else head if d == "kv_cache_dim" else
                     0 if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = np.zeros(shape, dtype=np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("fmt,tied", [("awq", False), ("gptq", False), ("awq", True)])
def test_onnxruntime_genai_builder_accepts_export(fmt, tied, quantized, llama64_tied, tmp_path):
    """The builder's int4 model of the export computes lowbit's logits (accuracy_level 1: float activations;
    lm_head and a tied embedding kept float, as lowbit left them, else the builder quantizes them by RTN; the
    difference is the float16 scales)."""
    pytest.importorskip("onnxruntime_genai")
    pytest.importorskip("onnx_ir")
    if tied:
        src = tmp_path / "lowbit"
        quantize(llama64_tied, src, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    else:
        src = quantized("w_uint4_per_group_asym", group_size=32)
    hf = export(src, tmp_path / fmt, fmt, quiet=True)
    onnx_dir = tmp_path / "onnx"
    run = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o",
                          str(onnx_dir), "-p", "int4", "-e", "cpu", "--extra_options",
                          "nodes_to_exclude=/lm_head/MatMul,/model/embed_tokens/Gather", "accuracy_level=1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    model, _ = load(src)
    with torch.no_grad():
        ref = model(torch.from_numpy(IDS)).logits.numpy()
    got = _ort_logits(onnx_dir, IDS)
    assert np.abs(got - ref).max() < 3e-3 * np.abs(ref).max()


def test_cli_quantize_export_and_refusal(llama64, tmp_path, capsys):
    from lowbit.cli import main

    assert main(["quantize", str(llama64), "-o", str(tmp_path / "q"), "--scheme", "w_uint4_per_group_asym",
                 "--group-size", "32", "--export", "gptq", "--no-progress"]) == 0
    assert f"exported gptq: {tmp_path / 'q-gptq'}" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "q"), "-f", "awq", "-o", str(tmp_path / "awq")]) == 0
    assert (tmp_path / "awq" / "model.safetensors").is_file()
    assert main(["quantize", str(llama64), "-o", str(tmp_path / "q2"), "--scheme", "w_mxfp4", "--export", "awq",
                 "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot export") and "compressed-tensors" in errors[0]
    assert not (tmp_path / "q2").exists()
