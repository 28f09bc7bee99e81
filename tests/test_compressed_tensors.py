"""compressed-tensors export, checked with the real consumer: transformers + the compressed-tensors package
load the exported folder on CPU and must compute with lowbit's own dequantized weights (bit for bit, except
NVFP4, whose decoder rounds the weights to bfloat16), and every unsupported case is refused before writing."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32  # noqa: E402
from transformers import AutoModelForCausalLM, CompressedTensorsConfig  # noqa: E402

from lowbit.api import load, quantize  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.exporters.compressed_tensors import export_compressed_tensors, pack_int32_rows  # noqa: E402
from lowbit.hf.actquant import detach_output_quant  # noqa: E402
from lowbit.hf.checkpoint import LazyCheckpoint  # noqa: E402
from .conftest import save_random_model  # noqa: E402

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))
WEIGHT = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def llama64(tmp_path_factory, tokenizer_dir):
    """A tiny llama whose in_features (64, 128) are multiples of 32, for the MX formats' groups of 32."""
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=0, pad_token_id=1, eos_token_id=2)
    return save_random_model(config, tmp_path_factory.mktemp("llama64"), tokenizer_dir)


def load_ct(folder, dequantize: bool = False):
    """The export as transformers loads it (compressed-tensors decompresses it on CPU); no key may be off."""
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    with warnings.catch_warnings():  # transformers warns that it takes only `dequantize` from that config
        warnings.simplefilter("ignore", UserWarning)
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **extra)
    assert not any(info.values()), info
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# dequantize=True where transformers' default (decompress on first forward) cannot run these in float32:
# NVFP4 / MX decoders leave bfloat16 weights, and asymmetric group / channel zero points are not packed
# when compressed-tensors 0.20 builds the compressed model on the meta device
EXACT = [
    ("llama", "w_int4_per_group_sym", {"group_size": 16}, False),
    ("llama", "w_int3_per_group_sym", {"group_size": 16}, False),  # words that straddle elements
    ("llama", "w_uint4_per_group_asym", {"group_size": 16}, True),
    ("llama", "w_int8_per_channel_sym", {}, False),
    ("llama", "w_fp8", {}, False),
    ("llama", "w_fp8_a_fp8", {}, False),  # static FP8 input activations (input_scale) as well
    ("llama64", "w_mxfp4", {}, True),
    ("llama64", "w_mxfp6_e2m3", {}, True),
    ("llama64", "w_mxfp8", {}, True),
]


@pytest.mark.parametrize("model,scheme,kwargs,dequantize", EXACT, ids=[e[1] for e in EXACT])
def test_export_is_exact(model, scheme, kwargs, dequantize, tiny_models, llama64, lowbit_out, tmp_path):
    source = llama64 if model == "llama64" else tiny_models[model]
    src = lowbit_out(source, scheme, **kwargs)
    out = export_compressed_tensors(src, tmp_path / "ct")
    ct = load_ct(out, dequantize)
    ref = load(src)[0].eval()
    assert (logits(ct) - logits(ref)).abs().max().item() == 0.0
    assert torch.equal(ct.get_parameter(WEIGHT), ref.get_parameter(WEIGHT))  # decompressed by the forward pass


def test_nvfp4_equals_lowbit_rounded_to_bfloat16(tiny_models, lowbit_out, tmp_path):
    src = lowbit_out(tiny_models["llama"], "w_nvfp4")
    out = export_compressed_tensors(src, tmp_path / "ct")
    t = LazyCheckpoint(src).get("model.layers.0.mlp.down_proj.tensor_scale")
    assert torch.equal(LazyCheckpoint(out).get("model.layers.0.mlp.down_proj.weight_global_scale"), 1 / t)
    ct = load_ct(out, dequantize=True)
    ref = load(src)[0].eval()
    with torch.no_grad():  # the decoder computes scale / global in float32, then the weight in bfloat16
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                torch.testing.assert_close(ct.get_parameter(name), p.bfloat16().float(), rtol=2 ** -8, atol=0)
                p.copy_(p.bfloat16().float())
    # weights agree to at most one bfloat16 step (scale / (1 / t) vs scale * t can round apart); one such step
    # in one weight moves a logit by far less than 1e-3 on this model (measured: identical, 0.0)
    assert (logits(ct) - logits(ref)).abs().max().item() <= 1e-3


@pytest.fixture(scope="module")
def kv_export(tiny_models, tmp_path_factory):
    """(lowbit folder, its compressed-tensors export) of a W8A8 FP8 model with an FP8 KV cache."""
    tmp = tmp_path_factory.mktemp("kv")
    quantize(tiny_models["llama"], tmp / "lowbit", scheme="w_fp8_a_fp8", kv_cache_dtype="fp8", progress=False,
             quiet=True, num_calib_data=4, seq_len=64)
    return tmp / "lowbit", export_compressed_tensors(tmp / "lowbit", tmp / "ct")


