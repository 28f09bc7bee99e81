"""Tiny random models of every supported architecture: lazy loading, quantize, export, reload, same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowbit
from lowbit.api import load, quantize
from lowbit.hf.model import open_model
from lowbit.safetensors_io import SafetensorsFile

from .conftest import ARCHS


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
def test_lazy_load_matches_transformers(arch, tiny_models, ids):
    ours, _ = load(tiny_models[arch])
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    assert torch.equal(logits(ours, ids), logits(ref, ids))


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_export_reload_same_logits(arch, tiny_models, ids, tmp_path):
    out = tmp_path / "q"
    result = quantize(tiny_models[arch], out, scheme="w_uint4_per_group_asym", group_size=32,
                      keep_in_memory=True, progress=False, quiet=True)
    reloaded, _ = load(out)
    assert torch.equal(logits(result.model, ids), logits(reloaded, ids))
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    diff = (logits(reloaded, ids) - logits(ref, ids)).abs().max()
    assert 0 < diff < 5  # quantized: changed, but still the same model
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["ignore"] == ["lm_head"]
    assert all(m["bits"] == 4 and m["group_size"] == 32 for m in qc["modules"].values())
    assert (out / "recipe.yaml").is_file() and (out / "tokenizer.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lowbit_version"] == lowbit.__version__ and summary["seed"] == 0
    assert len(summary["layer_errors"]) == len(qc["modules"]) and 0 < summary["mean_layer_error"] < 0.2


def test_packed_tensors_layout(tiny_models, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_models["llama"], out, scheme="w_uint4_per_group_asym", group_size=32, progress=False, quiet=True)
    f = SafetensorsFile(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"  # (80 out, 112 in): groups 32, 32, 32, 16
    assert f.entries[f"{name}.qweight"]["shape"] == [80, 56] and f.dtype(f"{name}.qweight") == "U8"
    assert f.entries[f"{name}.scales"]["shape"] == [80, 4] and f.dtype(f"{name}.scales") == "F32"
    assert f.entries[f"{name}.qzeros"]["shape"] == [80, 4]
    assert f"{name}.weight" not in f.entries and "lm_head.weight" not in f.entries  # tied, excluded
    from safetensors import safe_open  # the reference library reads what we stream out

    with safe_open(str(out / "model.safetensors"), "pt") as ref:
        assert torch.equal(ref.get_tensor(f"{name}.qweight"), f.get(f"{name}.qweight"))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_quantized_tied_lm_head_is_untied(arch, tiny_models, ids, tmp_path):
    out = tmp_path / "q"
    result = quantize(tiny_models[arch], out, scheme="w_int8_per_channel_sym", exclude_layers=[],
                      overrides=["lm_head:scheme=w_uint4_per_group_asym,group_size=16"],
                      keep_in_memory=True, progress=False, quiet=True)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["quantization_config"]["modules"]["lm_head"]["group_size"] == 16
    reloaded, _ = load(out)
    ref = AutoModelForCausalLM.from_pretrained(tiny_models[arch]).eval()
    emb = reloaded.get_input_embeddings().weight
    assert torch.equal(emb, ref.get_input_embeddings().weight)  # embeddings stay float
    assert not torch.equal(reloaded.get_output_embeddings().weight, emb)
    assert torch.equal(logits(result.model, ids), logits(reloaded, ids))


def test_overrides_are_applied(tiny_models, tmp_path):
    out = tmp_path / "q"
    quantize(tiny_models["qwen2"], out, scheme="w_uint4_per_group_asym", group_size=32,
             overrides=["down_proj:bits=8", "layers.1.self_attn.q_proj:scheme=w_int3_per_group_sym"],
             progress=False, quiet=True)
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    assert modules["model.layers.0.mlp.down_proj"]["bits"] == 8
    assert modules["model.layers.1.self_attn.q_proj"]["bits"] == 3
    assert modules["model.layers.1.self_attn.q_proj"]["signed"] is True
    assert modules["model.layers.0.self_attn.q_proj"]["bits"] == 4
    loaded = open_model(out)
    assert loaded.quantized["model.layers.0.mlp.down_proj"].bits == 8


@pytest.mark.parametrize("scheme,gs", [("w_int4_per_group_sym", 16), ("w_int8_per_tensor_sym", None),
                                       ("w_uint3_per_group_asym", 48), ("w_uint2_per_group_asym", 32),
                                       ("w_int6_per_channel_sym", None), ("w_fp8", None), ("w_mxfp4", None),
                                       ("w_mxfp6_e2m3", None), ("w_mxint8", None), ("w_mx6", None),
                                       ("w_bfp16", None), ("w_nvfp4", None), ("w_mxfp4_a_mxfp4", None),
                                       ("w_fp4_a_fp4_scale_fp8", None), ("w_mx9_a_mx9", None)])
def test_schemes_round_trip(scheme, gs, tiny_models, ids, tmp_path):
    out = tmp_path / "q"
    result = quantize(tiny_models["mistral"], out, scheme=scheme, group_size=gs, keep_in_memory=True,
                      progress=False, quiet=True)
    assert torch.equal(logits(result.model, ids), logits(load(out)[0], ids))


def test_bf16_source_keeps_dtype(tokenizer_dir, tmp_path, ids):
    from .conftest import make_tiny

    src = make_tiny("llama", tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    result = quantize(src, tmp_path / "q", scheme="w_uint4_per_group_asym", group_size=32, keep_in_memory=True,
                      progress=False, quiet=True)
    reloaded, _ = load(tmp_path / "q")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    # the in-memory model works in float32 (--calib-dtype) on the bfloat16-rounded values the folder stores
    assert next(result.model.parameters()).dtype == torch.float32
    widened, _ = load(tmp_path / "q", dtype="float32")
    assert torch.equal(logits(result.model, ids), logits(widened, ids))


def test_bf16_in_memory_and_reloaded_perplexity_agree(tokenizer_dir, tmp_path, text_file):
    from lowbit.api import evaluate

    from .conftest import make_tiny

    src = make_tiny("qwen2", tmp_path / "bf16", tokenizer_dir, dtype=torch.bfloat16)
    kw = dict(seq_len=64, max_chunks=3, progress=False)
    result = quantize(src, tmp_path / "q", scheme="w_int4_per_group_sym", group_size=32, evaluate_after=True,
                      eval_dataset=str(text_file), eval_seq_len=64, max_chunks=3, progress=False, quiet=True)
    reloaded = evaluate(tmp_path / "q", dataset=str(text_file), **kw)
    assert reloaded["dtype"] == "float32"
    assert reloaded["perplexity"] == pytest.approx(result.summary["perplexity"]["perplexity"], rel=1e-6)
    assert evaluate(src, dataset=str(text_file), dtype="auto", **kw)["dtype"] == "bfloat16"


def test_sharded_source_and_output(tiny_models, tmp_path, ids):
    from transformers import AutoModelForCausalLM as Auto

    src = tmp_path / "sharded"
    ref = Auto.from_pretrained(tiny_models["llama"])
    ref.save_pretrained(src, max_shard_size="100KB")
    for f in tiny_models["llama"].glob("tokenizer*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert (src / "model.safetensors.index.json").is_file()
    out = tmp_path / "q"
    from lowbit.exporters import native

    old = native.NativeSink.__init__.__defaults__
    native.NativeSink.__init__.__defaults__ = (50_000,)  # small shards for the test
    try:
        result = quantize(src, out, scheme="w_uint4_per_group_asym", group_size=32, keep_in_memory=True,
                          progress=False, quiet=True)
    finally:
        native.NativeSink.__init__.__defaults__ = old
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert torch.equal(logits(result.model, ids), logits(load(out)[0], ids))


@pytest.mark.parametrize("arch", ["llama", "phi3", "opt"])
def test_gptq_end_to_end(arch, tiny_models, ids, tmp_path, text_file):
    out = tmp_path / "q"
    result = quantize(tiny_models[arch], out, scheme="w_uint4_per_group_asym", group_size=16, algo="gptq",
                      dataset=str(text_file), num_calib_data=8, seq_len=32, keep_in_memory=True,
                      progress=False, quiet=True)
    assert torch.equal(logits(result.model, ids), logits(load(out)[0], ids))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithms"] == ["gptq"] and len(summary["calibration_sha256"]) == 64
    recipe = (out / "recipe.yaml").read_text()
    assert "gptq" in recipe and "act_order: true" in recipe


@pytest.mark.parametrize("algo", ["rtn", "smoothquant,gptq"])
def test_fp8_activations_and_kv_cache_round_trip(algo, tiny_models, ids, tmp_path):
    """w_fp8_a_fp8 with an FP8 KV cache: static input and K / V output scales are calibrated, stored and
    applied again on reload; the K / V projections' outputs are FP8 values times their scale."""
    out = tmp_path / "q"
    result = quantize(tiny_models["llama"], out, scheme="w_fp8_a_fp8", algo=algo, kv_cache_dtype="fp8",
                      num_calib_data=4, seq_len=64, keep_in_memory=True, progress=False, quiet=True)
    reloaded, _ = load(out)
    assert torch.equal(logits(result.model, ids), logits(reloaded, ids))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(qc["outputs"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kv"]
    assert len(qc["inputs"]) == len(qc["modules"])
    from safetensors.torch import load_file

    tensors = load_file(next(out.glob("*.safetensors")))
    k_scale = tensors["model.layers.0.self_attn.k_proj.output_scale"]
    seen = {}
    k_proj = reloaded.model.layers[0].self_attn.k_proj
    handle = k_proj.register_forward_hook(lambda m, a, o: seen.setdefault("k", o))
    reloaded(input_ids=ids)
    handle.remove()
    k = seen["k"] / k_scale  # on the FP8 grid, up to the float32 rounding of (v * scale) / scale
    assert torch.allclose(k, k.to(torch.float8_e4m3fn).float(), rtol=1e-6, atol=0)
    assert not torch.allclose(k, k.round(), rtol=1e-3)  # FP8, not integers