def test_fp8_kv_cache_scales_in_the_file(kv_export):
    """The names and values every compressed-tensors consumer reads (vLLM, and transformers where compressed-tensors
    hooks the attention): `k_scale` / `v_scale` on the attention module, and a kv_cache_scheme that
    compressed-tensors' own QuantizationConfig parses."""
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_metadata import KVCacheScaleType

    src, out = kv_export
    ckpt, ct = LazyCheckpoint(src), LazyCheckpoint(out)
    for i in range(2):
        for kv, scale in (("k", KVCacheScaleType.KEY.value), ("v", KVCacheScaleType.VALUE.value)):
            stored = ckpt.get(f"model.layers.{i}.self_attn.{kv}_proj.output_scale")
            assert torch.equal(ct.get(f"model.layers.{i}.self_attn.{scale}"), stored.float().reshape(1))
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qconfig).kv_cache_scheme
    assert (parsed.num_bits, parsed.type, parsed.strategy, parsed.dynamic) == (8, "float", "tensor", False)


def _ct_hooks_attention() -> str | None:
    """Why the installed compressed-tensors cannot apply a KV-cache scheme in the installed transformers, or None.
    (compressed-tensors 0.20.1 looks for a `past_key_values` argument, which transformers 5.24 renamed `cache`.)"""
    import compressed_tensors
    import transformers
    from compressed_tensors.quantization.lifecycle.initialize import is_cached_attention_module
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    attention = LlamaAttention(LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1), 0)
    if is_cached_attention_module(attention):
        return None
    return (f"compressed-tensors {compressed_tensors.__version__} does not recognise transformers "
            f"{transformers.__version__}'s attention as cached, so transformers cannot load any KV-cache scale")


def test_fp8_kv_cache_scales_loaded_by_transformers(kv_export, monkeypatch):
    import compressed_tensors.modeling.kvcache as kvcache

    reason = _ct_hooks_attention()
    if reason:
        pytest.skip(reason)
    src, out = kv_export
    ckpt = LazyCheckpoint(src)
    ct = load_ct(out)
    for i, layer in enumerate(ct.model.layers):
        for kv in "kv":
            stored = ckpt.get(f"model.layers.{i}.self_attn.{kv}_proj.output_scale")
            assert torch.equal(getattr(layer.self_attn, f"{kv}_scale").detach(), stored)
    # compressed-tensors quantizes keys after RoPE and lowbit before it; the values are quantized alike
    ref = load(src)[0].eval()
    for layer in ref.model.layers:
        detach_output_quant(layer.self_attn.k_proj)
    quantize_kv = kvcache.forward_quantize
    monkeypatch.setattr(kvcache, "forward_quantize",
                        lambda module, x, base, args: x if base == "k" else quantize_kv(module, x, base, args))
    assert (logits(ct) - logits(ref)).abs().max().item() == 0.0


def test_pack_int32_rows_matches_compressed_tensors():
    g = torch.Generator().manual_seed(0)
    for bits in range(2, 9):
        for cols in (80, 37, 1):
            codes = torch.randint(0, 1 << bits, (5, cols), generator=g)
            expected = pack_to_int32((codes - (1 << (bits - 1))).to(torch.int8), bits)
            assert torch.equal(pack_int32_rows(codes, bits), expected), (bits, cols)


@pytest.mark.parametrize("scheme,kwargs,message", [
    ("w_int4_per_group_sym", {"group_size": 32}, "no partial last group"),  # 80 = 2 x 32 + 16
    ("w_mx6", {}, "block-floating-point"),
    ("w_bfp16", {}, "block-floating-point"),
    ("w_mxint8", {"group_size": 16}, "MXINT8"),
    ("w_mxfp6_e3m2", {"group_size": 16}, "MX formats are"),
    ("w_int8_a_int8_per_tensor_sym", {}, "only static per-tensor FP8 inputs"),
])
def test_refusals_write_nothing(scheme, kwargs, message, tiny_models, lowbit_out, tmp_path):
    src = lowbit_out(tiny_models["llama"], scheme, **kwargs)
    with pytest.raises(LowbitError, match=message):
        export_compressed_tensors(src, tmp_path / "ct")
    assert list(tmp_path.iterdir()) == []


def test_refuses_folders_it_cannot_read_or_replace(tiny_models, lowbit_out, tmp_path):
    with pytest.raises(LowbitError, match="not a lowbit output"):
        export_compressed_tensors(tiny_models["llama"], tmp_path / "ct")
    src = lowbit_out(tiny_models["llama"], "w_int4_per_group_sym", group_size=16)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(LowbitError, match="already exists"):
        export_compressed_tensors(src, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(LowbitError, match="is the source model"):
        export_compressed_tensors(src, src, overwrite=True)
    with pytest.raises(LowbitError, match="holds files lowbit does not write"):
        export_compressed_tensors(src, existing, overwrite=True)
    (existing / "keep.txt").unlink()
    export_compressed_tensors(src, existing, overwrite=True)
    assert (existing / "model.safetensors").is_file()
    export_compressed_tensors(src, existing, overwrite=True)  # an export is replaced by a new one
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_cli_export(tiny_models, lowbit_out, tmp_path, capsys):
    from lowbit.cli import main

    src = lowbit_out(tiny_models["llama"], "w_fp8")
    assert main(["export", str(src), "-f", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 0
    assert torch.equal(logits(load_ct(tmp_path / "ct")), logits(load(src)[0]))
    assert main(["export", str(src), "-f", "compressed-tensors", "-o", str(tmp_path / "ct")]) == 2
    assert "exists" in capsys.readouterr().err.strip().splitlines()[-1]
